"""DeepSpeed ZeRO-2 / ZeRO-3 (train.sharding=zero2|zero3, preftune/train/zero.py) on 2 CPU processes
(gloo) against unsharded runs, like tests/test_sharding.py does for FSDP2 and with its helpers.

All 2-process runs share one torchrun launch. Needs deepspeed (preftune[deepspeed]): without it the
tests skip, except under CI=true (.ci/run installs it), where they fail.
"""

import math
import os
import subprocess
import sys

import pytest

import preftune.train.loop as loop_mod
from preftune.run_config import load_run_config
from preftune.train.metrics import read_metrics
from tests.conftest import ROOT
from tests.test_sharding import (
    _Accelerator, _run, assert_resumed_run_equals, data_files, dpo, launch, losses, rloo, sft, weights)
from tests.test_train import _free_port, assert_same_weights

NAN_REWARD = f"{ROOT / 'tests' / 'rl_reward.py'}:nan_when_flagged"
ACCUM = ["train.micro_batch_size=1", "train.grad_accum_steps=2"]


def _require_deepspeed():
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but deepspeed is not installed (scripts/install.sh --dev installs it)")
        pytest.skip("deepspeed not installed (bash scripts/install.sh --deepspeed)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-process run, in one launch; returns (folder, files)."""
    _require_deepspeed()
    tmp = tmp_path_factory.mktemp("zero")
    files = data_files(tmp)
    two = tmp / "two"
    plan = []
    for stage in ("zero2", "zero3"):
        z = [f"train.sharding={stage}"]
        step2 = "checkpoints/step-000002"
        plan += [
            {"name": f"sft_{stage}", "overrides": sft(files["sft"], two / f"sft_{stage}", *ACCUM, *z)},
            {"name": f"sft_{stage}_resumed", "copy_checkpoint": [str(two / f"sft_{stage}" / step2), str(two / f"sft_{stage}_resumed" / step2)],
             "overrides": sft(files["sft"], two / f"sft_{stage}_resumed", *ACCUM, "train.resume_from=latest", *z)},
            {"name": f"dpo_{stage}", "overrides": dpo(files["pairs"], two / f"dpo_{stage}", "train.micro_batch_size=2", *z)},
            {"name": f"rloo_{stage}", "overrides": rloo(files["prompts"], two / f"rloo_{stage}", *z)},
        ]
    skip = ["train.nonfinite=skip", f"rloo.reward={NAN_REWARD}", "train.max_steps=3"]
    plan += [
        {"name": "dpo_zero3_live", "overrides": dpo(files["pairs"], two / "dpo_zero3_live", "train.micro_batch_size=2",
                                                    "dpo.precompute_reference=false", "train.sharding=zero3")},
        {"name": "rloo_ddp", "overrides": rloo(files["prompts"], two / "rloo_ddp")},
        # rank 1's 2nd rollout scores one completion NaN: the guard refuses step 2 on both processes
        {"name": "skip_ddp", "overrides": rloo(files["prompts"], two / "skip_ddp", *skip)},
        {"name": "skip_zero2", "overrides": rloo(files["prompts"], two / "skip_zero2", *skip, "train.sharding=zero2")},
        {"name": "skip_zero3", "overrides": rloo(files["prompts"], two / "skip_zero3", *skip, "train.sharding=zero3")},
    ]
    flag = tmp / "nan-flag"
    flag.write_text("")
    # an empty extension cache: nothing may be compiled (DeepSpeed's CPU shared-memory op took minutes of g++)
    launch(tmp, plan, PREFTUNE_TEST_NAN_FLAG=str(flag), NAN_RANK="1", TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"))
    return two, files


STAGES = pytest.mark.parametrize("stage", ["zero2", "zero3"])


@pytest.fixture(scope="module")
def one_sft(runs, tmp_path_factory):
    _, files = runs
    return loop_mod.train(load_run_config(None, sft(files["sft"], tmp_path_factory.mktemp("one_sft"), "train.micro_batch_size=4")))


@STAGES
def test_sft_zero_equals_one_process(runs, one_sft, stage, tmp_path):
    two, _ = runs
    assert not (two.parent / "torch_extensions").exists()  # no JIT build of any DeepSpeed op
    run = two / f"sft_{stage}"
    assert losses(run / "metrics.jsonl") == pytest.approx(losses(one_sft.metrics_path), abs=1e-5)
    assert losses(run / "metrics.jsonl", "grad_norm") == pytest.approx(losses(one_sft.metrics_path, "grad_norm"), rel=1e-5)
    assert losses(run / "metrics.jsonl", "eval/loss") == pytest.approx(losses(one_sft.metrics_path, "eval/loss"), abs=1e-5)
    assert read_metrics(one_sft.metrics_path)[0]["grad_norm"] > 0.5  # clipping (max_grad_norm=0.5) is in play
    assert_same_weights(weights(one_sft.output_dir), weights(run), atol=1e-5)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "model")  # one whole model folder
    checkpoint = run / "checkpoints" / "step-000004"
    assert sorted(p.name for p in checkpoint.glob("optimizer*")) == ["optimizer_0.pt", "optimizer_1.pt"]
    from preftune.train.export import export_checkpoint  # the gathered trainable.safetensors exports in one process

    exported = export_checkpoint(checkpoint, tmp_path / "exported")
    from safetensors.torch import load_file

    assert_same_weights(load_file(str(exported / "model.safetensors")), weights(run), atol=0)


@STAGES
def test_zero_resume_equals_uninterrupted(runs, stage):
    two, _ = runs
    assert_resumed_run_equals(two / f"sft_{stage}", two / f"sft_{stage}_resumed")


def test_dpo_zero_equals_one_process(runs, tmp_path, monkeypatch):
    two, files = runs
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    one = loop_mod.train(load_run_config(None, dpo(files["pairs"], tmp_path / "one", "train.micro_batch_size=4")))
    m1 = read_metrics(one.metrics_path)
    for name in ("dpo_zero2", "dpo_zero3", "dpo_zero3_live"):  # reference precomputed, or live and partitioned
        m2 = read_metrics(two / name / "metrics.jsonl")
        assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], abs=1e-5), name
        assert [m["ref_logps/chosen"] for m in m2] == pytest.approx([m["ref_logps/chosen"] for m in m1], abs=1e-4), name
        assert_same_weights(weights(one.output_dir), weights(two / name), atol=1e-4)


