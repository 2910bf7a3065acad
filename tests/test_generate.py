"""generate_completions on a tiny random llama with the tiny ChatML tokenizer (pad == eos)."""

import json
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from preftune.models.cache import write_jsonl
from preftune.rollout.sampling import generate_completions

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "src", "preftune", "assets", "tiny_tokenizer")
PROMPTS = [
    "hello",
    [{"role": "user", "content": "What is the capital of France?"}],
    "a much longer prompt with many words in it, to force left padding",
    "x",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    "the cat sat on the mat",
    "one two three",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def tiny_model(tokenizer, eos_bias):
    """Random tiny llama whose lm_head has a bias on EOS: 0.2 makes some greedy rows stop, 100 all."""
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )
    model = LlamaForCausalLM(config)
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = eos_bias
    model.lm_head = head
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer, eos_bias=0.2)


def encode(tokenizer, prompt):
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_greedy_batched_equals_unbatched_generate_in_input_order(model, tokenizer):
    eos = tokenizer.eos_token_id
    results = generate_completions(
        model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0, batch_size=3, return_token_ids=True
    )
    assert [r["prompt"] for r in results] == PROMPTS
    for prompt, result in zip(PROMPTS, results):
        ids = torch.tensor([encode(tokenizer, prompt)])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=12, do_sample=False, pad_token_id=eos, eos_token_id=eos
            )
        expected = out[0, ids.shape[1] :].tolist()
        assert result["prompt_ids"] == ids[0].tolist()
        assert result["completion_ids"] == expected
        assert result["completion_tokens"] == len(expected)
        assert result["finished"] == (expected[-1] == eos)
        assert result["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert "<|im_end|>" not in result["completion"]
    # the EOS bias was chosen so that both kinds of rows occur
    assert {r["finished"] for r in results} == {True, False}
    assert any(1 < r["completion_tokens"] < 12 for r in results if r["finished"])


def test_same_seed_same_samples_and_global_rng_untouched(model, tokenizer):
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=100, batch_size=4)
    rng = torch.get_rng_state()
    first = generate_completions(model, tokenizer, PROMPTS, seed=7, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)
    assert generate_completions(model, tokenizer, PROMPTS, seed=7, **kwargs) == first
    other = generate_completions(model, tokenizer, PROMPTS, seed=8, **kwargs)
    assert [r["completion"] for r in other] != [r["completion"] for r in first]
    greedy = generate_completions(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0)
    assert [r["completion"] for r in first] != [r["completion"] for r in greedy]


def test_max_new_tokens_respected(model, tokenizer):
    results = generate_completions(model, tokenizer, PROMPTS, max_new_tokens=5, temperature=1.0)
    for r in results:
        assert 1 <= r["completion_tokens"] <= 5
        if not r["finished"]:
            assert r["completion_tokens"] == 5


def test_finished_when_eos_is_forced(tokenizer):
    model = tiny_model(tokenizer, eos_bias=100.0)
    stopped = generate_completions(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=1.0)
    assert all(r == {"prompt": p, "completion": "", "completion_tokens": 1, "finished": True}
               for p, r in zip(PROMPTS, stopped))
    ignored = generate_completions(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0, stop_at_eos=False,
                                   return_token_ids=True)
    eos = tokenizer.eos_token_id
    assert all(r["completion_ids"] == [eos] * 6 and r["finished"] for r in ignored)


def test_text_as_chat_wraps_a_user_message(model, tokenizer):
    text = "Tell me a joke"
    as_chat = generate_completions(model, tokenizer, [text], max_new_tokens=6, temperature=0, text_as_chat=True)
    conversation = [{"role": "user", "content": text}]
    expected = generate_completions(model, tokenizer, [conversation], max_new_tokens=6, temperature=0)
    raw = generate_completions(model, tokenizer, [text], max_new_tokens=6, temperature=0, return_token_ids=True)
    assert as_chat[0]["prompt"] == text
    assert as_chat[0]["completion"] == expected[0]["completion"]
    assert raw[0]["prompt_ids"] == tokenizer(text).input_ids


def test_restores_train_mode_and_leaves_tokenizer_and_model_defaults_alone(model, tokenizer):
    before = generate_completions(model, tokenizer, PROMPTS[:3], max_new_tokens=8, temperature=0)
    model.train()
    side = tokenizer.padding_side
    # sampling defaults in a model's generation_config.json must not leak into explicit settings
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.top_k = 3
    try:
        after = generate_completions(model, tokenizer, PROMPTS[:3], max_new_tokens=8, temperature=0)
    finally:
        model.generation_config.repetition_penalty = None
        model.generation_config.top_k = None
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert tokenizer.padding_side == side
    assert after == before


def test_rejects_bad_settings(model, tokenizer):
    for kwargs in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            generate_completions(model, tokenizer, ["hi"], **kwargs)
    with pytest.raises(TypeError):
        generate_completions(model, tokenizer, [123])
    assert generate_completions(model, tokenizer, []) == []


def test_write_jsonl_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "out" / "samples.jsonl"
    rows = [{"prompt": "é", "completion": "x\ny", "completion_tokens": 2, "finished": True}]
    write_jsonl(rows, path)
    write_jsonl(rows * 2, path)  # overwrite in place
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows * 2
    assert os.listdir(path.parent) == ["samples.jsonl"]  # no temporary file left behind

    def failing():
        yield rows[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(failing(), path)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    assert os.listdir(path.parent) == ["samples.jsonl"]
