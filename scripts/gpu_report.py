"""Throughput, MFU and peak memory of training runs, from their metrics.jsonl (scripts/gpu_check.sh).

    python3 scripts/gpu_report.py RUN_DIR [RUN_DIR ...]

tokens/s: mean of the logged steps after the first (warm-up, compilation of kernels), all processes
together (the loop counts the tokens of the global batch). MFU = 6 x P x tokens/s / (GPUs x peak),
the usual forward + backward estimate (Kaplan et al. 2020; attention FLOPs and, for RL, generation
left out, so RL's MFU is a lower bound of the training part). P = all parameters of the policy
(LoRA included: the frozen weights still run forward and backward). Peak memory: rank 0's
``peak_memory_gb`` (torch.cuda.max_memory_allocated), written by the loop on CUDA.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Dense bf16 tensor-core peak per GPU (vendor data sheets, no sparsity), matched by device name.
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 125e12), ("A10", 125e12),
    ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("A6000", 155e12), ("V100", 125e12), ("T4", 65e12),
]


def peak_flops(device_name: str) -> float | None:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def parameter_count(run_dir: Path) -> int:
    """Parameters of the run's policy, counted on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = run_dir / "model"
    if (model_dir / "adapter_config.json").is_file():  # LoRA: the base model's size
        model_dir = Path(json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def report(run_dir: Path, gpus: int, device_name: str) -> str:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "tokens_per_s" in r]
    timed = steps[1:] or steps
    tps = sum(r["tokens_per_s"] for r in timed) / max(len(timed), 1)
    peak_mem = max((r.get("peak_memory_gb", 0.0) for r in steps), default=0.0)
    params = parameter_count(run_dir)
    peak = peak_flops(device_name)
    mfu = f"{6 * params * tps / (gpus * peak):.1%}" if peak else "n/a (unknown GPU: set PEAK_TFLOPS)"
    return (f"{run_dir.name:<14} steps {len(steps):>3}  tokens/s {tps:>10.0f}  params {params / 1e6:.1f}M  "
            f"MFU {mfu}  peak memory {peak_mem:.2f} GiB (rank 0)  final loss {steps[-1]['loss'] if steps else float('nan'):.4f}")


def main(argv: list[str]) -> int:
    import torch

    gpus = int(os.environ.get("REPORT_GPUS", torch.cuda.device_count() or 1))
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = peak_flops(name)
    print(f"GPU: {name} x {gpus}; peak assumed {peak / 1e12:.0f} TFLOP/s bf16 dense per GPU" if peak else f"GPU: {name} (peak unknown)")
    for arg in argv:
        path = Path(arg)
        if (path / "metrics.jsonl").is_file():
            print(report(path, int(os.environ.get(f"GPUS_{path.name}", gpus)), name))
        else:
            print(f"{path.name:<14} no metrics.jsonl (the run failed or was skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
