"""mDPO: the loss in closed form, the corrupted image, image-pair data, the tiny VLM, training, CLI."""

import json
import math

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import preftune.train.loop as loop_mod
from preftune.run_config import load_run_config
from preftune.data.images import corruption_box, load_image_pairs, write_colour_images
from preftune.data.records import DataError
from preftune.losses.mdpo import anchored_preference_loss, conditional_preference_loss, mdpo_loss
from preftune.losses.preference import dpo_loss
from preftune.models.loading import ModelLoadError, load_model, save_model
from preftune.models.vision import image_conditioned_logps
from preftune.train.export import resolve_model
from preftune.train.metrics import read_metrics
from tests.conftest import ROOT, cli, write_jsonl

LN2 = math.log(2)


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-9, atol=1e-12)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))


# -- loss -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_each_term_is_ln2_at_the_reference(beta):
    g = torch.Generator().manual_seed(0)
    pc, pr, pcc = (-30 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(3))
    losses, m = mdpo_loss(pc, pr, pcc, pc.clone(), pr.clone(), pcc.clone(), beta=beta)
    close(losses, torch.full((5,), 3 * LN2, dtype=torch.float64))
    for term in ("dpo_losses", "copo_losses", "anchor_losses"):
        close(m[term], torch.full((5,), LN2, dtype=torch.float64))
    close(m["copo_margins"], torch.zeros(5, dtype=torch.float64))
    # With an anchor δ the anchored term at the reference is log(1 + e^δ); λ's weigh the terms.
    losses, _ = mdpo_loss(pc, pr, pcc, pc, pr, pcc, beta=beta, copo_weight=0.5, anchor_weight=2.0, delta=1.5)
    close(losses, torch.full((5,), LN2 + 0.5 * LN2 + 2.0 * math.log1p(math.exp(1.5)), dtype=torch.float64))


def test_worked_example():
    # log-ratios: chosen +1, rejected −1, chosen under the corrupted image −0.5; β = 0.5.
    pc, pr, pcc = t(-10.0), t(-12.0), t(-14.5)
    rc, rr, rcc = t(-11.0), t(-11.0), t(-14.0)
    losses, m = mdpo_loss(pc, pr, pcc, rc, rr, rcc, beta=0.5, delta=0.25)
    dpo = -math.log(sigmoid(0.5 * (1 - (-1))))
    copo = -math.log(sigmoid(0.5 * (1 - (-0.5))))
    anchor = -math.log(sigmoid(0.5 * 1 - 0.25))
    close(losses, [dpo + copo + anchor])
    close(m["dpo_losses"], [dpo])
    close(m["copo_losses"], [copo])
    close(m["anchor_losses"], [anchor])
    close(m["chosen_rewards"], [0.5])
    close(m["corrupted_rewards"], [-0.25])
    close(m["copo_margins"], [0.75])
    close(m["copo_accuracies"], [1.0])
    close(m["anchor_margins"], [0.25])


def test_gradients_match_the_formulas():
    beta, delta = 0.3, 0.2
    pc, pcc = t(-4.0, -20.0, grad=True), t(-6.0, -18.0, grad=True)
    rc, rcc = t(-5.0, -19.0), t(-5.5, -21.0)
    losses, _ = conditional_preference_loss(pc, pcc, rc, rcc, beta=beta)
    losses.sum().backward()
    z = [beta * ((a - b) - (c - d)) for a, b, c, d in zip([-4.0, -20.0], [-5.0, -19.0], [-6.0, -18.0], [-5.5, -21.0])]
    close(pc.grad, [-beta * sigmoid(-x) for x in z])  # ∂(−log σ(z))/∂z = −σ(−z), ∂z/∂pc = β
    close(pcc.grad, [beta * sigmoid(-x) for x in z])

    pc2 = t(-4.0, -20.0, grad=True)
    losses, _ = anchored_preference_loss(pc2, rc, beta=beta, delta=delta)
    losses.sum().backward()
    close(pc2.grad, [-beta * sigmoid(-(beta * (a - b) - delta)) for a, b in zip([-4.0, -20.0], [-5.0, -19.0])])


