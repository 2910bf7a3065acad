"""The sentiment study resumes job by job: a finished study reruns nothing, a killed training job
continues from its newest checkpoint, and a changed job (only that one, and what depends on it) is redone."""

import json
import logging
import shutil

from preftune.experiments.jobs import Ledger, fingerprint
from preftune.experiments.sentiment import load_study_config, plan_stages, run_study
from tests.conftest import ROOT


def test_ledger_skips_only_a_job_with_the_same_key(tmp_path):
    ledger = Ledger(tmp_path)
    calls = []
    first = ledger.run("train a", "k1", lambda: calls.append(1) or {"x": 1})
    again = ledger.run("train a", "k1", lambda: calls.append(2) or {"x": 2})
    changed = ledger.run("train a", "k2", lambda: calls.append(3) or {"x": 3})
    assert calls == [1, 3] and first["result"] == again["result"] == {"x": 1} and changed["result"] == {"x": 3}
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1}) != fingerprint({"a": 1, "b": 3})


def _config(out, jobs):
    return load_study_config(None, [
        f"output_dir={out}", "model=tiny-random-llama", "train_prompts=16", "test_prompts=4", "max_new_tokens=8",
        f"jobs=[{', '.join(jobs)}]", "online_steps=4", "offline_epochs=1", "micro_batch_size=4", "eval_samples=1",
        f"gold_reward={ROOT / 'tests' / 'rl_reward.py'}:low_ids", "save_steps=2", "train_overrides=[train.progress_bar=false]",
    ])


def _records(out):
    return {p.name: p.read_text() for p in (out / "jobs").glob("*.json")}


def test_study_resumes_job_by_job(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "study"
    cfg = _config(out, ["dpo:beta=0.1", "rloo:kl_coef=0.1"])
    assert len(plan_stages(cfg)) == 1 + 2 + 1 + 2  # pairs, 2 jobs, reference + 2 models evaluated
    run_study(cfg, progress=False)
    first, records = json.loads((out / "results.json").read_text()), _records(out)

    run_study(cfg, progress=False)  # finished: nothing reruns, the same numbers come out
    assert _records(out) == records
    assert json.loads((out / "results.json").read_text())["models"] == first["models"]

    # killed in the middle of the RLOO job: its record and final model missing, checkpoints up to step 2
    run_dir = out / "runs" / "rloo-kl_coef0.1"
    (out / "jobs" / "train_rloo-kl_coef0.1.json").unlink()
    shutil.rmtree(run_dir / "model")
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")
    with caplog.at_level(logging.INFO):
        run_study(cfg, progress=False)
    assert "resumed from" in caplog.text and "step-000002 at step 2" in caplog.text
    assert "job train dpo-beta0.1: done earlier" in caplog.text  # the finished job was not rerun
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps[-1] == 4 and (run_dir / "model").is_dir()

    caplog.clear()
    with caplog.at_level(logging.INFO):  # one job changed: only it is trained and evaluated again
        run_study(_config(out, ["dpo:beta=0.1", "rloo:kl_coef=0.1", "dpo:beta=0.5"]), progress=False)
    assert "job train dpo-beta0.1: done earlier" in caplog.text and "job train rloo-kl_coef0.1: done earlier" in caplog.text
    after = _records(out)
    assert after["evaluate_dpo-beta0.1.json"] == records["evaluate_dpo-beta0.1.json"] and "train_dpo-beta0.5.json" in after
