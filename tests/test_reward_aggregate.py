"""Several rewards through the one reward interface: mean / min / weighted specs, and RL on them."""

import json

import pytest

from preftune.rewards.aggregate import parse_aggregate
from preftune.rewards.spec import check_reward_spec, resolve_reward
from tests.conftest import ROOT, cli, write_jsonl

FNS = '''
def length(prompts, completions):
    return [float(len(c)) for c in completions]

def exclaims(prompts, completions):
    return [-float(c.count("!")) for c in completions]
'''


@pytest.fixture
def fns(tmp_path):
    path = tmp_path / "fns.py"
    path.write_text(FNS)
    return path


def test_parse():
    assert parse_aggregate("min(vader | a.py:f)") == ("min", ["vader", "a.py:f"], None)
    assert parse_aggregate("weighted(0.8*vader | .2 * a.py:f)") == ("weighted", ["vader", "a.py:f"], [0.8, 0.2])
    assert parse_aggregate("vader") is None and parse_aggregate("a.py:f") is None
    with pytest.raises(ValueError, match="at least two rewards"):
        parse_aggregate("min(vader)")
    with pytest.raises(ValueError, match="'WEIGHT\\*REWARD', got 'vader'"):
        parse_aggregate("weighted(vader | 0.5*a.py:f)")


def test_rules_by_hand(fns):
    rows = (["p", "p"], ["ab!!", "abcde"])  # length (4, 5), exclaims (-2, 0)
    assert resolve_reward(f"mean({fns}:length | {fns}:exclaims)")(*rows) == [1.0, 2.5]
    source = resolve_reward(f"min({fns}:length | {fns}:exclaims)")
    assert source(*rows) == [-2.0, 0.0]
    assert source.last_parts == [[4.0, 5.0], [-2.0, -0.0]]
    assert resolve_reward(f"weighted(0.5*{fns}:length | 2*{fns}:exclaims)")(*rows) == [-2.0, 2.5]


def test_bad_part_is_refused_before_loading(fns):
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        check_reward_spec(f"min({fns}:length | {fns}:nope)")


def test_rloo_on_the_min_of_two_rewards_through_cli(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about item {i}:"} for i in range(16)])
    (tmp_path / "inv.py").write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\nfrom tests.rl_reward import low_ids\n"
        "def high_ids(prompts, completions):\n    return [1.0 - x for x in low_ids(prompts, completions)]\n")
    reward = f"min({ROOT / 'tests' / 'rl_reward.py'}:low_ids | {tmp_path / 'inv.py'}:high_ids)"
    out = tmp_path / "rloo"
    proc = cli("train", "configs/rloo.yaml", "model.name=tiny-random-llama", f"data.path={prompts}", f"output_dir={out}",
               f"rloo.reward={reward}", "train.max_steps=2", "train.micro_batch_size=4", "rloo.max_new_tokens=8",
               "data.max_length=64", "train.progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ms = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(ms) == 2
    assert all(0.0 <= m["reward/raw_score"] <= 0.5 for m in ms)  # min(x, 1 - x) never exceeds 1/2