def test_zero_weights_are_dpo():
    pc, pr, rc, rr = t(-3.0, -8.0), t(-4.0, -7.0), t(-3.5, -7.5), t(-3.0, -9.0)
    losses, m = mdpo_loss(pc, pr, None, rc, rr, None, beta=0.2, copo_weight=0, anchor_weight=0)
    expected, dm = dpo_loss(pc, pr, rc, rr, beta=0.2)
    close(losses, expected)
    close(m["margins"], dm["margins"])
    assert "copo_losses" not in m and "anchor_losses" not in m
    with pytest.raises(ValueError, match="corrupted image"):
        mdpo_loss(pc, pr, None, rc, rr, None, beta=0.2)


# -- the corrupted image ----------------------------------------------------------------------------


def test_corruption_box_is_deterministic_and_small():
    boxes = [corruption_box(64, 48, key=f"example {i}", keep_min=0.05, keep_max=0.2) for i in range(50)]
    assert boxes == [corruption_box(64, 48, key=f"example {i}", keep_min=0.05, keep_max=0.2) for i in range(50)]
    assert len(set(boxes)) > 40  # the key decides: different examples, different crops
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
        area = (right - left) * (bottom - top) / (64 * 48)
        assert 0.03 <= area <= 0.23  # the drawn fraction, up to rounding of the sides
    with pytest.raises(ValueError):
        corruption_box(10, 10, key="k", keep_min=0.0, keep_max=0.2)


# -- data -------------------------------------------------------------------------------------------


def _png(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), colour).save(path)
    return path


def _row(**kw):
    return {"images": ["img/a.png"], "prompt": "What colour?", "chosen": " red", "rejected": " blue", **kw}


def test_image_pairs_load_with_relative_paths_and_trl_content(tmp_path, monkeypatch):
    _png(tmp_path / "data" / "img" / "a.png")
    typed = {
        "image": "img/a.png",
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "Colour? "}, {"type": "image"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
        "rejected": [{"role": "assistant", "content": "blue"}],
    }
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", [_row(), typed])
    monkeypatch.chdir(tmp_path)  # paths resolve against the data file's folder, not the working directory
    first, second = load_image_pairs(str(data))
    assert first.image == str((tmp_path / "data" / "img" / "a.png").resolve())
    assert first.pair.prompt == "<image>\nWhat colour?"  # no placeholder: the image goes first
    assert second.pair.prompt == [{"role": "user", "content": "Colour? <image>"}]
    assert second.pair.chosen == [{"role": "assistant", "content": "red"}]
    assert first.image_hash == second.image_hash and first.size == (16, 12)


@pytest.mark.parametrize(
    "row, field, message",
    [
        (_row(images=["img/missing.png"]), "images", "image file not found"),
        (_row(images=["img/bad.png"]), "images", "cannot read image file"),
        (_row(images=5), "images", "expected a list of image paths, got int"),
        (_row(images=["img/a.png", "img/a.png"]), "images", "exactly one image per row, got 2"),
        ({k: v for k, v in _row(image=3).items() if k != "images"}, "image", "expected a path to an image file"),
        ({k: v for k, v in _row().items() if k != "images"}, "images", "missing field"),
        (_row(prompt="<image> and <image>"), "prompt", "2 image placeholders"),
        (_row(chosen=" <image> red"), "chosen", "belong in the prompt only"),
        (_row(rejected=" red"), "rejected", "identical"),
        (_row(prompt=[{"role": "user", "content": [{"type": "audio"}]}]), "prompt", "content part 1"),
    ],
)
def test_image_pair_errors_name_file_row_and_field(tmp_path, row, field, message):
    _png(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")
    data = write_jsonl(tmp_path / "pairs.jsonl", [_row(), row])
    with pytest.raises(DataError) as err:
        load_image_pairs(str(data))
    assert (err.value.source, err.value.row, err.value.field) == (str(data), 2, field)
    assert message in str(err.value)


# -- the tiny VLM -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm():
    return load_model("tiny-random-llava", model_class=AutoModelForImageTextToText)


def _image_batch(processor, colours):
    prompt = processor.tokenizer("<image>\nWhat colour?", add_special_tokens=False)["input_ids"]
    k = prompt.index(processor.tokenizer.convert_tokens_to_ids("<image>"))
    prompt = prompt[:k] + prompt[k : k + 1] * 16 + prompt[k + 1 :]
    answer = processor.tokenizer(" red", add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer] * len(colours))
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, len(prompt) :] = True
    images = [Image.new("RGB", (32, 32), c) for c in colours]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion, "pixel_values": pixels}


