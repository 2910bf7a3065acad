"""The two RLOO (or GRPO: ``algorithm="grpo"`` in the variant) contestants of ``rloo_vs_trl.py``, each run inside its own child process.

``_child_preftune`` runs ``preftune.train.loop.train`` with the ``rloo`` algorithm and ``_child_trl``
TRL's ``RLOOTrainer``, on the same model, prompts, VADER reward and settings (``spec``: model, prompt
order, steps, k, lengths, lr, β, seed, threads, and the variant's ``settings``: trainer, dtype, lora,
gc, reuse). Both report to the :class:`Probe` below from outside the trainers: generation (by
wrapping ``GenerationMixin.generate``), rollouts, rewards and the end of each optimizer step.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.harness import cpu_s, mark_when_model_loaded, peak_mb, rss_mb, system_busy_s

PROMPTS_SOURCE = "builtin:movie_review_prompts"
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


# ------------------------------------------------------------------------------------------- probes


class Probe:
    """Per-step counters, filled by the wrappers below and closed at the end of each optimizer step."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks: dict[str, dict] = {}
        self.steps: list[dict] = []
        self.extra: dict = {}
        self._reset()

    def _reset(self):
        self.gen_s = self.rollout_s = 0.0
        self.gen_tokens = self.gen_rows = self.gen_calls = self.decode_steps = self.prompt_tokens = 0
        self.rewards: list[float] = []
        self.prompts: list[str] = []

    def mark(self, name: str) -> None:
        self.marks[name] = {"t": time.perf_counter() - self.t0, "rss_mb": rss_mb(), "peak_mb": peak_mb(),
                            "cpu_s": cpu_s(), "sys_busy_s": system_busy_s()}

    def step_end(self, step: int) -> None:
        self.steps.append({
            "step": step, "t": time.perf_counter() - self.t0, "cpu_s": cpu_s(), "sys_busy_s": system_busy_s(),
            "peak_mb": peak_mb(), "rss_mb": rss_mb(), "gen_s": self.gen_s, "rollout_s": self.rollout_s,
            "gen_tokens": self.gen_tokens, "gen_rows": self.gen_rows, "gen_calls": self.gen_calls,
            "decode_steps": self.decode_steps, "prompt_tokens": self.prompt_tokens,
            "reward_mean": statistics.fmean(self.rewards) if self.rewards else None, "n_rewards": len(self.rewards),
            "prompts_sha": hashlib.sha1("\n".join(sorted(self.prompts)).encode()).hexdigest()[:12],
        })
        self._reset()

    def result(self) -> dict:
        return {"marks": self.marks, "steps": self.steps, **self.extra}


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(x) for x in (value if isinstance(value, (list, tuple)) else [value])]


def patch_generate(probe: Probe) -> None:
    """Time every top-level ``model.generate`` call and count the tokens it really generated."""
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate
    depth = [0]

    def generate(self, *args, **kwargs):
        depth[0] += 1
        t = time.perf_counter()
        try:
            out = original(self, *args, **kwargs)
        finally:
            depth[0] -= 1
        if depth[0]:
            return out
        probe.gen_s += time.perf_counter() - t
        import torch

        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        width = input_ids.shape[1]
        gen = seqs[:, width:]
        cfg = kwargs.get("generation_config") or self.generation_config
        eos = _eos_list(getattr(cfg, "eos_token_id", None)) or _eos_list(self.generation_config.eos_token_id)
        if eos:
            is_eos = torch.isin(gen, torch.tensor(eos, device=gen.device))
            has = is_eos.any(-1)
            lengths = torch.where(has, is_eos.int().argmax(-1) + 1, gen.shape[1])
        else:
            lengths = torch.full((gen.shape[0],), gen.shape[1])
        probe.gen_tokens += int(lengths.sum())
        probe.gen_rows += gen.shape[0]
        probe.gen_calls += 1
        probe.decode_steps += gen.shape[1]
        mask = kwargs.get("attention_mask")
        probe.prompt_tokens += int(mask.sum()) if mask is not None else input_ids.numel()
        return out

    GenerationMixin.generate = generate


