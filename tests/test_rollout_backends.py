"""Rollout backends: the ``hf`` backend is the sampler as it was (seeded outputs unchanged); the ``int8``
and ``fp16`` backends sample from a quantized copy of the policy whose log-probs stay close to the fp32
policy's, are refreshed from the policy after updates (LoRA merged), and their samples are corrected by TIS."""

import contextlib

import pytest
import torch
from accelerate import Accelerator
from torch import nn

import preftune.train.loop as loop_mod
from preftune.config import ConfigError
from preftune.data.collate import collate_completions
from preftune.models.loading import load_model
from preftune.models.lora import apply_lora
from preftune.rollout.backends import SamplingSettings, make_backend
from preftune.rollout.quantized import _int8_weight, quantize_copy
from preftune.rollout.sampling import generate_completions
from preftune.rollout.scoring import score_tokens
from preftune.train.metrics import read_metrics
from tests.conftest import cli
from tests.test_rl_train import REWARD, prompts_file, rl_cfg  # noqa: F401 (fixture)

SETTINGS = SamplingSettings(max_new_tokens=12, temperature=1.0, batch_size=8)


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny-random-llama")
    return model.eval(), tok


def _prompts(tok, n=8):
    return [tok(f"Tell me about item {i}:").input_ids for i in range(n)]


