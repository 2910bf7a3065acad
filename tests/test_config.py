from pathlib import Path

import pytest
import yaml

from preftune.algorithms import ALGORITHMS
from preftune.commands.config import config_markdown
from preftune.config import ConfigError, RunConfig, commented_yaml
from preftune.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "algorithm: sft\ndata:\n  path: x.jsonl\ntrain:\n  learning_rate: 1e-5\n")
    run = load_run_config(p, ["train.micro_batch_size=2", "model.lora.enabled=true", "sft.packing=true"])
    assert run.train.learning_rate == 1e-5  # PyYAML reads "1e-5" as a string; floats accept it
    assert run.train.micro_batch_size == 2
    assert run.model.lora.enabled is True
    assert run.algo.packing is True


def test_unknown_key_names_key_and_valid_ones(tmp_path):
    p = write(tmp_path, "data:\n  path: x.jsonl\ntrain:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert "train.learning_rat" in msg and "Did you mean 'learning_rate'" in msg and "micro_batch_size" in msg


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, "data:\n  path: x.jsonl\ntrainer: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer'.*Did you mean 'train'.*Valid keys: algorithm"):
        load_run_config(p)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.micro_batch_size=two", r"train.micro_batch_size: expected int, got str 'two'"),
        ("train.micro_batch_size=1.5", r"expected int, got float"),
        ("model.dtype=fp16", r"model.dtype: expected 'fp32' \| 'bf16'"),
        ("model.gradient_checkpointing=1", r"expected bool, got int"),
        ("train.report_to=[tensorboard, mlflow]", r"unknown tracker"),
        ("data.max_prompt_length=5000", r"max_prompt_length: must be between 1 and"),
        ("train.micro_batch_size=0", r"micro_batch_size: must be >= 1"),
        ("sft.packin=true", r"unknown key 'sft.packin'.*packing"),
        ("algorithm=nope", r"algorithm: unknown 'nope'"),
    ],
)
def test_bad_values_fail_with_the_key(tmp_path, override, pattern):
    p = write(tmp_path, "data:\n  path: x.jsonl\n")
    with pytest.raises(ConfigError, match=pattern):
        load_run_config(p, [override])


def test_type_error_includes_help_text(tmp_path):
    p = write(tmp_path, "data:\n  path: x.jsonl\n")
    with pytest.raises(ConfigError, match="Peak learning rate"):
        load_run_config(p, ["train.learning_rate=fast"])


def test_missing_data_path_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="data.path: required"):
        load_run_config(write(tmp_path, "algorithm: sft\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")


def test_commented_yaml_round_trips_to_defaults():
    for name, cls in ALGORITHMS.items():
        text = commented_yaml(RunConfig, RunConfig(algorithm=name))
        data = yaml.safe_load(text)
        data["data"]["path"] = "x.jsonl"
        data[name] = yaml.safe_load(commented_yaml(cls.Config)) or {}
        from preftune.config import apply_overrides  # noqa: F401  (same loader path as files)

        run = load_run_config(None, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in _flat(data).items()])
        assert run.train == RunConfig().train
        assert run.model == RunConfig().model


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, dict):
            out[f"{prefix}{k}"] = v
    return out


def test_every_example_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs, "configs/ holds no example"
    for path in configs:
        run = load_run_config(path)
        assert run.algorithm in ALGORITHMS


def test_config_docs_are_generated_from_fields():
    assert (ROOT / "docs" / "config.md").read_text() == config_markdown(), "run: python -m preftune config --markdown > docs/config.md"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme[:30] if line.startswith("bash scripts/install.sh")]
    assert len(commands) == 2, commands
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("override, message", [
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0, got -0.1"),
    ("train.learning_rate=-1", "train.learning_rate: must be > 0, got -1.0"),
    ("train.learning_rate=.nan", "train.learning_rate: must be a finite number, got nan"),
    ("train.adam_beta1=1.5", "train.adam_beta1: must lie in [0, 1), got 1.5"),
    ("train.adam_beta2=-0.1", "train.adam_beta2: must lie in [0, 1), got -0.1"),
    ("train.adam_eps=0", "train.adam_eps: must be > 0, got 0.0"),
    ("train.max_grad_norm=0", "train.max_grad_norm: must be > 0 or null (no clipping), got 0.0"),
    ("train.warmup_steps=-1", "train.warmup_steps: must be >= 0, got -1"),
    ("train.save_steps=-2", "train.save_steps: must be >= 0, got -2"),
    ("train.nonfinite=ignore", "train.nonfinite: expected 'stop' | 'skip'"),
    ("train.nonfinite_max_skips=0", "train.nonfinite_max_skips: must be >= 1, got 0"),
])  # fmt: skip
def test_every_optimizer_and_loop_setting_is_checked_at_load(tmp_path, override, message):
    """Values torch would reject mid-run (or silently misuse) fail at config load, naming key and value."""
    p = write(tmp_path, "data:\n  path: x.jsonl\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p, [override])
    assert message in str(e.value)


def test_a_setting_written_as_a_top_level_key_gets_its_full_name(tmp_path):
    p = write(tmp_path, "algorithm: dpo\ndata:\n  path: x.jsonl\nlearnin_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'learnin_rate'. Did you mean 'train.learning_rate'\?"):
        load_run_config(p)
    with pytest.raises(ConfigError, match=r"unknown key 'beta'. Did you mean 'dpo.beta'\?"):
        load_run_config(write(tmp_path, "algorithm: dpo\ndata:\n  path: x.jsonl\nbeta: 0.1\n"))


def test_a_setting_under_another_algorithms_section_names_the_right_key(tmp_path):
    p = write(tmp_path, "algorithm: rloo\ndata:\n  path: builtin:movie_review_prompts\nreward:\n  reward: vader\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    assert "section 'reward' given but algorithm is 'rloo'" in str(e.value) and "rloo.reward" in str(e.value)


def test_full_example_configs_list_every_train_setting():
    """Configs that list every setting stay complete (scripts/sync_example_configs.py adds new ones)."""
    from preftune.config import TrainConfig, describe

    keys = {k for k, *_ in describe(TrainConfig)}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "progress_bar" in (data.get("train") or {}):
            assert set(data["train"]) == keys, (path.name, keys ^ set(data["train"]))
