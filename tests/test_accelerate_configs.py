"""configs/accelerate/: every launch config parses, passes Accelerate's own launch validation
(offline, no GPU needed) and is what the README's "Scaling out" table says it is."""

import re

import pytest
import yaml

from tests.conftest import ROOT

CONFIGS = ROOT / "configs" / "accelerate"
# file -> what Accelerate must read from it
EXPECTED = {
    "ddp.yaml": {"distributed_type": "MULTI_GPU"},
    "fsdp2.yaml": {"distributed_type": "FSDP", "fsdp_version": 2},
    "zero2.yaml": {"distributed_type": "DEEPSPEED", "zero_stage": 2, "offload_optimizer_device": "none", "offload_param_device": "none"},
    "zero2_offload.yaml": {"distributed_type": "DEEPSPEED", "zero_stage": 2, "offload_optimizer_device": "cpu", "offload_param_device": "none"},
    "zero3.yaml": {"distributed_type": "DEEPSPEED", "zero_stage": 3, "offload_optimizer_device": "none", "offload_param_device": "none"},
    "zero3_offload.yaml": {"distributed_type": "DEEPSPEED", "zero_stage": 3, "offload_optimizer_device": "cpu", "offload_param_device": "cpu"},
}


def _launch_args(path):
    """What `accelerate launch --config_file path -m preftune train ...` resolves, without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "preftune", "train", "x.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_every_config_file_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_and_validates(name):
    path = CONFIGS / name
    text = path.read_text()
    raw = yaml.safe_load(text)
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("When:" in line for line in header), "header says when to use it"
    assert any("1B" in line and "8B" in line for line in header), "header gives 1B / 8B memory arithmetic"
    assert f"--config_file configs/accelerate/{name}" in text, "header shows the launch command"
    args, defaults = _launch_args(path)  # accelerate's ClusterConfig rejects unknown top-level keys
    want = EXPECTED[name]
    assert defaults.distributed_type.value == want["distributed_type"] == raw["distributed_type"]
    if want["distributed_type"] == "MULTI_GPU":
        assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    if want["distributed_type"] == "FSDP":
        assert args.use_fsdp and int(args.fsdp_version) == 2
        assert str(args.fsdp_reshard_after_forward).lower() == "true"  # full shard
        assert args.fsdp_auto_wrap_policy == "TRANSFORMER_BASED_WRAP"
        assert str(args.fsdp_activation_checkpointing).lower() == "true"
        assert args.fsdp_state_dict_type == "SHARDED_STATE_DICT"
    if want["distributed_type"] == "DEEPSPEED":
        assert args.use_deepspeed
        for key in ("zero_stage", "offload_optimizer_device", "offload_param_device"):
            assert getattr(args, key) == want[key], key


def test_fsdp2_config_builds_accelerates_plugin(monkeypatch):
    """The environment `accelerate launch` would export makes a valid FSDP2 plugin."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = _launch_args(CONFIGS / "fsdp2.yaml")
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.activation_checkpointing is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"


def test_readme_table_names_what_each_file_is():
    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `configs/accelerate/([\w.]+)` \| ([^|]+) \|", readme, re.M)}
    assert sorted(rows) == sorted(EXPECTED), "the Scaling out table lists every config"
    for name, what in rows.items():
        want = EXPECTED[name]
        engine = {"MULTI_GPU": "DDP", "FSDP": "FSDP2", "DEEPSPEED": f"ZeRO-{want.get('zero_stage')}"}[want["distributed_type"]]
        assert engine in what, (name, what)
        offload = want.get("offload_optimizer_device") == "cpu"
        assert ("offload" in what.lower()) == offload, (name, what)
