"""The non-finite guard and dead-run warnings: a NaN/inf step is never applied, the run stops with one
line (or skips), the last good checkpoint survives and --resume continues from it."""

import json
import math
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import preftune.train.loop as loop_mod
from preftune.config import TrainConfig
from preftune.run_config import load_run_config
from preftune.train.checkpoint import list_checkpoints, verify_checkpoint
from preftune.train.guard import NonFiniteError, StepGuard, bad_metrics
from preftune.train.loop import follow_learning_rate
from preftune.train.metrics import MetricsLog, read_metrics
from preftune.train.optim import build_optimizer, build_scheduler
from tests.conftest import ROOT, cli, write_jsonl

NAN_REWARD = f"{ROOT / 'tests' / 'rl_reward.py'}:nan_when_flagged"
CONSTANT_REWARD = f"{ROOT / 'tests' / 'rl_reward.py'}:constant"
NAN_RUN = ["model.name=tiny-random-llama", "train.learning_rate=1e30", "train.max_steps=5", "train.save_steps=1",
           "train.progress_bar=false"]


def _one_process():
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True,
                           reduce=lambda t, reduction: t)


# -- pure pieces ----------------------------------------------------------------------------------


def test_bad_metrics_names_every_nonfinite_quantity():
    assert bad_metrics({"loss": 0.5}, 1.0) == []
    assert bad_metrics({"loss": float("nan")}, float("inf")) == ["loss", "grad_norm"]
    assert bad_metrics({"loss": 0.5, "nonfinite/rewards": 0.25, "nonfinite/advantages": 0.0}, 1.0) == ["nonfinite/rewards"]


def test_skip_counter_resets_on_a_good_step_and_stops_after_max(tmp_path):
    t = TrainConfig(nonfinite="skip", nonfinite_max_skips=2, dead_run_steps=0)
    guard = StepGuard(t, tmp_path, chance_loss=None, log_warning=lambda r: None)
    acc, rows = _one_process(), lambda: [{"row": 0, "prompt_text": "p"}]
    nan = {"loss": float("nan")}
    assert guard.check(1, nan, 1.0, acc, rows) is False and guard.stop is None  # skipped, 1 in a row
    assert guard.check(2, {"loss": 0.3}, 1.0, acc, rows) is True and guard.consecutive_bad == 0
    assert guard.check(3, nan, 1.0, acc, rows) is False and guard.stop is None
    assert guard.check(4, nan, 1.0, acc, rows) is False
    assert isinstance(guard.stop, NonFiniteError) and "2 steps in a row" in str(guard.stop) and "step 4" in str(guard.stop)
    assert guard.skipped == 3
    assert sorted(p.name for p in tmp_path.glob("nonfinite-step-*.jsonl")) == [f"nonfinite-step-{i}.jsonl" for i in (1, 3, 4)]


def test_metrics_log_keeps_nonfinite_values_as_strings(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "x": -float("inf"), "ok": 0.5, "n": None})
    text = (tmp_path / "m.jsonl").read_text()
    assert json.loads(text) == {"step": 1, "loss": "nan", "grad_norm": "inf", "x": "-inf", "ok": 0.5, "n": None}
    (row,) = read_metrics(tmp_path / "m.jsonl")
    assert math.isnan(row["loss"]) and row["grad_norm"] == math.inf and row["x"] == -math.inf and row["n"] is None


def test_resume_follows_a_changed_learning_rate_on_the_same_schedule():
    t = TrainConfig(learning_rate=1.0, warmup_steps=2, lr_scheduler="linear")
    params = [torch.nn.Parameter(torch.ones(2, 2))]
    opt = build_optimizer(params, t)
    sched = build_scheduler(opt, t, total_steps=10)
    for _ in range(3):
        opt.step()
        sched.step()
    saved = sched.state_dict(), opt.state_dict()
    lowered = TrainConfig(learning_rate=0.01, warmup_steps=2, lr_scheduler="linear")
    opt2 = build_optimizer(params, lowered)
    sched2 = build_scheduler(opt2, lowered, total_steps=10)
    sched2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    assert sched2.get_last_lr()[0] == pytest.approx(1.0 * 7 / 8)  # the checkpoint's rate
    follow_learning_rate(opt2, sched2, 0.01)
    assert sched2.get_last_lr()[0] == pytest.approx(0.01 * 7 / 8) and opt2.param_groups[0]["lr"] == pytest.approx(0.01 * 7 / 8)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 * 6 / 8)


