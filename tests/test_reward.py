"""Reward models end to end: pooling, training (pairs, rankings, margins, LoRA, ensembles), scoring, bad input."""

import json
import logging
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from preftune.algorithms.reward import PLAIN_CHAT_TEMPLATE, RewardModelAlgorithm
from preftune.config import ConfigError
from preftune.run_config import load_run_config
from preftune.data.records import DataError
from preftune.losses.reward import bradley_terry_loss
from preftune.models.loading import load_model
from preftune.models.reward_head import last_token_index, sequence_rewards
from preftune.rewards import FunctionReward, RewardModel, RewardSource
from preftune.data.source import split_eval
from preftune.train.loop import build_algorithm, train
from tests.conftest import cli, write_jsonl

WORDS = ["apple", "tree", "blue", "stone", "river", "cat", "moon", "red"]


def count_good(prompts, completions):
    """Gold reward of the synthetic data: how often 'good' occurs in the completion."""
    return [c.split().count("good") for c in completions]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Six-word completions; the one with more 'good's is preferred (a known scoring rule)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        if a == b:
            continue
        texts = []
        for k in (a, b):
            words = ["good"] * k + [rng.choice(WORDS) for _ in range(6 - k)]
            rng.shuffle(words)
            texts.append(" " + " ".join(words))
        chosen, rejected = texts if a > b else texts[::-1]
        rows.append({"prompt": f"Review {rng.choice(WORDS)}:", "chosen": chosen, "rejected": rejected})
    return rows


