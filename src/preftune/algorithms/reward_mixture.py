"""``reward.groups=mixture``: K neural Bradley–Terry reward models fitted by EM when the annotators'
groups are unknown (Chakraborty et al. 2024, "MaxMin-RLHF", §4, Algorithm 1), on one shared backbone.

    model    one backbone (full or LoRA) with K scalar heads: a K-label sequence classifier
    warm-up  ``reward.em_warmup_steps`` optimizer steps of pooled BT (every head on every pair)
    start    each annotator's preferred direction in the backbone's feature space, mean h(y_w) − h(y_l)
             over their pairs (``losses.diverse.annotator_directions``), split into K by spherical
             k-means: responsibilities 0.9 on the annotator's cluster. This breaks the symmetry of the
             heads, which the warm-up trained alike (an earlier design, one network told a latent
             component in its prompt, collapsed into a single component on builtin:diverse_pairs)
    E-step   every ``reward.em_interval_steps`` steps, over all training pairs:
             γ[a, k] ∝ π_k · Π_{pairs i of a} σ(r_k(x_i, y_w) − r_k(x_i, y_l)), π = mean_a γ[a]
             (``losses.diverse.mixture_responsibilities``)
    M-step   the optimizer steps in between: Σ_k γ[a_i, k] · −log σ(r_k(y_w) − r_k(y_l)) per pair
             (``losses.diverse.weighted_bradley_terry_loss``); a pair of an annotator the training data
             lacks (held-out rows) is weighted by the prior π
    output   OUTPUT_DIR/component-k/ (a one-label reward model each, loaded and scored like a per_group
             folder), OUTPUT_DIR/ensemble.json (all components as one reward, ``reward.combine``: e.g.
             ``min`` is MaxMin-RLHF's egalitarian reward), em_components.json, reward_eval.json
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.algorithms.reward_report import REPORT_FILE
from preftune.data.groups import assignment_accuracy, group_names, warn_single_label_annotators
from preftune.data.records import DataError
from preftune.losses.diverse import (
    annotator_directions,
    mixture_log_likelihood,
    mixture_responsibilities,
    spherical_kmeans,
    weighted_bradley_terry_loss,
)
from preftune.losses.metrics import row_metrics
from preftune.losses.reward import centering_penalty
from preftune.models.cache import write_json
from preftune.models.loading import save_model
from preftune.models.reward_head import component_classifier, sequence_scores
from preftune.rewards.evaluation import json_ready
from preftune.rewards.model import ENSEMBLE_FILE, RewardMember, RewardModel, ScoreSpec

log = logging.getLogger("preftune.algorithms")

EM_FILE = "em_components.json"
START_CONFIDENCE = 0.9  # responsibility of an annotator's k-means cluster at the start (the rest spread evenly)


class RewardMixture:
    """The EM state of a mixture run: the annotators, their responsibilities γ[A, K], the prior π, the
    log-likelihood trace and the step count (all in every checkpoint, so a resumed run continues exactly)."""

    def __init__(self, annotators: list[str], groups: dict[str, str | None], num_components: int, *,
                 warmup_steps: int, interval_steps: int, seed: int):
        self.annotators, self.groups, self.k = annotators, groups, num_components
        self.index = {a: i for i, a in enumerate(annotators)}
        self.warmup_steps, self.interval_steps, self.seed = warmup_steps, interval_steps, seed
        self.gamma = torch.full((len(annotators), num_components), 1.0 / num_components)
        self.log_prior = torch.full((num_components,), -math.log(num_components))
        self.trace: list[dict] = []
        self.steps = 0
        self.start_components: list[int] | None = None

    @classmethod
    def from_records(cls, config, records: list, source: str, seed: int) -> "RewardMixture":
        """The annotators of the training records; every row needs one, and K may not exceed them."""
        names = group_names(records, source, key="annotator", min_groups=1)
        if config.num_components > len(names):
            raise DataError(f"reward.num_components={config.num_components} mixture components for {len(names)} "
                            f"annotator(s) ({', '.join(names)}): each component needs annotators of its own; use at "
                            f"most {len(names)}", source=source, field="annotator")
        warn_single_label_annotators(records, source)
        groups = {a: None for a in names}
        for rec in records:
            groups[rec.annotator] = groups[rec.annotator] or getattr(rec, "group", None)
        return cls(names, groups, config.num_components, warmup_steps=config.em_warmup_steps,
                   interval_steps=config.em_interval_steps, seed=seed)

    def annotator_ids(self, records: list) -> list[int]:
        """Each record's annotator index, −1 for an annotator the training data lacks (or none)."""
        return [self.index.get(getattr(r, "annotator", None), -1) for r in records]

    def weights(self, annotator: Tensor) -> Tensor:
        """Tensor[B, K]: each pair's responsibilities (its annotator's γ; the prior π for unknown ones)."""
        gamma, prior = self.gamma.to(annotator.device), self.log_prior.exp().to(annotator.device)
        return torch.where((annotator >= 0)[:, None], gamma[annotator.clamp(min=0)], prior)

    # -- EM ------------------------------------------------------------------------------------
    def before_step(self, score: Callable[[bool], tuple]) -> None:
        """Called once per optimizer step; starts the mixture after the warm-up, then E-steps.
        ``score(with_features)`` -> (chosen [N, K], rejected [N, K], annotator [N], feature diffs [N, H] or None)."""
        step, self.steps = self.steps, self.steps + 1
        if step < self.warmup_steps or (step - self.warmup_steps) % self.interval_steps:
            return
        if self.start_components is None:
            self.start(*score(True))
        else:
            self.e_step(*score(False)[:3], step=step)

    def start(self, chosen: Tensor, rejected: Tensor, annotator: Tensor, feature_diffs: Tensor) -> None:
        """Hard-ish responsibilities from k-means on the annotators' preferred directions."""
        directions = annotator_directions(feature_diffs.float(), annotator, len(self.annotators))
        labels = spherical_kmeans(directions, self.k, seed=self.seed)
        self.start_components = labels.tolist()
        rest = (1 - START_CONFIDENCE) / max(self.k - 1, 1)
        self.gamma = torch.full((len(self.annotators), self.k), rest).scatter_(1, labels[:, None], START_CONFIDENCE)
        self.log_prior = self.gamma.mean(0).log()
        self._record(chosen, rejected, annotator, step=self.steps - 1, event="start")
        log.info("reward mixture: started from k-means on the annotators' directions: %s",
                 {a: c for a, c in zip(self.annotators, self.start_components)})

    def e_step(self, chosen: Tensor, rejected: Tensor, annotator: Tensor, *, step: int) -> None:
        loglik = F.logsigmoid(chosen.float() - rejected.float())
        self.gamma = mixture_responsibilities(loglik, annotator, len(self.annotators), self.log_prior)
        self.log_prior = self.gamma.mean(0).clamp(min=1e-6).log()
        self._record(chosen, rejected, annotator, step=step, event="e_step")

    def _record(self, chosen, rejected, annotator, *, step: int, event: str) -> None:
        loglik = F.logsigmoid(chosen.float() - rejected.float())
        value = float(mixture_log_likelihood(loglik, annotator, len(self.annotators), self.log_prior))
        self.trace.append({"step": step, "event": event, "log_likelihood": value, "prior": self.log_prior.exp().tolist()})

    # -- loss ----------------------------------------------------------------------------------
    def loss(self, rewards: Tensor, annotator: Tensor, centering_coef: float) -> tuple[Tensor, dict]:
        """rewards: Tensor[2B, K] (chosen rows, then rejected). Returns (summed loss, metrics)."""
        b = rewards.shape[0] // 2
        chosen, rejected, w = rewards[:b], rewards[b:], self.weights(annotator)
        losses, m = weighted_bradley_terry_loss(chosen, rejected, w)
        correct = (chosen > rejected).float()
        metrics = row_metrics({"accuracy": (w * correct).sum(-1), "margin": (w * (chosen - rejected)).sum(-1),
                               "log_likelihood": (w * m["log_likelihood"]).sum(-1), "rewards/mean": rewards})
        for k in range(self.k):
            metrics[f"component_accuracy/{k}"] = ((w[:, k] * correct[:, k]).sum(), w[:, k].sum())
        per_pair = losses.sum(-1)
        if centering_coef > 0:
            penalty = (w * centering_penalty(torch.stack([chosen, rejected], -1), centering_coef)).sum(-1)
            per_pair = per_pair + penalty
            metrics.update(row_metrics({"centering": penalty}))
        return per_pair.sum(), metrics

    # -- state and report ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"gamma": self.gamma.clone(), "log_prior": self.log_prior.clone(), "trace": list(self.trace),
                "steps": self.steps, "start_components": self.start_components}

    def load_state_dict(self, state: dict) -> None:
        self.gamma, self.log_prior = state["gamma"].clone(), state["log_prior"].clone()
        self.trace, self.steps, self.start_components = list(state["trace"]), state["steps"], state["start_components"]

    def components(self) -> list[int]:
        """Each annotator's component: the one of highest responsibility."""
        return self.gamma.argmax(-1).tolist()

    def report(self) -> dict:
        """em_components.json: per annotator γ and component, per component its annotators and prior."""
        assigned, prior = self.components(), self.log_prior.exp().tolist()
        out = {"num_components": self.k, "prior": prior, "log_likelihood": self.trace,
               "annotators": {a: {"component": c, "responsibilities": g, "start_component": s,
                                  **({"group": self.groups[a]} if self.groups[a] is not None else {})}
                              for a, c, g, s in zip(self.annotators, assigned, self.gamma.tolist(),
                                                    self.start_components or [None] * len(assigned))},
               "components": {str(k): {"annotators": [a for a, c in zip(self.annotators, assigned) if c == k],
                                       "prior": prior[k]} for k in range(self.k)}}
        if all(g is not None for g in self.groups.values()):
            accuracy, names = assignment_accuracy([self.groups[a] for a in self.annotators], assigned)
            out["assignment_accuracy"] = accuracy
            for k, name in names.items():
                out["components"][str(k)]["majority_group"] = name
        return out

    def group_components(self) -> dict[str, int]:
        """Group -> the component most of its annotators fall in (training rows that carry groups)."""
        votes: dict[str, list[int]] = {}
        for a, c in zip(self.annotators, self.components()):
            if self.groups[a] is not None:
                votes.setdefault(self.groups[a], []).append(c)
        return {g: max(set(cs), key=lambda c: (cs.count(c), -c)) for g, cs in votes.items()}