def test_tiny_vlm_logps_depend_on_the_image_and_match_full_logits(vlm):
    model, processor = vlm
    batch = _image_batch(processor, [(255, 0, 0), (0, 0, 255), (255, 0, 0)])
    with torch.no_grad():
        logps, lengths = image_conditioned_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits.float()
    assert lengths.tolist() == [3, 3, 3]
    assert abs(float(logps[0] - logps[1])) > 1e-4  # another image, another likelihood of the same answer
    torch.testing.assert_close(logps[0], logps[2])
    full = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = (full * batch["completion_mask"][:, 1:]).sum(-1)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)


def test_tiny_vlm_saves_and_loads_like_a_local_llava_folder(vlm, tmp_path):
    model, processor = vlm
    folder = save_model(model, processor, tmp_path / "llava")
    batch = _image_batch(processor, [(0, 200, 0)])
    hf_model, hf_processor = AutoModelForImageTextToText.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    ours, our_processor = load_model(str(folder), model_class=AutoModelForImageTextToText)
    assert type(hf_processor).__name__ == type(our_processor).__name__ == "LlavaProcessor"
    with torch.no_grad():
        reference = image_conditioned_logps(model, batch)[0]
        torch.testing.assert_close(image_conditioned_logps(hf_model, batch)[0], reference)
        torch.testing.assert_close(image_conditioned_logps(ours, batch)[0], reference)
    with pytest.raises(ModelLoadError, match="vision-language"):
        load_model("tiny-random-llava")  # as a text-only causal LM


# -- training ---------------------------------------------------------------------------------------


def run_cfg(tmp_path, name, *overrides):
    return load_run_config(ROOT / "configs" / "mdpo_tiny.yaml", [
        f"output_dir={tmp_path / name}", "train.progress_bar=false", "train.save_steps=0", *overrides,
    ])  # fmt: skip


def test_mdpo_learns_to_use_the_image(tmp_path):
    res = loop_mod.train(run_cfg(tmp_path, "mdpo"))
    ms = read_metrics(res.metrics_path)
    first, final = ms[0], [m for m in ms if "eval/loss" in m][-1]
    assert first["loss"] == pytest.approx(3 * LN2, abs=1e-4)  # policy = reference: each term ln 2
    assert first["rewards/copo_margins"] == pytest.approx(0.0, abs=1e-5)
    # Each colour is chosen and rejected equally often under one prompt: only the image tells them apart.
    assert final["eval/rewards/accuracies"] >= 0.85
    assert final["eval/rewards/copo_margins"] > 0.1
    assert final["eval/rewards/copo_accuracies"] >= 0.75
    assert final["eval/loss"] < first["loss"] - 0.2


def test_zero_weights_train_dpo_on_image_pairs(tmp_path):
    cfg = run_cfg(tmp_path, "dpo", "train.max_steps=2", "data.eval_path=null", "mdpo.copo_weight=0", "mdpo.anchor_weight=0")
    first = read_metrics(loop_mod.train(cfg).metrics_path)[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)
    assert "loss/copo" not in first and "logps/corrupted_chosen" not in first


