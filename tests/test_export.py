"""Checkpoints become loadable models: `preftune export`, and a checkpoint folder resolved to its export."""

import pytest
import torch
from safetensors.torch import load_file

from preftune.models.loading import ModelLoadError, load_model
from preftune.train import loop as loop_mod
from preftune.train.checkpoint import CheckpointError, list_checkpoints
from preftune.train.export import default_export_dir, export_checkpoint, resolve_model
from tests.conftest import cli
from tests.test_train import run_cfg


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("lora", [False, True])
def test_final_checkpoint_exports_to_the_final_model(tmp_path, sft_file, lora):
    extra = ["train.micro_batch_size=4", "train.max_steps=4", "train.save_steps=2", "train.save_total_limit=5"]
    if lora:
        extra += ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.0"]
    result = loop_mod.train(run_cfg(tmp_path, sft_file, "run", *extra))
    first, last = list_checkpoints(tmp_path / "run")
    assert last.name == "step-000004"

    exported = export_checkpoint(last)
    assert exported == default_export_dir(last) == tmp_path / "run" / "exports" / "step-000004"
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(str(exported / name)), load_file(str(result.model_dir / name))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the last checkpoint is the final model, bit for bit

    # a checkpoint folder resolves to its export; an earlier step is a different model
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    final, _ = load_model(str(result.model_dir))
    at_last, _ = load_model(resolve_model(str(last)))
    at_first, _ = load_model(resolve_model(str(first)))
    torch.testing.assert_close(_logits(at_last, ids), _logits(final, ids), rtol=0, atol=0)
    assert not torch.allclose(_logits(at_first, ids), _logits(final, ids))
    assert (default_export_dir(first) / "preftune_export.json").is_file()


def test_export_is_redone_when_the_checkpoint_changes(tmp_path, sft_file):
    extra = ["train.micro_batch_size=4", "train.max_steps=2", "train.save_steps=2"]
    loop_mod.train(run_cfg(tmp_path, sft_file, "run", *extra))
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    out = export_checkpoint(checkpoint)
    before = load_file(str(out / "model.safetensors"))
    # a new run in the same folder (other learning rate) writes a different step-000002
    loop_mod.train(run_cfg(tmp_path, sft_file, "run", *extra, "train.learning_rate=1e-1", "train.overwrite_output_dir=true"))
    after = load_file(str(export_checkpoint(checkpoint) / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_export_cli_and_errors(tmp_path, sft_file):
    loop_mod.train(run_cfg(tmp_path, sft_file, "run", "train.micro_batch_size=4", "train.max_steps=1", "train.save_steps=1"))
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    proc = cli("export", str(checkpoint), "--output", str(tmp_path / "exported"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"model exported to {tmp_path / 'exported'}" in proc.stdout
    load_model(str(tmp_path / "exported"))

    proc = cli("export", str(tmp_path / "run"))  # the run folder, not a checkpoint
    assert proc.returncode == 2 and "not a checkpoint folder" in proc.stderr and "Traceback" not in proc.stderr

    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="config.yaml is missing"):
        export_checkpoint(checkpoint, tmp_path / "again", reuse=False)
    with pytest.raises(ModelLoadError, match="config.yaml is missing"):
        load_model(resolve_model(str(checkpoint)))  # never exported to its default folder, so it must be rebuilt
