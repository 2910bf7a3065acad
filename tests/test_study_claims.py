"""The study's verdicts are computed from its numbers: each claim on made-up results whose answer is
known (confirmed / not confirmed / mixed), and the report opens each claim's section with it."""

import math

from preftune.eval.report import render_html
from preftune.experiments.claims import (
    Comparison,
    dpo_longer,
    dpo_vs_ppo,
    judge_claims,
    kto_vs_dpo,
    overoptimisation,
    preference_vs_sft,
    unlikelihood_degenerates,
    verdict,
)
from preftune.experiments.progress import eta_seconds, format_duration
from tests.test_eval import _parse


def m(algorithm, reward, kl, se=0.01, **extra):
    return {"algorithm": algorithm, "reward_mean": reward, "reward_se": se, "kl": kl, "kl_se": 0.1, **extra}


def test_verdict_rule():
    assert verdict([Comparison("a", 0.3, 0.1), Comparison("b", 0.05, 0.1)]) == "confirmed"
    assert verdict([Comparison("a", 0.1, 0.1), Comparison("b", -0.1, 0.1)]) == "not confirmed"  # all within 2 SE
    assert verdict([Comparison("a", -0.3, 0.1)]) == "not confirmed"
    assert verdict([Comparison("a", 0.3, 0.1), Comparison("b", -0.3, 0.1)]) == "mixed"
    assert Comparison("a", 0.3, 0.1).z == 0.3 / 0.1 and Comparison("a", 0.0, 0.0).z == 0.0


def test_dpo_vs_ppo_compares_at_matched_kl():
    dpo = {"dpo-b1": m("dpo", 0.2, 1.0), "dpo-b0.1": m("dpo", 0.6, 5.0)}
    # the DPO front at KL 3 is 0.4 (interpolated), SE 0.01; PPO there: 0.3 -> 0.1 above, z = 0.1/hypot(0.01, 0.01)
    out = dpo_vs_ppo({"reference": m("reference", 0.1, 0.0), **dpo, "ppo-a": m("ppo", 0.3, 3.0), "ppo-far": m("ppo", 0.9, 9.0)})
    assert out["verdict"] == "confirmed" and out["sentence"].startswith("Confirmed")
    assert len(out["comparisons"]) == 1 and math.isclose(out["comparisons"][0]["difference"], 0.1)
    assert math.isclose(out["comparisons"][0]["se"], math.hypot(0.01, 0.01))
    assert any("ppo-far" in n for n in out["notes"])  # outside DPO's KL range: named, not compared
    against = dpo_vs_ppo({**dpo, "ppo-a": m("ppo", 0.5, 3.0)})
    assert against["verdict"] == "not confirmed"
    both = dpo_vs_ppo({**dpo, "ppo-a": m("ppo", 0.2, 2.0), "ppo-b": m("ppo", 0.7, 4.0)})  # front: 0.3 at KL 2, 0.5 at KL 4
    assert both["verdict"] == "mixed"
    assert dpo_vs_ppo(dpo)["verdict"] == "not run"
    # below DPO's lowest KL the front runs from π_ref (0.1 at KL 0) to dpo-b1 (0.2 at KL 1): 0.15 at KL 0.5
    low = dpo_vs_ppo({"reference": m("reference", 0.1, 0.0), **dpo, "ppo-low": m("ppo", 0.3, 0.5)})
    assert low["verdict"] == "not confirmed" and math.isclose(low["comparisons"][0]["difference"], -0.15)
    assert any("β → ∞" in n for n in low["notes"])
    stand_in = dpo_vs_ppo({**dpo, "rloo-a": m("rloo", 0.5, 3.0)})  # the demo: RLOO in place of PPO
    assert stand_in["verdict"] == "not confirmed" and "RLOO" in stand_in["title"]


def test_sft_kto_and_length_claims():
    models = {"reference": m("reference", 0.1, 0.0, length_mean=20.0, length_se=0.5),
              "dpo-beta0.1": m("dpo", 0.5, 4.0, length_mean=23.0, length_se=0.5),
              "dpo-beta1.0": m("dpo", 0.2, 1.0, length_mean=21.0, length_se=0.5),
              "sft": m("sft", 0.2, 2.0), "kto-beta0.1": m("kto", 0.49, 3.8),
              "rloo-x": m("rloo", 0.5, 2.5, length_mean=20.0, length_se=0.5)}
    sft = preference_vs_sft(models)
    assert sft["verdict"] == "confirmed" and math.isclose(sft["comparisons"][0]["difference"], 0.1)  # front at KL 2 is 0.3
    kto = kto_vs_dpo(models)
    assert kto["verdict"] == "confirmed" and "kto-beta0.1 − dpo-beta0.1" in kto["comparisons"][0]["comparison"]
    assert kto_vs_dpo({**models, "kto-beta0.1": m("kto", 0.3, 3.8)})["verdict"] == "not confirmed"
    length = dpo_longer(models, max_new_tokens=32)
    assert length["verdict"] == "confirmed"  # dpo-beta0.1: 3 tokens longer than the reference, z = 3/0.71
    capped = dpo_longer({**models, "reference": {**models["reference"], "length_mean": 24.5}}, max_new_tokens=24)
    assert any("cap" in n for n in capped["notes"])


