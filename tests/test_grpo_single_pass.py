"""Single-pass GRPO / GSPO / REINFORCE++ (num_epochs = minibatches = 1, the KL out of the reward): π_old is
the training forward's own log-probs, detached, so the rollout scores no old policy. Same weights and the
same π_old metrics as with the rollout's policy forward; that forward really is gone; the condition holds."""

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import preftune.train.loop as loop_mod
from preftune.algorithms.grpo import ClippedPolicyGradient
from preftune.train.metrics import read_metrics
from tests.test_rl_train import prompts_file, rl_cfg  # noqa: F401 (fixture)

FP16_TIS = ["train.micro_batch_size=4", "train.grad_accum_steps=2", "train.max_steps=3", "train.learning_rate=3e-3",
            "train.adam_eps=1e-4", "grpo.samples_per_prompt=4", "grpo.sampler=fp16", "grpo.tis_cap=1.0",
            "grpo.kl_coef=0.1"]
"""The quantized sampler with TIS (cap 1: it binds wherever π_old > π_sampler, about half the tokens, since the
refreshed fp16 copy is within float rounding of the policy) and a reference KL as a loss term."""

OLD_POLICY_METRICS = ("entropy", "kl", "reward/with_kl", "tis/ratio", "tis/kl", "tis/truncated", "tis/weight")


def test_same_weights_and_metrics_as_the_rollout_forward(tmp_path, prompts_file, monkeypatch):  # noqa: F811
    new = loop_mod.train(rl_cfg(tmp_path, prompts_file, "new", "grpo", *FP16_TIS))
    monkeypatch.setattr(ClippedPolicyGradient, "old_policy_in_training", lambda self: False)  # the rollout scores π_old
    old = loop_mod.train(rl_cfg(tmp_path, prompts_file, "old", "grpo", *FP16_TIS))
    a, b = load_file(str(new.model_dir / "model.safetensors")), load_file(str(old.model_dir / "model.safetensors"))
    start = loop_mod.build_module(rl_cfg(tmp_path, prompts_file, "start", "grpo")).policy.state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3  # the steps moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-6, msg=k)
    mn, mo = read_metrics(new.metrics_path), read_metrics(old.metrics_path)
    assert len(mn) == len(mo) == 3
    for n, o in zip(mn, mo):
        assert n["loss"] == pytest.approx(o["loss"], rel=1e-4, abs=1e-6)
        for key in OLD_POLICY_METRICS:  # measured by the training forward instead of the rollout's: same values
            assert n[key] == pytest.approx(o[key], rel=1e-4, abs=1e-6), key
        assert n["policy/ratio_deviation"] == 0.0 and o["policy/ratio_deviation"] < 1e-5  # exactly 1 / 1 up to rounding
    assert max(m["tis/truncated"] for m in mn) > 0  # the cap binds somewhere: the weights are really used


def _forward_counts(algo) -> dict:
    """Forwards of the policy and the reference (no-grad = the rollout's scoring, grad = the training step's,
    inference mode = the hf sampler's decode)."""
    counts = {"policy/no_grad": 0, "policy/grad": 0, "policy/decode": 0, "reference": 0}

    def mode() -> str:
        return "decode" if torch.is_inference_mode_enabled() else "grad" if torch.is_grad_enabled() else "no_grad"

    def hook(name):
        def count(module, args, output):
            counts[name if name == "reference" else f"{name}/{mode()}"] += 1
        return count

    algo.policy.get_input_embeddings().register_forward_hook(hook("policy"))
    if algo.reference_model is not None:
        algo.reference_model.get_input_embeddings().register_forward_hook(hook("reference"))
    return counts