@STAGES
def test_rloo_zero_equals_unsharded(runs, stage):
    """Sampling is seeded per process: compared with 2 unsharded processes (ZeRO-3 decodes on gathered weights)."""
    two, _ = runs
    ddp, zero = read_metrics(two / "rloo_ddp" / "metrics.jsonl"), read_metrics(two / f"rloo_{stage}" / "metrics.jsonl")
    assert len(zero) == len(ddp) == 2
    for key in ("reward/score", "loss", "kl"):
        assert [m.get(key) for m in zero] == pytest.approx([m.get(key) for m in ddp], abs=1e-5), key
    assert_same_weights(weights(two / "rloo_ddp"), weights(two / f"rloo_{stage}"), atol=1e-5)


@STAGES
def test_zero_refused_step_is_not_applied(runs, stage):
    """A NaN step refused by the guard leaves weights and AdamW state untouched (DeepSpeed's overflow
    path): the run goes on exactly as the unsharded one that skipped the same step."""
    two, _ = runs
    ddp, zero = ([m for m in read_metrics(two / name / "metrics.jsonl") if "loss" in m] for name in ("skip_ddp", f"skip_{stage}"))
    assert [m.get("skipped", False) for m in zero] == [m.get("skipped", False) for m in ddp] == [False, True, False]
    assert math.isinf(zero[1]["grad_norm"]) or math.isnan(zero[1]["grad_norm"])
    assert [m["loss"] for m in (zero[0], zero[2])] == pytest.approx([m["loss"] for m in (ddp[0], ddp[2])], abs=1e-5)
    assert_same_weights(weights(two / "skip_ddp"), weights(two / f"skip_{stage}"), atol=1e-5)