# ------------------------------------------------------------------------------------------- children


def _child_preftune(spec: dict, v: dict, probe: Probe) -> None:
    import preftune.algorithms.online as rewards_module  # where OnlineAlgorithm looks resolve_reward up
    from preftune.algorithms.online import OnlineAlgorithm
    from preftune.run_config import load_run_config
    from preftune.train import loop
    from preftune.train.metrics import MetricsLog

    probe.mark("imported")
    mark_when_model_loaded(probe)

    original_resolve = rewards_module.resolve_reward

    def resolve_reward(spec_, **kwargs):
        fn = original_resolve(spec_, **kwargs)

        def reward(prompts, completions):
            scores = fn(prompts, completions)
            probe.rewards += [float(s) for s in scores]
            probe.prompts += [str(p) for p in prompts]
            return scores

        return reward

    rewards_module.resolve_reward = resolve_reward  # OnlineAlgorithm reads its module global at call time

    original_rollout = OnlineAlgorithm.make_rollout

    def make_rollout(self, *args, **kwargs):
        t = time.perf_counter()
        out = original_rollout(self, *args, **kwargs)
        probe.rollout_s += time.perf_counter() - t
        return out

    OnlineAlgorithm.make_rollout = make_rollout

    original_write = MetricsLog.write

    def write(self, record):
        if "tokens_per_s" in record:  # a training-step record
            probe.step_end(int(record["step"]))
        original_write(self, record)

    MetricsLog.write = write

    rows = spec["prompts"] * spec["k"]
    a = v.get("algorithm", "rloo")
    overrides = [
        f"algorithm={a}",
        f"model.name={spec['model']}",
        f"model.dtype={v['dtype']}",
        f"data.path={spec['prompts_source']}",
        "data.eval_fraction=0",
        f"train.micro_batch_size={spec['micro_batch']}",
        f"train.grad_accum_steps={rows // spec['micro_batch']}",
        f"train.max_steps={spec['warmup'] + spec['steps']}",
        f"train.learning_rate={spec['lr']}",
        "train.lr_scheduler=constant",
        "train.warmup_steps=0",
        "train.max_grad_norm=1.0",
        "train.logging_steps=1",
        f"train.seed={spec['seed']}",
        "train.save_steps=0",
        "train.progress_bar=false",
        "train.overwrite_output_dir=true",
        f"output_dir={spec['workdir']}/run-{spec['variant']}",
        f"{a}.reward=vader",
        f"{a}.samples_per_prompt={spec['k']}",
        f"{a}.max_new_tokens={spec['max_new_tokens']}",
        f"{a}.temperature={spec['temperature']}",
        f"{a}.top_p=1.0",
        f"{a}.top_k=0",
        f"{a}.generation_batch_size={rows}",
        f"{a}.kl_coef={spec['beta']}",
        f"{a}.log_samples_steps=0",
    ]
    if a == "rloo":
        overrides += ["rloo.kl_estimator=k1", "rloo.kl_in_reward=true", "rloo.advantage=rloo"]
    else:  # GRPO as TRL's GRPOTrainer defaults: token-level (DAPO) loss, group std, k3 KL as a loss term, 1 pass
        overrides += ["grpo.kl_estimator=k3", "grpo.kl_in_reward=false", "grpo.aggregation=token", "grpo.num_epochs=1",
                      "grpo.epsilon_low=0.2", "grpo.epsilon_high=0.2"]
    if v["lora"]:
        overrides += [
            "model.lora.enabled=true", f"model.lora.r={LORA['r']}", f"model.lora.alpha={LORA['alpha']}",
            f"model.lora.dropout={LORA['dropout']}", f"model.lora.target_modules={LORA['target_modules']}",
        ]
    if v.get("reuse") is False:
        overrides.append(f"{a}.reuse_sampler_logps=false")
    if v.get("sampler"):  # a quantized rollout backend, corrected by truncated importance sampling
        overrides += [f"{a}.sampler={v['sampler']}", f"{a}.tis_cap=2.0"]
    run = load_run_config(None, overrides)
    probe.extra["settings"] = {"overrides": overrides}
    probe.mark("train_start")
    loop.train(run)
    probe.mark("train_end")