@pytest.mark.parametrize("lora", [False, True])
def test_precomputed_reference_equals_live(tmp_path, lora):
    extra = ["train.max_steps=3", "data.eval_path=null"]
    if lora:
        extra += ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0"]
    pre = read_metrics(loop_mod.train(run_cfg(tmp_path, "pre", *extra)).metrics_path)
    live = read_metrics(loop_mod.train(run_cfg(tmp_path, "live", *extra, "mdpo.precompute_reference=false")).metrics_path)
    for key in ("loss", "ref_logps/chosen", "ref_logps/rejected", "ref_logps/corrupted_chosen", "rewards/copo_margins"):
        assert [m[key] for m in pre] == pytest.approx([m[key] for m in live], abs=2e-4), key
    if lora:  # the saved adapter names its base and carries the processor
        model, processor = load_model(str(tmp_path / "pre" / "model"), model_class=AutoModelForImageTextToText)
        assert hasattr(model, "peft_config") and type(processor).__name__ == "LlavaProcessor"


def test_corrupted_images_differ_from_the_originals_and_repeat(tmp_path):
    from preftune.train.loop import build_algorithm

    cfg = run_cfg(tmp_path, "x")
    algo, examples, _, _ = build_algorithm(cfg)
    batch = algo.collate(examples[:8])
    real, _, corrupted = batch["pixel_values"].chunk(3)
    assert all(not torch.allclose(a, b) for a, b in zip(real, corrupted))
    again, again_examples, _, _ = build_algorithm(cfg)  # a second run (or a resumed one): the same crops
    assert [e["corrupt_box"] for e in again_examples] == [e["corrupt_box"] for e in examples]
    torch.testing.assert_close(again.collate(again_examples[:8])["pixel_values"], batch["pixel_values"])


def test_cli_trains_the_example_config_and_the_model_reloads(tmp_path):
    out = tmp_path / "run"
    proc = cli("train", "configs/mdpo_tiny.yaml", f"output_dir={out}", "train.max_steps=4", "train.save_steps=2",
               "data.eval_path=null", "train.progress_bar=false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    model = AutoModelForImageTextToText.from_pretrained(out / "model")
    processor = AutoProcessor.from_pretrained(out / "model")
    exported, _ = load_model(resolve_model(str(out / "checkpoints" / "step-000004")), model_class=AutoModelForImageTextToText)
    batch = _image_batch(processor, [(200, 0, 0), (0, 0, 200)])
    with torch.no_grad():
        torch.testing.assert_close(image_conditioned_logps(exported, batch)[0], image_conditioned_logps(model, batch)[0])


def test_builtin_colour_images_are_balanced(tmp_path):
    rows = [json.loads(line) for line in write_colour_images(tmp_path).read_text().splitlines()]
    chosen = sorted(r["chosen"] for r in rows)
    assert chosen == sorted(r["rejected"] for r in rows)  # every colour as often chosen as rejected
    assert all(r["chosen"] != r["rejected"] and r["chosen"].strip() in r["images"][0] for r in rows)


@pytest.mark.parametrize("max_length, message", [(24, "a left-truncated prompt loses the image"), (12, "must leave room")])
def test_a_prompt_truncated_into_the_image_is_an_error(tmp_path, max_length, message):
    from preftune.train.loop import build_algorithm

    with pytest.raises(DataError, match=message) as err:
        build_algorithm(run_cfg(tmp_path, "x", f"data.max_length={max_length}", "data.max_prompt_length=null"))
    assert (err.value.row, err.value.field) == (1, "prompt")


class Stop(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    extra = ["train.max_steps=4", "train.save_steps=2", "data.eval_path=null", "train.micro_batch_size=4"]
    full = loop_mod.train(run_cfg(tmp_path, "full", *extra))
    real_save = loop_mod.save_checkpoint

    def save_then_crash(out, step, **kw):
        path = real_save(out, step, **kw)
        if step == 2:
            raise Stop()
        return path

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(Stop):
        loop_mod.train(run_cfg(tmp_path, "cut", *extra))
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    resumed = loop_mod.train(run_cfg(tmp_path, "cut", *extra, "train.resume_from=latest"))
    a, b = (load_file(str(r.model_dir / "model.safetensors")) for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same crops, same reference columns, bit for bit
    strip = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]  # noqa: E731
    assert strip(read_metrics(resumed.metrics_path)) == strip(read_metrics(full.metrics_path))
