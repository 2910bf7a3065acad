"""Held-out evaluation inside the loop: the algorithm's own loss and metrics, without gradients."""

from __future__ import annotations

import torch

from preftune.models.zero import is_partitioned
from preftune.train.sharding import is_sharded


@torch.no_grad()
def evaluate(algo, inner, examples: list[dict], batch_size: int, accelerator) -> dict[str, float]:
    """Mean loss (per the algorithm's unit) and metrics over `examples`, sharded over processes."""
    was_training = inner.training
    algo.eval()
    device = accelerator.device
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    loss_sum = torch.zeros((), device=device)
    units = torch.zeros((), device=device)
    sums: dict[str, torch.Tensor] = {}
    order = sorted(range(len(mine)), key=lambda i: inner.example_length(mine[i]))
    starts = list(range(0, len(order), batch_size))
    if sharded := is_sharded(inner) or is_partitioned(inner):
        # A sharded forward is collective in every layer: every process runs as many as the busiest one
        # (extra ones on a real row, their results dropped).
        most = accelerator.reduce(torch.tensor(float(len(starts)), device=device), reduction="max")
        starts += [None] * (int(most) - len(starts))
    for k in starts:
        rows = [mine[i] for i in order[k : k + batch_size]] if k is not None else examples[:1]
        batch = {key: v.to(device) for key, v in inner.collate(rows).items()}
        with accelerator.autocast():
            loss, metrics = inner(batch)
        if sharded and k is None:
            continue
        loss_sum += loss.float()
        units += inner.count_units(batch)
        for name, (s, c) in metrics.items():
            acc = sums.setdefault(name, torch.zeros(2, device=device))
            acc[0] += s.float()
            acc[1] += c.float()
    names = sorted(sums)
    # Every process must join the reduction with the same keys, even one whose shard was empty.
    names = accelerator.gather_for_metrics([names], use_gather_object=True) if accelerator.num_processes > 1 else [names]
    names = sorted({n for part in names for n in part})
    packed = torch.stack([loss_sum, units] + [x for n in names for x in sums.get(n, torch.zeros(2, device=device))])
    packed = accelerator.reduce(packed, reduction="sum")
    out = {"eval/loss": float(packed[0] / packed[1].clamp(min=1))}
    for j, name in enumerate(names):
        s, c = packed[2 + 2 * j], packed[3 + 2 * j]
        out[f"eval/{name}"] = float(s / c) if c > 0 else float("nan")
    if was_training:
        algo.train()
    return out
