"""per_token_logps / sequence_logps / concatenated_logps against a plain full-logits computation."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from preftune.models.logprobs import (
    concatenated_logps,
    per_token_logps,
    sequence_logps,
    supports_fast_path,
    unpack,
)

PAD = EOS = 2  # pad == eos, as for SmolLM2


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


def make_batch(examples):
    """Right-padded batch from (prompt_ids, completion_ids) pairs; masks built from lengths."""
    width = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.full((len(examples), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
    completion_mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, (prompt, completion) in enumerate(examples):
        n = len(prompt) + len(completion)
        input_ids[row, :n] = torch.tensor(prompt + completion)
        attention_mask[row, :n] = 1
        completion_mask[row, len(prompt) : n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def random_examples(n, seed=1, eos=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        plen = int(torch.randint(1, 9, (1,), generator=g))
        clen = int(torch.randint(1, 8, (1,), generator=g))
        prompt = torch.randint(3, 128, (plen,), generator=g).tolist()
        completion = torch.randint(3, 128, (clen,), generator=g).tolist() + ([EOS] if eos else [])
        out.append((prompt, completion))
    return out


def reference_logps(model, examples):
    """Hand computation, one unpadded sequence at a time: {row: [(t, logp), ...]} over completion tokens."""
    result = []
    for prompt, completion in examples:
        ids = torch.tensor([prompt + completion])
        logprobs = model(ids).logits.float().log_softmax(-1)[0]
        result.append(
            [(t, logprobs[t - 1, ids[0, t]]) for t in range(len(prompt), len(prompt) + len(completion))]
        )
    return result


def full_logits_per_token(model, batch):
    """Plain differentiable reference on the padded batch: full log_softmax, then mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = logits.float().log_softmax(-1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    logprobs = logprobs * batch["completion_mask"][:, 1:]
    return torch.cat([torch.zeros(logprobs.shape[0], 1), logprobs], dim=1)


def test_matches_hand_computation_with_right_padding_and_eos_scored():
    model = tiny_llama()
    examples = random_examples(5)
    batch = make_batch(examples)
    with torch.no_grad():
        got = per_token_logps(model, batch)
        expected = reference_logps(model, examples)
    assert got.dtype == torch.float32 and got.shape == batch["input_ids"].shape
    for row, (prompt, completion) in enumerate(examples):
        scored = {t for t, _ in expected[row]}
        for t in range(got.shape[1]):
            if t not in scored:  # prompt, padding (same id as EOS) and position 0
                assert got[row, t] == 0.0
        for t, value in expected[row]:
            torch.testing.assert_close(got[row, t], value, atol=1e-5, rtol=1e-5)
        # the final EOS has the padding id but is scored, with a real (negative) log-prob
        last = len(prompt) + len(completion) - 1
        assert batch["input_ids"][row, last] == PAD and got[row, last] < 0
    sums = sequence_logps(got, batch["completion_mask"])
    means = sequence_logps(got, batch["completion_mask"], average=True)
    for row, (_, completion) in enumerate(examples):
        total = sum(v for _, v in expected[row])
        torch.testing.assert_close(sums[row], total, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(means[row], total / len(completion), atol=1e-4, rtol=1e-5)


def test_position_zero_is_never_scored():
    model = tiny_llama()
    batch = make_batch([([], [5, 6, 7, EOS])])
    with torch.no_grad():
        got = per_token_logps(model, batch)
    assert got[0, 0] == 0.0 and (got[0, 1:] < 0).all()
    assert sequence_logps(got, batch["completion_mask"], average=True) == got[0, 1:].mean()


def test_packed_batch_equals_unpacked():
    model = tiny_llama()
    examples = random_examples(4, seed=3)
    padded = make_batch(examples)
    lengths = [len(p) + len(c) for p, c in examples]
    tail = 3  # trailing padding of the packed row, scored nowhere
    packed = {
        "input_ids": torch.cat([torch.tensor(p + c) for p, c in examples] + [torch.full((tail,), PAD)])[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths] + [torch.arange(tail)])[None],
        "completion_mask": torch.cat(
            [torch.tensor([False] * len(p) + [True] * len(c)) for p, c in examples]
            + [torch.zeros(tail, dtype=torch.bool)]
        )[None],
    }
    with torch.no_grad():
        packed_lp = per_token_logps(model, packed)
        padded_lp = per_token_logps(model, padded)
    assert packed_lp.shape == (1, sum(lengths) + tail)
    pieces = unpack(packed_lp, lengths)
    assert [len(p) for p in pieces] == lengths
    for row, piece in enumerate(pieces):
        torch.testing.assert_close(piece, padded_lp[row, : lengths[row]], atol=1e-5, rtol=0)
    for average in (False, True):
        torch.testing.assert_close(
            sequence_logps(packed_lp, packed["completion_mask"], average=average, seq_lengths=lengths),
            sequence_logps(padded_lp, padded["completion_mask"], average=average),
            atol=1e-5,
            rtol=0,
        )


def test_concatenated_equals_two_separate_forwards():
    model = tiny_llama()
    chosen, rejected = random_examples(3, seed=4), random_examples(3, seed=5)
    rejected = [(c[0], r[1]) for c, r in zip(chosen, rejected)]  # same prompts
    pair = make_batch(chosen + rejected)
    pair["labels"] = torch.ones(6, dtype=torch.bool)  # extra keys ride along untouched
    with torch.no_grad():
        out = concatenated_logps(model, pair)
        for name, examples in (("chosen", chosen), ("rejected", rejected)):
            alone = make_batch(examples)
            per_token = per_token_logps(model, alone)
            width = per_token.shape[1]
            torch.testing.assert_close(out[f"{name}_per_token_logps"][:, :width], per_token, atol=1e-5, rtol=0)
            assert (out[f"{name}_per_token_logps"][:, width:] == 0).all()
            torch.testing.assert_close(out[f"{name}_logps"], sequence_logps(per_token, alone["completion_mask"]))
            assert out[f"{name}_lengths"].tolist() == [len(c) for _, c in examples]
        averaged = concatenated_logps(model, pair, average=True)
    torch.testing.assert_close(averaged["chosen_logps"], out["chosen_logps"] / out["chosen_lengths"])


def test_chunk_size_does_not_change_values():
    model = tiny_llama()
    batch = make_batch(random_examples(4, seed=6))
    with torch.no_grad():
        big = per_token_logps(model, batch, chunk_size=4096)
        one = per_token_logps(model, batch, chunk_size=1)
    torch.testing.assert_close(one, big, atol=1e-6, rtol=0)


@pytest.mark.parametrize("recompute_head", [True, False])
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_gradients_equal_plain_full_logits_path(recompute_head, gradient_checkpointing):
    batch = make_batch(random_examples(4, seed=7))
    grads = []
    for path in ("ours", "plain"):
        model = tiny_llama().train()
        if gradient_checkpointing:
            model.activation_checkpointing_enable()
        if path == "ours":
            per_token = per_token_logps(model, batch, chunk_size=5, recompute_head=recompute_head)
        else:
            per_token = full_logits_per_token(model, batch)
        # weight tokens unevenly so that a mis-assigned gradient would show
        weights = torch.linspace(0.5, 2.0, per_token.numel()).reshape(per_token.shape)
        (per_token * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    ours, plain = grads
    assert ours.keys() == plain.keys()
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


def test_lora_model_and_disabled_adapter_equal_base():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    batch = make_batch(random_examples(3, seed=8))
    with torch.no_grad():
        base_lp = per_token_logps(base, batch)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    assert supports_fast_path(model)
    with torch.no_grad():  # make the adapter non-trivial (peft initialises B = 0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
        lora_lp = per_token_logps(model, batch)
        lora_ref = full_logits_per_token(model, batch)
        with model.disable_adapter():
            disabled_lp = per_token_logps(model, batch)
    torch.testing.assert_close(lora_lp, lora_ref, atol=1e-5, rtol=0)
    assert (lora_lp - base_lp).abs().max() > 1e-3
    torch.testing.assert_close(disabled_lp, base_lp, atol=1e-6, rtol=0)
    # gradients reach the adapter weights through the unwrapped inner model
    per_token_logps(model.train(), batch).sum().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_bf16_autocast_returns_fp32_close_to_fp32():
    model = tiny_llama()
    batch = make_batch(random_examples(4, seed=9))
    with torch.no_grad():
        fp32 = per_token_logps(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = per_token_logps(model, batch)
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # autocast really ran the matmuls in bf16
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.05)


SMALL = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=256, head_dim=8)
ARCHITECTURES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"final_logit_softcapping": 3.0},
    "gemma3_text": {"final_logit_softcapping": 3.0},
    "granite": {"logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.25},
    "gpt2": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=256),
}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_fast_path_matches_model_logits_for_each_supported_architecture(model_type):
    kwargs = ARCHITECTURES[model_type] if model_type == "gpt2" else {**SMALL, **ARCHITECTURES[model_type]}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()
    assert supports_fast_path(model)
    batch = make_batch(random_examples(3, seed=10))
    with torch.no_grad():
        got = per_token_logps(model, batch)
    torch.testing.assert_close(got, full_logits_per_token(model, batch).detach(), atol=1e-5, rtol=0)