@torch.no_grad()
def score_pairs(model, examples: list[dict], collate, batch_size: int, with_features: bool) -> tuple:
    """Every head's rewards on every pair of ``examples`` (in order), without gradients, in eval mode:
    (chosen Tensor[N, K], rejected Tensor[N, K], annotator LongTensor[N], h(y_w) − h(y_l) Tensor[N, H] or None)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen, rejected, diffs, annotator = [], [], [], []
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
            out = sequence_scores(model, batch["input_ids"], batch["attention_mask"], with_features=with_features)
            scores, feats = out if with_features else (out, None)
            b = scores.shape[0] // 2
            chosen.append(scores[:b].float().cpu())
            rejected.append(scores[b:].float().cpu())
            annotator.append(batch["annotator"].cpu())
            if with_features:
                diffs.append((feats[:b] - feats[b:]).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected), torch.cat(annotator), torch.cat(diffs) if with_features else None


def component_report(mixture: RewardMixture, reports: list[dict], split: str) -> dict:
    """reward_eval.json of a mixture run: each component's held-out accuracy (per group when pairs carry
    groups) and, per group, the component serving it (most of its annotators; else its best component on
    the held-out pairs, flagged) with that component's numbers."""
    em = mixture.report()
    components = {str(k): {"annotators": em["components"][str(k)]["annotators"], "prior": em["prior"][k],
                           "pairs": r["pairs"], "accuracy": r["accuracy"], "groups": r.get("groups", {})}
                  for k, r in enumerate(reports)}
    by_annotators = mixture.group_components()
    groups = {}
    for g in sorted({g for r in reports for g in r.get("groups", {})}):
        k = by_annotators.get(g)
        chosen_by = "annotators"
        if k is None:
            k, chosen_by = max(range(len(reports)), key=lambda j: reports[j]["groups"][g]["accuracy"]), "held-out accuracy"
        groups[g] = {"component": k, "chosen_by": chosen_by, **reports[k]["groups"][g]}
    if groups:  # each group's pairs scored by the component serving it
        served = sum(v["accuracy"] * v["pairs"] for v in groups.values()) / sum(v["pairs"] for v in groups.values())
    else:
        served = max(r["accuracy"] for r in reports)
    return {"split": split, "num_components": mixture.k, "accuracy": served, "pairs": reports[0]["pairs"],
            "components": components, "groups": groups, "assignment_accuracy": em.get("assignment_accuracy")}