def reward_run(tmp_path, data, *overrides):
    return load_run_config(None, [
        "algorithm=reward", "model.name=tiny-random-llama", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
        "train.micro_batch_size=8", "train.max_steps=3", "train.learning_rate=3e-3", "train.progress_bar=false",
        *overrides,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny reward model trained on synthetic pairs with a held-out split (shared by several tests)."""
    tmp = tmp_path_factory.mktemp("reward")
    data = write_jsonl(tmp / "synthetic.jsonl", synthetic_pairs(300))
    run = reward_run(
        tmp, data, "data.eval_fraction=0.2", "train.micro_batch_size=16", "train.max_steps=30", "train.learning_rate=5e-3",
        "train.warmup_steps=3", "train.eval_batch_size=64", "reward.gold_reward=tests.test_reward:count_good",
    )  # fmt: skip
    result = train(run)
    return tmp, result


# ------------------------------------------------------------------------------------ pooling


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pooling_reads_last_real_token_under_left_and_right_padding_with_pad_eq_eos(arch):
    model, tok = load_model(f"tiny-random-{arch}", model_class=AutoModelForSequenceClassification)
    pad = tok.pad_token_id
    assert pad == tok.eos_token_id == 2
    seqs = [[5, pad, 7, 9, pad], [11, 12], [pad, 30, 31, 32, 33, 34, pad]]  # EOS inside and at the end
    with torch.no_grad():
        alone = torch.cat([sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
        t = max(map(len, seqs))
        right = torch.tensor([s + [pad] * (t - len(s)) for s in seqs])
        left = torch.tensor([[pad] * (t - len(s)) + s for s in seqs])
        right_mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs])
        left_mask = right_mask.flip(-1)
        assert last_token_index(right_mask).tolist() == [4, 1, 6] and last_token_index(left_mask).tolist() == [6, 6, 6]
        assert torch.allclose(sequence_rewards(model, right, right_mask), alone, atol=1e-5)
        assert torch.allclose(sequence_rewards(model, left, left_mask), alone, atol=1e-5)
        # transformers' own forward finds the last token by pad id: it skips a final EOS (rows 0, 2) and
        # reads the token before; that is our reward of the row without its final EOS.
        hf = model(input_ids=right, attention_mask=right_mask).logits[:, 0]
        without_eos = sequence_rewards(model, torch.tensor([seqs[0][:-1]]), torch.ones(1, 4, dtype=torch.long))
        assert torch.allclose(hf[0], without_eos[0], atol=1e-5) and not torch.allclose(hf[0], alone[0], atol=1e-3)
        assert torch.allclose(hf[1], alone[1], atol=1e-5)


# ------------------------------------------------------------------------------------ training


def test_learns_a_known_rule_to_high_heldout_accuracy(trained):
    tmp, result = trained
    report = json.loads((tmp / "run" / "reward_eval.json").read_text())
    assert report["split"] == "held-out" and report["pairs"] == 60
    assert report["accuracy"] >= 0.9, report
    assert result.last_metrics["eval/accuracy"] == pytest.approx(report["accuracy"])  # loop eval == scoring path
    assert report["gold"]["spearman"] > 0.5 and report["gold"]["label_agreement"] == 1.0
    assert {"ece", "bins"} <= set(report["calibration"]) and report["rewards"]["count"] == 120
    metrics = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "margin", "log_likelihood", "rewards/chosen", "rewards/rejected", "rewards/mean"} <= set(metrics[0])
    spec = json.loads((result.model_dir / "reward_config.json").read_text())
    assert spec["offset"] == pytest.approx(report["rewards"]["mean"])


def test_saved_model_reloads_in_transformers_with_the_same_scores(trained):
    tmp, result = trained
    rows = synthetic_pairs(5, seed=9)
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    rm = RewardModel.load(tmp / "run")  # a run's OUTPUT_DIR
    assert isinstance(rm, RewardSource)
    ours = rm(prompts, completions, batch_size=2)
    assert len(ours) == 5 and list(ours) == ours.scores and ours.std == [0.0] * 5
    hf = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    examples = rm.members[0].encode(prompts, completions)
    t = max(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in examples)
    ids = [e["prompt_ids"] + e["completion_ids"] for e in examples]
    batch = torch.tensor([x + [tok.pad_token_id] * (t - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (t - len(x)) for x in ids])
    with torch.no_grad():
        plain = hf(input_ids=batch, attention_mask=mask).logits[:, 0]
        with_eos = torch.stack([hf(input_ids=torch.tensor([x + [tok.eos_token_id]])).logits[0, 0] for x in ids])
    assert torch.allclose(plain, torch.tensor(ours.scores), atol=1e-5)
    assert torch.allclose(with_eos, plain, atol=1e-5)  # a trailing EOS (= pad) changes nothing


def test_margin_column_rides_along_and_enters_the_loss(tmp_path):
    rows = [{**r, "margin": float(i % 3)} for i, r in enumerate(synthetic_pairs(8))]
    rows[5]["chosen"] = " good" * 200  # dropped by truncation: margins must stay aligned with their pairs
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    run = reward_run(tmp_path, data, "reward.margin_column=margin", "data.max_length=64", "data.truncation=drop")
    algo, examples, _, _ = build_algorithm(run)
    assert [e["margin"] for e in examples] == [float(i % 3) for i in range(8) if i != 5]
    batch = algo.collate(examples[:4])
    with torch.no_grad():
        loss, metrics = algo(batch)
        rewards = sequence_rewards(algo.policy, batch["input_ids"], batch["attention_mask"])
    expected, _ = bradley_terry_loss(rewards[:4], rewards[4:], margin=torch.tensor([0.0, 1.0, 2.0, 0.0]))
    assert loss.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert algo.count_units(batch) == 4 and metrics["accuracy"][1].item() == 4


def test_plackett_luce_on_rankings_with_ties(tmp_path):
    rng = random.Random(1)
    rows = []
    for i in range(16):
        comps = [" " + " ".join(["good"] * k + ["stone"] * (4 - k)) for k in (0, 1, 2, 3)]
        order = sorted(range(4), key=lambda j: -j)  # more 'good' = better; 0 and 1 tied at the bottom half the time
        ranking = order[:2] + ([[order[2], order[3]]] if i % 2 else order[2:])
        rows.append({"prompt": f"Q{rng.randint(0, 9)}:", "completions": comps, "ranking": ranking})
    data = write_jsonl(tmp_path / "rank.jsonl", rows)
    run = reward_run(tmp_path, data, "reward.loss=plackett_luce", "reward.centering_coef=0.01", "data.eval_fraction=0.25", "train.micro_batch_size=4")
    result = train(run)
    assert {"accuracy", "centering", "log_likelihood", "eval/accuracy"} <= set(result.last_metrics)
    report = json.loads((tmp_path / "run" / "reward_eval.json").read_text())
    held = split_eval(list(range(16)), 0.25, run.train.seed)[1]
    assert report["loss"] == "plackett_luce" and report["pairs"] == sum(5 if i % 2 else 6 for i in held)  # a tie: no pair
    # with loss=bt the same rankings become pairs (ties give none)
    pairs = RewardModelAlgorithm.load_records(run.algo.__class__(rankings_to_pairs="best_vs_rest"), str(data), "train")
    assert len(pairs) == 16 * 3 and pairs[0].chosen == rows[0]["completions"][3]


@pytest.mark.parametrize("loss", ["bt", "plackett_luce"])
def test_micro_batch_split_does_not_change_the_update(tmp_path, loss):
    data = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(16))
    results = []
    for micro, accum in [(8, 1), (2, 4)]:
        run = reward_run(tmp_path / f"{micro}", data, f"reward.loss={loss}", "train.max_steps=2",
                         f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}", "data.group_by_length=false")  # fmt: skip
        results.append(train(run).last_metrics)
    for key in ("loss", "grad_norm", "accuracy", "margin"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-4, abs=1e-6), key


def test_lora_reward_model_merges_into_a_plain_classifier(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(16))
    run = reward_run(tmp_path, data, "model.lora.enabled=true", "model.lora.r=4", "model.lora.merge_on_save=true", "model.name=tiny-random-qwen2")
    result = train(run)
    report = json.loads((tmp_path / "run" / "reward_eval.json").read_text())
    assert report["split"].startswith("train") and report["pairs"] == 16
    hf = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert type(hf).__name__ == "Qwen2ForSequenceClassification"
    rm = RewardModel.load(result.model_dir)
    assert len(rm(["Q:"], [" good good"]).scores) == 1


# ------------------------------------------------------------------------------------ ensembles + CLI


def test_ensemble_through_the_cli_then_score(tmp_path):
    out = tmp_path / "ens"
    proc = cli("train", "configs/reward_tiny.yaml", f"output_dir={out}", "reward.ensemble_size=2", "reward.combine=min",
               "train.max_steps=4", "train.eval_steps=0", "train.progress_bar=false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model saved to") == 2
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest == {"members": ["member-0/model", "member-1/model"], "combine": "min", "k": 1.0}
    m0, m1 = (json.loads((out / f"member-{i}" / "reward_eval.json").read_text()) for i in (0, 1))
    assert m0["pairs"] == m1["pairs"] == 12  # the same held-out rows for every member
    logs = [[json.loads(x) for x in (out / f"member-{i}" / "metrics.jsonl").read_text().splitlines()] for i in (0, 1)]
    steps = [[row["loss"] for row in log if "loss" in row] for log in logs]
    assert steps[0] != steps[1]  # different init and data order
    root = json.loads((out / "reward_eval.json").read_text())
    assert root["ensemble"]["members"] == 2 and root["combine"] == "min" and root["ensemble"]["mean_std"] > 0

    # The Python API: members shifted by their offsets, then combined.
    rm = RewardModel.load(out)
    assert rm.combine == "min" and len(rm.members) == 2
    prompts, completions = ["Hello"] * 3, [" a b", " good good", " what"]
    got = rm(prompts, completions)
    members = torch.stack([
        torch.tensor(RewardModel.load(out / f"member-{i}")(prompts, completions).scores)
        - json.loads((out / f"member-{i}" / "model" / "reward_config.json").read_text())["offset"]
        for i in (0, 1)
    ])  # fmt: skip
    assert torch.allclose(torch.tensor(got.members), members, atol=1e-5)
    assert torch.allclose(torch.tensor(got.scores), members.min(0).values, atol=1e-5)
    assert torch.allclose(torch.tensor(got.std), members.std(0, unbiased=False), atol=1e-5)
    mean = RewardModel.load(out, combine="mean_minus_std", k=2.0)(prompts, completions)
    assert torch.allclose(torch.tensor(mean.scores), members.mean(0) - 2 * members.std(0, unbiased=False), atol=1e-5)

    # `preftune score` on completion rows (plain text and a conversation) with the ensemble.
    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "Hello", "completion": " a b", "id": 7},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
    ])  # fmt: skip
    scores = tmp_path / "scores.jsonl"
    proc = cli("score", f"model={out}", f"data={rows}", f"output={scores}", "batch_size=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (json.loads(x) for x in scores.read_text().splitlines())
    assert first["id"] == 7 and first["score"] == pytest.approx(min(first["member_scores"]), abs=1e-6)
    assert first["score"] == pytest.approx(got.scores[0], abs=1e-5) and len(second["member_scores"]) == 2
    assert second["score_std"] >= 0
    summary = json.loads((tmp_path / "scores.jsonl.report.json").read_text())
    assert summary["kind"] == "completions" and summary["members"] == 2 and summary["rewards"]["count"] == 2


def test_score_cli_on_pairs_with_gold(trained, tmp_path):
    tmp, result = trained
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(20, seed=5))
    out = tmp_path / "s.jsonl"
    proc = cli("score", f"model={result.model_dir}", f"data={data}", f"output={out}", f"report={tmp_path / 'r.json'}",
               "gold_reward=tests.test_reward:count_good")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 20 and {"chosen_score", "rejected_score", "chosen_gold_score"} <= set(rows[0])
    assert "chosen_score_std" not in rows[0]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kind"] == "pairs" and report["accuracy"] >= 0.8 and report["gold"]["pearson"] > 0.5
    proc = cli("score", f"model={result.model_dir}", f"data={data}", "gold_reward=nowhere:fn")
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------ bad input


def _config(**kw):
    return RewardModelAlgorithm.Config(**kw)


def test_bad_rankings_are_located(tmp_path):
    good = {"prompt": "Q", "completions": [" a", " b", " c"], "ranking": [0, 1, 2]}
    cases = [
        ({"ranking": [0, 0, 1]}, "completion 0 appears more than once"),
        ({"ranking": [0, 2]}, "does not place completion(s) 1"),
        ({"ranking": "0>1>2"}, "expected a non-empty list"),
    ]
    for i, (patch, message) in enumerate(cases):
        path = write_jsonl(tmp_path / f"r{i}.jsonl", [good, {**good, **patch}])
        with pytest.raises(DataError) as err:
            RewardModelAlgorithm.load_records(_config(), str(path), "train")
        assert f"r{i}.jsonl, row 2, field 'ranking'" in str(err.value) and message in str(err.value)


def test_identical_pairs_are_counted_dropped_or_refused(tmp_path, caplog):
    rows = synthetic_pairs(3) + [{"prompt": "Q", "chosen": " same", "rejected": " same"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="preftune.algorithms"):
        records = RewardModelAlgorithm.load_records(_config(), str(path), "train")
    assert len(records) == 3 and "dropped 1 pair(s) whose chosen and rejected are identical (rows 4)" in caplog.text
    with pytest.raises(DataError, match=r"p.jsonl, row 4, field 'rejected': 'chosen' and 'rejected' are identical"):
        RewardModelAlgorithm.load_records(_config(identical_pairs="error"), str(path), "train")


def test_margin_column_of_the_wrong_type(tmp_path):
    rows = [{**r, "margin": 1.0} for r in synthetic_pairs(3)]
    rows[2]["margin"] = "high"
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError, match=r"m.jsonl, row 3, field 'margin': expected a number \(the pair's margin\), got str 'high'"):
        RewardModelAlgorithm.load_records(_config(margin_column="margin"), str(path), "train")
    with pytest.raises(DataError, match=r"row 1, field 'strength': missing field"):
        RewardModelAlgorithm.load_records(_config(margin_column="strength"), str(path), "train")
    csv = tmp_path / "m.csv"
    csv.write_text("prompt,chosen,rejected,margin\nQ,good,bad,0.5\n")
    assert RewardModelAlgorithm.load_records(_config(margin_column="margin"), str(csv), "train")[0].margin == 0.5


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="margin_column"):
        load_run_config(None, ["algorithm=reward", "data.path=x.jsonl", "reward.loss=plackett_luce", "reward.margin_column=m"])
    with pytest.raises(ConfigError, match=r"reward.gold_reward: .*cannot import module 'no_such_module'"):
        load_run_config(None, ["algorithm=reward", "data.path=x.jsonl", "reward.gold_reward=no_such_module:f"])
    with pytest.raises(ConfigError, match="reward.member"):
        load_run_config(None, ["algorithm=reward", "data.path=x.jsonl", "reward.member=2", "reward.ensemble_size=2"])
    data = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(8))
    with pytest.raises(ConfigError, match="member-i"):  # an ensemble is trained member by member
        build_algorithm(reward_run(tmp_path, data, "reward.ensemble_size=2"))


def test_function_reward(tmp_path):
    gold = FunctionReward("tests.test_reward:count_good")
    assert isinstance(gold, RewardSource) and gold(["p", "q"], [" good good x", " x"]) == [2.0, 0.0]
    script = tmp_path / "scorer.py"
    script.write_text("def length(completions, **kwargs):\n    return [len(c) for c in completions]\n"
                      "def broken(prompts, completions):\n    return ['x' for _ in completions]\n")  # fmt: skip
    assert FunctionReward(f"{script}:length")(["a"], ["abc"]) == [3.0]
    with pytest.raises(ValueError, match="row 0: expected a number, got str"):
        FunctionReward(f"{script}:broken")(["a"], ["b"])
    with pytest.raises(ValueError, match="returned 1 scores for 2 rows"):
        FunctionReward(lambda prompts, completions: [1.0])(["a", "b"], ["c", "d"])
    for spec, message in [("no_colon", "expected 'module:function'"), ("nowhere_mod:f", "cannot import"), ("json:nope", "no attribute 'nope'")]:
        with pytest.raises(ValueError, match=message):
            FunctionReward(spec)


def test_reward_model_takes_generated_text_for_conversational_prompts(trained):
    _, result = trained
    rm = RewardModel.load(result.model_dir)
    convo = [{"role": "user", "content": "Rate"}]
    a = rm([convo], [" good good"]).scores
    b = rm([convo], [[{"role": "assistant", "content": " good good"}]]).scores
    assert a == b and rm([], []).scores == []


# ------------------------------------------------------------------------------------ real encoder


def test_minilm_encoder_trains_and_scores(tmp_path):
    run = load_run_config(None, [
        "algorithm=reward", "reward.backbone=minilm-l6-v2", "data.path=builtin:tiny_pairs", "data.max_rows=16",
        f"output_dir={tmp_path / 'run'}", "train.micro_batch_size=4", "train.max_steps=3", "train.learning_rate=5e-5",
        "train.progress_bar=false", "train.eval_batch_size=16",
    ])  # fmt: skip
    result = train(run)
    assert result.steps == 3 and result.last_metrics["loss"] > 0
    hf = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    assert type(hf).__name__ == "BertForSequenceClassification" and tok.chat_template == PLAIN_CHAT_TEMPLATE
    rm = RewardModel.load(result.model_dir)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    scores = rm([prompt, prompt], ["The capital of France is Paris.", "I don't know."]).scores
    (example,) = rm.members[0].encode([prompt], ["The capital of France is Paris."])
    ids = example["prompt_ids"] + example["completion_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids[1:6]) == "user : what is the"
    with torch.no_grad():
        plain = hf(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert plain == pytest.approx(scores[0], abs=1e-5)
