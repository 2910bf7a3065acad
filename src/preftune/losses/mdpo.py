"""mDPO: conditional preference optimisation for multimodal LLMs (Wang et al. 2024, "mDPO: Conditional
Preference Optimization for Multimodal Large Language Models", EMNLP 2024, arXiv:2406.11839, §3).

DPO on image-conditioned pairs can ignore the image: the chosen answer may be preferable from the
text alone, so the model learns a language prior ("unconditional preference"). mDPO adds two terms:

- CoPO, conditional preference (eq. 3): the chosen answer y_w should be more likely with the real
  image m than with a corrupted image m' (the paper keeps a random crop of under 20% of the image):

      L_CoPO = −log σ(β[(log π_θ(y_w|m,x) − log π_ref(y_w|m,x)) − (log π_θ(y_w|m',x) − log π_ref(y_w|m',x))])

- AncPO, anchored preference (eq. 4): the chosen reward must stay above an anchor δ, so that DPO's
  relative objective cannot lower the likelihood of both answers at once:

      L_AncPO = −log σ(β(log π_θ(y_w|m,x) − log π_ref(y_w|m,x)) − δ)

and the objective (eq. 5) is L_mDPO = L_DPO(y_w, y_l | m, x) + L_CoPO + L_AncPO. The paper weighs the
three terms equally and uses δ = 0 (as its released trainer does); here λ_c and λ_a weigh the two
added terms, so λ_c = λ_a = 0 is DPO on image-conditioned pairs.

Every function is pure: per-row tensors Tensor[B] of summed log-probs in, ``(losses [B], metrics)``
out, metrics being detached per-row values (see ``losses/preference.py`` for the conventions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.preference import Metrics, dpo_loss


def conditional_preference_loss(
    policy_chosen_logps: Tensor,
    policy_corrupted_chosen_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_corrupted_chosen_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """CoPO (mDPO eq. 3): DPO between the chosen answer under the real image m and the same answer
    under the corrupted image m'. ln 2 at π_θ = π_ref.

    Args:
        policy_chosen_logps, reference_chosen_logps: Tensor[B], log π(y_w | m, x).
        policy_corrupted_chosen_logps, reference_corrupted_chosen_logps: Tensor[B], log π(y_w | m', x).
        beta: β, as in DPO.
    Returns:
        losses [B]; metrics ``corrupted_rewards`` β(log π_θ − log π_ref)(y_w | m'),
        ``copo_margins`` (chosen reward − corrupted reward) and ``copo_accuracies`` (margin > 0).
    """
    chosen = beta * (policy_chosen_logps - reference_chosen_logps)
    corrupted = beta * (policy_corrupted_chosen_logps - reference_corrupted_chosen_logps)
    losses = -F.logsigmoid(chosen - corrupted)
    margins = (chosen - corrupted).detach()
    dtype = torch.promote_types(margins.dtype, torch.float32)  # indicator sums: never in bf16
    return losses, {"corrupted_rewards": corrupted.detach(), "copo_margins": margins,
                    "copo_accuracies": (margins > 0).to(dtype)}  # fmt: skip


def anchored_preference_loss(
    policy_chosen_logps: Tensor,
    reference_chosen_logps: Tensor,
    *,
    beta: float,
    delta: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """AncPO (mDPO eq. 4): −log σ(β(log π_θ(y_w|m,x) − log π_ref(y_w|m,x)) − δ), a push of the chosen
    reward above the anchor δ. At π_θ = π_ref it is log(1 + e^δ) (ln 2 for δ = 0).

    Returns: losses [B]; metrics ``anchor_margins`` = chosen reward − δ.
    """
    z = beta * (policy_chosen_logps - reference_chosen_logps) - delta
    return -F.logsigmoid(z), {"anchor_margins": z.detach()}


def mdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    policy_corrupted_chosen_logps: Tensor | None,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    reference_corrupted_chosen_logps: Tensor | None,
    *,
    beta: float,
    copo_weight: float = 1.0,
    anchor_weight: float = 1.0,
    delta: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """mDPO (eq. 5): L_DPO(y_w, y_l | m, x) + λ_c·L_CoPO + λ_a·L_AncPO, per row.

    Args:
        policy_*_logps, reference_*_logps: Tensor[B] summed log-probs; chosen/rejected under the real
            image m, corrupted_chosen = the chosen answer under the corrupted image m'. The corrupted
            ones may be None when ``copo_weight == 0`` (then they are never computed).
        beta: β of all three terms (the paper shares it).
        copo_weight, anchor_weight: λ_c, λ_a (1 and 1 in the paper). 0 and 0 give DPO exactly.
        delta: δ, the anchor of AncPO (0 in the paper).
    Returns:
        losses [B]; metrics: DPO's (``chosen_rewards``, ``rejected_rewards``, ``margins``,
        ``accuracies``, ``grad_weights``), each term's per-row loss ``dpo_losses``, ``copo_losses``,
        ``anchor_losses``, plus CoPO's and AncPO's metrics. At π_θ = π_ref with δ = 0 each term is
        ln 2, so the loss is (1 + λ_c + λ_a)·ln 2.
    """
    losses, metrics = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta=beta
    )
    metrics["dpo_losses"] = losses.detach()
    if copo_weight != 0:
        if policy_corrupted_chosen_logps is None or reference_corrupted_chosen_logps is None:
            raise ValueError("copo_weight != 0 needs the log-probs of the chosen answer under the corrupted image")
        copo, copo_metrics = conditional_preference_loss(
            policy_chosen_logps, policy_corrupted_chosen_logps, reference_chosen_logps,
            reference_corrupted_chosen_logps, beta=beta,
        )  # fmt: skip
        losses = losses + copo_weight * copo
        metrics.update(copo_metrics, copo_losses=copo.detach())
    if anchor_weight != 0:
        anchor, anchor_metrics = anchored_preference_loss(
            policy_chosen_logps, reference_chosen_logps, beta=beta, delta=delta
        )
        losses = losses + anchor_weight * anchor
        metrics.update(anchor_metrics, anchor_losses=anchor.detach())
    return losses, metrics
