"""DPO family and KTO through the one loop: learning, reference precompute, invariances, CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import preftune.train.loop as loop_mod
from preftune.algorithms import ALGORITHMS
from preftune.run_config import load_run_config
from preftune.train.metrics import read_metrics
from tests.conftest import ROOT, cli, write_jsonl
from tests.test_train import _free_port, assert_same_weights

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def pair_rows(n=16, seed=0):
    """Chosen completions say 'yes ...', rejected 'no ...': an easy, learnable preference."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(3 + i % 4))
        rows.append({
            "prompt": f"Q: {prompt}?",
            "chosen": " " + " ".join(["yes"] * (1 + i % 3) + [rng.choice(WORDS)]),
            "rejected": " " + " ".join(["no"] * (1 + i % 2) + [rng.choice(WORDS)]),
        })
    return rows


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows())


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))


def run_cfg(tmp_path, data, name, algorithm="dpo", *overrides):
    return load_run_config(None, [
        f"algorithm={algorithm}", f"output_dir={tmp_path / name}", "model.name=tiny-random-llama",
        f"data.path={data}", "data.max_length=64", "train.learning_rate=1e-3", "train.progress_bar=false",
        *overrides,
    ])


def test_dpo_learns_the_preference(tmp_path, pairs_file):
    res = loop_mod.train(run_cfg(tmp_path, pairs_file, "dpo", "dpo", "train.micro_batch_size=8", "train.grad_accum_steps=2",
                                 "train.max_steps=30", f"data.eval_path={pairs_file}", "train.eval_steps=30"))
    ms = read_metrics(res.metrics_path)
    first = ms[0]
    assert first["loss"] == pytest.approx(0.693147, abs=1e-4)  # policy = reference: ln 2
    final = [m for m in ms if "eval/loss" in m][-1]  # all 16 train pairs, after training
    assert final["eval/rewards/accuracies"] >= 0.9
    assert final["eval/rewards/margins"] > first["rewards/margins"] + 0.5
    assert final["eval/loss"] < 0.5


@pytest.mark.parametrize("lora", [False, True])
def test_precomputed_reference_equals_live(tmp_path, pairs_file, lora):
    extra = ["train.micro_batch_size=4", "train.max_steps=4"] + (["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0"] if lora else [])
    pre = loop_mod.train(run_cfg(tmp_path, pairs_file, "pre", "dpo", *extra, "dpo.precompute_reference=true"))
    live = loop_mod.train(run_cfg(tmp_path, pairs_file, "live", "dpo", *extra, "dpo.precompute_reference=false"))
    a, b = read_metrics(pre.metrics_path), read_metrics(live.metrics_path)
    for key in ("loss", "ref_logps/chosen", "ref_logps/rejected", "rewards/margins"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], abs=2e-4), key


def test_reference_cache_is_reused_and_invalidated(tmp_path, pairs_file, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="preftune")
    cache = tmp_path / "cache" / "reference_logps"
    loop_mod.train(run_cfg(tmp_path, pairs_file, "a", "dpo", "train.micro_batch_size=4", "train.max_steps=1"))
    assert len(list(cache.glob("*.safetensors"))) == 1
    loop_mod.train(run_cfg(tmp_path, pairs_file, "b", "dpo", "train.micro_batch_size=4", "train.max_steps=1"))
    assert "reused" in caplog.text and len(list(cache.glob("*.safetensors"))) == 1
    rows = pair_rows()
    rows[3]["rejected"] = " no no never"
    changed = write_jsonl(tmp_path / "changed.jsonl", rows)
    loop_mod.train(run_cfg(tmp_path, changed, "c", "dpo", "train.micro_batch_size=4", "train.max_steps=1"))
    assert len(list(cache.glob("*.safetensors"))) == 2  # a changed row is a new key, never the stale cache
    loop_mod.train(run_cfg(tmp_path, pairs_file, "d", "dpo", "train.micro_batch_size=4", "train.max_steps=1", "data.max_length=12"))
    assert len(list(cache.glob("*.safetensors"))) == 3  # so is a changed truncation setting
    loop_mod.train(run_cfg(tmp_path, pairs_file, "e", "dpo", "train.micro_batch_size=4", "train.max_steps=1", "train.seed=1"))
    assert len(list(cache.glob("*.safetensors"))) == 4  # and other reference weights (the tiny model's init follows the seed)


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_accumulation_invariance(tmp_path, pairs_file, algorithm):
    common = ["train.max_steps=3", "train.adam_eps=1e-4", "train.max_grad_norm=null"]
    a = loop_mod.train(run_cfg(tmp_path, pairs_file, "a", algorithm, "train.micro_batch_size=4", "train.grad_accum_steps=1", *common))
    b = loop_mod.train(run_cfg(tmp_path, pairs_file, "b", algorithm, "train.micro_batch_size=1", "train.grad_accum_steps=4", *common))
    ma, mb = read_metrics(a.metrics_path), read_metrics(b.metrics_path)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in ma + mb)  # KTO at micro-batch 1 included
    assert [m["loss"] for m in ma] == pytest.approx([m["loss"] for m in mb], abs=1e-5)
    if algorithm == "kto":
        assert [m["kl"] for m in ma] == pytest.approx([m["kl"] for m in mb], abs=1e-5)
    assert_same_weights(load_file(str(a.model_dir / "model.safetensors")), load_file(str(b.model_dir / "model.safetensors")), atol=1e-5)


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_two_processes_equal_one(tmp_path, pairs_file, algorithm):
    common = [f"algorithm={algorithm}", "model.name=tiny-random-llama", f"data.path={pairs_file}", "data.max_length=64",
              "train.learning_rate=1e-3", "train.max_steps=3", "train.progress_bar=false", "train.adam_eps=1e-4"]
    one = loop_mod.train(load_run_config(None, [f"output_dir={tmp_path / 'one'}", "train.micro_batch_size=4", *common]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "preftune", "train", str(cfg), f"output_dir={tmp_path / 'two'}", "train.micro_batch_size=2", *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1, m2 = read_metrics(one.metrics_path), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], abs=1e-5)
    assert_same_weights(load_file(str(one.model_dir / "model.safetensors")), load_file(str(tmp_path / "two" / "model" / "model.safetensors")), atol=1e-4)