def _one_step(run) -> tuple[dict, list[dict], dict, dict]:
    """(forward counts, rollout rows, rollout metrics, step metrics) of one rollout and its first step."""
    algo, examples, _, _ = loop_mod.build_algorithm(run)
    accelerator = Accelerator(cpu=True)
    counts = _forward_counts(algo)
    source = algo.make_source(examples, accelerator)
    batches = source.next_step()
    rollout_metrics = source.pop_metrics()
    rollout_counts = dict(counts)
    step = loop_mod._run_step(algo, batches, accelerator, rollout_metrics)
    return rollout_counts, source.buffer, rollout_metrics, {**step, "batch_keys": set(batches[0])}


def test_the_rollout_runs_no_policy_forward(tmp_path, prompts_file):  # noqa: F811
    counts, rows, rollout, step = _one_step(rl_cfg(tmp_path, prompts_file, "n", "grpo", *FP16_TIS))
    assert counts == {"policy/no_grad": 0, "policy/grad": 0, "policy/decode": 0, "reference": 1}  # the reference only
    assert "old_logps" not in rows[0] and "ref_logps" in rows[0] and "sampler_logps" in rows[0]
    assert "old_logps" not in step["batch_keys"]
    for key in OLD_POLICY_METRICS:  # the training forward reports them
        assert key not in rollout and key in step, key
    assert step["policy/ratio"] == 1.0 and step["tis/kl"] < 1e-3


def test_no_reference_no_rollout_forward_at_all(tmp_path, prompts_file):  # noqa: F811
    counts, rows, _, step = _one_step(rl_cfg(tmp_path, prompts_file, "z", "grpo", "train.micro_batch_size=8",
                                             "grpo.samples_per_prompt=4", "grpo.reuse_sampler_logps=false"))
    assert counts["policy/no_grad"] == 0 and counts["policy/decode"] > 0  # the hf sampler decodes with the policy
    assert "ref_logps" not in rows[0] and "ref_logps" not in step["batch_keys"]
    assert "entropy" in step and "kl" not in step  # β = 0: no KL to report


@pytest.mark.parametrize("setting", ["grpo.num_epochs=2", "grpo.minibatches=2"])
def test_several_updates_per_rollout_still_score_the_old_policy(tmp_path, prompts_file, setting):  # noqa: F811
    counts, rows, rollout, step = _one_step(rl_cfg(tmp_path, prompts_file, "m", "grpo", *FP16_TIS, setting))
    assert counts["policy/no_grad"] == 1 and counts["reference"] == 1  # π_old is scored once, before any update
    assert "old_logps" in rows[0] and "old_logps" in step["batch_keys"]
    assert all(key in rollout for key in OLD_POLICY_METRICS if key != "tis/weight")  # measured by the rollout


@pytest.mark.parametrize("algorithm,settings,expected", [
    ("grpo", [], True),                                           # β = 0: no reference
    ("grpo", ["grpo.kl_coef=0.1"], True),                         # KL as a loss term, read by the training forward
    ("gspo", ["gspo.kl_coef=0.1", "gspo.tis_cap=2.0"], True),
    ("grpo", ["grpo.kl_coef=0.1", "grpo.kl_in_reward=true"], False),  # the rewards read the rollout's KL
    ("grpo", ["grpo.kl_coef=0.1", "grpo.kl_target=0.5"], False),      # the adaptive controller updates before the step
    ("grpo", ["grpo.num_epochs=2"], False),
    ("reinforce_pp", [], False),                                  # its default: β·KL in the per-token advantages
    ("reinforce_pp", ["reinforce_pp.kl_coef=0"], True),
    ("reinforce_pp", ["reinforce_pp.kl_in_reward=false", "reinforce_pp.kl_estimator=k3"], True),
    ("rloo", ["rloo.kl_in_reward=false", "rloo.kl_estimator=k3"], False),  # not a clipped-ratio algorithm
])
def test_when_the_training_forward_is_the_old_policy(tmp_path, prompts_file, algorithm, settings, expected):  # noqa: F811
    algo = loop_mod.build_module(rl_cfg(tmp_path, prompts_file, "c", algorithm, *settings))
    assert algo.old_policy_in_training() is expected
    assert ("old_logps" in algo.token_fields) is not expected
