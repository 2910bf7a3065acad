"""The neural reward mixture (reward.groups=mixture): its pure parts in closed form, its EM schedule, the
component models, and the whole run through the CLI on builtin:diverse_pairs (8 annotators, 16 pairs
each: a0..a5 of group A prefer "yes ...", b0 and b1 of group B the "no ..." twins)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from preftune.algorithms.reward_mixture import RewardMixture
from preftune.data.groups import assignment_accuracy
from preftune.losses.diverse import annotator_directions, mixture_log_likelihood, spherical_kmeans
from tests.conftest import assert_resume_equals_uninterrupted, cli, write_jsonl


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))


def test_annotator_directions_are_centred_unit_means():
    # a0: diffs (1, 0), (3, 0) -> mean (2, 0); a1: (0, 2); the mean over annotators (1, 1) is removed.
    diffs = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    d = annotator_directions(diffs, torch.tensor([0, 1, 0]), 3)  # a2 has no pairs
    s = 1 / math.sqrt(2)
    assert torch.allclose(d, torch.tensor([[s, -s], [-s, s], [0.0, 0.0]]), atol=1e-6)


def test_spherical_kmeans_splits_opposite_directions():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(16, generator=gen)
    points = torch.cat([u + 0.3 * torch.randn(6, 16, generator=gen), -u + 0.3 * torch.randn(2, 16, generator=gen)])
    assert spherical_kmeans(points, 2).tolist() == [0] * 6 + [1] * 2  # numbered by first member
    assert spherical_kmeans(points, 1).tolist() == [0] * 8
    assert spherical_kmeans(points, 2, seed=5).tolist() == [0] * 6 + [1] * 2
    with pytest.raises(ValueError, match="3 clusters for 2 points"):
        spherical_kmeans(points[:2], 3)


def test_mixture_log_likelihood_in_closed_form():
    # Two annotators, two components; pair log-likelihoods log σ(Δ) chosen by hand.
    ll = torch.tensor([[math.log(0.9), math.log(0.2)], [math.log(0.8), math.log(0.5)], [math.log(0.3), math.log(0.6)]])
    prior = torch.tensor([0.25, 0.75])
    got = mixture_log_likelihood(ll, torch.tensor([0, 0, 1]), 2, prior.log())
    want = math.log(0.25 * 0.9 * 0.8 + 0.75 * 0.2 * 0.5) + math.log(0.25 * 0.3 + 0.75 * 0.6)
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_assignment_accuracy_ignores_component_labels():
    groups = ["A", "A", "A", "B", "B"]
    assert assignment_accuracy(groups, [1, 1, 1, 0, 0]) == (1.0, {0: "B", 1: "A"})
    assert assignment_accuracy(groups, [0, 0, 0, 0, 0])[0] == pytest.approx(0.6)  # collapsed: the minority is lost
    assert assignment_accuracy(groups, [0, 0, 1, 1, 1])[0] == pytest.approx(0.8)


def test_em_schedule_start_then_e_steps_and_loss_weights():
    mix = RewardMixture(["a", "b", "c"], {"a": "A", "b": "A", "c": "B"}, 2, warmup_steps=2, interval_steps=3, seed=0)
    annotator = torch.tensor([0, 1, 2, 2])
    # Head 0 prefers every chosen completion by 2, head 1 the rejected by 2; a and b share c's opposite direction.
    chosen = torch.tensor([[1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, 1.0]])
    rejected = -chosen
    diffs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    calls = []

    def score(with_features):
        calls.append((mix.steps - 1, with_features))
        return chosen, rejected, annotator, diffs if with_features else None

    for _ in range(9):
        mix.before_step(score)
    assert calls == [(2, True), (5, False), (8, False)]  # start after the warm-up, then every 3 steps
    assert mix.start_components == [0, 0, 1]
    # E-step: γ[a, k] ∝ π_k Π σ(Δ_k); a: σ(2) vs σ(-2) under the prior of the step before.
    assert mix.components() == [0, 0, 1]
    prior = mix.log_prior.exp()
    p = F.logsigmoid(torch.tensor(2.0)).exp()
    assert float(mix.gamma[2, 1]) == pytest.approx(float(prior[1] * p**2 / (prior[1] * p**2 + prior[0] * (1 - p) ** 2)), rel=1e-3)
    assert [e["event"] for e in mix.trace] == ["start", "e_step", "e_step"]
    again = RewardMixture(["a", "b", "c"], {}, 2, warmup_steps=2, interval_steps=3, seed=0)
    again.load_state_dict(mix.state_dict())  # what a checkpoint carries: a resumed run continues the schedule
    assert torch.equal(again.gamma, mix.gamma) and again.steps == 9 and again.trace == mix.trace
    # The M-step loss: Σ_k γ[a_i, k] · −log σ(Δ_k); an unknown annotator (−1) is weighted by the prior.
    rewards = torch.cat([chosen[:2], rejected[:2]])
    loss, metrics = mix.loss(rewards, torch.tensor([0, -1]), 0.0)
    w = torch.stack([mix.gamma[0], prior])
    want = -(w * F.logsigmoid(chosen[:2] - rejected[:2])).sum()
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert set(metrics) >= {"accuracy", "component_accuracy/0", "component_accuracy/1"}


@pytest.mark.parametrize("lora", [False, True])
def test_component_classifier_scores_with_its_head(lora):
    from transformers import AutoModelForSequenceClassification

    from preftune.models.loading import load_model
    from preftune.models.lora import apply_lora
    from preftune.models.reward_head import component_classifier, sequence_rewards, sequence_scores

    model, _ = load_model("tiny-random-llama", model_class=AutoModelForSequenceClassification, num_labels=3, seed=0)
    if lora:
        model = apply_lora(model, r=4, dropout=0.0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # a non-zero adapter, so merging matters
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        scores = sequence_scores(model, ids, mask)
        for k in range(3):
            single = component_classifier(model, k)
            assert single.config.num_labels == 1
            assert torch.allclose(sequence_rewards(single, ids, mask), scores[:, k], atol=1e-5)
        assert torch.allclose(sequence_scores(model, ids, mask), scores)  # the shared model is unchanged
    with pytest.raises(ValueError, match="3 score heads"):
        sequence_rewards(model, ids, mask)


def test_mixture_through_cli_recovers_the_annotator_groups(tmp_path):
    from preftune.data.loaders import load_records
    from preftune.models.loading import ModelLoadError
    from preftune.rewards.model import RewardModel

    out = tmp_path / "mix"
    proc = cli("train", "configs/reward_mixture_tiny.yaml", f"output_dir={out}", "train.progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    em = json.loads((out / "em_components.json").read_text())
    assert em["assignment_accuracy"] >= 0.9 and len(em["annotators"]) == 8
    truth = {a: info["group"] for a, info in em["annotators"].items()}
    got = [em["annotators"][a]["component"] for a in sorted(truth)]
    assert assignment_accuracy([truth[a] for a in sorted(truth)], got)[0] == em["assignment_accuracy"]
    assert sorted(len(c["annotators"]) for c in em["components"].values()) == [2, 6]
    assert sum(em["prior"]) == pytest.approx(1.0) and len(em["log_likelihood"]) >= 2
    trace = [e["log_likelihood"] for e in em["log_likelihood"]]
    assert trace[-1] > trace[0]  # EM climbs
    report = json.loads((out / "reward_eval.json").read_text())
    for group, served in report["groups"].items():  # each group's component, on that group's held-out pairs
        assert served["chosen_by"] == "annotators" and served["accuracy"] >= 0.9, (group, served)
        assert report["components"][str(served["component"])]["groups"][group] == {
            k: served[k] for k in ("pairs", "accuracy", "margin")}
    assert report["groups"]["A"]["component"] != report["groups"]["B"]["component"]
    # Each component folder is a reward model like a per_group folder; OUTPUT_DIR is all of them.
    held = [r for r in load_records("builtin:diverse_pairs", "pairs") if r.group == "B"][:6]
    k = report["groups"]["B"]["component"]
    one = RewardModel.load(out / f"component-{k}")
    chosen, rejected = one([r.prompt for r in held], [r.chosen for r in held]), one([r.prompt for r in held], [r.rejected for r in held])
    assert all(c > r for c, r in zip(chosen.scores, rejected.scores))
    both = RewardModel.load(out)
    assert len(both.members) == 2 and json.loads((out / "ensemble.json").read_text())["members"][k] == f"component-{k}/model"
    with pytest.raises(ModelLoadError, match="a classifier with 2 outputs, a reward model has one; a reward mixture's shared model"):
        RewardModel.load(out / "model")  # the shared K-head model is no reward model


def test_mixture_refuses_rows_without_annotators_and_too_many_components(tmp_path):
    from preftune.config import ConfigError
    from preftune.data.loaders import load_records
    from preftune.data.records import DataError
    from preftune.run_config import load_run_config

    rows = [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no", "annotator": f"x{i % 2}"} for i in range(6)]
    rows[3] = {k: v for k, v in rows[3].items() if k != "annotator"}
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    proc = cli("train", "configs/reward_mixture_tiny.yaml", f"output_dir={tmp_path / 'a'}", f"data.path={bad}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}, row 4, field 'annotator': missing field" in proc.stderr
    run = load_run_config("configs/reward_mixture_tiny.yaml", ["reward.num_components=3"])
    records = load_records(str(bad), "pairs")
    del records[3]
    with pytest.raises(DataError) as err:
        RewardMixture.from_records(run.algo, records, str(bad), seed=0)
    assert f"{bad}, field 'annotator': reward.num_components=3 mixture components for 2 annotator(s) (x0, x1)" in str(err.value)
    with pytest.raises(ConfigError, match="reward.groups: mixture fits K Bradley-Terry heads on pairs"):
        load_run_config("configs/reward_mixture_tiny.yaml", ["reward.loss=plackett_luce"])


def test_mixture_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """The responsibilities, prior, log-likelihood trace and EM schedule travel in the checkpoint."""
    from preftune.run_config import load_run_config

    def cfg(name, *extra):
        return load_run_config("configs/reward_mixture_tiny.yaml", [
            f"output_dir={tmp_path / name}", "train.max_steps=8", "reward.em_warmup_steps=2", "reward.em_interval_steps=2",
            "train.save_steps=4", "train.eval_steps=0", "train.progress_bar=false", "data.max_rows=64", *extra])

    assert_resume_equals_uninterrupted(cfg, monkeypatch, crash_step=4)
    em = json.loads((tmp_path / "full" / "em_components.json").read_text())
    assert em == json.loads((tmp_path / "cut" / "em_components.json").read_text())
    assert [e["step"] for e in em["log_likelihood"]] == [2, 4, 6, 8]  # start, E-steps, the final E-step