def _child_trl(spec: dict, v: dict, probe: Probe) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    import trl.trainer.grpo_trainer as grpo_module
    import trl.trainer.rloo_trainer as rloo_module
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    grpo = v.get("algorithm") == "grpo"
    Trainer, Config = (GRPOTrainer, GRPOConfig) if grpo else (RLOOTrainer, RLOOConfig)

    from preftune.models.loading import load_model
    from preftune.rewards.sentiment import VaderSentiment

    probe.mark("imported")
    model, tokenizer = load_model(spec["model"], seed=spec["seed"])
    probe.mark("model_loaded")

    def create_model_from_path(*args, **kwargs):
        # TRL builds the frozen reference (full fine-tuning, beta > 0) from the policy's hub id; offline
        # it gets the same weights, loaded the same way as the policy.
        ref, _ = load_model(spec["model"], seed=spec["seed"])
        probe.mark("ref_loaded")
        return ref

    rloo_module.create_model_from_path = create_model_from_path
    grpo_module.create_model_from_path = create_model_from_path

    vader = VaderSentiment()

    def vader_sentiment(prompts, completions, **kwargs):
        scores = vader(prompts, completions)
        probe.rewards += [float(s) for s in scores]
        probe.prompts += [str(p) for p in prompts]
        return scores

    class Timed(Trainer):
        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            probe.rollout_s += time.perf_counter() - t
            return out

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            probe.step_end(int(state.global_step))

    peft_config = None
    if v["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"], task_type="CAUSAL_LM",
        )
    rows = spec["prompts"] * spec["k"]
    kwargs = {}
    if not v.get("gc", True):
        kwargs["gradient_checkpointing"] = False
    if grpo:  # its defaults, spelled out: DAPO's token-level loss, group std, symmetric clip 0.2
        kwargs.update(loss_type="dapo", scale_rewards="group", epsilon=0.2)
    args = Config(
        output_dir=f"{spec['workdir']}/run-{spec['variant']}",
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=rows // spec["micro_batch"],
        num_generations=spec["k"],
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_p=1.0,
        top_k=0,
        beta=spec["beta"],
        num_iterations=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=spec["warmup"] + spec["steps"],
        bf16=v["dtype"] == "bf16",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        shuffle_dataset=False,  # the dataset is written in preftune's visiting order
        seed=spec["seed"],
        use_cpu=True,
        **kwargs,
    )
    probe.extra["settings"] = {
        "gradient_checkpointing": args.gradient_checkpointing, "optim": str(args.optim), "bf16": args.bf16,
        "generation_batch_size": args.generation_batch_size, "steps_per_generation": args.steps_per_generation,
        "num_generations": args.num_generations, "beta": args.beta,
    }
    dataset = Dataset.from_list([{"prompt": p} for p in spec["prompt_order"]])
    t = time.perf_counter()
    trainer = Timed(
        model=model, reward_funcs=[vader_sentiment], args=args, train_dataset=dataset,
        processing_class=tokenizer, peft_config=peft_config, callbacks=[StepEnd()],
    )
    probe.extra["init_s"] = time.perf_counter() - t
    probe.mark("train_start")
    trainer.train()
    probe.mark("train_end")


def child_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    v = spec["settings"]
    probe = Probe()
    patch_generate(probe)
    probe.extra["loadavg_start"] = os.getloadavg()
    if v["trainer"] == "preftune":
        _child_preftune(spec, v, probe)
    else:
        _child_trl(spec, v, probe)
    probe.extra["loadavg_end"] = os.getloadavg()
    probe.extra["torch_threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(probe.result()))
