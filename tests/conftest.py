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