def test_unlikelihood_and_overoptimisation_claims():
    models = {"reference": m("reference", 0.1, 0.0, repeated_3gram=0.01, repeated_3gram_se=0.005),
              "unlikelihood@5": m("unlikelihood", 0.15, 2.0, repeated_3gram=0.05, repeated_3gram_se=0.01),
              "unlikelihood": m("unlikelihood", 0.05, 6.0, repeated_3gram=0.30, repeated_3gram_se=0.03, distinct_2=0.2),
              "dpo-beta0.1": m("dpo", 0.4, 4.0, repeated_3gram=0.02, repeated_3gram_se=0.01, distinct_2=0.8)}
    tracked = {"unlikelihood": [{"step": 0, "model": "reference"}, {"step": 5, "model": "unlikelihood@5"},
                                {"step": 10, "model": "unlikelihood"}],
               "dpo-beta0.1": [{"step": 0, "model": "reference"}, {"step": 10, "model": "dpo-beta0.1"}]}
    ul = unlikelihood_degenerates(models, tracked)
    assert ul["verdict"] == "confirmed" and len(ul["comparisons"]) == 2 and ul["quotes"] == []
    assert any(n.startswith("gold reward: dpo-beta0.1 − unlikelihood = 0.35") for n in ul["notes"])
    flat = {**models, "unlikelihood": {**models["unlikelihood"], "repeated_3gram": 0.01}}  # worse reward, no repetition
    assert unlikelihood_degenerates(flat, tracked)["verdict"] == "not confirmed"
    curve = {"n": [1, 2, 4], "kl": [0.0, 0.19, 0.64], "gold_mean": [0.1, 0.3, 0.1], "gold_se": [0.02] * 3,
             "proxy_mean": [0.0, 0.5, 1.0], "proxy_se": [0.05] * 3}
    assert overoptimisation(models, curve, [])["verdict"] == "confirmed"
    rising = {**curve, "gold_mean": [0.1, 0.2, 0.3]}
    assert overoptimisation(models, rising, [])["verdict"] == "not confirmed"
    rl = {"rl@1": m("rloo on proxy", 0.1, 1.0, proxy_reward_mean=0.0, proxy_reward_se=0.05),
          "rl@2": m("rloo on proxy", 0.3, 2.0, proxy_reward_mean=0.5, proxy_reward_se=0.05)}
    assert overoptimisation({**models, **rl}, curve, ["rl@1", "rl@2"])["verdict"] == "mixed"  # RL's gold never falls
    claims = judge_claims({"models": models, "best_of_n": curve}, tracked=tracked, proxy_rl=[], max_new_tokens=24)
    assert [c["claim"] for c in claims] == [1, 2, 3, 4, 5, 6]


def test_report_opens_each_claim_with_its_verdict():
    models = {"reference": m("reference", 0.1, 0.0), "dpo-b1": m("dpo", 0.2, 1.0), "dpo-b0.1": m("dpo", 0.6, 5.0),
              "ppo-a": m("ppo", 0.3, 3.0)}
    claims = judge_claims({"models": models}, tracked={}, proxy_rl=[], max_new_tokens=24)
    page = render_html({"title": "t", "models": models, "claims": claims}, {"frontier": b"\x89PNG\r\n\x1a\nfake"})
    parser = _parse(page)
    assert parser is not None
    first = page.index('<h3 id="claim-1">')
    after = page[first:].split("\n")[1]
    assert after.startswith('<p class="verdict confirmed">Confirmed: DPO') and page.count('class="verdict') == 6
    assert page.count("data:image/png;base64,") == 1 and page.index("data:image/png") > first  # the plot sits in its claim


def test_eta_scales_the_estimates_by_the_speed_so_far():
    assert eta_seconds([10, 20, 30], [None, None, None], 0, 0.0) == 60.0
    assert eta_seconds([10, 20, 30], [20.0, None, None], 1, 5.0) == 2 * 20 - 5 + 2 * 30  # ran twice as slow as estimated
    assert eta_seconds([10, 20, 30], [None, 40.0, None], 2, 100.0) == 0.0  # a stage past its estimate: 0, never negative
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "01:05"
