"""GRPO, GSPO, REINFORCE++ (and RPO, DPOP) through the one loop and the CLI: one update however the
global batch is split (micro-batch x accumulation x world size, every aggregation), rewards rise,
dynamic sampling / overlong shaping / TIS / β = 0 do what they say."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import preftune.train.loop as loop_mod
from preftune.train.metrics import read_metrics
from preftune.config import ConfigError
from tests.conftest import ROOT, cli
from tests.test_rl_train import REWARD, prompts_file, rl_cfg, rollout_rewards  # noqa: F401 (fixture)
from tests.test_train import _free_port

WORKER = str(ROOT / "tests" / "grpo_dist_worker.py")


def test_update_invariant_to_micro_batch_accumulation_and_world_size(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    one = subprocess.run([sys.executable, WORKER, str(tmp_path / "one.pt"), "8", "3", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                          WORKER, str(tmp_path / "two.pt"), "4", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    results = {**{f"1x{k}": v for k, v in torch.load(tmp_path / "one.pt").items()},
               **{f"2x{k}": v for k, v in torch.load(tmp_path / "two.pt").items()}}
    cases = {"grpo-token", "grpo-sequence", "grpo-dr_grpo", "gspo", "reinforce_pp-tis", "grpo-single-pass-tis"}
    for case in cases:
        ref = results[f"1x{case}/8"]  # 1 process, one micro-batch of all 8 rows
        # clipping is active: the ratio is far from 1 (a single pass: π_old is the training forward, ratio 1)
        assert ref["clip"] > 0.1 if "single-pass" not in case else ref["clip"] == 0.0, case
        assert ref["loss"] == pytest.approx(ref["definition"], rel=1e-5, abs=1e-7), case  # the loop computes the definition
        for split in ("1x{}/3", "1x{}/1", "2x{}/4", "2x{}/1"):  # accumulation 3 (ragged) / 8, 2 processes x 1 / 4
            other = results[split.format(case)]
            assert other["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), (case, split)
            torch.testing.assert_close(other["grad"], ref["grad"], atol=2e-6, rtol=1e-5, msg=f"{case} {split}")
    # the aggregations are really different losses
    losses = [results[f"1x{c}/8"]["loss"] for c in ("grpo-token", "grpo-sequence", "grpo-dr_grpo")]
    assert len({round(v, 6) for v in losses}) == 3


def test_loop_accumulation_invariance_over_epochs(tmp_path, prompts_file, aggregation="token"):  # noqa: F811
    common = ["train.max_steps=3", "train.learning_rate=3e-3", "train.adam_eps=1e-4", "grpo.samples_per_prompt=2",
              "grpo.num_epochs=2", "grpo.minibatches=1", f"grpo.aggregation={aggregation}", "grpo.kl_coef=0.1"]
    a = loop_mod.train(rl_cfg(tmp_path, prompts_file, "a", "grpo", "train.micro_batch_size=8", "train.grad_accum_steps=1", *common))
    b = loop_mod.train(rl_cfg(tmp_path, prompts_file, "b", "grpo", "train.micro_batch_size=2", "train.grad_accum_steps=4", *common))
    ma, mb = read_metrics(a.metrics_path), read_metrics(b.metrics_path)
    assert [m["loss"] for m in ma] == pytest.approx([m["loss"] for m in mb], abs=1e-5)
    assert ma[1]["policy/ratio_deviation"] > 0  # step 2 replays the rollout: off-policy
    wa, wb = load_file(str(a.model_dir / "model.safetensors")), load_file(str(b.model_dir / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


CLI_SETTINGS = {
    "grpo": ["grpo.epsilon_high=0.28", "grpo.num_epochs=1"],
    "gspo": ["gspo.num_epochs=1"],
    "reinforce_pp": ["reinforce_pp.num_epochs=1"],
}


@pytest.mark.parametrize("algorithm", list(CLI_SETTINGS))
def test_cli_run_raises_reward(tmp_path, prompts_file, algorithm):  # noqa: F811
    out = tmp_path / algorithm
    proc = cli("train", f"configs/{algorithm}_tiny.yaml", f"output_dir={out}", f"data.path={prompts_file}",
               "train.progress_bar=false", "train.max_steps=16", "train.learning_rate=1e-2", "train.lr_scheduler=constant",
               f"{algorithm}.reward={REWARD}", f"{algorithm}.dynamic_sampling=false", f"{algorithm}.samples_per_prompt=4",
               f"{algorithm}.max_new_tokens=8", *CLI_SETTINGS[algorithm])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rewards = rollout_rewards(out / "metrics.jsonl")
    assert len(rewards) == 16
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    last = read_metrics(out / "metrics.jsonl")[-1]
    for key in ("policy/clip_low", "policy/clip_high", "policy/ratio", "entropy", "response_length", "zero_variance_groups"):
        assert key in last, key
    assert (out / "model" / "model.safetensors").exists()


def test_dynamic_sampling_overlong_shaping_and_no_reference(tmp_path, prompts_file):  # noqa: F811
    sparse = f"{ROOT / 'tests' / 'rl_reward.py'}:rare_low"
    res = loop_mod.train(rl_cfg(tmp_path, prompts_file, "ds", "grpo", "train.micro_batch_size=16", "train.max_steps=2",
                                f"grpo.reward={sparse}", "grpo.samples_per_prompt=4", "grpo.dynamic_sampling=true",
                                "grpo.dynamic_sampling_rounds=1", "grpo.overlong_buffer=4", "grpo.overlong_penalty=0.5"))
    ms = read_metrics(res.metrics_path)
    zero = [m["dynamic_sampling/zero_variance_fraction"] for m in ms]
    kept = [m["dynamic_sampling/kept_zero_variance_fraction"] for m in ms]
    assert all(0 <= k <= z <= 1 for k, z in zip(kept, zero)), (zero, kept)
    assert max(zero) > 0 and sum(m["dynamic_sampling/rounds"] for m in ms) > 0  # groups were dropped and refilled
    assert [m["zero_variance_groups"] for m in ms] == pytest.approx(kept)  # what is left in the batch is what is reported
    # the random policy rarely ends before 8 tokens: those get −0.5 (8 = max_new_tokens, the end of the buffer)
    for m in ms:  # penalty −0.5·max(L − 4, 0)/4 ≤ −0.5·(L − 4)/4, equal when no row ended early
        bound = m["reward/raw_score"] - 0.5 * (m["response_length"] - 4) / 4
        assert m["reward/score"] == pytest.approx(bound, abs=1e-5) if m["eos_fraction"] == 0 else m["reward/score"] <= bound + 1e-6
    assert "kl" not in ms[0] and ms[0]["kl_coef"] == 0.0  # β = 0: no reference scored, no KL reported
    algo = loop_mod.build_module(rl_cfg(tmp_path, prompts_file, "x", "grpo"))
    assert algo.reference_model is None
    assert loop_mod.build_module(rl_cfg(tmp_path, prompts_file, "y", "grpo", "grpo.kl_coef=0.04")).reference_model is not None


def test_tis_measures_the_bf16_sampler_mismatch(tmp_path, prompts_file):  # noqa: F811
    common = ["train.micro_batch_size=8", "train.max_steps=2", "grpo.samples_per_prompt=4", "grpo.tis_cap=2.0"]
    fp32 = read_metrics(loop_mod.train(rl_cfg(tmp_path, prompts_file, "f", "grpo", *common)).metrics_path)
    bf16 = read_metrics(loop_mod.train(rl_cfg(tmp_path, prompts_file, "b", "grpo", *common, "model.dtype=bf16")).metrics_path)
    # fp32: the sampler and the forward are one function (KL ~1e-13, float rounding); bf16: the decode and the
    # full forward round differently (measured on the tiny model: KL ~1e-8 to 1e-7, ratio off 1 by ~7e-5)
    assert fp32[0]["tis/kl"] < 1e-11 and fp32[0]["tis/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert bf16[0]["tis/kl"] > 1e-9 and bf16[0]["tis/kl"] > 1e3 * fp32[0]["tis/kl"]
    assert abs(bf16[0]["tis/ratio"] - 1.0) > 1e-5
    assert all(0 < m["tis/weight"] <= 2.0 for m in bf16)


@pytest.mark.parametrize("algorithm,metric", [("rpo", "nll"), ("dpop", "penalty")])
def test_rpo_and_dpop_run_from_the_cli(tmp_path, algorithm, metric):
    out = tmp_path / algorithm
    proc = cli("train", f"configs/{algorithm}.yaml", f"output_dir={out}", "model.name=tiny-random-llama", "train.max_steps=2",
               "train.micro_batch_size=4", "train.progress_bar=false", "train.save_steps=0", "data.max_length=128")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metric in last and last[metric] >= 0 and torch.isfinite(torch.tensor(last["loss"]))


@pytest.mark.parametrize("setting,message", [
    ("grpo.samples_per_prompt=1", "grpo.samples_per_prompt: group-relative advantages need at least 2"),
    ("grpo.aggregation=mean", "aggregation"),
    ("grpo.epsilon_low=1.5", "epsilon_low must lie in"),
    ("grpo.overlong_buffer=100", "grpo.overlong_buffer: must lie in"),
    ("grpo.kl_target=0.1", "grpo.kl_target: the adaptive KL controller"),
    ("reinforce_pp.samples_per_prompt=1", "reinforce_pp.baseline: 'group' needs samples_per_prompt >= 2"),
    ("gspo.tis_cap=0", "gspo.tis_cap: must be > 0"),
])
def test_bad_settings_are_one_line_errors(tmp_path, prompts_file, setting, message):  # noqa: F811
    algorithm = setting.split(".")[0]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        rl_cfg(tmp_path, prompts_file, "bad", algorithm, setting)
    assert "\n" not in str(err.value)


def test_resume_mid_rollout_is_exact_with_epochs_and_dynamic_sampling(tmp_path, prompts_file, monkeypatch):  # noqa: F811
    sparse = f"{ROOT / 'tests' / 'rl_reward.py'}:rare_low"
    extra = ["train.micro_batch_size=4", "train.max_steps=4", "train.save_steps=3", "train.learning_rate=3e-3", "grpo.samples_per_prompt=2",
             "grpo.num_epochs=2", "grpo.dynamic_sampling=true", "grpo.dynamic_sampling_rounds=1", f"grpo.reward={sparse}"]
    full = loop_mod.train(rl_cfg(tmp_path, prompts_file, "full", "grpo", *extra))
    real_save = loop_mod.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_crash(out, step, **kw):  # step 3 is the first step of rollout 2 (2 steps each)
        real_save(out, step, **kw)
        raise Stop()

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(Stop):
        loop_mod.train(rl_cfg(tmp_path, prompts_file, "cut", "grpo", *extra))
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    resumed = loop_mod.train(rl_cfg(tmp_path, prompts_file, "cut", "grpo", *extra, "train.resume_from=latest"))
    a, b = load_file(str(full.model_dir / "model.safetensors")), load_file(str(resumed.model_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("tokens_per_s", "samples_per_s")} for m in ms]  # noqa: E731
    assert strip(read_metrics(resumed.metrics_path)) == strip(read_metrics(full.metrics_path))