def _fp32_logps(model, tok, rows) -> list[torch.Tensor]:
    """The training forward's per-token log-probs of each row's completion."""
    batch = collate_completions([{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"]} for r in rows], tok.pad_token_id)
    out = score_tokens(model, None, batch, kl_estimator="k1", autocast=contextlib.nullcontext)
    return [out["logps"][i][out["mask"][i]] for i in range(len(rows))]


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits


def test_hf_backend_is_generate_completions(tiny):
    model, tok = tiny
    backend = make_backend("hf", tok)
    backend.sync(model)
    rows = backend.generate(_prompts(tok), SETTINGS, seed=3, return_logps=True)
    direct = generate_completions(model, tok, _prompts(tok), max_new_tokens=12, temperature=1.0, batch_size=8, seed=3,
                                  return_token_ids=True, return_logps=True)
    assert rows == direct
    assert backend.exact and not make_backend("int8", tok).exact


def test_int8_weight_quantization_is_the_per_channel_observers(tiny):
    from torch.ao.nn.quantized.modules.utils import _quantize_weight

    w = torch.randn(48, 32) * torch.linspace(0.01, 3.0, 48)[:, None]
    observer = torch.ao.quantization.per_channel_dynamic_qconfig.weight()
    observer(w)
    expected = _quantize_weight(w, observer)
    ours = _int8_weight(w)
    assert torch.equal(ours.int_repr(), expected.int_repr())
    torch.testing.assert_close(ours.q_per_channel_scales(), expected.q_per_channel_scales(), rtol=1e-7, atol=0)
    # symmetric, zero point 0: the largest |w| of each row is 127.5 steps, rounded (half to even) to 127 or 128 (-128)
    assert (ours.q_per_channel_zero_points() == 0).all()
    assert set(ours.int_repr().int().abs().amax(1).tolist()) <= {127, 128}


# measured on this model (12 tokens x 8 rows): int8 (per-channel weights, per-batch int8 activations) max |Δ log π|
# 0.009, mean 0.002, k3 KL(π_int8‖π) 5e-6; fp16 weights: max 1.4e-4, mean 4e-5. The bounds leave ~5x room.
@pytest.mark.parametrize("name,max_bound,mean_bound", [("int8", 0.05, 0.01), ("fp16", 1e-3, 2e-4)])
def test_quantized_logps_are_close_to_the_fp32_policy(tiny, name, max_bound, mean_bound):
    model, tok = tiny
    backend = make_backend(name, tok)
    backend.sync(model)
    assert all(type(m) is not nn.Linear for m in backend.model.modules())  # every linear layer is quantized
    rows = backend.generate(_prompts(tok), SETTINGS, seed=0, return_logps=True)
    assert rows == backend.generate(_prompts(tok), SETTINGS, seed=0, return_logps=True)  # seeded
    diff = torch.cat([fp - torch.tensor(r["logps"]) for fp, r in zip(_fp32_logps(model, tok, rows), rows)])
    assert diff.abs().max() < max_bound and diff.abs().mean() < mean_bound
    assert ((diff.exp() - 1) - diff).mean() < 1e-4
    assert diff.abs().max() > 1e-6  # and it is a different model: the mismatch TIS corrects


@pytest.mark.parametrize("name,fused", [("int8", False), ("fp16", False), ("fp16", True)])
def test_refresh_follows_the_policy_after_an_update(tiny, name, fused):
    """Also after a fused AdamW step (the loop's optimizer), which updates the weights in place
    without bumping their version counters."""
    model, tok = tiny
    policy = load_model("tiny-random-llama")[0].eval()
    backend = make_backend(name, tok)
    backend.sync(policy)
    ids = _prompts(tok, 1)[0]
    before = _logits(backend.model, ids)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, fused=fused)
    policy.train()
    policy(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.backward()
    optimizer.step()
    policy.eval()
    assert torch.equal(_logits(backend.model, ids), before)  # not synced yet: the old weights
    backend.sync(policy)
    after = _logits(backend.model, ids)
    assert not torch.allclose(after, before, atol=1e-4)
    fresh = quantize_copy(policy, backend.dtype)
    torch.testing.assert_close(after, _logits(fresh, ids), rtol=0, atol=0)  # = a fresh copy of the update


def test_lora_policy_is_quantized_from_merged_weights():
    model, tok = load_model("tiny-random-llama")
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: B != 0
    backend = make_backend("int8", tok)
    backend.sync(peft_model)
    ids = _prompts(tok, 1)[0]
    merged = _logits(quantize_copy(_merged(peft_model)), ids)
    torch.testing.assert_close(_logits(backend.model, ids), merged, rtol=0, atol=0)
    base = _logits(quantize_copy(load_model("tiny-random-llama")[0]), ids)
    assert not torch.allclose(merged, base, atol=1e-3)  # the adapter is in the sampler
    with torch.no_grad():  # an update of the adapter alone reaches the sampler on the next sync
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).add_(1.0)
    backend.sync(peft_model)
    torch.testing.assert_close(_logits(backend.model, ids), _logits(quantize_copy(_merged(peft_model)), ids), rtol=0, atol=0)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]  # a fused AdamW step of the adapters
    optimizer = torch.optim.AdamW(trainable, lr=1e-1, fused=True)
    peft_model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.backward()
    optimizer.step()
    backend.sync(peft_model)
    updated = _logits(quantize_copy(_merged(peft_model)), ids)
    assert not torch.allclose(updated, merged, atol=1e-4)
    torch.testing.assert_close(_logits(backend.model, ids), updated, rtol=0, atol=0)


def test_switching_between_frozen_adapters_reaches_the_sampler():
    """Two frozen adapters (nothing trainable, so refreshes skip unchanged layers): set_adapter switches
    which one is merged, and the next sync re-quantizes the layers it touches."""
    model, tok = load_model("tiny-random-llama")
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    peft_model.add_adapter("other", peft_model.peft_config["default"])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    backend = make_backend("int8", tok)
    backend.sync(peft_model)
    ids = _prompts(tok, 1)[0]
    first = _logits(backend.model, ids)
    torch.testing.assert_close(first, _logits(quantize_copy(_merged(peft_model)), ids), rtol=0, atol=0)
    peft_model.set_adapter("other")
    for p in peft_model.parameters():  # set_adapter makes the active adapter trainable; freeze it again
        p.requires_grad_(False)
    backend.sync(peft_model)
    switched = _logits(quantize_copy(_merged(peft_model)), ids)
    assert not torch.allclose(switched, first, atol=1e-3)
    torch.testing.assert_close(_logits(backend.model, ids), switched, rtol=0, atol=0)


def _merged(peft_model):
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


def test_int8_rollout_keeps_sampler_logps_and_recomputes_the_old_policy(tmp_path, prompts_file):  # noqa: F811
    # two epochs: π_old is scored by the rollout (a single pass takes it from the training forward, test_grpo_single_pass.py)
    run = rl_cfg(tmp_path, prompts_file, "g", "grpo", "train.micro_batch_size=8", "grpo.samples_per_prompt=4",
                 "grpo.sampler=int8", "grpo.tis_cap=2.0", "grpo.num_epochs=2")
    algo, examples, _, _ = loop_mod.build_algorithm(run)
    source = algo.make_source(examples, Accelerator(cpu=True))
    batches = source.next_step()
    metrics = source.pop_metrics()
    assert "sampler_logps" in batches[0] and "tis/kl" in metrics and "sampler/sync_s" in metrics
    rows = source.buffer
    fp32 = _fp32_logps(algo.policy, algo.tokenizer, rows)
    for row, ref in zip(rows, fp32):
        torch.testing.assert_close(torch.tensor(row["old_logps"]), ref, rtol=0, atol=1e-5)  # the fp32 forward's
    diff = torch.cat([torch.tensor(r["old_logps"]) - torch.tensor(r["sampler_logps"]) for r in rows])
    assert 0 < diff.abs().max() < 0.05  # the sampler's own (int8), kept for TIS


@pytest.mark.parametrize("algorithm,sampler", [("rloo", "int8"), ("grpo", "fp16")])
def test_cli_run_with_a_quantized_sampler(tmp_path, prompts_file, algorithm, sampler):  # noqa: F811
    out = tmp_path / algorithm
    proc = cli("train", f"configs/{algorithm}.yaml", "model.name=tiny-random-llama", f"output_dir={out}", f"data.path={prompts_file}",
               "train.progress_bar=false", "train.max_steps=2", "train.micro_batch_size=8", f"{algorithm}.reward={REWARD}",
               f"{algorithm}.samples_per_prompt=4", f"{algorithm}.max_new_tokens=8", f"{algorithm}.sampler={sampler}",
               f"{algorithm}.tis_cap=2.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = read_metrics(out / "metrics.jsonl")
    assert len([m for m in steps if "tis/weight" in m]) == 2
    for m in steps:
        if "tis/kl" in m:
            assert 0 <= m["tis/kl"] < 1e-3 and m["tis/ratio"] == pytest.approx(1.0, abs=0.01) and 0 < m["tis/weight"] <= 2.0
    assert f"sampler: {sampler}" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("algorithm,setting,message", [
    ("rloo", "rloo.sampler=int8", "rloo.sampler: the int8 sampler's log-probs differ from the policy's, so its samples need truncated importance sampling: set rloo.tis_cap"),
    ("ppo", "ppo.sampler=int8", "ppo.sampler: int8 needs truncated importance sampling (tis_cap), which this algorithm does not have"),
    ("rloo", "rloo.tis_cap=-1", "rloo.tis_cap: must be > 0"),
])
def test_int8_sampler_settings_are_checked(tmp_path, prompts_file, algorithm, setting, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        rl_cfg(tmp_path, prompts_file, "bad", algorithm, setting)
    assert "\n" not in str(err.value)
