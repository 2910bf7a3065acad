"""Evaluation: statistics against closed forms, log-probs against a plain forward, and `preftune eval`
end to end (report.html valid, plots embedded, its numbers = results.json's)."""

import base64
import json
import math
from html.parser import HTMLParser

import pytest
import torch

from preftune.config import ConfigError, from_dict
from preftune.eval import (best_of_n_kl, distinct_n, format_number, frontier_plot, mean_repeated_ngram_fraction,
                           pareto_front, repeated_ngram_fraction, sequence_kl, wilson_interval, win_rate, write_report)
from preftune.eval.run import EvalConfig, model_entries
from tests.conftest import cli, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def _sequence_logp(first, second, y):
    """log p(y1, y2) of an autoregressive distribution over a 2-token vocabulary, length 2."""
    return math.log(first[y[0]]) + math.log(second[y[0]][y[1]])


def test_sequence_kl_matches_the_exact_kl_of_enumerable_sequences():
    # p and q: p(y1) then p(y2 | y1), over {0, 1}^2 -- four sequences, so KL(p||q) is a finite sum.
    p1, p2 = [0.7, 0.3], [[0.9, 0.1], [0.4, 0.6]]
    q1, q2 = [0.5, 0.5], [[0.6, 0.4], [0.2, 0.8]]
    sequences = [(a, b) for a in (0, 1) for b in (0, 1)]
    exact = sum(
        math.exp(_sequence_logp(p1, p2, y)) * (_sequence_logp(p1, p2, y) - _sequence_logp(q1, q2, y)) for y in sequences
    )
    g = torch.Generator().manual_seed(0)
    n = 20000
    y1 = torch.multinomial(torch.tensor(p1), n, replacement=True, generator=g)
    y2 = torch.stack([torch.multinomial(torch.tensor(p2[int(a)]), 1, generator=g)[0] for a in y1])
    samples = list(zip(y1.tolist(), y2.tolist()))
    policy = [_sequence_logp(p1, p2, y) for y in samples]
    reference = [_sequence_logp(q1, q2, y) for y in samples]
    mean, se = sequence_kl(policy, reference)
    # by hand, chain rule: KL(p1||q1) + Σ_a p1(a) KL(p2(.|a)||q2(.|a)) = 0.08228 + 0.7·0.22629 + 0.3·0.10465
    assert exact == pytest.approx(0.27208, abs=1e-4)
    assert 0 < se < 0.01
    assert abs(mean - exact) < 3 * se
    # tensors work too, and the SE is the sample std (N - 1) over sqrt(N)
    m, s = sequence_kl(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3))
    assert m == pytest.approx(2.0) and s == pytest.approx(1 / math.sqrt(3))
    with pytest.raises(ValueError):
        sequence_kl([0.0, 1.0], [0.0])


def test_win_rate_counts_ties_half_with_a_wilson_interval():
    a = [3, 3, 3, 3, 3, 3, 1, 1, 0, 0]
    b = [1, 1, 1, 1, 1, 1, 1, 1, 2, 2]  # 6 wins, 2 ties, 2 losses
    w = win_rate(a, b)
    assert (w["n"], w["wins"], w["ties"], w["losses"]) == (10, 6, 2, 2)
    assert w["rate"] == pytest.approx(0.7)
    # Wilson 95% interval of 7/10, by hand: centre (p + z²/2n)/(1 + z²/n) ± z/(1 + z²/n)·sqrt(p(1-p)/n + z²/4n²)
    assert w["ci_low"] == pytest.approx(0.39677, abs=1e-4) and w["ci_high"] == pytest.approx(0.89222, abs=1e-4)
    assert wilson_interval(0.5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)

    near = win_rate([1.0, 1.05, 0.0], [1.0, 1.0, 0.5], tie_tolerance=0.1)
    assert (near["wins"], near["ties"], near["losses"]) == (0, 2, 1) and near["rate"] == pytest.approx(1 / 3)
    exact = win_rate([1.0, 1.05, 0.0], [1.0, 1.0, 0.5])
    assert (exact["wins"], exact["ties"], exact["losses"]) == (1, 1, 1)
    all_ties = win_rate([0.5] * 4, [0.5] * 4)
    assert all_ties["rate"] == 0.5 and all_ties["ties"] == 4
    empty = win_rate([], [])
    assert math.isnan(empty["rate"]) and (empty["ci_low"], empty["ci_high"]) == (0.0, 1.0)


