"""A miniature `preftune demo` end to end through the CLI on a tiny random model."""

import json

from preftune.eval import format_number
from tests.conftest import ROOT, cli
from tests.test_eval import _parse


def test_miniature_demo(tmp_path):
    out = tmp_path / "demo"
    proc = cli(
        "demo", "model=tiny-random-llama", f"output_dir={out}", "train_prompts=16", "test_prompts=4", "max_new_tokens=8",
        "jobs=[dpo:beta=0.1, dpo:beta=0.5, rloo:kl_coef=0.1, kto, sft, unlikelihood]", "online_steps=2", "offline_epochs=1",
        "micro_batch_size=4", "eval_samples=1", f"gold_reward={ROOT / 'tests' / 'rl_reward.py'}:low_ids",
        "proxy_reward_model=true", "best_of_n=[1, 2]", "proxy_rl=rloo:kl_coef=0.0", "proxy_rl_checkpoints=2",
        "train_overrides=[train.progress_bar=false]",
        env={"PREFTUNE_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    on_proxy = {"rloo-kl_coef0.0-on-proxy@1", "rloo-kl_coef0.0-on-proxy@2"}  # proxy_rl's checkpoints
    assert set(results["models"]) == {"reference", "dpo-beta0.1", "dpo-beta0.5", "rloo-kl_coef0.1", "kto", "sft", "unlikelihood"} | on_proxy
    for name in on_proxy:
        m = results["models"][name]
        assert m["algorithm"] == "rloo on proxy" and m["proxy_reward_mean"] is not None and m["kl"] is not None
    assert (out / "runs" / "rloo-kl_coef0.0-on-proxy" / "exports" / "step-000001" / "adapter_model.safetensors").is_file()
    assert results["pairs"]["pairs"] >= 2 and results["best_of_n"]["n"] == [1, 2]
    assert results["timings_seconds"]["total (this run)"] > 0
    # the summary printed on the terminal is the same numbers
    for name, m in results["models"].items():
        line = next(x for x in proc.stdout.splitlines() if x.startswith(name + " "))
        assert f"{m['reward_mean']:.3f}" in line
    parser = _parse((out / "report.html").read_text())  # strict: well-formed HTML, table cells by (model, metric)
    assert len([s for s in parser.images if s.startswith("data:image/png;base64,")]) >= 3  # frontier, reward, over-optimisation
    for name, m in results["models"].items():  # the report shows results.json's numbers
        for key in ("reward_mean", "kl", "length_mean", "eos_rate"):
            assert parser.cells[(name, key)] == format_number(m[key]), (name, key)
    assert f"report: {out / 'report.html'}" in proc.stdout


def test_study_config_is_valid():
    from preftune.experiments.sentiment import load_study_config

    cfg = load_study_config(str(ROOT / "configs" / "studies" / "sentiment.yaml"), [])
    assert len(cfg.jobs) >= 10 and cfg.proxy_reward_model and cfg.proxy_rl


def test_test_split_is_fixed_and_never_trained_on():
    from preftune.config import ConfigError
    from preftune.data.loaders import load_records
    from preftune.experiments.sentiment import StudyConfig, load_study_config, split_prompts

    prompts = load_records("builtin:movie_review_prompts", "prompts")
    demo_train, demo_test = split_prompts(StudyConfig(), prompts)
    full = load_study_config(str(ROOT / "configs" / "studies" / "sentiment.yaml"), [])
    full_train, full_test = split_prompts(full, prompts)
    assert (len(demo_train), len(demo_test), len(full_train), len(full_test)) == (96, 48, 240, 60)
    test_rows = {p.prompt for p in prompts[-60:]}
    assert {p.prompt for p in demo_test} <= test_rows and {p.prompt for p in full_test} == test_rows
    assert not test_rows & {p.prompt for p in full_train}  # the demo's and the study's evaluation never saw training
    import pytest

    with pytest.raises(ConfigError, match="fewer than train_prompts"):
        split_prompts(StudyConfig(train_prompts=250), prompts)
