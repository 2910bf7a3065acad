"""PROTOTYPE (not used by preftune): where a DPO step's time goes, and two ways to cut it.

Measures one SmolLM2 DPO step (2 pairs of the benchmark data) piece by piece, interleaving the
variants so that other jobs on the machine slow them alike, and prototypes in this file (a copy of
the idea, not of preftune's code) what ``preftune.models.logprobs.concatenated_logps`` could do:

* ``padded``: today's layout (``collate_pairs``): 2B rows [prompt+chosen; prompt+rejected], right
  padded to the longest; the prompt runs twice, padding runs too.
* ``shared``: one row per pair, ``prompt + chosen + rejected``, with position ids restarting at the
  end of the prompt for the rejected part and a 4-D boolean mask in which rejected tokens see the
  prompt and themselves but not the chosen tokens. The prompt runs once; rows are padded only to
  the longest pair. Log-probs equal the padded layout's (checked below).
* ``rows``: each of the 2B rows alone (batch 1, no padding, no mask).

    python benchmarks/proto_shared_prompt.py [--model smollm2-135m-instruct] [--repeats 3] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def shared_prompt_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """[{"prompt_ids", "chosen_ids", "rejected_ids"}] -> one row per pair: prompt + chosen + rejected."""
    lens = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples]
    b, t = len(examples), max(lens)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    pos = torch.zeros((b, t), dtype=torch.long)
    allowed = torch.zeros((b, 1, t, t), dtype=torch.bool)
    causal = torch.ones((t, t), dtype=torch.bool).tril()
    src_c, tgt_c, row_c, src_r, tgt_r, row_r = [], [], [], [], [], []
    for i, e in enumerate(examples):
        p, c, r = e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]
        P, C, R = len(p), len(c), len(r)
        n = P + C + R
        ids[i, :n] = torch.tensor(p + c + r)
        pos[i, :n] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
        m = causal[:n, :n].clone()
        m[P + C : n, P : P + C] = False  # rejected never sees chosen
        allowed[i, 0, :n, :n] = m
        allowed[i, 0, n:, n:] = torch.eye(t - n, dtype=torch.bool)  # padding sees itself only (no NaN rows)
        # token at index j is predicted from the hidden state of the token before it in ITS sequence
        for k in range(C):
            src_c.append(P + k - 1 if k else P - 1), tgt_c.append(c[k]), row_c.append(i)
        for k in range(R):
            src_r.append(P + C + k - 1 if k else P - 1), tgt_r.append(r[k]), row_r.append(i)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {
        "input_ids": ids, "position_ids": pos, "attention_mask": allowed,
        "src": torch.stack([as_long(row_c + row_r), as_long(src_c + src_r)]),
        "targets": as_long(tgt_c + tgt_r), "is_rejected": as_long([0] * len(tgt_c) + [1] * len(tgt_r)).bool(),
        "row": as_long(row_c + row_r),
    }


def shared_prompt_logps(model, sb: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B] of chosen and rejected from one shared-prompt forward (fast head path only)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = inner.get_decoder()(input_ids=sb["input_ids"], position_ids=sb["position_ids"],
                              attention_mask=sb["attention_mask"], use_cache=False)
    hidden = out.last_hidden_state[sb["src"][0], sb["src"][1]]  # [N, H]
    head = inner.get_output_embeddings()
    pieces = []
    for i in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[i : i + chunk_size]).float()
        tg = sb["targets"][i : i + chunk_size]
        pieces.append(logits.gather(-1, tg[:, None]).squeeze(-1) - torch.logsumexp(logits, -1))
    flat = torch.cat(pieces)
    b = sb["input_ids"].shape[0]
    rej = sb["is_rejected"]
    chosen = flat.new_zeros(b).index_add(0, sb["row"][~rej], flat[~rej])
    rejected = flat.new_zeros(b).index_add(0, sb["row"][rej], flat[rej])
    return chosen, rejected


def rows_logps(model, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt+completion alone (no padding): 2B forwards of batch 1."""
    from preftune.models.logprobs import per_token_logps, sequence_logps

    cs, rs = [], []
    for e in examples:
        for key, acc in (("chosen_ids", cs), ("rejected_ids", rs)):
            n = len(e["prompt_ids"]) + len(e[key])
            one = {"input_ids": torch.tensor([e["prompt_ids"] + e[key]]),
                   "attention_mask": torch.ones(1, n, dtype=torch.long),
                   "completion_mask": torch.zeros(1, n, dtype=torch.bool)}
            one["completion_mask"][:, len(e["prompt_ids"]):] = True
            acc.append(sequence_logps(per_token_logps(model, one), one["completion_mask"])[0])
    return torch.stack(cs), torch.stack(rs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4, help="different pair batches of the benchmark data")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from benchmarks.data import make_pairs
    from preftune.data.collate import collate_pairs
    from preftune.data.records import PairRecord
    from preftune.data.tokenize import tokenize_pairs
    from preftune.models.loading import load_model
    from preftune.models.logprobs import concatenated_logps

    model, tok = load_model(args.model)
    model.train()
    n = args.pairs * args.batches
    recs = [PairRecord(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in make_pairs(n, 0)]
    examples, _ = tokenize_pairs(recs, tok, max_length=512)
    batches = [examples[i : i + args.pairs] for i in range(0, n, args.pairs)]
    pad = tok.pad_token_id
    ac = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16"
          else torch.autocast("cpu", enabled=False))

    # 1. equality of the layouts
    with torch.no_grad(), ac:
        ex = batches[0]
        a = concatenated_logps(model, collate_pairs(ex, pad))
        c2, r2 = shared_prompt_logps(model, shared_prompt_batch(ex, pad))
        c3, r3 = rows_logps(model, ex)
    print("chosen  padded", a["chosen_logps"].tolist(), "\n        shared", c2.tolist(), "\n        rows  ", c3.tolist())
    print("rejected padded", a["rejected_logps"].tolist(), "\n         shared", r2.tolist())
    print("max |shared - padded| =", float(torch.cat([c2 - a["chosen_logps"], r2 - a["rejected_logps"]]).abs().max()))

    # 2. timing of fwd+bwd per layout (interleaved), and of the step's other parts
    def loss_padded(ex):
        out = concatenated_logps(model, collate_pairs(ex, pad))
        return -(torch.nn.functional.logsigmoid(0.1 * (out["chosen_logps"] - out["rejected_logps"]))).sum()

    def loss_shared(ex):
        c, r = shared_prompt_logps(model, shared_prompt_batch(ex, pad))
        return -(torch.nn.functional.logsigmoid(0.1 * (c - r))).sum()

    def loss_rows(ex):
        c, r = rows_logps(model, ex)
        return -(torch.nn.functional.logsigmoid(0.1 * (c - r))).sum()

    def tokens(ex, layout):
        if layout == "padded":
            return int(collate_pairs(ex, pad)["input_ids"].numel())
        if layout == "shared":
            return int(shared_prompt_batch(ex, pad)["input_ids"].numel())
        return sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ex)

    layouts = {"padded": loss_padded, "shared": loss_shared, "rows": loss_rows}
    times: dict[str, list[float]] = {k: [] for k in layouts}
    fwd_times: dict[str, list[float]] = {k: [] for k in layouts}
    for rep in range(args.repeats):
        for name, fn in (layouts.items() if rep % 2 == 0 else list(layouts.items())[::-1]):
            total = fwd = 0.0
            for ex in batches:
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                with ac:
                    loss = fn(ex)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                total += t2 - t0
                fwd += t1 - t0
            times[name].append(total / len(batches))
            fwd_times[name].append(fwd / len(batches))
    print(f"\nfwd+bwd per step of {args.pairs} pairs ({args.dtype}, {args.threads} threads), median of {args.repeats}:")
    base = statistics.median(times["padded"])
    for name in layouts:
        toks = sum(tokens(ex, name) for ex in batches) / len(batches)
        med = statistics.median(times[name])
        print(f"  {name:<7} {med:6.2f} s (fwd {statistics.median(fwd_times[name]):5.2f} s)  "
              f"{toks:6.0f} positions/step  speed-up x{base / med:.2f}")

    # 3. optimizer variants on the full model
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for kind in ("default", "foreach", "fused"):
        kw = {"foreach": True} if kind == "foreach" else {"fused": True} if kind == "fused" else {}
        opt = torch.optim.AdamW(params, lr=1e-9, **kw)
        opt.step()  # allocate state
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            opt.step()
            ts.append(time.perf_counter() - t0)
        print(f"  AdamW {kind:<8} step {statistics.median(ts):.3f} s")
        del opt
    t0 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    print(f"  clip_grad_norm_     {time.perf_counter() - t0:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
