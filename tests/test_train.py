"""The loop: accumulation / world-size invariance, resume, checkpoint safety, outputs."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import preftune.train.loop as loop_mod
from preftune.config import ConfigError
from preftune.run_config import load_run_config
from preftune.train.checkpoint import CheckpointError, list_checkpoints
from preftune.train.metrics import read_metrics
from tests.conftest import ROOT


def run_cfg(tmp_path, data, name, *overrides):
    return load_run_config(
        None,
        [
            "algorithm=sft",
            f"output_dir={tmp_path / name}",
            "model.name=tiny-random-llama",
            f"data.path={data}",
            "data.max_length=64",
            "train.learning_rate=1e-2",
            "train.progress_bar=false",
            "train.max_grad_norm=null",
            "train.warmup_steps=1",
            *overrides,
        ],
    )


def final_weights(result):
    return load_file(str(result.model_dir / "model.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_accumulation_invariance(tmp_path, sft_file):
    big = loop_mod.train(run_cfg(tmp_path, sft_file, "a", "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.max_steps=3"))
    small = loop_mod.train(run_cfg(tmp_path, sft_file, "b", "train.micro_batch_size=1", "train.grad_accum_steps=4", "train.max_steps=3"))
    la = [m["loss"] for m in read_metrics(big.metrics_path)]
    lb = [m["loss"] for m in read_metrics(small.metrics_path)]
    assert len(la) == 3 and la == pytest.approx(lb, abs=1e-5)
    assert la[-1] < la[0]  # it learns
    assert_same_weights(final_weights(big), final_weights(small), atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path, sft_file):
    common = ["model.name=tiny-random-llama", f"data.path={sft_file}", "data.max_length=64", "train.learning_rate=1e-2",
              "train.max_grad_norm=0.5", "train.max_steps=3", "train.progress_bar=false",
              # Adam's first steps are ~lr*sign(g): a larger eps keeps fp-noise in tiny gradients
              # (different all-reduce order) from flipping whole updates.
              "train.adam_eps=1e-4"]
    one = loop_mod.train(load_run_config(None, [f"output_dir={tmp_path / 'one'}", "train.micro_batch_size=4", *common]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "preftune", "train", str(ROOT / "configs" / "sft_tiny.yaml"), f"output_dir={tmp_path / 'two'}",
           "train.micro_batch_size=2", "train.save_steps=0", "sft.packing=false", *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_metrics = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [m["loss"] for m in two_metrics] == pytest.approx([m["loss"] for m in read_metrics(one.metrics_path)], abs=1e-5)
    assert [m["grad_norm"] for m in two_metrics] == pytest.approx([m["grad_norm"] for m in read_metrics(one.metrics_path)], rel=1e-5)
    assert two_metrics[-1]["units"] == read_metrics(one.metrics_path)[-1]["units"]
    assert_same_weights(final_weights(one), load_file(str(tmp_path / "two" / "model" / "model.safetensors")), atol=1e-5)


class Stop(Exception):
    pass


@pytest.mark.parametrize("lora", [False, True])
def test_resume_equals_uninterrupted(tmp_path, sft_file, monkeypatch, lora):
    extra = ["train.micro_batch_size=2", "train.grad_accum_steps=2", "train.max_steps=6", "train.save_steps=2"]
    if lora:  # dropout makes the RNG state matter
        extra += ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.3", "model.lora.merge_on_save=true"]
    full = loop_mod.train(run_cfg(tmp_path, sft_file, "full", *extra))

    real_save = loop_mod.save_checkpoint

    def save_then_crash(out, step, **kw):
        path = real_save(out, step, **kw)
        if step == 4:
            raise Stop()
        return path

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(Stop):
        loop_mod.train(run_cfg(tmp_path, sft_file, "cut", *extra))
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-000002", "step-000004"]

    resumed = loop_mod.train(run_cfg(tmp_path, sft_file, "cut", *extra, "train.resume_from=latest"))
    assert resumed.steps == 6
    a, b = final_weights(full), final_weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit
    strip = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]  # noqa: E731
    assert strip(read_metrics(resumed.metrics_path)) == strip(read_metrics(full.metrics_path))
    # keep-last-K: 2 checkpoints remain, the newest is the final step
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-000004", "step-000006"]


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path, sft_file):
    loop_mod.train(run_cfg(tmp_path, sft_file, "r", "train.max_steps=2", "train.save_steps=1", "train.micro_batch_size=4"))
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
        loop_mod.train(run_cfg(tmp_path, sft_file, "r", "train.max_steps=2", "train.micro_batch_size=4"))
    again = loop_mod.train(run_cfg(tmp_path, sft_file, "r", "train.max_steps=1", "train.micro_batch_size=4", "train.overwrite_output_dir=true"))
    assert again.steps == 1 and list_checkpoints(tmp_path / "r") == []


def test_missing_or_corrupt_checkpoint_is_an_error(tmp_path, sft_file):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        loop_mod.train(run_cfg(tmp_path, sft_file, "none", "train.resume_from=latest"))
    loop_mod.train(run_cfg(tmp_path, sft_file, "c", "train.max_steps=2", "train.save_steps=2", "train.micro_batch_size=4"))
    (ckpt,) = list_checkpoints(tmp_path / "c")
    with open(ckpt / "optimizer.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.raises(CheckpointError, match="optimizer.pt: corrupt"):
        loop_mod.train(run_cfg(tmp_path, sft_file, "c", "train.max_steps=3", "train.resume_from=latest", "train.micro_batch_size=4"))


def test_outputs_metrics_and_config(tmp_path, sft_file):
    res = loop_mod.train(run_cfg(tmp_path, sft_file, "o", "train.max_steps=4", "train.logging_steps=2", "train.micro_batch_size=4"))
    ms = read_metrics(res.metrics_path)
    assert [m["step"] for m in ms] == [2, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens", "epoch"):
        assert all(isinstance(m[key], (int, float)) for m in ms), key
    saved = load_run_config(res.output_dir / "config.yaml")
    assert saved.train.max_steps == 4 and saved.model.name == "tiny-random-llama"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(res.model_dir)
    tok = AutoTokenizer.from_pretrained(res.model_dir)
    assert model(**tok("hello there", return_tensors="pt")).logits.shape[-1] == model.config.vocab_size


def test_packing_matches_padding(tmp_path, sft_file):
    a = loop_mod.train(run_cfg(tmp_path, sft_file, "pad", "train.micro_batch_size=4", "train.max_steps=2"))
    b = loop_mod.train(run_cfg(tmp_path, sft_file, "pack", "train.micro_batch_size=4", "train.max_steps=2", "sft.packing=true"))
    assert [m["loss"] for m in read_metrics(a.metrics_path)] == pytest.approx([m["loss"] for m in read_metrics(b.metrics_path)], abs=1e-5)
    assert_same_weights(final_weights(a), final_weights(b), atol=1e-5)
