"""FSDP2 sharding (train.sharding=fsdp2) on 2 CPU processes (gloo) against unsharded runs.

All 2-process runs share one torchrun launch (tests/sharded_runs.py, a module-scoped fixture);
each test compares some of them with 1-process runs made here, or, for online RL (whose sampling is
seeded per process), with the same 2 processes unsharded (DDP).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import preftune.train.loop as loop_mod
from preftune.config import ConfigError
from preftune.run_config import load_run_config
from preftune.train import sharding
from preftune.train.metrics import read_metrics
from preftune.train.sharding import ShardPlan
from preftune.train.zero import ZeroPlan
from tests.conftest import ROOT, sft_rows, write_jsonl
from tests.test_preference_train import pair_rows
from tests.test_train import _free_port, assert_same_weights

REWARD = f"{ROOT / 'tests' / 'rl_reward.py'}:low_ids"
# Adam's first steps are ~lr*sign(g): a larger eps keeps fp-noise in tiny gradients (another
# reduction order) from flipping whole updates; as in test_train.py::test_two_processes_equal_one.
BASE = ["model.name=tiny-random-llama", "data.max_length=64", "train.progress_bar=false", "train.adam_eps=1e-4"]


def sft(data, out, *extra):
    return ["algorithm=sft", f"data.path={data}", f"output_dir={out}", "train.learning_rate=1e-2", "train.max_grad_norm=0.5",
            "train.max_steps=4", "train.save_steps=2", "sft.packing=false", "data.eval_fraction=0.25", *BASE, *extra]


def dpo(data, out, *extra):
    return ["algorithm=dpo", f"data.path={data}", f"output_dir={out}", "train.learning_rate=1e-3", "train.max_steps=3",
            *BASE, *extra]


def reward(data, out, *extra):
    return ["algorithm=reward", f"data.path={data}", f"output_dir={out}", "train.learning_rate=1e-3", "train.max_steps=3",
            *BASE, *extra]


def kto(data, out, *extra):
    return ["algorithm=kto", f"data.path={data}", f"output_dir={out}", "train.learning_rate=1e-3", "train.max_steps=2",
            *BASE, *extra]


def ppo(data, out, *extra):
    return ["algorithm=ppo", f"data.path={data}", f"output_dir={out}", "train.learning_rate=3e-3", "train.max_steps=2",
            "train.lr_scheduler=constant", f"ppo.reward={REWARD}", "ppo.max_new_tokens=8", "ppo.samples_per_prompt=2",
            "ppo.ppo_epochs=2", "train.micro_batch_size=2", *BASE, *extra]


def rloo(data, out, *extra):
    return ["algorithm=rloo", f"data.path={data}", f"output_dir={out}", "train.learning_rate=1e-2", "train.max_steps=2",
            "train.lr_scheduler=constant", f"rloo.reward={REWARD}", "rloo.max_new_tokens=8", "rloo.samples_per_prompt=4",
            "train.micro_batch_size=4", *BASE, *extra]


LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.0"]  # dropout streams differ per process
SHARD = ["train.sharding=fsdp2"]


def data_files(tmp):
    return {"sft": write_jsonl(tmp / "sft.jsonl", sft_rows()), "pairs": write_jsonl(tmp / "pairs.jsonl", pair_rows()),
            "prompts": write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"Tell me about item {i}:"} for i in range(16)])}


def launch(tmp, plan, **env):
    """Run every job of ``plan`` (tests/sharded_runs.py's format) in one 2-process torchrun launch."""
    (tmp / "plan.json").write_text(json.dumps(plan, default=str))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT),
           "PREFTUNE_CACHE": str(tmp / "cache"), **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "sharded_runs.py"), str(tmp / "plan.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-process run, in one launch; returns (folder, files)."""
    tmp = tmp_path_factory.mktemp("sharding")
    files = data_files(tmp)
    two = tmp / "two"
    plan = [
        {"name": "sft", "overrides": sft(files["sft"], two / "sft", "train.micro_batch_size=1", "train.grad_accum_steps=2", *SHARD)},
        {"name": "sft_resumed", "copy_checkpoint": [str(two / "sft" / "checkpoints" / "step-000002"),
                                                    str(two / "sft_resumed" / "checkpoints" / "step-000002")],
         "overrides": sft(files["sft"], two / "sft_resumed", "train.micro_batch_size=1", "train.grad_accum_steps=2",
                          "train.resume_from=latest", *SHARD)},
        {"name": "dpo", "overrides": dpo(files["pairs"], two / "dpo", "train.micro_batch_size=2", *SHARD)},
        {"name": "dpo_live", "overrides": dpo(files["pairs"], two / "dpo_live", "train.micro_batch_size=2",
                                               "dpo.precompute_reference=false", *SHARD)},  # the reference sharded too
        {"name": "lora", "overrides": sft(files["sft"], two / "lora", "train.micro_batch_size=2", *LORA, *SHARD)},
        {"name": "reward", "overrides": reward(files["pairs"], two / "reward", "train.micro_batch_size=2", *SHARD)},
        {"name": "kto", "overrides": kto(files["pairs"], two / "kto", "train.micro_batch_size=2", *SHARD)},
        {"name": "ppo_ddp", "overrides": ppo(files["prompts"], two / "ppo_ddp")},
        {"name": "ppo", "overrides": ppo(files["prompts"], two / "ppo", *SHARD)},  # value head: a unit of its own
        {"name": "rloo_ddp", "overrides": rloo(files["prompts"], two / "rloo_ddp")},
        {"name": "rloo", "overrides": rloo(files["prompts"], two / "rloo", *SHARD)},
    ]
    launch(tmp, plan)
    return two, files


def losses(path, key="loss"):
    return [m[key] for m in read_metrics(path) if key in m]


def weights(run_dir, name="model.safetensors"):
    return load_file(str(run_dir / "model" / name))


def test_sft_sharded_equals_one_process(runs, tmp_path):
    two, files = runs
    one = loop_mod.train(load_run_config(None, sft(files["sft"], tmp_path / "one", "train.micro_batch_size=4")))
    m1, m2 = read_metrics(one.metrics_path), read_metrics(two / "sft" / "metrics.jsonl")
    assert losses(two / "sft" / "metrics.jsonl") == pytest.approx(losses(one.metrics_path), abs=1e-5)
    assert losses(two / "sft" / "metrics.jsonl", "grad_norm") == pytest.approx(losses(one.metrics_path, "grad_norm"), rel=1e-5)
    assert m1[0]["grad_norm"] > 0.5
    ev1, ev2 = (next(m for m in ms if "eval/loss" in m) for ms in (m1, m2))  # held-out rows, every process as many forwards
    assert ev2["eval/loss"] == pytest.approx(ev1["eval/loss"], abs=1e-5)
    assert_same_weights(weights(one.output_dir), weights(two / "sft"), atol=1e-5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(two / "sft" / "model")  # one whole model folder
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    state = json.loads((two / "sft" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["sharding"] == "fsdp2" and state["world_size"] == 2
    from preftune.train.export import export_checkpoint  # a sharded run's checkpoint exports in one process

    exported = export_checkpoint(two / "sft" / "checkpoints" / "step-000004", tmp_path / "exported")
    assert_same_weights(load_file(str(exported / "model.safetensors")), weights(two / "sft"), atol=0)


def assert_resumed_run_equals(full, resumed, skipped_steps: int = 2):
    """A run resumed after ``skipped_steps`` logs the uninterrupted run's later metrics and ends with its
    weights, bit for bit (tokens/s aside)."""
    strip = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]  # noqa: E731
    assert strip(read_metrics(resumed / "metrics.jsonl")) == strip(read_metrics(full / "metrics.jsonl"))[skipped_steps:]
    a, b = weights(full), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sharded_resume_equals_uninterrupted(runs):
    two, _ = runs
    assert_resumed_run_equals(two / "sft", two / "sft_resumed")


def test_dpo_sharded_equals_one_process(runs, tmp_path, monkeypatch):
    two, files = runs
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    one = loop_mod.train(load_run_config(None, dpo(files["pairs"], tmp_path / "one", "train.micro_batch_size=4")))
    m1, m2 = read_metrics(one.metrics_path), read_metrics(two / "dpo" / "metrics.jsonl")
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], abs=1e-5)
    assert [m["ref_logps/chosen"] for m in m2] == pytest.approx([m["ref_logps/chosen"] for m in m1], abs=1e-4)
    assert_same_weights(weights(one.output_dir), weights(two / "dpo"), atol=1e-4)
    live = read_metrics(two / "dpo_live" / "metrics.jsonl")  # a live reference model, sharded like the policy
    assert [m["loss"] for m in live] == pytest.approx([m["loss"] for m in m1], abs=1e-5)
    assert_same_weights(weights(one.output_dir), weights(two / "dpo_live"), atol=1e-4)


def test_reward_model_sharded_equals_one_process(runs, tmp_path):
    two, files = runs
    one = loop_mod.train(load_run_config(None, reward(files["pairs"], tmp_path / "one", "train.micro_batch_size=4")))
    assert losses(two / "reward" / "metrics.jsonl") == pytest.approx(losses(one.metrics_path), abs=1e-5)
    assert_same_weights(weights(one.output_dir), weights(two / "reward"), atol=1e-5)


def test_lora_sharded_trains_only_the_adapter(runs, tmp_path):
    two, files = runs
    one = loop_mod.train(load_run_config(None, sft(files["sft"], tmp_path / "one", "train.micro_batch_size=4", *LORA)))
    saved = load_file(str(two / "lora" / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert (two / "lora" / "model" / "adapter_model.safetensors").is_file()  # a peft adapter, as unsharded
    assert_same_weights(weights(one.output_dir, "adapter_model.safetensors"), weights(two / "lora", "adapter_model.safetensors"), atol=1e-5)


def test_kto_sharded_equals_one_process(runs, tmp_path, monkeypatch):
    two, files = runs
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    one = loop_mod.train(load_run_config(None, kto(files["pairs"], tmp_path / "one", "train.micro_batch_size=4")))
    assert losses(two / "kto" / "metrics.jsonl") == pytest.approx(losses(one.metrics_path), abs=1e-5)
    assert_same_weights(weights(one.output_dir), weights(two / "kto"), atol=1e-4)


@pytest.mark.parametrize("algorithm,keys", [("rloo", ("reward/score", "loss", "kl")), ("ppo", ("loss", "value/loss"))])
def test_online_rl_sharded_equals_unsharded(runs, algorithm, keys):
    """Sampling is seeded per process, so 2 sharded processes are compared with 2 unsharded ones:
    the decode runs on gathered weights and must draw the same samples."""
    two, _ = runs
    ddp, sharded = read_metrics(two / f"{algorithm}_ddp" / "metrics.jsonl"), read_metrics(two / algorithm / "metrics.jsonl")
    assert len(sharded) == len(ddp) == 2
    for key in keys:
        assert [m.get(key) for m in sharded] == pytest.approx([m.get(key) for m in ddp], abs=1e-5), key
    assert_same_weights(weights(two / f"{algorithm}_ddp"), weights(two / algorithm), atol=1e-5)


class _Accelerator:
    """What plan_for reads of an Accelerator."""

    def __init__(self, kind, plugin=None, processes=2):
        from types import SimpleNamespace

        from accelerate.utils import DistributedType

        self.distributed_type = getattr(DistributedType, kind)
        self.state = SimpleNamespace(fsdp_plugin=plugin)
        self.num_processes = processes


def _run(*extra):
    return load_run_config(None, ["data.path=x.jsonl", *extra])


def test_sharding_plan_from_setting_and_launch_config():
    from types import SimpleNamespace

    from preftune.config import ConfigError
    from preftune.train.sharding import ShardPlan, plan_for

    assert plan_for(_run(), _Accelerator("MULTI_CPU")) is None
    assert plan_for(_run("train.sharding=fsdp2"), _Accelerator("MULTI_CPU")) == ShardPlan()
    assert plan_for(_run("train.sharding=fsdp2"), _Accelerator("NO", processes=1)) is None  # nothing to shard
    plugin = SimpleNamespace(fsdp_version=2, reshard_after_forward=False, activation_checkpointing=True, cpu_offload=None,
                             transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    # an Accelerate FSDP2 launch config (GPU) implies sharding, with its settings; Accelerate itself wraps nothing
    assert plan_for(_run(), _Accelerator("FSDP", plugin)) == ShardPlan(False, True, False, ("LlamaDecoderLayer",))
    assert plan_for(_run(), _Accelerator("FSDP", plugin, processes=1)) is not None  # else Accelerate would wrap it
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        plan_for(_run(), _Accelerator("FSDP", SimpleNamespace(fsdp_version=1)))


def test_sharding_plan_from_an_fsdp2_launch_on_cpu(monkeypatch):
    """On a CPU-only machine Accelerate reports MULTI_CPU and drops its FSDP plugin; the loop reads
    the variables `accelerate launch --config_file configs/accelerate/fsdp2.yaml` exported."""
    from preftune.train.sharding import ShardPlan, plan_for

    for key, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
                       "FSDP_ACTIVATION_CHECKPOINTING": "true"}.items():
        monkeypatch.setenv(key, value)
    assert plan_for(_run(), _Accelerator("MULTI_CPU")) == ShardPlan(activation_checkpointing=True)


def test_accelerate_launch_with_the_fsdp2_config_on_cpu(runs, tmp_path):
    """The user-facing route: `accelerate launch --config_file configs/accelerate/fsdp2.yaml` (2 CPU
    processes; the config's activation checkpointing on) trains what train.sharding=fsdp2 trains."""
    two, files = runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "preftune", "train", str(ROOT / "configs" / "sft_tiny.yaml"),
           *sft(files["sft"], tmp_path / "acc", "train.micro_batch_size=1", "train.grad_accum_steps=2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP2: 2 decoder layers" in proc.stderr
    assert losses(tmp_path / "acc" / "metrics.jsonl") == pytest.approx(losses(two / "sft" / "metrics.jsonl"), abs=1e-6)
    assert_same_weights(weights(two / "sft"), weights(tmp_path / "acc"), atol=1e-6)


def test_algorithms_see_the_sharding_a_launch_config_asks_for(tmp_path):
    """An Accelerate launch config shards a run whose ``train.sharding`` says none: the algorithms'
    refusals read the planned kind (sharding.as_planned), and a one-process run is not refused."""
    cfg = ROOT / "configs" / "reward_mixture_tiny.yaml"
    run = load_run_config(cfg, [f"output_dir={tmp_path}"])
    assert sharding.as_planned(run, None) is run
    assert sharding.as_planned(run, ShardPlan()).train.sharding == "fsdp2"
    zero3 = sharding.as_planned(run, ZeroPlan(3))
    assert zero3.train.sharding == "zero3" and run.train.sharding == "none" and zero3.train.seed == run.train.seed
    with pytest.raises(ConfigError, match="reward.groups=mixture under train.sharding=zero3"):
        loop_mod.build_algorithm(zero3)
    one = load_run_config(cfg, [f"output_dir={tmp_path}", "train.sharding=zero3"])
    assert sharding.as_planned(one, None).train.sharding == "none"  # one process: nothing sharded, nothing refused
