"""The loop's metric format: ``{name: (sum, count)}``, so every metric is averaged over the global
batch (summed over micro-batches and processes, then divided), not over a micro-batch."""

from __future__ import annotations

import torch


def row_metrics(per_row: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: Tensor[B]}`` -> ``{name: (sum, count)}`` (detached, fp32; on ``device``, default the values')."""
    out = {}
    for name, values in per_row.items():
        values = values.detach().float()
        where = values.device if device is None else device
        out[name] = (values.sum().to(where), torch.tensor(float(values.numel()), device=where))
    return out
