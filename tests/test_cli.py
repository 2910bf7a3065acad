"""End to end through the command line, as a user runs it."""

import json

from tests.conftest import ROOT, cli, sft_rows, write_jsonl


def test_train_then_generate(tmp_path):
    out = tmp_path / "run"
    proc = cli("train", "configs/sft_tiny.yaml", f"output_dir={out}", "train.max_steps=4", "train.save_steps=2", "train.progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model saved to {out / 'model'}" in proc.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello"}, {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}, {"prompt": "A longer prompt about the sea and the sky"}])
    gen = tmp_path / "gen.jsonl"
    proc = cli("generate", f"model={out / 'model'}", f"prompts={prompts}", f"output={gen}", "max_new_tokens=8", "temperature=0", "num_samples=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in gen.read_text().splitlines()]
    assert len(rows) == 6
    assert rows[0]["prompt"] == "Hello" and rows[0]["sample"] == 0 and rows[1]["sample"] == 1
    assert all(0 < r["completion_tokens"] <= 8 for r in rows)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template and model.config.vocab_size == len(tok)


def test_resume_flag_continues(tmp_path):
    out = tmp_path / "run"
    args = ["train", "configs/sft_tiny.yaml", f"output_dir={out}", "train.save_steps=2", "train.progress_bar=false"]
    assert cli(*args, "train.max_steps=2").returncode == 0
    proc = cli(*args, "train.max_steps=4", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_errors_are_one_clear_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", sft_rows(3) + [{"prompt": "x", "completion": 5}])
    proc = cli("train", "configs/sft_tiny.yaml", f"data.path={bad}", f"output_dir={tmp_path / 'o'}")
    assert proc.returncode == 2
    assert "bad.jsonl" in proc.stderr and "row 4" in proc.stderr and "'completion'" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = cli("train", "configs/sft_tiny.yaml", "train.lr=0.1")
    assert proc.returncode == 2 and "unknown key 'train.lr'" in proc.stderr and "learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = cli("train", "configs/sft_tiny.yaml", f"output_dir={tmp_path / 'none'}", "--resume")
    assert proc.returncode == 2 and "holds no checkpoint" in proc.stderr

    proc = cli("generate", "model=no-such-model-dir/", f"prompts={bad}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_help_lists_every_field():
    proc = cli("train", "--help")
    assert proc.returncode == 0
    for key in ("train.micro_batch_size", "model.lora.r", "data.truncation", "sft.packing"):
        assert key in proc.stdout
    proc = cli("config", "sft")
    assert proc.returncode == 0 and "# Peak learning rate of AdamW." in proc.stdout
    assert cli("algorithms").stdout.startswith("sft")
    assert (ROOT / "configs" / "sft_tiny.yaml").exists()