def save_components(policy, tokenizer, spec: ScoreSpec, mixture: RewardMixture, out_root: Path,
                    report: Callable[[RewardModel], dict], combine: str, combine_k: float) -> dict:
    """OUTPUT_DIR/component-k/{model, reward_eval.json} per head, ensemble.json naming them (scored together
    with ``combine``), em_components.json and the mixture's reward_eval.json (returned)."""
    reports = []
    for k in range(mixture.k):
        single = component_classifier(policy, k)
        folder = Path(out_root) / f"component-{k}"
        r = report(RewardModel([RewardMember(single, tokenizer, spec)]))
        save_model(single, tokenizer, folder / "model")
        ScoreSpec(**{**asdict(spec), "offset": r["rewards"].get("mean", 0.0)}).save(folder / "model")
        write_json(folder / REPORT_FILE, json_ready(r), default=str)
        reports.append(r)
        del single
    members = [f"component-{k}/model" for k in range(mixture.k)]
    write_json(Path(out_root) / ENSEMBLE_FILE, {"members": members, "combine": combine, "k": combine_k})
    write_json(Path(out_root) / EM_FILE, json_ready(mixture.report()), default=str)
    result = component_report(mixture, reports, reports[0]["split"])
    write_json(Path(out_root) / REPORT_FILE, json_ready(result), default=str)
    return result
