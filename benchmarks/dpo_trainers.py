"""The two DPO contestants of ``dpo_vs_trl.py``, each run inside its own child process.

``train_preftune`` runs ``preftune.train.loop.train`` and ``train_trl`` TRL's ``DPOTrainer`` on the
same data, model and settings (``spec``: model, data files, steps, batch, max length, lr, seed, and
the variant's ``settings``: dtype, precompute, lora, gc, and preftune config overrides). Both report
to a :class:`benchmarks.harness.Probe` from the outside of the trainers: ``model_loaded`` after the
policy loads, precompute start/end, the tokens of each micro-batch and the end of each optimizer
step (preftune: when the loop logs it; TRL: ``on_step_end``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.harness import Probe, mark_when_model_loaded

LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")  # TRL disables dropout: 0 in both


def pair_batch_tokens(batch) -> tuple[int, int]:
    """(positions the forward processes, prompt + chosen + rejected tokens) of a pair batch, padding
    excluded: a shared-prompt batch (``pair_lengths``) holds each prompt once, a padded batch
    ([chosen rows; rejected rows], preftune's ``collate_pairs`` and TRL's) twice."""
    if "pair_lengths" in batch:
        n = int(batch["pair_lengths"].sum())
        return n, n
    attn = batch["attention_mask"]
    fwd = int(attn.sum())
    b = attn.shape[0] // 2
    prompt_of_rejected = int(attn[b:].sum() - batch["completion_mask"][b:].bool().sum())
    return fwd, fwd - prompt_of_rejected


def train_preftune(spec: dict, probe: Probe) -> None:
    from preftune.algorithms import ALGORITHMS
    from preftune.run_config import load_run_config
    from preftune.train import loop
    from preftune.train.metrics import MetricsLog
    from preftune.data.source import OfflineSource

    v = spec["settings"]
    probe.mark("imported")
    mark_when_model_loaded(probe)

    algo_cls = ALGORITHMS["dpo"]
    original_prepare = algo_cls.prepare_examples  # whichever base class defines it

    def prepare_examples(self, examples, accelerator):
        probe.mark("precompute_start")
        t = time.perf_counter()
        out = original_prepare(self, examples, accelerator)
        probe.extra["precompute_s"] = time.perf_counter() - t
        probe.mark("precompute_end")
        probe.extra["lengths"] = {k: [len(e[k]) for e in examples] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        probe.extra["pair_layout"] = self.pair_layout
        return out

    algo_cls.prepare_examples = prepare_examples

    original_next = OfflineSource.next_step

    def next_step(self):
        batches = original_next(self)
        for b in batches:
            probe.add_tokens(*pair_batch_tokens(b))
        return batches

    OfflineSource.next_step = next_step

    original_write = MetricsLog.write

    def write(self, record):
        if "tokens_per_s" in record:  # a training-step record (evaluation records have no tokens)
            probe.step_end(int(record["step"]), float(record["loss"]))
        original_write(self, record)

    MetricsLog.write = write

    overrides = [
        "algorithm=dpo",
        f"model.name={spec['model']}",
        f"model.dtype={v['dtype']}",
        f"data.path={spec['data']}",
        f"data.max_length={spec['max_length']}",
        f"train.micro_batch_size={spec['batch']}",
        "train.grad_accum_steps=1",
        f"train.max_steps={spec['warmup'] + spec['steps']}",
        f"train.learning_rate={spec['lr']}",
        f"train.seed={spec['seed']}",
        "train.save_steps=0",
        "train.progress_bar=false",
        "train.overwrite_output_dir=true",
        f"output_dir={spec['workdir']}/run-{spec['variant']}",
        f"dpo.precompute_reference={str(v['precompute']).lower()}",
    ]
    if v["lora"]:
        overrides += [
            "model.lora.enabled=true", f"model.lora.r={LORA['r']}", f"model.lora.alpha={LORA['alpha']}",
            f"model.lora.dropout={LORA['dropout']}", f"model.lora.target_modules={LORA['target_modules']}",
        ]
    overrides += v.get("overrides", [])
    run = load_run_config(None, overrides)
    probe.extra["preftune_settings"] = {"gradient_checkpointing": run.model.gradient_checkpointing,
                                        "overrides": v.get("overrides", [])}
    probe.mark("train_start")
    loop.train(run)
    probe.mark("train_end")


def train_trl(spec: dict, probe: Probe) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    import trl.trainer.dpo_trainer as dpo_module

    from preftune.models.loading import load_model

    v = spec["settings"]
    probe.mark("imported")
    model, tokenizer = load_model(spec["model"], seed=spec["seed"])
    probe.mark("model_loaded")
    ref_model = None
    if not v["precompute"] and not v["lora"]:
        # TRL's default builds this frozen copy itself from the policy's hub id; offline we hand it the
        # same weights, loaded the same way.
        ref_model, _ = load_model(spec["model"], seed=spec["seed"])
        probe.mark("ref_loaded")
    rows = [json.loads(line) for line in Path(spec["trl_data"]).read_text().splitlines() if line.strip()]

    original_hash = dpo_module.hash_module

    def hash_module(*args, **kwargs):
        t = time.perf_counter()
        out = original_hash(*args, **kwargs)
        probe.extra["hash_s"] = probe.extra.get("hash_s", 0.0) + time.perf_counter() - t
        return out

    dpo_module.hash_module = hash_module

    class Timed(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            probe.mark("precompute_start")
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            probe.extra["precompute_loop_s"] = time.perf_counter() - t
            probe.mark("precompute_end")
            return out

        def training_step(self, model, inputs, *args, **kwargs):
            probe.add_tokens(*pair_batch_tokens(inputs))
            loss = super().training_step(model, inputs, *args, **kwargs)
            probe.pending_loss.append(float(loss.detach()))
            return loss

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            probe.step_end(int(state.global_step), None)

    peft_config = None
    if v["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"], task_type="CAUSAL_LM",
        )
    kwargs = {} if v.get("gc", True) else {"gradient_checkpointing": False}
    args = DPOConfig(
        output_dir=f"{spec['workdir']}/run-{spec['variant']}",
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=spec["lr"],
        bf16=v["dtype"] == "bf16",
        precompute_ref_log_probs=v["precompute"],
        max_length=spec["max_length"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        train_sampling_strategy="sequential",  # rows were written in preftune's visiting order
        seed=spec["seed"],
        use_cpu=True,
        **kwargs,
    )
    probe.extra["trl_settings"] = {
        "gradient_checkpointing": args.gradient_checkpointing, "optim": str(args.optim),
        "bf16": args.bf16, "precompute_ref_log_probs": args.precompute_ref_log_probs,
    }
    t = time.perf_counter()
    trainer = Timed(
        model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=peft_config, callbacks=[StepEnd()],
    )
    probe.extra["init_s"] = time.perf_counter() - t
    if "precompute_loop_s" in probe.extra:
        probe.extra["precompute_s"] = probe.extra["precompute_loop_s"] + probe.extra.get("hash_s", 0.0)
    ds = trainer.train_dataset
    probe.extra["lengths"] = {
        k: [len(x) for x in ds[k]] for k in ("prompt_ids", "chosen_ids", "rejected_ids") if k in ds.column_names
    }
    probe.mark("train_start")
    trainer.train()
    probe.mark("train_end")


def train(spec: dict, probe: Probe) -> None:
    """The child-process entry: the contestant named by ``spec["settings"]["trainer"]``."""
    (train_preftune if spec["settings"]["trainer"] == "preftune" else train_trl)(spec, probe)
