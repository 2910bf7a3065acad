"""The diverse-preferences study end to end through the CLI on a tiny model (configs/studies/diverse_quick.yaml)."""

import html
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from preftune.eval.formatting import format_number
from tests.conftest import cli


def test_quick_study_runs_and_its_report_shows_its_results(tmp_path):
    out = tmp_path / "study"
    # One arm (80/20) keeps the test short; the config's second arm runs the same code.
    proc = cli("study", "configs/studies/diverse_quick.yaml", f"output_dir={out}", "mixes=[0.8]",
               env={"PREFTUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mix80 reward-pooled" in proc.stdout and f"report: {out / 'report.html'}" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    arm = results["arms"]["mix80"]
    assert arm["pairs"]["A"] > arm["pairs"]["B"] > 0  # 5 of 6 annotators in A
    assert set(arm["reward_models"]) == {"pooled", "conditioned", "mixture"}
    assert all(set(acc) == {"A", "B"} and all(0 <= v <= 1 for v in acc.values()) for acc in arm["reward_models"].values())
    assert set(arm["policies"]) == {"dpo", "grdpo", "dpo_conditioned", "rloo_min"}
    for per_group in arm["policies"].values():
        assert set(per_group) == {"A", "B"} and all(isinstance(v["kl"], float) for v in per_group.values())
    assert arm["summary"]["minority"] == "B" and "minority_rm_accuracy_pooled" in arm["summary"]
    em = json.loads((out / "mix80" / "em_components.json").read_text())
    assert em == arm["em"] and len(em["annotators"]) == 6 and 0 <= em["assignment_accuracy"] <= 1
    assert (out / "mix80" / "grdpo" / "model" / "group_weights.json").is_file()
    neural, mixture = arm["neural_em"], json.loads((out / "mix80" / "reward-mixture" / "reward_eval.json").read_text())
    assert sorted(a for c in neural["components"].values() for a in c["annotators"]) == sorted(em["annotators"])
    for k, c in neural["components"].items():  # each component's accuracy per group is its reward_eval.json's
        assert c["accuracy"] == {g: v["accuracy"] for g, v in mixture["components"][k]["groups"].items()}
    assert arm["reward_models"]["mixture"] == {g: neural["components"][str(k)]["accuracy"][g] for g, k in neural["serves"].items()}
    assert "mix80 mixture component 0" in proc.stdout
    page = (out / "report.html").read_text()
    for name, m in results["models"].items():  # every (arm, method, group) row: its numbers are results.json's
        row = page.split(f'<tr data-model="{html.escape(name)}">')[1].split("</tr>")[0]
        for key in ("reward_mean", "kl", "reward_se"):
            assert f'data-key="{key}">{html.escape(format_number(m[key]))}</td>' in row, (name, key)
    assert html.escape(json.dumps(results["arms"], indent=2, ensure_ascii=False)) in page
    assert page.count('src="data:image/png;base64,') == 6  # gains A vs B, reward vs KL for A and B, EM (linear, neural), RM accuracy
    assert sum(1 for name in results["models"] if name.endswith("@B")) == 4
    models = results["models"]  # a plain policy is sampled once and scored by each group: one KL, two rewards
    assert models["mix80/dpo @A"]["kl"] == models["mix80/dpo @B"]["kl"]
    assert models["gold/rloo_min @B"]["reward_mean"] == models["gold/rloo_min @B"]["extra_rewards"]["B"]["mean"]
    assert models["mix80/dpo @B"]["win_rate"] is None and models["mix80/dpo @A"]["win_rate"] is not None
    assert arm["policies"]["rloo_min"]["B"]["gold_reward"] == models["gold/rloo_min @B"]["reward_mean"]
    from preftune.experiments.diverse_report import group_gains  # the main plot's points: gains over π_ref

    gains = {(p["arm"], p["method"]): p for p in group_gains(["A", "B"], results)}
    assert set(gains) == {("mix80", "dpo"), ("mix80", "grdpo"), ("mix80", "dpo_conditioned"), ("gold", "rloo_min")}
    cond = models["mix80/dpo_conditioned @B"]
    assert gains[("mix80", "dpo_conditioned")]["gain"]["B"] == cond["reward_mean"] - cond["reference_reward_mean"]


def test_reward_models_alone_on_more_pairs_per_prompt(tmp_path):
    """pairs_per_prompt=2 draws 4 samples per prompt, paired disjointly, for training and held-out pairs;
    with no policy_methods the study trains and reports the reward models only."""
    out = tmp_path / "study"
    args = ["study", "configs/studies/diverse_quick.yaml", f"output_dir={out}", "mixes=[0.8]", "reward_methods=[pooled]"]
    proc = cli(*args, "pairs_per_prompt=2", "policy_methods=[]", "reward_backbone=minilm-l6-v2",
               env={"PREFTUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["models"] == {} and set(results["arms"]["mix80"]["reward_models"]) == {"pooled"}
    config = results["configs"]["mix80/reward-pooled"]  # the reward model is the sentence encoder, π_ref the tiny llama
    assert config["reward"]["backbone"] == "minilm-l6-v2" and config["model"]["name"] == "tiny-random-llama"
    assert json.loads((out / "mix80" / "reward-pooled" / "model" / "config.json").read_text())["model_type"] == "bert"
    page = (out / "report.html").read_text()  # no policies: no policy plots, the EM and reward-model ones
    assert page.count('src="data:image/png;base64,') == 2 and not (out / "group_tradeoff.png").exists()
    (table,) = results["tables"].values()  # the accuracies as a table, in the page and in results.md
    acc = results["arms"]["mix80"]["reward_models"]["pooled"]
    assert table["rows"] == [["mix80", "pooled", acc["A"], acc["B"], *results["arms"]["mix80"]["pairs"].values()]]
    assert f'<td data-key="{html.escape(table["columns"][3])}">{format_number(acc["B"])}</td>' in page
    assert f"| mix80 | pooled | {format_number(acc['A'])} | {format_number(acc['B'])} |" in (out / "results.md").read_text()
    samples = json.loads((out / "jobs" / "sample_train_pairs.json").read_text())["result"]
    prompts = [r["prompt"] for r in samples]
    assert len(samples) > 40 and all(prompts.count(p) <= 2 for p in prompts)  # 40 prompts, up to 2 pairs each
    assert sum(prompts.count(p) == 2 for p in set(prompts)) > 30
    assert all(r["a"] != r["b"] for r in samples)
    held = [json.loads(line) for line in (out / "held_out_pairs.jsonl").read_text().splitlines()]
    assert len({(r["prompt"], r["chosen"], r["rejected"]) for r in held if r["group"] == "A"}) > 8  # 8 test prompts
    proc = cli(*args, "pairs_per_prompt=0")
    assert proc.returncode == 2 and "study.pairs_per_prompt: must be >= 1, got 0" in proc.stderr


def test_study_config_errors_are_one_line():
    proc = cli("study", "configs/studies/diverse_quick.yaml", "policy_methods=[dpo,ppo]")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "study.policy_methods: unknown method 'ppo'. Valid: dpo, grdpo, dpo_conditioned, rloo_mean, rloo_min" in proc.stderr
    proc = cli("study", "configs/studies/diverse_quick.yaml", "mixes=[1.0]")
    assert proc.returncode == 2 and "study.mixes: each share must lie strictly between 0 and 1, got 1.0" in proc.stderr



def test_a_finished_group_model_is_kept_when_its_job_is_killed_in_the_next(tmp_path, monkeypatch):
    import preftune.experiments.diverse as diverse
    from preftune.experiments.jobs import finished

    calls = []
    real = diverse.train_resumable

    def killed_in_group_b(member, key, **kw):
        calls.append(member.output_dir)
        if str(member.output_dir).endswith("group-B") and len(calls) == 2:
            raise KeyboardInterrupt
        return real(member, key, **kw)

    monkeypatch.setattr(diverse, "train_resumable", killed_in_group_b)
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "study"
    cfg = diverse.load_diverse_config("configs/studies/diverse_quick.yaml", [
        f"output_dir={out}", "mixes=[0.5]", "reward_methods=[per_group]", "policy_methods=[]", "train_overrides=[train.micro_batch_size=2]"])
    with pytest.raises(KeyboardInterrupt):
        diverse.run_diverse_study(cfg, progress=False)
    group_a = out / "mix50" / "reward-per_group" / "group-A"
    assert (group_a / "model").is_dir() and json.loads((group_a / "study_job.json").read_text())["finished"] is True
    before = _weights(group_a / "model")
    diverse.run_diverse_study(cfg, progress=False)
    assert [Path(c).name for c in calls] == ["group-A", "group-B", "group-B"]  # A was not trained again
    after = _weights(group_a / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not finished(group_a, "another key")


def test_a_group_too_small_for_a_batch_is_a_one_line_error(tmp_path):
    """Group B's own reward model gets 4 of the quick study's pairs, fewer than a micro-batch of 8."""
    out = tmp_path / "study"
    proc = cli("study", "configs/studies/diverse_quick.yaml", f"output_dir={out}", "mixes=[0.8]", "reward_methods=[per_group]",
               "policy_methods=[]", env={"PREFTUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{out / 'mix80' / 'pairs.jsonl'}: " in proc.stderr and f"training rows for {out / 'mix80' / 'reward-per_group' / 'group-B'}" in proc.stderr
    assert "fewer than one global batch of 8 (train.micro_batch_size 8" in proc.stderr


def test_full_study_is_sized_for_a_cpu_afternoon():
    """configs/studies/diverse.yaml says it takes about 1.3 h on a quiet 2-core CPU; the estimate keeps it true."""
    from preftune.experiments.costs import LOAD
    from preftune.experiments.diverse import load_diverse_config, plan_stages

    cfg = load_diverse_config("configs/studies/diverse.yaml", [])
    stages = plan_stages(cfg)
    names = [n for n, _ in stages]
    assert "mix80 reward-mixture" in names and "evaluate mix50/dpo" in names and all(s > 0 for _, s in stages)
    # the RL policies on the gold rewards do not depend on the mix: trained and evaluated once for both arms
    assert [n for n in names if "rloo_min" in n] == ["gold rloo_min", "evaluate gold/rloo_min"]
    # π_ref is sampled once on the plain prompts and once per group with the group in the prompt
    assert sum(n.startswith("evaluate reference") for n in names) == 3
    assert sum(n.startswith("evaluate mix80/dpo_conditioned") for n in names) == 2
    assert sum(s for _, s in stages) / 3600 == pytest.approx(1.3, abs=0.1)
    assert sum(s for _, s in stages) < sum(s for _, s in plan_stages(load_diverse_config("configs/studies/diverse.yaml", ["online_steps=40"])))
    more = dict(plan_stages(load_diverse_config("configs/studies/diverse.yaml", ["pairs_per_prompt=2"])))
    for stage in ("sample train pairs", "mix80 reward-pooled", "mix80 dpo"):  # twice the rows, one model load
        assert more[stage] - LOAD == pytest.approx(2 * (dict(stages)[stage] - LOAD))


def _weights(model_dir):
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    assert files, model_dir
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def _records(out):
    return {p.name: p.read_text() for p in (out / "jobs").glob("*.json")}


def test_study_resumes_job_by_job(tmp_path, monkeypatch, caplog):
    """A finished study reruns nothing and keeps no checkpoints; a policy killed mid-training continues
    from its newest checkpoint to the uninterrupted run's weights; save_steps is not part of the keys."""
    import preftune.train.loop as loop
    from preftune.experiments.diverse import load_diverse_config, plan_stages, run_diverse_study

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "study"
    overrides = [f"output_dir={out}", "mixes=[0.8]", "reward_methods=[pooled]", "policy_methods=[dpo, rloo_min]",
                 "train_overrides=[train.progress_bar=false]"]
    cfg = load_diverse_config("configs/studies/diverse_quick.yaml", [*overrides, "save_steps=1"])
    run_diverse_study(cfg, progress=False)
    first, records = json.loads((out / "results.json").read_text()), _records(out)
    ran = {r["name"] for r in map(json.loads, records.values())}
    assert {n for n, _ in plan_stages(cfg)} <= ran  # every planned stage left its record
    assert not list(out.rglob("step-0*")), "a finished run keeps no checkpoints"

    # finished: nothing reruns, the same numbers come out, also with another save_steps
    run_diverse_study(load_diverse_config("configs/studies/diverse_quick.yaml", [*overrides, "save_steps=3"]), progress=False)
    assert _records(out) == records and json.loads((out / "results.json").read_text())["models"] == first["models"]

    # killed after the first checkpoint of the reward model, then of the RL policy: records and models missing
    run_dirs = {"mix80_reward-pooled": out / "mix80" / "reward-pooled", "gold_rloo_min": out / "gold" / "rloo_min"}
    before = {job: _weights(d / "model") for job, d in run_dirs.items()}
    for job, run_dir in run_dirs.items():
        (out / "jobs" / f"{job}.json").unlink()
        shutil.rmtree(run_dir)
    save, to_kill = loop.save_checkpoint, list(run_dirs.values())

    def killed_after_the_first(output_dir, step, **kw):
        save(output_dir, step, **kw)
        if to_kill and Path(output_dir) == to_kill[0]:
            to_kill.pop(0)
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", killed_after_the_first)
    caplog.set_level(logging.INFO)
    for run_dir in run_dirs.values():  # each rerun continues the killed job, then is killed in the next
        with pytest.raises(KeyboardInterrupt):
            run_diverse_study(cfg, progress=False)
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000001"] and not (run_dir / "model").exists()
    run_diverse_study(cfg, progress=False)
    assert "job mix80 dpo: done earlier" in caplog.text
    assert caplog.text.count("step-000001 at step 1") == 2  # both continued from their checkpoint
    assert _records(out).keys() == records.keys()
    for job, run_dir in run_dirs.items():  # the resumed runs' weights are the uninterrupted runs' ...
        after = _weights(run_dir / "model")
        assert not (run_dir / "checkpoints").exists()
        assert before[job].keys() == after.keys() and all(torch.equal(before[job][k], after[k]) for k in after), job
    # ... so the kept evaluation still describes them
    assert json.loads((out / "results.json").read_text())["models"] == first["models"]
