"""The packaged default model (SmolLM2-135M-Instruct) through the real training path. Slower (~20 s),
runs in CI: the model installs from a package, no hub needed."""

import pytest
import torch
from safetensors.torch import load_file

import preftune.train.loop as loop_mod
from preftune.run_config import load_run_config
from preftune.train.metrics import read_metrics


def test_sft_step_on_smollm2(tmp_path):
    run = load_run_config(None, [
        "algorithm=sft", f"output_dir={tmp_path / 'sft'}", "model.name=smollm2-135m-instruct",
        "data.path=builtin:tiny_instructions", "data.max_rows=4", "data.max_length=64",
        "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.max_steps=1", "train.progress_bar=false",
    ])
    res = loop_mod.train(run)
    (m,) = read_metrics(res.metrics_path)
    # An instruction-tuned model already predicts these short answers fairly well: mean token NLL
    # far below log(vocab) = 10.8, and finite.
    assert 0.1 < m["loss"] < 4.0
    weights = load_file(str(res.model_dir / "model.safetensors"))
    assert sum(v.numel() for v in weights.values()) > 100_000_000


def test_dpo_lora_step_on_smollm2_starts_at_ln2(tmp_path):
    run = load_run_config(None, [
        "algorithm=dpo", f"output_dir={tmp_path / 'dpo'}", "model.name=smollm2-135m-instruct",
        "data.path=builtin:tiny_pairs", "data.max_rows=2", "data.max_length=96",
        "model.lora.enabled=true", "model.lora.r=4", "train.micro_batch_size=2", "train.max_steps=1",
        "train.progress_bar=false",
    ])
    res = loop_mod.train(run)
    (m,) = read_metrics(res.metrics_path)
    assert m["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert (res.model_dir / "adapter_config.json").is_file()
    assert torch.isfinite(torch.tensor(m["grad_norm"]))
