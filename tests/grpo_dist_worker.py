"""One optimizer step's gradient for a fixed rollout, split over this launch's processes and micro-batches.

    python tests/grpo_dist_worker.py OUT.pt MICRO [MICRO ...]                       # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/grpo_dist_worker.py OUT.pt MICRO ...

For every case of CASES (each aggregation, GSPO, REINFORCE++ with TIS; a single-pass GRPO whose π_old is its
training forward) and every micro-batch size, the same 8 rollout rows (ragged lengths, old log-probs far from
the policy's so that clipping is active)
go through the loop's ``_run_step``; rank 0 saves {case/micro: flat gradient} to OUT.pt. The update
must not depend on micro-batch size x accumulation x world size (tests/test_grpo_train.py).
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from preftune.run_config import load_run_config  # noqa: E402
from preftune.train.loop import _run_step, build_module  # noqa: E402

REWARD = f"{ROOT / 'tests' / 'rl_reward.py'}:low_ids"
CASES = {  # two epochs: the rows' old log-probs are π_old (a later epoch's step, off-policy)
    "grpo-token": ("grpo", ["grpo.aggregation=token", "grpo.num_epochs=2"]),
    "grpo-sequence": ("grpo", ["grpo.aggregation=sequence", "grpo.epsilon_high=0.28", "grpo.num_epochs=2"]),
    "grpo-dr_grpo": ("grpo", ["grpo.aggregation=dr_grpo", "grpo.num_epochs=2"]),
    "gspo": ("gspo", ["gspo.epsilon_low=0.05", "gspo.epsilon_high=0.05", "gspo.num_epochs=2"]),
    "reinforce_pp-tis": ("reinforce_pp", ["reinforce_pp.tis_cap=1.5", "reinforce_pp.kl_in_reward=false", "reinforce_pp.kl_estimator=k3",
                                          "reinforce_pp.num_epochs=2"]),
    # a single pass: π_old is the training forward's own log-probs (the rows' old_logps are not read), ratio 1
    "grpo-single-pass-tis": ("grpo", ["grpo.aggregation=sequence", "grpo.tis_cap=1.5"]),
}
ROWS = 8


def fixed_rows(tokenizer) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(ROWS):
        prompt = tokenizer(f"Tell me about item {i}:", add_special_tokens=False).input_ids
        n = 1 + (3 * i) % 6  # completion lengths 1..6: micro-batches hold different token counts
        completion = torch.randint(5, 400, (n,), generator=g).tolist()
        old = (-6.0 + 0.6 * torch.randn(n, generator=g)).tolist()
        rows.append({
            "prompt_ids": prompt, "completion_ids": completion, "old_logps": old,
            "ref_logps": (torch.tensor(old) - 0.3 * torch.randn(n, generator=g)).tolist(),
            "sampler_logps": (torch.tensor(old) + 0.5 * torch.randn(n, generator=g)).tolist(),
            "advantages": torch.randn(n, generator=g).tolist(), "advantage": float(torch.randn((), generator=g)),
            "score": 0.1 * i,  # read by a single pass's reward/with_kl metric
        })
    return rows


@torch.no_grad()
def by_definition(algo, rows: list[dict], run) -> float:
    """The aggregated loss of all rows in one batch, written out from each aggregation's definition."""
    from preftune.losses.grpo import truncated_importance_weights
    from preftune.models.logprobs import _scored, per_token_logps

    batch = algo.collate(rows)
    logps = per_token_logps(algo.policy, batch)
    if algo.old_policy_in_training():
        batch["old_logps"] = logps
    mask = _scored(batch["completion_mask"])
    pg, _ = algo.policy_loss(logps, batch, mask)
    if algo.config.tis_cap is not None:
        pg = pg * truncated_importance_weights(batch["old_logps"], batch["sampler_logps"], mask, cap=algo.config.tis_cap)[0]
    ell = torch.where(mask, pg + algo.kl_loss_term(logps, batch), 0.0)
    mode, lengths = algo.config.aggregation, mask.sum(-1)
    if mode == "sequence":  # 1/N Σ_i 1/|o_i| Σ_t ℓ
        return float((ell.sum(-1) / lengths).mean())
    if mode == "token":  # Σ_i Σ_t ℓ / Σ_i |o_i|
        return float(ell.sum() / lengths.sum())
    return float(ell.sum() / (len(rows) * algo.config.max_new_tokens))  # dr_grpo: Σ ℓ / (N · L_max)


def main() -> None:
    out, micros = sys.argv[1], [int(m) for m in sys.argv[2:]]
    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    grads = {}
    for case, (algorithm, extra) in CASES.items():
        run = load_run_config(None, [
            f"algorithm={algorithm}", "output_dir=/tmp/unused", "model.name=tiny-random-llama", "data.path=unused.jsonl",
            f"{algorithm}.reward={REWARD}", f"{algorithm}.max_new_tokens=6", f"{algorithm}.kl_coef=0.1", *extra,
        ])
        algo = accelerator.prepare(build_module(run))
        inner = accelerator.unwrap_model(algo)
        mine = fixed_rows(inner.tokenizer)[rank * ROWS // world : (rank + 1) * ROWS // world]
        definition = by_definition(inner, fixed_rows(inner.tokenizer), run)
        for micro in micros:
            algo.zero_grad(set_to_none=True)
            batches = [inner.collate(mine[k : k + micro]) for k in range(0, len(mine), micro)]
            metrics = _run_step(algo, batches, accelerator, {})
            flat = torch.cat([p.grad.flatten() for p in inner.policy.parameters() if p.grad is not None])
            grads[f"{case}/{micro}"] = {"grad": flat.clone(), "loss": metrics["loss"], "definition": definition,
                                        "clip": metrics["policy/clip_low"] + metrics["policy/clip_high"]}
    if accelerator.is_main_process:
        torch.save(grads, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
