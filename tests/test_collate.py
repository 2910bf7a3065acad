"""preftune.data.collate: padding, packing and pair batches, checked on hand-worked examples."""

import pytest
import torch

from preftune.data.collate import (Collator, collate_completions, collate_pairs,
                                   count_completion_tokens, pack_completions)

EOS = PAD = 2  # pad == eos, as in SmolLM2: masks must come from lengths, not ids
EXAMPLES = [{"prompt_ids": [5, 6], "completion_ids": [7, EOS]},
            {"prompt_ids": [8], "completion_ids": [9, 10, 11, EOS]}]


def test_padded_batch_is_exact():
    batch = collate_completions(EXAMPLES, PAD)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, EOS, PAD], [8, 9, 10, 11, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[False, False, True, True, False],
                                                 [False, True, True, True, True]]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool


def test_eos_equal_to_pad_is_scored():
    batch = collate_completions(EXAMPLES, PAD)
    # Row 0: position 3 is the completion's EOS (scored), position 4 the same id as padding (not).
    assert batch["input_ids"][0, 3] == batch["input_ids"][0, 4] == PAD
    assert batch["completion_mask"][0, 3] and not batch["completion_mask"][0, 4]
    assert count_completion_tokens(batch) == 2 + 4


def test_pad_to_multiple_and_scalar_extras():
    examples = [dict(ex, label=flag) for ex, flag in zip(EXAMPLES, [True, False])]
    batch = collate_completions(examples, PAD, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1, 5:].tolist() == [PAD] * 3
    assert batch["completion_mask"][:, 5:].sum() == 0
    assert batch["labels"].tolist() == [True, False] and batch["labels"].dtype == torch.bool
    assert "label" not in batch


def test_packed_batch():
    packed = pack_completions(EXAMPLES)
    assert "attention_mask" not in packed
    assert packed["input_ids"].tolist() == [[5, 6, 7, EOS, 8, 9, 10, 11, EOS]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4]]
    assert packed["seq_lengths"].tolist() == [4, 5]
    padded = collate_completions(EXAMPLES, PAD)
    unpadded_masks = [padded["completion_mask"][i, : n] for i, n in enumerate([4, 5])]
    assert torch.equal(packed["completion_mask"][0], torch.cat(unpadded_masks))
    assert count_completion_tokens(packed) == count_completion_tokens(padded)


def test_pairs_batch_rows_and_common_length():
    examples = [{"prompt_ids": [5, 6], "chosen_ids": [7, EOS], "rejected_ids": [9, 10, 11, EOS]},
                {"prompt_ids": [8], "chosen_ids": [12, EOS], "rejected_ids": [EOS]}]
    batch = collate_pairs(examples, PAD)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, EOS, PAD, PAD],  # chosen of prompt 0
        [8, 12, EOS, PAD, PAD, PAD],  # chosen of prompt 1
        [5, 6, 9, 10, 11, EOS],  # rejected of prompt 0
        [8, EOS, PAD, PAD, PAD, PAD],  # rejected of prompt 1: an EOS-only completion
    ]
    assert batch["completion_mask"].int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0],
                                                       [0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [4, 3, 6, 2]


def test_collator_dispatch_and_validation():
    assert torch.equal(Collator(PAD)(EXAMPLES)["input_ids"], collate_completions(EXAMPLES, PAD)["input_ids"])
    assert "position_ids" in Collator(packing=True)(EXAMPLES)
    pairs = [{"prompt_ids": [5], "chosen_ids": [6], "rejected_ids": [7]}]
    assert Collator(PAD, kind="pairs")(pairs)["input_ids"].shape == (2, 2)
    with pytest.raises(ValueError, match="packing is only supported for kind='completions'"):
        Collator(PAD, packing=True, kind="pairs")
    with pytest.raises(ValueError, match="pad_token_id is required"):
        Collator()
    with pytest.raises(TypeError, match="only scalar extras"):
        collate_completions([dict(EXAMPLES[0], meta=[1])], PAD)


def test_packed_forward_matches_padded_forward():
    """The packed layout is what transformers needs: position_ids alone keep sequences apart."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    packed, padded = pack_completions(EXAMPLES), collate_completions(EXAMPLES, PAD)
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              use_cache=False).logits[0]
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                              use_cache=False).logits
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(packed_logits, padded_logits[real], atol=1e-5, rtol=1e-5)
