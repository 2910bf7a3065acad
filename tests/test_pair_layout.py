"""The shared-prompt pair layout (collate_shared_pairs) against the padded one (collate_pairs).

Both layouts must give the same log-probs, gradients and training runs; the shared one is used only
where the model honours its 4-D attention mask and position ids, and falls back to padded rows
elsewhere.
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import preftune.train.loop as loop_mod
from preftune.config import ConfigError
from preftune.data.collate import Collator, collate_pairs, collate_shared_pairs
from preftune.models.loading import load_model
from preftune.models.logprobs import concatenated_logps, shared_prompt_unsupported
from preftune.train.metrics import read_metrics
from tests.test_preference_train import pair_rows, run_cfg
from tests.conftest import write_jsonl
from tests.test_train import assert_same_weights

PAD = 2
TINY = ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-mistral", "tiny-random-gpt2"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows())


def random_pairs(seed=0, vocab=1000):
    """Pairs of uneven lengths, one with an empty prompt and one with a one-token completion."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist() + [PAD]  # EOS == PAD ends each completion

    return [
        {"prompt_ids": ids(6), "chosen_ids": ids(9), "rejected_ids": ids(3)},
        {"prompt_ids": ids(11), "chosen_ids": ids(2), "rejected_ids": ids(14)},
        {"prompt_ids": [], "chosen_ids": ids(5), "rejected_ids": ids(7)},
        {"prompt_ids": ids(3), "chosen_ids": [PAD], "rejected_ids": ids(4)},
    ]


def scored_values(per_token, mask):
    """The scored per-token log-probs of each row, in order (layout-independent)."""
    return [row[m] for row, m in zip(per_token, mask)]


def assert_layouts_agree(model, pairs, atol=1e-4):
    padded = concatenated_logps(model, collate_pairs(pairs, PAD))
    shared = concatenated_logps(model, collate_shared_pairs(pairs, PAD))
    for name in ("chosen", "rejected"):
        torch.testing.assert_close(shared[f"{name}_logps"], padded[f"{name}_logps"], atol=atol, rtol=0)
        assert shared[f"{name}_lengths"].tolist() == padded[f"{name}_lengths"].tolist()
        for a, b in zip(scored_values(shared[f"{name}_per_token_logps"], shared[f"{name}_mask"]),
                        scored_values(padded[f"{name}_per_token_logps"], padded[f"{name}_mask"])):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    return padded, shared


def test_shared_batch_is_exact():
    pairs = [{"prompt_ids": [5, 6], "chosen_ids": [7, PAD], "rejected_ids": [9, 10, PAD]},
             {"prompt_ids": [], "chosen_ids": [12, PAD], "rejected_ids": [13]}]
    batch = collate_shared_pairs(pairs, PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, PAD, 9, 10, PAD], [12, PAD, 13, PAD, PAD, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 0, 0, 0, 0, 0]]
    assert batch["pair_lengths"].tolist() == [[2, 2, 3], [0, 2, 1]]
    # an empty prompt leaves the first token of each completion unscored, as in collate_pairs
    assert batch["completion_mask"].int().tolist() == [[0, 0, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].shape == (2, 1, 7, 7)
    assert batch["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # chosen: causal over prompt + chosen
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # rejected: the prompt and itself, never the chosen tokens
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 1, 1, 1],
    ]
    assert batch["attention_mask"][1, 0, 3:].int().tolist() == [  # padding sees only itself
        [0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 1]]
    assert collate_shared_pairs(pairs, PAD, pad_to_multiple_of=4)["input_ids"].shape == (2, 8)


def test_collator_kind_and_packing():
    pairs = random_pairs()
    assert torch.equal(Collator(PAD, kind="shared_pairs")(pairs)["attention_mask"],
                       collate_shared_pairs(pairs, PAD)["attention_mask"])
    with pytest.raises(ValueError, match="packing is only supported for kind='completions'"):
        Collator(PAD, packing=True, kind="shared_pairs")