# -- through the CLI and the loop ------------------------------------------------------------------


def test_nan_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = cli("train", "configs/dpo.yaml", f"output_dir={out}", *NAN_RUN)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("preftune: error:")]
    assert "step 2: non-finite grad_norm=nan" in line and "train.learning_rate" in line and "--resume" in line
    assert "step-000001" in line
    # Nothing after the first bad step: step 1's checkpoint is the only one, intact, finite and loadable.
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    ckpt = out / "checkpoints" / "step-000001"
    verify_checkpoint(ckpt)
    assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "trainable.safetensors")).values())
    assert not (out / "model").exists()
    exported = cli("export", str(ckpt), "--output", str(tmp_path / "exported"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    # metrics.jsonl: the bad step is logged, its NaN as "nan", never null.
    text = (out / "metrics.jsonl").read_text()
    assert "null" not in text
    steps = [json.loads(x) for x in text.splitlines()]
    assert [m["step"] for m in steps] == [1, 2] and steps[1]["grad_norm"] == "nan" and steps[1]["skipped"] is True
    # The step's rows: a header naming the metric, then every row with ids and text.
    head, *rows = [json.loads(x) for x in (out / "nonfinite-step-2.jsonl").read_text().splitlines()]
    assert head["nonfinite"] == ["grad_norm"] and head["grad_norm"] == "nan"
    assert len(rows) == 4 and all(r["prompt_text"] and r["chosen_ids"] for r in rows)
    # --resume with a lowered learning rate continues from step 1 on the new rate. (Step 1's own update at
    # lr=1e30 already made the weights ~1e30, so step 2's gradient overflows again: the run stops again
    # at step 2, applying nothing, which is the honest outcome for weights that were damaged before the stop.)
    again = cli("train", "configs/dpo.yaml", f"output_dir={out}", *NAN_RUN, "train.learning_rate=1e-5", "--resume")
    assert "resumed from" in again.stderr and "step-000001 at step 1" in again.stderr
    assert "replaced by 1e-05" in again.stderr
    assert read_metrics(out / "metrics.jsonl")[1]["lr"] == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi / 5)))


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about item {i}:"} for i in range(32)])


def _rloo(tmp_path, prompts, name, reward, *extra):
    return load_run_config(None, [
        "algorithm=rloo", f"output_dir={tmp_path / name}", "model.name=tiny-random-llama", f"data.path={prompts}",
        "data.max_length=64", "train.progress_bar=false", "train.lr_scheduler=constant", f"rloo.reward={reward}",
        "rloo.max_new_tokens=6", "rloo.samples_per_prompt=2", "train.micro_batch_size=4", "train.learning_rate=1e-2",
        "train.max_steps=4", "train.save_steps=1", *extra,
    ])  # fmt: skip


