"""build_optimizer: fused AdamW where the kernel applies, the same update as torch's default."""

from types import SimpleNamespace

import torch

from preftune.train.optim import build_optimizer

SETTINGS = SimpleNamespace(learning_rate=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8)


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(8, 4, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]


def test_fused_on_cpu_with_decay_on_matrices_only():
    opt = build_optimizer(params(), SETTINGS)
    assert opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]


def test_fused_update_equals_default_adamw():
    ours, plain = params(), params()
    opt = build_optimizer(ours, SETTINGS)
    ref = torch.optim.AdamW([{"params": plain[:1], "weight_decay": 0.1}, {"params": plain[1:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, grad in zip(ours, plain, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, plain):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
