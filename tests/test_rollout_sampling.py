"""Rollout sampling that keeps the sampler's log-probs: they must equal a training forward's."""

import pytest
import torch

from preftune.data.collate import collate_completions
from preftune.rollout.sampling import generate_completions
from preftune.models.loading import load_model
from preftune.models.logprobs import policy_forward
from preftune.rollout.sampling import sample_rollout


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-llama", seed=0)


def test_sampler_logps_match_a_forward(tiny):
    model, tok = tiny
    prompts = [tok(t).input_ids for t in ["Tell me about item 1:", "A longer prompt about item number two:", "Hi"]] * 2
    samples = sample_rollout(model, tok, prompts, max_new_tokens=8, temperature=1.0, batch_size=4, seed=3)
    # the same samples as generate_completions (same seed, batching and EOS handling)
    plain = generate_completions(model, tok, prompts, max_new_tokens=8, temperature=1.0, batch_size=4, seed=3,
                                 return_token_ids=True)
    assert [s["completion_ids"] for s in samples] == [p["completion_ids"] for p in plain]
    batch = collate_completions([{"prompt_ids": s["prompt_ids"], "completion_ids": s["completion_ids"]} for s in samples],
                                tok.pad_token_id)
    with torch.no_grad():
        out = policy_forward(model, batch, with_entropy=True)
    for i, s in enumerate(samples):
        m = out["mask"][i]
        assert len(s["logps"]) == len(s["completion_ids"]) == int(m.sum())
        torch.testing.assert_close(torch.tensor(s["logps"]), out["logps"][i][m], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(s["entropy"]), out["entropy"][i][m], atol=1e-4, rtol=0)


def test_a_row_without_sampler_logps_is_scored_by_the_policy(tiny):
    """An empty completion replaced by EOS has no sampler log-prob; the old policy's must not be 0 there."""
    from preftune.rollout.scoring import score_tokens

    model, tok = tiny
    prompts = [tok(t).input_ids for t in ["Tell me about item 1:", "Hi"]]
    samples = sample_rollout(model, tok, prompts, max_new_tokens=6, temperature=1.0, batch_size=2, seed=3)
    rows = [{"prompt_ids": s["prompt_ids"], "completion_ids": s["completion_ids"]} for s in samples]
    rows[1]["completion_ids"] = [tok.eos_token_id]  # the replacement of an empty completion
    samples[1] = {**samples[1], "logps": [], "entropy": []}
    batch = collate_completions(rows, tok.pad_token_id)
    reused = score_tokens(model, None, batch, kl_estimator="k1", sampled=samples)
    forward = score_tokens(model, None, batch, kl_estimator="k1")
    torch.testing.assert_close(reused["logps"], forward["logps"])
    assert reused["logps"][1][reused["mask"][1]].item() < 0


def test_rloo_rollout_same_with_and_without_reuse(tmp_path):
    from preftune.run_config import load_run_config
    from preftune.train.loop import build_algorithm
    from tests.conftest import ROOT, write_jsonl

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about item {i}:"} for i in range(8)])
    rollouts = []
    for reuse in (True, False):
        run = load_run_config(None, [
            "algorithm=rloo", f"output_dir={tmp_path / str(reuse)}", "model.name=tiny-random-llama", f"data.path={prompts}",
            f"rloo.reward={ROOT / 'tests' / 'rl_reward.py'}:low_ids", "rloo.max_new_tokens=6", "rloo.samples_per_prompt=2",
            f"rloo.reuse_sampler_logps={str(reuse).lower()}", "rloo.log_samples_steps=0",
        ])
        algo, examples, _, _ = build_algorithm(run)

        class Acc:
            device, num_processes, process_index, is_main_process = torch.device("cpu"), 1, 0, True

            @staticmethod
            def autocast():
                return torch.autocast("cpu", enabled=False)

            @staticmethod
            def gather(x):
                return x

            @staticmethod
            def reduce(x, reduction="mean"):
                return x

        rows, metrics = algo.make_rollout(examples[:4], seed=1, accelerator=Acc(), rollout=0)
        rollouts.append((rows, metrics))
    (a, ma), (b, mb) = rollouts
    assert [r["completion_ids"] for r in a] == [r["completion_ids"] for r in b]
    for ra, rb in zip(a, b):
        torch.testing.assert_close(torch.tensor(ra["old_logps"]), torch.tensor(rb["old_logps"]), atol=1e-4, rtol=0)
        assert ra["ref_logps"] == rb["ref_logps"]
        assert ra["advantage"] == pytest.approx(rb["advantage"], abs=1e-4)
    for key in ("kl", "entropy"):
        assert float(ma[key][0]) == pytest.approx(float(mb[key][0]), abs=1e-3)
