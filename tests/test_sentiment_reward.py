"""The VADER sentiment reward (rewards/sentiment.py)."""

import sys

import pytest

from preftune.rewards.sentiment import VaderSentiment


def test_vader_orders_positive_above_negative_and_keeps_batch_shape():
    reward = VaderSentiment()
    prompts = ["The movie was"] * 3
    scores = reward(prompts, [" wonderful, I loved it!", " about two hours long.", " a terrible, boring waste of time."])
    assert len(scores) == 3 and all(isinstance(s, float) and -1 <= s <= 1 for s in scores)
    assert scores[0] > 0 > scores[2] and scores[1] == 0.0
    # Only the completion is scored, and message lists are read like text.
    assert reward(["I hated the plot, but"], [" wonderful, I loved it!"])[0] == scores[0]
    assert reward([[{"role": "user", "content": "Review?"}]],
                  [[{"role": "assistant", "content": " wonderful, I loved it!"}]]) == [scores[0]]
    with pytest.raises(ValueError, match="2 prompts but 1"):
        reward(["a", "b"], ["c"])


def test_vader_is_easy_to_fool():
    """Documented blind spots, which is what a reward-hacking study wants to see."""
    reward = VaderSentiment()
    sarcasm, honest, spam = "Great, just great. I fell asleep.", "A moving, well acted film.", "great great great great"
    s_sarcasm, s_honest, s_spam = reward(["", "", ""], [sarcasm, honest, spam])
    assert s_sarcasm > 0.5  # +0.85: the sarcasm reads as praise
    assert s_spam > s_honest > 0  # repeating a positive word beats an honest review
    # shared/ASSETS.md says "Not worth watching again" scores +0.85; vaderSentiment 3.3.2 actually
    # gives −0.17 ("not" negates "worth"). Pinned here so the docs can be corrected from a fact.
    assert reward([""], ["Not worth watching again"])[0] == pytest.approx(-0.1695, abs=1e-4)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(ImportError, match="pip install vaderSentiment"):
        VaderSentiment()