@pytest.mark.parametrize("name", TINY)
def test_shared_logps_equal_padded_for_each_tiny_architecture(name):
    model, _ = load_model(name, seed=0)
    assert shared_prompt_unsupported(model, 1024) is None
    with torch.no_grad():
        padded, shared = assert_layouts_agree(model.eval(), random_pairs())
        averaged = concatenated_logps(model, collate_shared_pairs(random_pairs(), PAD), average=True)
    torch.testing.assert_close(averaged["rejected_logps"], shared["rejected_logps"] / shared["rejected_lengths"])


def test_shared_logps_equal_padded_for_qwen3():
    config = AutoConfig.for_model("qwen3", vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, head_dim=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert shared_prompt_unsupported(model, 256) is None
    with torch.no_grad():
        assert_layouts_agree(model, random_pairs())


def test_shared_logps_equal_padded_with_lora_and_disabled_adapter():
    from peft import LoraConfig, get_peft_model

    base, _ = load_model("tiny-random-llama", seed=0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    assert shared_prompt_unsupported(model, 1024) is None
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # a non-trivial adapter (peft initialises B = 0)
        _, with_adapter = assert_layouts_agree(model.eval(), random_pairs())
        with model.disable_adapter():
            _, without = assert_layouts_agree(model, random_pairs())
    assert (with_adapter["chosen_logps"] - without["chosen_logps"]).abs().max() > 1e-3


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_gradients_equal_between_layouts(gradient_checkpointing):
    pairs = random_pairs(seed=1)
    grads = []
    for collate in (collate_pairs, collate_shared_pairs):
        model, _ = load_model("tiny-random-llama", seed=0)
        model.train()
        if gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        out = concatenated_logps(model, collate(pairs, PAD))
        # a DPO-like objective with uneven weights, so that a gradient sent to the wrong token would show
        weights = torch.linspace(0.5, 2.0, len(pairs))
        loss = -torch.nn.functional.logsigmoid(0.1 * (out["chosen_logps"] - out["rejected_logps"]) * weights).sum()
        (loss + 0.01 * out["rejected_per_token_logps"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    padded, shared = grads
    assert any(g.abs().sum() > 0 for g in padded.values())
    for name in padded:
        torch.testing.assert_close(shared[name], padded[name], atol=1e-6, rtol=1e-4, msg=name)


def test_eager_attention_would_get_the_mask_wrong_so_it_falls_back():
    model, _ = load_model("tiny-random-llama", seed=0)
    model.config._attn_implementation = "eager"  # adds the mask to the scores instead of applying it
    assert "eager" in shared_prompt_unsupported(model, 1024)
    with torch.no_grad():
        padded = concatenated_logps(model.eval(), collate_pairs(random_pairs(), PAD))
        shared = concatenated_logps(model, collate_shared_pairs(random_pairs(), PAD))
    assert (shared["rejected_logps"] - padded["rejected_logps"]).abs().max() > 1e-2


def test_unsupported_models_are_refused():
    config = AutoConfig.for_model("mistral", vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, sliding_window=16)
    mistral = AutoModelForCausalLM.from_config(config)
    assert "sliding-window" in shared_prompt_unsupported(mistral, 64)
    assert shared_prompt_unsupported(mistral, 16) is None  # every sequence fits in the window
    gemma = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma", vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, head_dim=8))
    assert "not known" in shared_prompt_unsupported(gemma, 64)

    class Wrapper(torch.nn.Module):  # no config: nothing is known about its attention
        pass

    assert shared_prompt_unsupported(Wrapper()) is not None


# -- through the training loop ---------------------------------------------------------------------


def test_auto_layout_choice_and_forced_shared(tmp_path, pairs_file, monkeypatch):
    import preftune.models.loading as loading
    from preftune.train.loop import build_module

    assert build_module(run_cfg(tmp_path, pairs_file, "a", "dpo")).pair_layout == "shared"
    assert build_module(run_cfg(tmp_path, pairs_file, "b", "orpo", "orpo.pair_layout=padded")).pair_layout == "padded"
    load = loading.load_model

    def load_eager(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        model.config._attn_implementation = "eager"
        return model, tokenizer

    monkeypatch.setattr(loading, "load_model", load_eager)
    assert build_module(run_cfg(tmp_path, pairs_file, "c", "dpo")).pair_layout == "padded"
    with pytest.raises(ConfigError, match="pair_layout"):
        build_module(run_cfg(tmp_path, pairs_file, "d", "dpo", "dpo.pair_layout=shared"))


def test_dpo_starts_at_ln2_with_shared_layout_and_precomputed_reference(tmp_path, pairs_file):
    cache = tmp_path / "cache" / "reference_logps"
    res = loop_mod.train(run_cfg(tmp_path, pairs_file, "s", "dpo", "train.micro_batch_size=4", "train.max_steps=2"))
    ms = read_metrics(res.metrics_path)
    assert ms[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-5)
    assert ms[1]["loss"] < ms[0]["loss"]
    assert len(list(cache.glob("*.safetensors"))) == 1
    loop_mod.train(run_cfg(tmp_path, pairs_file, "p", "dpo", "train.micro_batch_size=4", "train.max_steps=1",
                           "dpo.pair_layout=padded"))
    assert len(list(cache.glob("*.safetensors"))) == 2  # the layout is part of the cache key


@pytest.mark.parametrize("algorithm", ["dpo", "orpo", "unlikelihood"])
def test_training_runs_equal_between_layouts(tmp_path, pairs_file, algorithm):
    common = ["train.max_steps=3", "train.micro_batch_size=4", "train.adam_eps=1e-4"]
    runs = [loop_mod.train(run_cfg(tmp_path, pairs_file, layout, algorithm, *common, f"{algorithm}.pair_layout={layout}"))
            for layout in ("padded", "shared")]
    padded, shared = (read_metrics(r.metrics_path) for r in runs)
    assert [m["loss"] for m in shared] == pytest.approx([m["loss"] for m in padded], abs=1e-5)
    # the logged token counts: every prompt twice in padded rows, once in shared rows
    assert all(s["tokens"] < p["tokens"] for s, p in zip(shared, padded))
    assert_same_weights(load_file(str(runs[0].model_dir / "model.safetensors")),
                        load_file(str(runs[1].model_dir / "model.safetensors")), atol=1e-5)


def test_accumulation_invariance_with_shared_layout(tmp_path, pairs_file):
    common = ["train.max_steps=3", "train.adam_eps=1e-4", "train.max_grad_norm=null", "dpo.pair_layout=shared"]
    a = loop_mod.train(run_cfg(tmp_path, pairs_file, "a", "dpo", "train.micro_batch_size=4", "train.grad_accum_steps=1", *common))
    b = loop_mod.train(run_cfg(tmp_path, pairs_file, "b", "dpo", "train.micro_batch_size=1", "train.grad_accum_steps=4", *common))
    ma, mb = read_metrics(a.metrics_path), read_metrics(b.metrics_path)
    assert [m["loss"] for m in ma] == pytest.approx([m["loss"] for m in mb], abs=1e-5)
    assert_same_weights(load_file(str(a.model_dir / "model.safetensors")), load_file(str(b.model_dir / "model.safetensors")), atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_with_shared_layout(tmp_path, pairs_file, lora):
    common = ["train.max_steps=2", "train.micro_batch_size=4", "dpo.pair_layout=shared"]
    if lora:
        common += ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0"]
    plain = loop_mod.train(run_cfg(tmp_path, pairs_file, "plain", "dpo", *common))
    ckpt = loop_mod.train(run_cfg(tmp_path, pairs_file, "ckpt", "dpo", *common, "model.gradient_checkpointing=true"))
    losses = [m["loss"] for m in read_metrics(plain.metrics_path)]
    assert losses[1] < losses[0]  # it trains (a LoRA adapter too, through the checkpointed layers)
    assert [m["loss"] for m in read_metrics(ckpt.metrics_path)] == pytest.approx(losses, abs=1e-6)
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert_same_weights(load_file(str(plain.model_dir / weights)), load_file(str(ckpt.model_dir / weights)), atol=1e-6)
