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
        "tracked_jobs=[unlikelihood]", "tracked_checkpoints=2", "save_steps=2",
        "train_overrides=[train.progress_bar=false]",
        env={"PREFTUNE_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    on_proxy = {"rloo-kl_coef0.0-on-proxy@1", "rloo-kl_coef0.0-on-proxy@2"}  # proxy_rl's checkpoints
    tracked = {"unlikelihood@2"}  # the tracked job's checkpoint before its last step (save_steps=2)
    assert set(results["models"]) == {"reference", "dpo-beta0.1", "dpo-beta0.5", "rloo-kl_coef0.1", "kto", "sft", "unlikelihood"} | on_proxy | tracked
    steps = [c["step"] for c in results["tracked_checkpoints"]["unlikelihood"]]  # the reference, step 2, the last step
    assert steps[:2] == [0, 2] and len(steps) == 3 and steps[2] > 2
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
    # one overall line (stage k of n, elapsed, ETA) above the stages' own bars: every stage counted, in order
    lines = [x for x in proc.stderr.replace("\r", "\n").splitlines() if x.startswith("overall: ")]
    total = len(results["timings_seconds"]) - 2  # every job timed, less the two totals
    stages = [int(x.split("stage ")[1].split(" of ")[0]) for x in lines if " of " in x]
    assert stages and stages[0] == 1 and stages[-1] == total and stages == sorted(stages), lines[-3:]
    assert all(f" of {total} · " in x and "elapsed " in x and "ETA ~" in x for x in lines if " of " in x)
    assert [c["claim"] for c in results["claims"]] == [1, 2, 3, 4, 5, 6]
    assert results["claims"][1]["verdict"] in ("confirmed", "not confirmed", "mixed")  # sft and dpo ran


def test_study_config_is_valid():
    from preftune.experiments.sentiment import load_study_config

    cfg = load_study_config(str(ROOT / "configs" / "studies" / "sentiment.yaml"), [])
    assert len(cfg.jobs) >= 10 and cfg.proxy_reward_model and cfg.proxy_rl
    names = [j.split(":")[0] for j in cfg.jobs]  # the minimum sweep for each claim
    assert names.count("dpo") >= 4 and names.count("ppo") >= 3 and names.count("rloo") >= 3 and len(cfg.best_of_n) >= 4
    assert {"sft", "unlikelihood", "kto"} <= set(names) and "unlikelihood" in cfg.tracked_jobs
    assert any(j.startswith("kto:beta=") and j.replace("kto", "dpo", 1) in cfg.jobs for j in cfg.jobs)  # KTO and DPO at one β
    quick = load_study_config(str(ROOT / "configs" / "studies" / "sentiment_quick.yaml"), [])
    assert {j.split(":")[0] for j in quick.jobs} >= {"dpo", "ppo", "rloo", "sft", "unlikelihood", "kto"} and quick.proxy_rl


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