def test_unknown_architecture_falls_back_to_full_logits():
    class Wrapper(torch.nn.Module):  # e.g. a DDP-style wrapper: no config, only forward
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    model = tiny_llama()
    wrapped = Wrapper(model)
    assert supports_fast_path(model) and not supports_fast_path(wrapped)
    batch = make_batch(random_examples(3, seed=11))
    with torch.no_grad():
        torch.testing.assert_close(per_token_logps(wrapped, batch), per_token_logps(model, batch), atol=1e-6, rtol=0)


def full_logits_entropy(model, batch):
    """Entropy of the full next-token softmax at every scored position (0 elsewhere): the plain reference."""
    logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)[:, :-1] * batch["completion_mask"][:, 1:]
    return torch.cat([torch.zeros(entropy.shape[0], 1), entropy], dim=1)


@pytest.mark.parametrize("path", ["fast", "fast-recompute", "plain"])
def test_entropy_comes_with_the_same_logps_and_gradients(path):
    class Wrapper(torch.nn.Module):  # no config: the plain full-logits path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    batch = make_batch(random_examples(4, seed=12))
    model = tiny_llama().train()
    scored = model if path != "plain" else Wrapper(model)
    logps, entropy = per_token_logps(scored, batch, chunk_size=5, recompute_head=path == "fast-recompute", with_entropy=True)
    assert not entropy.requires_grad and logps.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(entropy, full_logits_entropy(model, batch), atol=1e-5, rtol=0)
        torch.testing.assert_close(logps.detach(), per_token_logps(scored, batch), atol=1e-6, rtol=0)
    logps.sum().backward()
    with_entropy = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    per_token_logps(scored, batch, chunk_size=5, recompute_head=path == "fast-recompute").sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(with_entropy[n], p.grad, atol=1e-7, rtol=1e-6, msg=n)