def test_kto_reads_pairs_and_unpaired(tmp_path, pairs_file):
    unpaired = write_jsonl(tmp_path / "u.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in pair_rows()[:12]]
                           + [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in pair_rows()[12:]])
    res = loop_mod.train(run_cfg(tmp_path, unpaired, "u", "kto", "train.micro_batch_size=4", "train.max_steps=2"))
    m = read_metrics(res.metrics_path)[0]
    assert m["loss"] == pytest.approx(0.5 * (12 / 16 * 1 + 4 / 16 * 3), abs=1e-4)  # λ_U = 3 from the 12:4 imbalance; σ(0)=0.5
    res = loop_mod.train(run_cfg(tmp_path, pairs_file, "p", "kto", "train.micro_batch_size=4", "train.max_steps=1"))
    assert read_metrics(res.metrics_path)[0]["desirable_fraction"] == pytest.approx(0.5, abs=0.26)


# Text preference data; mdpo's pairs carry images (tests/test_mdpo.py).
PAIR_ALGORITHMS = [name for name, cls in ALGORITHMS.items() if cls.needs.data_kind in ("pairs", "unpaired") and name != "mdpo"]


def test_first_losses_are_declared():
    """The closed-form first losses the CLI test checks come from the algorithms (ln 2, 1, 1/(2τ)²)."""
    import math

    declared = {name: ALGORITHMS[name].first_loss(load_run_config(ROOT / "configs" / f"{name}.yaml").algo) for name in PAIR_ALGORITHMS}
    assert declared["dpo"] == declared["cdpo"] == declared["robust_dpo"] == declared["dpop"] == declared["grdpo"] == math.log(2)
    assert declared["hinge"] == 1.0 and declared["ipo"] == pytest.approx((1 / 0.2) ** 2)
    assert declared["rpo"] is None  # ln 2 + α·NLL(y_w): depends on the data


@pytest.mark.parametrize("algorithm", PAIR_ALGORITHMS)
def test_example_config_through_cli(tmp_path, pairs_file, algorithm):
    """Each algorithm's example config, through the CLI: the closed-form first loss where there is one,
    then it learns the preference (evaluated on the training pairs after 24 steps)."""
    out = tmp_path / "run"
    proc = cli("train", f"configs/{algorithm}.yaml", "model.name=tiny-random-llama", f"data.path={pairs_file}", f"output_dir={out}",
               "train.max_steps=24", "train.micro_batch_size=8", "train.learning_rate=1e-3", "train.progress_bar=false",
               f"data.eval_path={pairs_file}", env={"PREFTUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ms = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_ms = [m for m in ms if "loss" in m]
    first, final = train_ms[0], [m for m in ms if "eval/loss" in m][-1]
    assert len(train_ms) == 24 and final["step"] == 24
    cls = ALGORITHMS[algorithm]
    expected = cls.first_loss(load_run_config(ROOT / "configs" / f"{algorithm}.yaml").algo)  # declared by the algorithm
    if expected is not None:
        assert first["loss"] == pytest.approx(expected, abs=1e-3)
    if algorithm == "kto":  # unpaired: no pairwise accuracy; the loss falls from σ(0)-based 0.5 (balanced pairs: λ_D = λ_U = 1)
        assert first["loss"] == pytest.approx(0.5, abs=1e-3)
        assert final["eval/loss"] < first["loss"] - 0.1
    elif algorithm == "reward":
        assert final["eval/accuracy"] >= 0.9 and final["eval/margin"] > 1.0
    elif algorithm == "ref_free_dpo":  # log π(y_w) − log π(y_l) starts far negative (the rejected are shorter)
        assert final["eval/rewards/margins"] > first["rewards/margins"] + 1.0
    else:
        assert final["eval/rewards/accuracies"] >= 0.9
        assert final["eval/rewards/margins"] > first["rewards/margins"] + 0.05
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if algorithm == "reward" else AutoModelForCausalLM
    assert auto.from_pretrained(out / "model") is not None


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_autocast_starts_at_ln2(tmp_path, pairs_file, lora):
    extra = ["model.dtype=bf16", "train.micro_batch_size=4", "train.max_steps=2", "dpo.precompute_reference=false"]
    if lora:
        extra += ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0"]
    res = loop_mod.train(run_cfg(tmp_path, pairs_file, "bf16", "dpo", *extra))
    ms = read_metrics(res.metrics_path)
    assert ms[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # the same bf16 forward for policy and reference
    assert ms[1]["loss"] < ms[0]["loss"]
    weights = load_file(str(res.model_dir / ("adapter_model.safetensors" if lora else "model.safetensors")))
    assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 master weights
