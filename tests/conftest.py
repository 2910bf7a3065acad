import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Model conversions (the packaged SmolLM2) are cached once per test session, not per test.
os.environ.setdefault("PREFTUNE_CACHE", str(ROOT / ".cache" / "preftune"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_rows(n: int = 16) -> list[dict]:
    """Varied-length prompt/completion rows: a tiny model can learn them quickly."""
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]
    rows = []
    for i in range(n):
        prompt = " ".join(words[(i + k) % len(words)] for k in range(2 + i % 5))
        completion = " ".join(words[(i * 3 + k) % len(words)] for k in range(1 + i % 4))
        rows.append({"prompt": f"Say: {prompt}", "completion": f" {completion}"})
    return rows


@pytest.fixture
def sft_file(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", sft_rows())


def cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run `python -m preftune ...` in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "preftune", *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=600
    )


def assert_resume_equals_uninterrupted(cfg, monkeypatch, crash_step: int):
    """Train ``cfg("full")``; train ``cfg("cut")`` until its checkpoint at ``crash_step``, crash, resume it;
    assert both runs logged the same metrics and saved the same weights. Returns (full, resumed) results."""
    import torch
    from safetensors.torch import load_file

    import preftune.train.loop as loop_mod
    from preftune.train.metrics import read_metrics

    full = loop_mod.train(cfg("full"))
    real_save = loop_mod.save_checkpoint

    def save_then_crash(out, step, **kw):
        path = real_save(out, step, **kw)
        if step == crash_step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        loop_mod.train(cfg("cut"))
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    resumed = loop_mod.train(cfg("cut", "train.resume_from=latest"))
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("tokens_per_s",)} for m in ms]  # noqa: E731
    assert strip(read_metrics(resumed.metrics_path)) == strip(read_metrics(full.metrics_path))
    a, b = load_file(str(full.model_dir / "model.safetensors")), load_file(str(resumed.model_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    return full, resumed
