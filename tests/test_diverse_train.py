"""Group-aware reward models and policies through the CLI, on the built-in pairs of two groups with
opposite tastes (group A: 96 pairs preferring "yes ...", group B: 32 pairs preferring "no ...")."""

import json
import math

import pytest

from tests.conftest import assert_resume_equals_uninterrupted, cli, write_jsonl


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))


def test_conditioned_reward_model_serves_both_groups_where_pooled_fails_the_minority(tmp_path):
    accuracy = {}
    for mode in ("pooled", "conditioned"):
        out = tmp_path / mode
        proc = cli("train", "configs/reward_conditioned_tiny.yaml", f"output_dir={out}", f"reward.groups={mode}", "train.progress_bar=false")
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "reward_eval.json").read_text())
        assert report["split"] == "held-out"
        accuracy[mode] = {g: v["accuracy"] for g, v in report["groups"].items()}
        assert sum(v["pairs"] for v in report["groups"].values()) == report["pairs"] == 32
    assert accuracy["conditioned"]["A"] >= 0.9 and accuracy["conditioned"]["B"] >= 0.9
    assert accuracy["pooled"]["A"] >= 0.9 and accuracy["pooled"]["B"] <= 0.5  # the minority is served at chance or worse


def test_grdpo_logs_weights_that_follow_the_worst_group(tmp_path):
    out = tmp_path / "grdpo"
    proc = cli("train", "configs/grdpo.yaml", "model.name=tiny-random-llama", f"output_dir={out}", "data.max_length=64",
               "train.max_steps=6", "train.micro_batch_size=8", "train.grad_accum_steps=2", "train.learning_rate=1e-3",
               "train.progress_bar=false", "grdpo.step_size=2.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ms = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(ms) == 6 and ms[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference
    assert ms[0]["group_weight/A"] == ms[0]["group_weight/B"] == pytest.approx(0.5)
    for prev, cur in zip(ms, ms[1:]):
        # α ← α·exp(η·L_g), normalised, from the previous step's group losses (η = 2).
        a, b = prev["group_weight/A"] * math.exp(2 * prev["group_loss/A"]), prev["group_weight/B"] * math.exp(2 * prev["group_loss/B"])
        assert cur["group_weight/A"] == pytest.approx(a / (a + b), rel=1e-4)
        assert cur["group_weight/A"] + cur["group_weight/B"] == pytest.approx(1.0)
    saved = json.loads((out / "model" / "group_weights.json").read_text())["group_weights"]
    assert set(saved) == {"A", "B"} and sum(saved.values()) == pytest.approx(1.0)


def test_group_conditioned_dpo_through_cli(tmp_path):
    out = tmp_path / "dpo"
    proc = cli("train", "configs/dpo_group_conditioned_tiny.yaml", f"output_dir={out}", "train.max_steps=4", "train.progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ms = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert ms[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert (out / "model" / "config.json").is_file()


def test_group_aware_runs_refuse_bad_groups(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no", "group": "A"} for i in range(4)])
    proc = cli("train", "configs/reward_conditioned_tiny.yaml", f"output_dir={tmp_path / 'r'}", f"data.path={one}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{one}, field 'group': the 'group' column has 1 distinct value(s) ('A')" in proc.stderr
    proc = cli("train", "configs/grdpo.yaml", "model.name=tiny-random-llama", f"output_dir={tmp_path / 'g1'}", f"data.path={one}",
               "data.max_length=64", "train.max_steps=1")
    assert proc.returncode == 0 and f"{one}, field 'group': one group ('A'), so grdpo is DPO" in proc.stderr  # a warning
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no", "group": "AB"[i % 2]} for i in range(8)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejected": " no", "group": "C"}])
    proc = cli("train", "configs/grdpo.yaml", "model.name=tiny-random-llama", f"output_dir={tmp_path / 'g'}", f"data.path={train}",
               f"data.eval_path={held}", "data.max_length=64", "train.max_steps=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{held}, row 1, field 'group': group 'C' does not occur in the training data (groups: A, B)" in proc.stderr


def test_per_group_reward_models_train_one_model_per_group(tmp_path):
    out = tmp_path / "per-group"
    proc = cli("train", "configs/reward_conditioned_tiny.yaml", f"output_dir={out}", "reward.groups=per_group",
               "train.max_steps=30", "train.eval_steps=30", "train.progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for group in ("A", "B"):
        report = json.loads((out / f"group-{group}" / "reward_eval.json").read_text())
        assert list(report["groups"]) == [group]  # trained and evaluated on its own group's pairs only
        assert report["groups"][group]["accuracy"] >= 0.9


def test_grdpo_accumulation_invariance(tmp_path):
    """micro 8 x accumulation 1 == micro 2 x accumulation 4: same losses, group weights and final weights."""
    import torch
    from safetensors.torch import load_file

    import preftune.train.loop as loop_mod
    from preftune.run_config import load_run_config
    from preftune.train.metrics import read_metrics

    def run(name, micro, accum):
        return loop_mod.train(load_run_config(None, [
            "algorithm=grdpo", f"output_dir={tmp_path / name}", "model.name=tiny-random-llama", "data.path=builtin:diverse_pairs",
            "data.max_length=64", "data.max_rows=32", "train.learning_rate=1e-3", "train.progress_bar=false", "train.max_steps=3",
            "train.adam_eps=1e-4", "train.max_grad_norm=null", f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}",
            "grdpo.step_size=2.0",
        ]))

    a, b = run("a", 8, 1), run("b", 2, 4)
    ma, mb = read_metrics(a.metrics_path), read_metrics(b.metrics_path)
    for key in ("loss", "group_weight/A", "group_weight/B", "group_loss/B"):
        assert [m[key] for m in ma] == pytest.approx([m[key] for m in mb], abs=1e-5), key
    assert ma[-1]["group_weight/B"] != pytest.approx(0.5)  # the weights did move
    wa, wb = load_file(str(a.model_dir / "model.safetensors")), load_file(str(b.model_dir / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_grdpo_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """The group weights and the losses gathered since their last update travel in the checkpoint."""
    from preftune.run_config import load_run_config

    def cfg(name, *extra):
        return load_run_config(None, [
            "algorithm=grdpo", f"output_dir={tmp_path / name}", "model.name=tiny-random-llama", "data.path=builtin:diverse_pairs",
            "data.max_length=64", "data.max_rows=32", "train.learning_rate=1e-3", "train.progress_bar=false", "train.max_steps=4",
            "train.micro_batch_size=8", "train.save_steps=2", "grdpo.step_size=2.0", *extra,
        ])  # fmt: skip

    assert_resume_equals_uninterrupted(cfg, monkeypatch, crash_step=2)
