"""Online RL through the one loop: rewards rise, β keeps KL down, exact resume, accumulation invariance."""

import pytest
import torch
from safetensors.torch import load_file

import preftune.train.loop as loop_mod
from preftune.run_config import load_run_config
from preftune.train.checkpoint import list_checkpoints
from preftune.train.metrics import read_metrics
from tests.conftest import ROOT, write_jsonl

REWARD = f"{ROOT / 'tests' / 'rl_reward.py'}:low_ids"


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about item {i}:"} for i in range(32)])


def rl_cfg(tmp_path, prompts, name, algorithm, *overrides):
    return load_run_config(None, [
        f"algorithm={algorithm}", f"output_dir={tmp_path / name}", "model.name=tiny-random-llama", f"data.path={prompts}",
        "data.max_length=64", "train.progress_bar=false", "train.lr_scheduler=constant", f"{algorithm}.reward={REWARD}",
        f"{algorithm}.max_new_tokens=8", f"{algorithm}.log_samples_steps=1", *overrides,
    ])


def rollout_rewards(metrics_path):
    return [m["reward/score"] for m in read_metrics(metrics_path) if "reward/score" in m]


SETTINGS = {
    "rloo": ["rloo.samples_per_prompt=4", "rloo.advantage=group_normalized", "train.micro_batch_size=8", "train.learning_rate=1e-2", "train.max_steps=24"],
    "reinforce": ["reinforce.samples_per_prompt=2", "train.micro_batch_size=8", "train.learning_rate=1e-2", "train.max_steps=24", "reinforce.baseline_decay=0.5"],
    "best_of_n": ["best_of_n.samples_per_prompt=4", "best_of_n.keep_top=1", "train.micro_batch_size=8", "train.learning_rate=1e-2", "train.max_steps=24"],
    "ppo": ["ppo.samples_per_prompt=2", "ppo.ppo_epochs=2", "train.micro_batch_size=8", "train.learning_rate=3e-3", "train.max_steps=48", "ppo.vf_coef=0.5"],
}


@pytest.mark.parametrize("algorithm", list(SETTINGS))
def test_each_algorithm_raises_reward(tmp_path, prompts_file, algorithm):
    res = loop_mod.train(rl_cfg(tmp_path, prompts_file, algorithm, algorithm, *SETTINGS[algorithm]))
    rewards = rollout_rewards(res.metrics_path)
    assert len(rewards) >= 12
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.1, rewards
    samples = (tmp_path / algorithm / "samples.jsonl").read_text().splitlines()
    assert samples and '"score"' in samples[0]


def test_larger_beta_keeps_kl_lower(tmp_path, prompts_file):
    finals = []
    for beta in (0.0, 0.3, 3.0):
        res = loop_mod.train(rl_cfg(tmp_path, prompts_file, f"b{beta}", "rloo", *SETTINGS["rloo"], f"rloo.kl_coef={beta}"))
        kls = [m["kl"] for m in read_metrics(res.metrics_path) if "kl" in m]
        finals.append(sum(kls[-6:]) / 6)
    assert finals[0] > finals[1] > finals[2], finals


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_online_resume_is_exact(tmp_path, prompts_file, monkeypatch, algorithm):
    extra = ["train.micro_batch_size=4", "train.max_steps=6", "train.save_steps=3", "train.learning_rate=3e-3",
             f"{algorithm}.samples_per_prompt=2"] + (["ppo.ppo_epochs=2", "ppo.minibatches=2"] if algorithm == "ppo" else [])
    full = loop_mod.train(rl_cfg(tmp_path, prompts_file, "full", algorithm, *extra))
    real_save = loop_mod.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_crash(out, step, **kw):  # step 3 is in the middle of a PPO rollout (4 steps each)
        real_save(out, step, **kw)
        raise Stop()

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(Stop):
        loop_mod.train(rl_cfg(tmp_path, prompts_file, "cut", algorithm, *extra))
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-000003"]
    resumed = loop_mod.train(rl_cfg(tmp_path, prompts_file, "cut", algorithm, *extra, "train.resume_from=latest"))
    a, b = load_file(str(full.model_dir / "model.safetensors")), load_file(str(resumed.model_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("tokens_per_s", "samples_per_s")} for m in ms]  # noqa: E731
    assert strip(read_metrics(resumed.metrics_path)) == strip(read_metrics(full.metrics_path))


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_update_invariant_to_accumulation(tmp_path, prompts_file, algorithm):
    common = ["train.max_steps=2", "train.learning_rate=3e-3", "train.adam_eps=1e-4", f"{algorithm}.samples_per_prompt=2"]
    a = loop_mod.train(rl_cfg(tmp_path, prompts_file, "a", algorithm, "train.micro_batch_size=8", "train.grad_accum_steps=1", *common))
    b = loop_mod.train(rl_cfg(tmp_path, prompts_file, "b", algorithm, "train.micro_batch_size=2", "train.grad_accum_steps=4", *common))
    ma, mb = read_metrics(a.metrics_path), read_metrics(b.metrics_path)
    assert [m["loss"] for m in ma] == pytest.approx([m["loss"] for m in mb], abs=1e-5)
    wa, wb = load_file(str(a.model_dir / "model.safetensors")), load_file(str(b.model_dir / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", [
    ["algorithm=ppo", "ppo.value_model=separate", "ppo.target_kl=0.5", "ppo.missing_eos_penalty=1.0"],
    ["algorithm=ppo", f"ppo.ptx_data={ROOT / 'src/preftune/data/builtin/tiny_instructions.jsonl'}", "ppo.ptx_coef=0.5"],
    ["algorithm=rloo", "rloo.kl_in_reward=false", "rloo.kl_estimator=k3", "rloo.kl_target=0.1", "rloo.kl_horizon=100"],
])
def test_rl_options_run_end_to_end(tmp_path, prompts_file, variant):
    algorithm = variant[0].split("=")[1]
    res = loop_mod.train(rl_cfg(tmp_path, prompts_file, "v", algorithm, *variant[1:], "train.micro_batch_size=4",
                                "train.max_steps=4", "train.learning_rate=1e-3", f"{algorithm}.samples_per_prompt=2"))
    ms = read_metrics(res.metrics_path)
    assert len(ms) == 4 and all(torch.isfinite(torch.tensor(m["loss"])) for m in ms)
    if "ptx_coef=0.5" in " ".join(variant):
        assert all("ptx/nll" in m and m["ptx/nll"] > 0 for m in ms)
    if "kl_target=0.1" in " ".join(variant):
        coefs = [m["kl_coef"] for m in ms if "kl_coef" in m]
        assert coefs[0] == pytest.approx(0.05) and coefs[-1] != coefs[0]  # the adaptive controller moved β