def test_nan_reward_stops_names_the_completion_and_resume_equals_a_clean_run(tmp_path, prompts_file, monkeypatch):
    flag = tmp_path / "flag"
    flag.write_text("")
    monkeypatch.setenv("PREFTUNE_TEST_NAN_FLAG", str(flag))
    with pytest.raises(NonFiniteError) as err:
        loop_mod.train(_rloo(tmp_path, prompts_file, "run", NAN_REWARD))
    msg = str(err.value)
    assert "step 2: non-finite" in msg and "nonfinite/rewards=0.25 of the rows" in msg
    assert "first: reward nan for prompt 'Tell me about item" in msg and "completion '" in msg
    rows = [json.loads(x) for x in (tmp_path / "run" / "nonfinite-step-2.jsonl").read_text().splitlines()[1:]]
    assert any(r["reward_score"] == "nan" and r["completion"] is not None for r in rows)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000001"]
    flag.unlink()  # the cause is fixed: resume continues and ends as if nothing had happened
    resumed = loop_mod.train(_rloo(tmp_path, prompts_file, "run", NAN_REWARD, "train.resume_from=latest"))
    clean = loop_mod.train(_rloo(tmp_path, prompts_file, "clean", NAN_REWARD))
    a, b = load_file(str(resumed.model_dir / "model.safetensors")), load_file(str(clean.model_dir / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_skip_mode_drops_the_bad_update_and_goes_on(tmp_path, prompts_file, monkeypatch):
    flag = tmp_path / "flag"
    flag.write_text("")
    monkeypatch.setenv("PREFTUNE_TEST_NAN_FLAG", str(flag))
    res = loop_mod.train(_rloo(tmp_path, prompts_file, "skip", NAN_REWARD, "train.nonfinite=skip"))
    ms = [m for m in read_metrics(res.metrics_path) if "loss" in m]
    assert [m["step"] for m in ms] == [1, 2, 3, 4]
    assert [m.get("skipped", False) for m in ms] == [False, True, False, False]
    assert math.isnan(ms[1]["loss"]) and all(math.isfinite(m["loss"]) for m in ms if not m.get("skipped"))
    assert all(torch.isfinite(v).all() for v in load_file(str(res.model_dir / "model.safetensors")).values())


def test_skip_mode_stops_after_consecutive_bad_steps(tmp_path):
    out = tmp_path / "skips"
    proc = cli("train", "configs/dpo.yaml", f"output_dir={out}", *NAN_RUN, "train.nonfinite=skip", "train.nonfinite_max_skips=2")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "2 steps in a row (train.nonfinite_max_skips) were non-finite, the last at step 3" in proc.stderr
    ms = read_metrics(out / "metrics.jsonl")
    assert [(m["step"], m.get("skipped", False)) for m in ms] == [(1, False), (2, True), (3, True)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_when_one_sees_nan(tmp_path, prompts_file):
    """Rank 1's reward is NaN, rank 0's is not: both stop at the same step, neither hangs."""
    flag = tmp_path / "flag"
    flag.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PREFTUNE_TEST_NAN_FLAG": str(flag), "NAN_RANK": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "preftune", "train", str(ROOT / "configs" / "rloo.yaml"), f"output_dir={tmp_path / 'two'}",
           "model.name=tiny-random-llama", f"data.path={prompts_file}", "data.max_length=64", "train.progress_bar=false",
           f"rloo.reward={NAN_REWARD}", "rloo.max_new_tokens=6", "rloo.samples_per_prompt=2", "train.micro_batch_size=2",
           "train.max_steps=4", "train.save_steps=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    # torchrun ends the other worker once one exits, so the second line may be cut; the gathered rows
    # show that both processes reached the same verdict at step 2 (the gather is collective).
    errors = [x for x in proc.stderr.splitlines() if x.startswith("preftune: error: step 2: non-finite")]
    assert errors, proc.stderr[-3000:]
    assert "Timeout" not in proc.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "two")] == ["step-000001"]
    rows = [json.loads(x) for x in (tmp_path / "two" / "nonfinite-step-2.jsonl").read_text().splitlines()[1:]]
    assert {r["rank"] for r in rows} == {0, 1} and any(r["rank"] == 1 and r["reward_score"] == "nan" for r in rows)


def test_dead_run_warnings_once_in_log_and_metrics(tmp_path, caplog):
    cfg = load_run_config(ROOT / "configs" / "sft_tiny.yaml", [
        f"output_dir={tmp_path / 'dead'}", "train.learning_rate=1e3", "train.max_steps=12", "train.progress_bar=false",
        "train.dead_run_steps=4"])  # fmt: skip
    with caplog.at_level("WARNING", logger="preftune.train"):
        res = loop_mod.train(cfg)
    warnings = [m for m in read_metrics(res.metrics_path) if "warning" in m]
    assert len(warnings) == 2, warnings
    assert any("gradient norm has been exactly 0 for 4 steps" in w["warning"] for w in warnings)
    assert any(f"{math.log(1024):.4f} = ln |V|" in w["warning"] for w in warnings)
    assert sum("ln |V|" in r.getMessage() for r in caplog.records) == 1


def test_equal_rewards_in_every_group_warn(tmp_path, prompts_file):
    res = loop_mod.train(_rloo(tmp_path, prompts_file, "flat", CONSTANT_REWARD, "train.dead_run_steps=3", "train.save_steps=0"))
    ms = read_metrics(res.metrics_path)
    warnings = [(m["step"], m["warning"]) for m in ms if "warning" in m and "rewards have been equal" in m["warning"]]
    assert len(warnings) == 1 and warnings[0][0] == 3, warnings
    assert "every group's rewards have been equal for 3 steps" in warnings[0][1]
    assert all(m["zero_variance_groups"] == 1.0 for m in ms if "zero_variance_groups" in m)