def test_best_of_n_kl_closed_form_and_a_fine_discrete_check():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)
    # M equally likely outcomes with distinct rewards: the best of n has P(i) = (i/M)^n - ((i-1)/M)^n;
    # its exact KL to the uniform reference approaches (from below) the closed form as M grows.
    m = 20000
    for n in (2, 4, 8):
        kl = 0.0
        for i in range(1, m + 1):
            p = (i / m) ** n - ((i - 1) / m) ** n
            if p > 0:
                kl += p * math.log(p * m)
        assert kl <= best_of_n_kl(n) + 1e-12
        assert kl == pytest.approx(best_of_n_kl(n), abs=2e-3)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_pareto_front_maximises_reward_and_minimises_kl():
    points = [(0.0, 0.0), (1.0, 1.0), (1.0, 0.5), (2.0, 1.0), (0.5, 1.2), (3.0, 2.0), (3.0, 2.0), (0.1, float("nan"))]
    assert pareto_front(points) == [0, 4, 5]  # (1,1), (1,0.5), (2,1) are beaten by (0.5,1.2); the duplicate goes
    assert pareto_front([(2.0, 1.0), (1.0, 1.0)]) == [1]  # same reward, less KL wins
    assert pareto_front([]) == []


def test_distinct_and_repeated_ngrams():
    texts = ["a b a b", "a c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert repeated_ngram_fraction("a b a b a b", 2) == pytest.approx(3 / 5)
    assert repeated_ngram_fraction("one two", 3) == 0.0
    # "a b c a b c": abc bca cab abc, one repeat in 4; averaged over texts with a 3-gram: (0 + 1/4) / 2
    assert mean_repeated_ngram_fraction(["x y z", "a b c a b c", "short"], 3) == pytest.approx(0.125)
    assert distinct_n([], 2) == 0.0


# --------------------------------------------------------------------------------------------------
# log-probs of sampled ids, report rendering
# --------------------------------------------------------------------------------------------------


def test_sampled_sequence_logps_match_a_plain_forward():
    from preftune.eval.evaluate import _sequence_logps
    from preftune.rollout.sampling import generate_completions
    from preftune.models.loading import load_model

    model, tok = load_model("tiny-random-llama", seed=3)
    rows = generate_completions(model, tok, ["Hello there", "A much longer prompt about rivers", "x"],
                                max_new_tokens=6, seed=1, return_token_ids=True)
    got = _sequence_logps(model, tok, rows, batch_size=2, progress=False, desc="")
    for row, value in zip(rows, got):
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        p = len(row["prompt_ids"])
        expected = sum(float(logp[t - 1, ids[0, t]]) for t in range(p, ids.shape[1]))
        assert value == pytest.approx(expected, abs=1e-4)


def test_extra_rewards_score_the_same_completions():
    """Each extra reward is scored on the completions the gold reward saw: one equal to the gold reward
    gives its mean and SE; a second one gives its own mean over the kept completions."""
    from preftune.eval.evaluate import evaluate
    from preftune.eval.metrics import mean_and_se

    def chars(prompts, completions):
        return [float(len(c)) for c in completions]

    def words(prompts, completions):
        return [float(len(c.split())) for c in completions]

    out = evaluate({"same": "tiny-random-llama"}, "tiny-random-llama", ["Hello there", "Rivers"], chars,
                   extra_rewards={"chars": chars, "words": words}, num_samples=2, max_new_tokens=5, seed=1,
                   progress=False, keep_completions=True)
    for name, m in out["models"].items():
        extra = m["extra_rewards"]
        assert extra["chars"] == {"mean": m["reward_mean"], "se": m["reward_se"]}
        texts = [r["completion"] for r in out["completions"][name]]
        assert (extra["words"]["mean"], extra["words"]["se"]) == mean_and_se([float(len(t.split())) for t in texts])
    assert "extra_rewards" not in evaluate({}, "tiny-random-llama", ["Hi"], chars, max_new_tokens=2, progress=False)["models"]["reference"]


class StrictParser(HTMLParser):
    """Checks that every element is closed in order; collects images and the cells tagged with data-key."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images, self.cells = [], [], [], {}
        self._cell = None
        self._row = None
        self._text = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "tr":
            self._row = attrs.get("data-model")
        if tag == "td" and self._row is not None and "data-key" in attrs:
            self._cell, self._text = (self._row, attrs["data-key"]), []

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
            return
        self.stack.pop()
        if tag == "td" and self._cell is not None:
            self.cells[self._cell] = "".join(self._text)
            self._cell = None
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._text.append(data)


def _parse(html_text: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(html_text)
    parser.close()
    assert html_text.startswith("<!DOCTYPE html>")
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    return parser


def test_report_is_valid_html_and_escapes_data(tmp_path):
    results = {
        "settings": {"num_samples": 1},
        "models": {
            "reference": {"algorithm": "reference", "n": 2, "reward_mean": 0.25, "kl": 0.0, "win_rate": None,
                          "samples": [{"prompt": "<script>alert(1)</script>", "completion": "a & b", "reward": 0.5}]},
            "m<1>": {"algorithm": "dpo", "n": 2, "reward_mean": 1 / 3, "kl": float("nan"),
                     "win_rate": {"n": 2, "wins": 1, "ties": 1, "losses": 0, "rate": 0.75, "ci_low": 0.2, "ci_high": 0.97},
                     "samples": []},
        },
    }
    png = frontier_plot([{"algorithm": "dpo", "label": "b=0.1", "kl": 1.0, "reward": 0.5},
                         {"algorithm": "dpo", "label": "b=0.5", "kl": 0.5, "reward": 0.4},
                         {"algorithm": "reference", "label": "ref", "kl": 0.0, "reward": 0.1}])
    assert png.startswith(PNG_MAGIC)
    path = write_report(results, tmp_path, title="t <x>", configs={"eval": {"models": ["a=b"]}}, plots={"frontier": png})
    text = path.read_text()
    parser = _parse(text)
    assert "<script>" not in text and "&lt;script&gt;" in text and "a &amp; b" in text
    assert base64.b64decode(parser.images[0].split(",", 1)[1]) == png
    assert (tmp_path / "frontier.png").read_bytes() == png
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"]["m<1>"]["kl"] is None  # NaN is not JSON: null, shown as n/a
    assert parser.cells[("m<1>", "kl")] == "n/a"
    assert parser.cells[("m<1>", "reward_mean")] == format_number(saved["models"]["m<1>"]["reward_mean"]) == "0.3333"
    assert parser.cells[("m<1>", "win_rate.rate")] == "0.7500" and parser.cells[("reference", "win_rate.rate")] == "n/a"
    assert saved["configs"]["eval"]["models"] == ["a=b"] and saved["environment"]["torch"] == torch.__version__


def test_markdown_results_carry_the_json_numbers_claims_first(tmp_path):
    results = {
        "claims": [{"claim": 1, "title": "DPO | RL", "verdict": "confirmed", "sentence": "RL is higher.",
                    "comparisons": [{"comparison": "rloo − dpo", "difference": 0.25, "se": 0.05, "z": 5.0}],
                    "notes": ["few prompts"]}],
        "models": {"reference": {"algorithm": "reference", "reward_mean": 0.1, "kl": 0.0},
                   "dpo": {"algorithm": "dpo", "reward_mean": 2 / 3, "reward_se": 0.01, "kl": 1.5,
                           "win_rate": {"rate": 0.75}}},
        "best_of_n": {"n": [1, 4], "kl": [0.0, 0.636], "gold_mean": [0.1, 0.3], "gold_se": [0.01, 0.02],
                      "proxy_mean": [0.0, 0.5], "proxy_se": [0.01, 0.01]},
        "timings_seconds": {"train dpo": 12.5, "total (all jobs, as they ran)": 12.5}, "cpu_seconds": {"train dpo": 20.0},
        "machine": {"cpus": 2},
    }
    write_report(results, tmp_path, title="study")
    md = (tmp_path / "results.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert md.index("## Claim 1: DPO | RL") < md.index("## Models") < md.index("## Best-of-n")
    assert "**Confirmed.** RL is higher." in md and "| rloo − dpo | 0.2500 | 0.0500 | 5.0000 |" in md and "- few prompts" in md
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ") for line in md.splitlines() if line.startswith("| dpo |")}
    header = next(line for line in md.splitlines() if line.startswith("| model |")).strip("| ").split(" | ")
    cells = dict(zip(header, rows["dpo"]))
    assert cells["gold reward"] == format_number(saved["models"]["dpo"]["reward_mean"]) == "0.6667"
    assert cells["win rate vs ref"] == "0.7500" and "repeated 3-grams" not in header  # a column nobody has is left out
    assert "| 4 | 0.6360 | 0.3000 | 0.0200 | 0.5000 | 0.0100 |" in md
    assert "Machine: cpus 2." in md and "| train dpo | 12.5000 | 20.0000 |" in md and "| total (all jobs, as they ran) | 12.5000 | n/a |" in md


# --------------------------------------------------------------------------------------------------
# config and the command line
# --------------------------------------------------------------------------------------------------


def test_eval_config_model_entries_and_errors():
    cfg = from_dict(EvalConfig, {"models": ["runs/dpo-b0.1/model", "b=some/dir",
                                            {"path": "tiny-random-llama", "name": "t", "algorithm": "x"}]}, "eval")
    assert model_entries(cfg) == [
        {"name": "dpo-b0.1", "path": "runs/dpo-b0.1/model", "algorithm": None},
        {"name": "b", "path": "some/dir", "algorithm": None},
        {"name": "t", "path": "tiny-random-llama", "algorithm": "x"},
    ]
    assert [e["name"] for e in model_entries(from_dict(EvalConfig, {"models": "a=x,b=y"}, "eval"))] == ["a", "b"]
    for bad, message in [
        ({"models": ["a=x", "a=y"]}, "used twice"),
        ({"models": [{"name": "a"}]}, "path"),
        ({"models": [{"path": "x", "colour": "red"}]}, "unknown key"),
        ({"models": ["reference=x"]}, "reference"),
        ({"best_of_n": [1, 2]}, "proxy_reward"),
        ({"num_samples": 0}, "num_samples"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from_dict(EvalConfig, bad, "eval")
    proc = cli("eval", "best_of_n=[2]", "max_rows=2")
    assert proc.returncode == 2 and "proxy_reward" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_end_to_end_through_the_cli(tmp_path):
    from preftune.models.loading import load_model

    folders = {}
    for name, seed in (("ref", 0), ("other", 1)):
        model, tok = load_model("tiny-random-llama", seed=seed)
        folders[name] = tmp_path / name / "model"
        model.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    # a run folder: the frontier groups it under the algorithm in its config.yaml
    (tmp_path / "other" / "config.yaml").write_text("algorithm: dpo\ndpo:\n  beta: 0.1\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say: red green"}, {"prompt": "Hello"},
                                                       {"messages": [{"role": "user", "content": "Hi <b>there</b>"}]}])
    out = tmp_path / "eval"
    proc = cli("eval", f"reference={folders['ref']}", f"models=[same={folders['ref']},{folders['other']}]",
               f"prompts={prompts}", "reward=tests/rl_reward.py:low_ids", "proxy_reward=vader", "best_of_n=[1,2]",
               "num_samples=2", "max_new_tokens=6", "batch_size=4", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report written to {out / 'report.html'}" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    assert list(models) == ["reference", "same", "other"]
    assert models["other"]["algorithm"] == "dpo" and models["same"]["algorithm"] == "model"
    # a copy of the reference samples the same completions: KL exactly 0, every row a tie
    assert models["same"]["kl"] == 0.0 and models["same"]["win_rate"]["ties"] == 6
    assert models["same"]["reward_mean"] == models["reference"]["reward_mean"]
    assert models["other"]["kl"] != 0.0 and models["other"]["kl_se"] > 0
    for m in models.values():
        assert m["n"] == 6 and 0 < m["length_mean"] <= 6 and 0 <= m["eos_rate"] <= 1 and len(m["samples"]) == 3
    assert results["best_of_n"]["n"] == [1, 2] and results["best_of_n"]["kl"] == [0.0, best_of_n_kl(2)]
    assert results["environment"]["transformers"] and results["configs"]["eval"]["num_samples"] == 2
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 18
    for name in ("frontier", "reward", "win_rate", "overoptimization"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG_MAGIC)

    text = (out / "report.html").read_text()
    parser = _parse(text)
    assert len(parser.images) == 4 and all(s.startswith("data:image/png;base64,") for s in parser.images)
    assert "Hi &lt;b&gt;there&lt;/b&gt;" in text
    for name, m in models.items():
        for key in ("reward_mean", "kl", "kl_se", "length_mean", "eos_rate", "distinct_2"):
            assert parser.cells[(name, key)] == format_number(m[key]), (name, key)
        if m["win_rate"] is not None:
            assert parser.cells[(name, "win_rate.rate")] == format_number(m["win_rate"]["rate"])
