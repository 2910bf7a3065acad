"""DPO and its family: each variant = a loss from preftune.losses.preference + what it needs.

DPO (Rafailov et al. 2023), cDPO (label smoothing), robust DPO (Chowdhury et al. 2024), IPO (Azar et
al. 2023), hinge / SLiC (Zhao et al. 2023), reference-free DPO, SimPO (Meng et al. 2024), ORPO (Hong et
al. 2024), RPO (Pang et al. 2024), DPO-Positive (Pal et al. 2024) and the unlikelihood baseline (seed
000). All share one concatenated forward and the reference handling of algorithms/pairwise.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from preftune.algorithms.base import Needs
from preftune.algorithms.pairwise import PairsConfig, PairwiseAlgorithm, PairwiseConfig
from preftune.config import ConfigError, check_range, doc, shared
from preftune.losses import preference as L

NO_REFERENCE = Needs(data_kind="pairs", loss_unit="row", reference_model=False)


@dataclass
class DPOConfig(PairwiseConfig):
    beta: float = shared("beta")

    def validate(self, path: str) -> None:
        check_range(path, self, positive=("beta",))


@dataclass
class SmoothedDPOConfig(PairwiseConfig):
    beta: float = shared("beta")
    label_smoothing: float = doc(0.1, "ε: assumed fraction of preference labels that are flipped, in [0, 0.5).")

    def validate(self, path: str) -> None:
        check_range(path, self, positive=("beta",))
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{path}.label_smoothing: must lie in [0, 0.5), got {self.label_smoothing}")


@dataclass
class IPOConfig(PairwiseConfig):
    tau: float = doc(0.1, "τ: regularisation; the loss pulls the length-averaged log-ratio gap to 1/(2τ).")

    def validate(self, path: str) -> None:
        check_range(path, self, positive=("tau",))


@dataclass
class ReferenceFreeConfig(PairsConfig):
    beta: float = doc(0.1, "β: scale of the implicit reward β·log π(y|x) (the reference is uniform).")

    def validate(self, path: str) -> None:
        check_range(path, self, positive=("beta",))


@dataclass
class SimPOConfig(PairsConfig):
    beta: float = doc(2.0, "β: scale of the length-normalised implicit reward (the paper uses 2-10).")
    gamma: float = doc(1.0, "γ: target reward margin (absolute, not γ/β).")

    def validate(self, path: str) -> None:
        check_range(path, self, positive=("beta",), non_negative=("gamma",))


@dataclass
class ORPOConfig(PairsConfig):
    lam: float = doc(0.1, "λ: weight of the odds-ratio term added to the SFT loss on the chosen completion.")

    def validate(self, path: str) -> None:
        check_range(path, self, non_negative=("lam",))


@dataclass
class UnlikelihoodConfig(PairsConfig):
    alpha: float = doc(1.0, "α: weight of the unlikelihood term −log(1 − p) on rejected tokens.")

    def validate(self, path: str) -> None:
        check_range(path, self, non_negative=("alpha",))


class DPO(PairwiseAlgorithm):
    """DPO (Rafailov et al. 2023, eq. 7): logistic loss on the implicit reward margin."""

    name = "dpo"
    Config = DPOConfig

    @classmethod
    def first_loss(cls, config):
        return math.log(2)  # σ(0): policy = reference

    def loss(self, batch, out, logps):
        return L.dpo_loss(*logps, beta=self.config.beta)


class CDPO(PairwiseAlgorithm):
    """Conservative DPO: DPO with label smoothing ε (labels assumed flipped with probability ε)."""

    name = "cdpo"
    Config = SmoothedDPOConfig

    @classmethod
    def first_loss(cls, config):
        return math.log(2)  # σ(0): policy = reference

    def loss(self, batch, out, logps):
        return L.cdpo_loss(*logps, beta=self.config.beta, label_smoothing=self.config.label_smoothing)


class RobustDPO(PairwiseAlgorithm):
    """Robust DPO (Chowdhury et al. 2024): unbiased DPO loss under a known label-flip rate ε."""

    name = "robust_dpo"
    Config = SmoothedDPOConfig

    @classmethod
    def first_loss(cls, config):
        return math.log(2)  # σ(0): policy = reference

    def loss(self, batch, out, logps):
        return L.robust_dpo_loss(*logps, beta=self.config.beta, label_smoothing=self.config.label_smoothing)


class IPO(PairwiseAlgorithm):
    """IPO (Azar et al. 2023): squared loss pulling the averaged log-ratio gap to 1/(2τ)."""

    name = "ipo"
    Config = IPOConfig
    needs = Needs(data_kind="pairs", loss_unit="row", reference_model=True, length_averaged=True)

    @classmethod
    def first_loss(cls, config):
        return (1 / (2 * config.tau)) ** 2  # (h − 1/(2τ))² at h = 0

    def loss(self, batch, out, logps):
        return L.ipo_loss(*logps, tau=self.config.tau)


class Hinge(PairwiseAlgorithm):
    """Hinge / SLiC-HF (Zhao et al. 2023): max(0, 1 − β·margin)."""

    name = "hinge"
    Config = DPOConfig

    @classmethod
    def first_loss(cls, config):
        return 1.0  # relu(1 − β·0)

    def loss(self, batch, out, logps):
        return L.hinge_loss(*logps, beta=self.config.beta)


class ReferenceFreeDPO(PairwiseAlgorithm):
    """Reference-free DPO: DPO with a uniform reference policy."""

    name = "ref_free_dpo"
    Config = ReferenceFreeConfig
    needs = NO_REFERENCE

    def loss(self, batch, out, logps):
        return L.reference_free_dpo_loss(logps.policy_chosen_logps, logps.policy_rejected_logps, beta=self.config.beta)


class SimPO(PairwiseAlgorithm):
    """SimPO (Meng et al. 2024): reference-free, length-normalised, target margin γ."""

    name = "simpo"
    Config = SimPOConfig
    needs = Needs(data_kind="pairs", loss_unit="row", reference_model=False, length_averaged=True)

    def loss(self, batch, out, logps):
        return L.simpo_loss(logps.policy_chosen_logps, logps.policy_rejected_logps, beta=self.config.beta, gamma=self.config.gamma)


class ORPO(PairwiseAlgorithm):
    """ORPO (Hong et al. 2024): SFT loss on the chosen answer + λ·odds-ratio term."""

    name = "orpo"
    Config = ORPOConfig
    needs = Needs(data_kind="pairs", loss_unit="row", reference_model=False, length_averaged=True)

    def loss(self, batch, out, logps):
        return L.orpo_loss(logps.policy_chosen_logps, logps.policy_rejected_logps, -logps.policy_chosen_logps, lam=self.config.lam)  # the mean chosen log-prob: − it = mean NLL


class Unlikelihood(PairwiseAlgorithm):
    """Unlikelihood baseline (seed 000): raise log p(y_w), push down each token of y_l; degenerates."""

    name = "unlikelihood"
    Config = UnlikelihoodConfig
    needs = NO_REFERENCE

    def loss(self, batch, out, logps):
        return L.unlikelihood_loss(
            out["chosen_per_token_logps"], out["chosen_mask"], out["rejected_per_token_logps"], out["rejected_mask"],
            alpha=self.config.alpha,
        )



@dataclass
class RPOConfig(PairwiseConfig):
    beta: float = shared("beta")
    alpha: float = doc(1.0, "α: weight of the length-normalised NLL of the chosen response added to the DPO loss.")

    def validate(self, path: str) -> None:
        check_range(path, self, positive=("beta",), non_negative=("alpha",))


@dataclass
class DPOPConfig(PairwiseConfig):
    beta: float = shared("beta")
    lam: float = doc(50.0, "λ: weight of the penalty max(0, log π_ref(y_w) − log π_θ(y_w)) inside the sigmoid.")

    def validate(self, path: str) -> None:
        check_range(path, self, positive=("beta",), non_negative=("lam",))


class RPO(PairwiseAlgorithm):
    """RPO (Pang et al. 2024): DPO + α · NLL per token of the chosen response."""

    name = "rpo"
    Config = RPOConfig

    def loss(self, batch, out, logps):
        nll = -logps.policy_chosen_logps / out["chosen_lengths"].clamp(min=1)  # the summed chosen log-prob
        return L.rpo_loss(*logps, nll, beta=self.config.beta, alpha=self.config.alpha)


class DPOP(PairwiseAlgorithm):
    """DPO-Positive (Pal et al. 2024): DPO with a penalty when log π(y_w) falls below the reference's."""

    name = "dpop"
    Config = DPOPConfig

    @classmethod
    def first_loss(cls, config):
        return math.log(2)  # σ(0): policy = reference

    def loss(self, batch, out, logps):
        return L.dpop_loss(*logps, beta=self.config.beta, lam=self.config.lam)
