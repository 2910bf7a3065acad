"""scripts/gpu_check.sh fails fast, with a clear message, where there is no CUDA GPU."""

import os
import subprocess

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: run the script itself")
def test_gpu_check_refuses_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "gpu_check: no CUDA GPU found" in proc.stderr
    assert not (ROOT / "runs" / "gpu_check").exists() or not any((ROOT / "runs" / "gpu_check").iterdir())


def test_gpu_report_peak_table():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "scripts" / "gpu_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert mod.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert mod.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert mod.peak_flops("Some Future GPU") is None