def test_zero_plan_from_setting_and_launch_config(monkeypatch):
    """On GPU as on CPU, the loop reads the variables `accelerate launch --config_file zero*.yaml`
    exported; the Accelerator is made without seeing them (in its DeepSpeed state Accelerate would
    turn bf16 autocast off and leave the model to an engine of its own)."""
    from preftune.config import ConfigError
    from preftune.train.sharding import plan_for
    from preftune.train.zero import ZeroPlan, hidden_from_accelerate

    assert plan_for(_run("train.sharding=zero3"), _Accelerator("MULTI_CPU")) == ZeroPlan(3)
    assert plan_for(_run("train.sharding=zero2"), _Accelerator("NO", processes=1)) is None  # nothing to shard
    launch_env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                  "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}
    for key, value in launch_env.items():
        monkeypatch.setenv(key, value)
    assert plan_for(_run(), _Accelerator("MULTI_GPU")) == ZeroPlan(3, offload_optimizer=True, offload_params=True)
    with hidden_from_accelerate():
        assert "ACCELERATE_USE_DEEPSPEED" not in os.environ
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(ConfigError, match="ZeRO stage 1"):
        plan_for(_run(), _Accelerator("MULTI_GPU"))


@pytest.mark.parametrize("config,stage,offload", [("zero2_offload", "zero2", "optimizer"), ("zero3_offload", "zero3", "optimizer, weights")])
def test_accelerate_launch_with_an_offload_config_on_cpu(runs, tmp_path, config, stage, offload):
    """The user-facing route: `accelerate launch --config_file configs/accelerate/zero*_offload.yaml` (2 CPU
    processes, offload to CPU RAM with the loop's torch AdamW, nothing compiled) trains what
    train.sharding=zero2|zero3 trains."""
    two, files = runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PREFTUNE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"{config}.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "preftune", "train", str(ROOT / "configs" / "sft_tiny.yaml"),
           *sft(files["sft"], tmp_path / "acc", *ACCUM)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"DeepSpeed ZeRO-{stage[-1]} over 2 processes (offload: {offload})" in proc.stderr
    assert losses(tmp_path / "acc" / "metrics.jsonl") == pytest.approx(losses(two / f"sft_{stage}" / "metrics.jsonl"), abs=1e-6)
    assert_same_weights(weights(two / f"sft_{stage}"), weights(tmp_path / "acc"), atol=1e-6)


def test_zero_without_deepspeed_is_one_line(monkeypatch):
    from preftune.config import ConfigError
    from preftune.train.zero import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    with pytest.raises(ConfigError, match="scripts/install.sh --deepspeed"):
        import_deepspeed()


_AUTOCAST_PROBE = r"""
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import deepspeed
from types import SimpleNamespace
from preftune.train import zero

seen = []

class Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return self.linear(x).sum()

# What DeepSpeed's engine does on CUDA: it asks torch.is_autocast_enabled() (CUDA) whether the
# caller runs autocast; here the caller's autocast is the CPU's.
real = torch.is_autocast_enabled
torch.is_autocast_enabled = lambda *a: real(*a) if a else real("cpu")
torch.distributed.init_process_group("gloo")
t = SimpleNamespace(micro_batch_size=1, max_grad_norm=1.0)
for bf16 in (False, True):
    model = Probe()
    engine = zero.initialize(model, torch.optim.AdamW(model.parameters()), zero.ZeroPlan(2), t, bf16=bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine(torch.ones(1, 4))
    print(bf16, seen[-1][0], seen[-1][1], all(not hasattr(p, "comm_dtype") for p in model.parameters()), flush=True)
"""


def test_engine_forward_keeps_the_loops_bf16_autocast(tmp_path):
    """DeepSpeed's engine turns a caller's autocast off unless its config names one: with bf16 the loop
    gives it ``torch_autocast`` (gradient reductions kept fp32), so the training forward stays bf16."""
    _require_deepspeed()
    probe = tmp_path / "probe.py"
    probe.write_text(_AUTOCAST_PROBE)
    proc = subprocess.run([sys.executable, str(probe), str(_free_port())], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT / "src")})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("False ", "True "))]
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    # without torch_autocast the engine would switch the caller's autocast off (the bug this guards)
    assert lines[0].split()[:2] == ["False", "False"]
    assert lines[1] == "True True torch.bfloat16 True"
