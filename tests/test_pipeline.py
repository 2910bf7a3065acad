"""`preftune pipeline`: rounds of generate -> label -> train -> evaluate on tiny random models.

Every stage kind through the CLI; a SIGKILL in the middle of round 2's training and --resume ending
with the same weights as an uninterrupted run; a changed round-2 setting redoing round 2 only; bad
pipeline files refused before any model loads; a people-labelling stage waiting for the store.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from preftune.cli import main
from tests.conftest import ROOT, cli

TINY = str(ROOT / "configs" / "pipelines" / "tiny.yaml")
TINY_RL = str(ROOT / "configs" / "pipelines" / "tiny_rl.yaml")


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model" / "model.safetensors"))


def _lines(text: str, stage: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{stage}: ")]


def test_every_stage_kind_in_two_rounds_through_the_cli(tmp_path):
    out = tmp_path / "p"
    proc = cli("pipeline", TINY, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = {}
    for done in out.glob("round-*/*/done.json"):
        kinds[done.parent.relative_to(out).as_posix()] = json.loads(done.read_text())["summary"]
    assert sorted(kinds) == ["round-0/sft"] + [f"round-{r}/{s}" for r in (1, 2) for s in
                                               ("evaluate", "generate", "improve", "label", "prefer")]
    assert kinds["round-1/generate"]["samples"] == 16  # 8 prompts x 2
    assert kinds["round-1/improve"]["algorithm"] == "rejection_sampling"
    assert kinds["round-2/improve"]["algorithm"] == "rloo" and kinds["round-2/improve"]["reward_model_rows"] > 0
    assert (out / "round-2/improve/reward/model").is_dir()  # reward model, then RL against it
    # KTO in round 2 reads both rounds' labels; each round samples from the policy the previous trained
    assert list(kinds["round-2/prefer"]["labels_used"]) == ["round-1/label", "round-2/label"]
    assert kinds["round-2/generate"]["policy"] == str(out / "round-1/prefer/run/model")
    assert kinds["round-1/generate"]["policy"] == str(out / "round-0/sft/run/model")
    results = json.loads((out / "results.json").read_text())
    evals = [r["evaluate"] for r in results["rounds"] if r["evaluate"]]
    assert [e["round"] for e in evals] == [1, 2]
    for e in evals:
        assert e["win_rate_vs_start"]["n"] == e["win_rate_vs_previous"]["n"] == 4
        assert (out / e["report"]).is_file()  # each round's own eval report
    # round 1's previous policy is the start model: the two win rates are the same comparison
    assert evals[0]["win_rate_vs_previous"] == evals[0]["win_rate_vs_start"]
    page = (out / "report.html").read_text()
    assert 'data-round="1"' in page and 'data-round="2"' in page and 'href="round-2/evaluate/report.html"' in page
    assert "labels_used" in page and "reward_model_rows" in page  # the data each round used
    assert "report: " in proc.stdout


def test_sigkill_in_round_2_training_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["pipeline", TINY_RL, f"output_dir={full}"]) == 0
    capsys.readouterr()

    checkpoint = cut / "round-2/rl/run/checkpoints/step-000002"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PREFTUNE_TEST_KILL_WHEN": str(checkpoint)}
    proc = subprocess.run([sys.executable, "-m", "preftune", "pipeline", TINY_RL, f"output_dir={cut}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint.is_dir() and not (cut / "round-2/rl/run/model").exists()
    assert (cut / "round-1/evaluate/done.json").is_file() and not (cut / "round-2/rl/done.json").exists()

    assert main(["pipeline", TINY_RL, f"output_dir={cut}", "--resume"]) == 0
    text = capsys.readouterr().out
    assert all("skipped" in line for line in _lines(text, "round-1/rl") + _lines(text, "round-1/evaluate"))
    assert "continuing from its own output" in _lines(text, "round-2/rl")[0]
    a, b = _weights(full / "round-2/rl/run"), _weights(cut / "round-2/rl/run")
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit, as the loop's own resume tests
    assert json.loads((cut / "results.json").read_text())["rounds"][1]["evaluate"]["reward_mean"] == \
        json.loads((full / "results.json").read_text())["rounds"][1]["evaluate"]["reward_mean"]

    # A changed round-2 setting: round 1 is skipped, round 2 redone.
    round_1 = (cut / "round-1/rl/done.json").read_text()
    assert main(["pipeline", TINY_RL, f"output_dir={cut}", "per_round.2.rl.config.rloo.kl_coef=0.2", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "skipped" in _lines(text, "round-1/rl")[0] and "skipped" in _lines(text, "round-1/evaluate")[0]
    assert "redoing" in _lines(text, "round-2/rl")[0] and "redoing" in _lines(text, "round-2/evaluate")[0]
    assert (cut / "round-1/rl/done.json").read_text() == round_1
    assert not torch.equal(_weights(cut / "round-2/rl/run")[next(iter(a))], a[next(iter(a))])


def test_a_finished_output_dir_needs_resume(tmp_path, capsys):
    (tmp_path / "p/round-1/rl").mkdir(parents=True)
    (tmp_path / "p/round-1/rl/started.json").write_text("{}")
    assert main(["pipeline", TINY_RL, f"output_dir={tmp_path / 'p'}"]) == 2
    assert "--resume" in capsys.readouterr().err


BAD = [
    ({"stages": {"generate": {}, "polish": {}}}, "stages.polish.kind: required"),
    ({"stages": {"generate": {}, "x": {"kind": "finetune"}}}, "stages.x.kind: unknown stage kind 'finetune'"),
    ({"stages": {"label": {"judge": "vader"}}}, "stages.label: a label stage needs samples"),
    ({"stages": {"generate": {}, "dpo": {"kind": "train"}}}, "stages.dpo: a train stage needs labels"),
    ({"rounds": 0}, "rounds: must be >= 1"),
    ({"stages": {"generate": {"num_samples": "two"}}}, "stages.generate.num_samples: expected int"),
    ({"rounds": "three"}, "rounds: expected int"),
    ({"stages": {"generate": {}, "label": {}, "t": {"kind": "train", "algorithm": "dpx"}}}, "stages.t.algorithm: unknown 'dpx'"),
    ({"stages": {"generate": {}, "label": {}, "t": {"kind": "train", "config": {"train": {"learnin_rate": 1}}}}},
     "stages.t.config: unknown key 'train.learnin_rate'"),
    ({"per_round": {"3": {"generate": {}}}}, "per_round.3: there is no round 3"),
    ({"stagez": {}}, "unknown key 'stagez'"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_pipeline_files_fail_before_any_model_loads(tmp_path, monkeypatch, capsys, change, message):
    import preftune.models.loading as loading

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_model", no_model)
    base = {"output_dir": str(tmp_path / "out"), "model": "tiny-random-llama", "rounds": 2,
            "train_prompts": "builtin:movie_review_prompts", "gold_reward": "vader", "stages": {"generate": {}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**base, **change}))
    assert main(["pipeline", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_people_label_stage_waits_for_the_store_and_goes_on(tmp_path):
    from preftune.collect.store import Store, db_url

    out = tmp_path / "p"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "preftune", "pipeline", str(ROOT / "configs/pipelines/tiny_human.yaml"),
                                 f"output_dir={out}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            shown = []
            while not any("items labelled" in line for line in shown):  # the project is made; the pipeline waits
                line = proc.stdout.readline()
                assert line, (tmp_path / "stderr.txt").read_text()[-3000:]
                shown.append(line)
            assert any("preftune collect serve" in line for line in shown)
            time.sleep(1.0)
            assert proc.poll() is None  # still waiting for people
            store = Store(db_url(out / "round-1/label/project"))
            alice = store.annotator_id("alice", create=True)
            while (item := store.next_item(alice, overlap=1)) is not None:
                store.submit(alice, item["id"], "rank", [[1], [0]])
            stdout = "".join(shown) + proc.communicate(timeout=300)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert "round-1/label: 0 of 3 items labelled" in stdout and "round-1/label: 3 of 3 items labelled" in stdout
    labels = [json.loads(line) for line in (out / "round-1/label/labels.jsonl").read_text().splitlines()]
    assert len(labels) == 3 and all(r["ranking"] == [[1], [0]] for r in labels)
    assert json.loads((out / "round-1/dpo/done.json").read_text())["summary"]["training_rows"] == 3


def test_a_generate_chunk_cut_short_is_dropped(tmp_path):
    from preftune.pipeline.stages import _saved_chunks

    path = tmp_path / "samples.partial.jsonl"
    rows = [{"prompt": "p", "completion": str(i)} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "p", "comp')
    assert _saved_chunks(path, [2, 2, 2]) == 2  # rows 0-3 complete; row 4 and the torn line are sampled again
    assert [json.loads(line)["completion"] for line in path.read_text().splitlines()] == ["0", "1", "2", "3"]
