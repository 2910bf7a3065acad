"""Settings and data that cannot train give one clear error, before or instead of a deep traceback."""

import pytest

from preftune.config import ConfigError
from preftune.run_config import load_run_config
from preftune.data.records import DataError
from preftune.train.loop import train
from tests.conftest import write_jsonl


@pytest.mark.parametrize("algorithm, setting, words", [
    ("dpo", "dpo.beta=0", "dpo.beta: must be > 0, got 0"),
    ("hinge", "hinge.beta=-0.1", "hinge.beta: must be > 0"),
    ("cdpo", "cdpo.beta=-1", "cdpo.beta: must be > 0"),
    ("ipo", "ipo.tau=0", "ipo.tau: must be > 0"),
    ("ref_free_dpo", "ref_free_dpo.beta=0", "ref_free_dpo.beta: must be > 0"),
    ("simpo", "simpo.gamma=-1", "simpo.gamma: must be >= 0"),
    ("orpo", "orpo.lam=-0.5", "orpo.lam: must be >= 0"),
    ("unlikelihood", "unlikelihood.alpha=-1", "unlikelihood.alpha: must be >= 0"),
    ("kto", "kto.beta=-1", "kto.beta: must be > 0"),
    ("kto", "kto.desirable_weight=0", "kto.desirable_weight: must be > 0"),
])  # fmt: skip
def test_out_of_range_settings_fail_before_anything_loads(algorithm, setting, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_run_config(None, [f"algorithm={algorithm}", "data.path=builtin:tiny_pairs", setting])


def _run(tmp_path, algorithm, data, *extra):
    return load_run_config(None, [
        f"algorithm={algorithm}", "model.name=tiny-random-llama", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
        "train.max_steps=1", "train.progress_bar=false", *extra,
    ])  # fmt: skip


def test_rankings_that_give_no_pairs(tmp_path):
    data = write_jsonl(tmp_path / "tied.jsonl", [{"prompt": "p", "completions": ["a", "b"], "ranking": [[0, 1]]}] * 3)
    with pytest.raises(DataError, match="no usable pairs rows") as err:
        train(_run(tmp_path, "dpo", data))
    assert str(data) in str(err.value)


def test_every_row_dropped_by_truncation(tmp_path):
    rows = [{"prompt": "a long prompt " * 10, "chosen": " yes " * 5, "rejected": " no " * 5}] * 4
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match="no rows left to train on after tokenization .*4 dropped") as err:
        train(_run(tmp_path, "dpo", data, "data.max_length=16", "data.truncation=drop"))
    assert str(data) in str(err.value)


def test_kto_with_one_row(tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "completion": " good", "label": True}])
    with pytest.raises(DataError, match="KTO needs at least 2 rows") as err:
        train(_run(tmp_path, "kto", data))
    assert str(data) in str(err.value)


@pytest.mark.parametrize("setting, words", [
    ("rloo.reward=nosuchmodule:score", "rloo.reward: .*cannot import module 'nosuchmodule'"),
    ("rloo.reward=no_such_reward_dir", "rloo.reward: .*no such reward model folder"),
    ("rloo.kl_in_reward=false", "rloo.kl_estimator: k1 as a loss term"),
    ("rloo.kl_coef=-0.1", "rloo.kl_coef: must be >= 0"),
])  # fmt: skip
def test_rl_settings_fail_before_the_model_loads(setting, words):
    with pytest.raises(ConfigError, match=words):
        load_run_config(None, ["algorithm=rloo", "data.path=builtin:movie_review_prompts", setting])
    # k3 (or k2) as the loss term is fine
    load_run_config(None, ["algorithm=rloo", "data.path=builtin:movie_review_prompts", "rloo.kl_in_reward=false", "rloo.kl_estimator=k3"])


def test_online_algorithms_disable_dropout(tmp_path):
    from preftune.train.loop import build_module

    run = load_run_config(None, ["algorithm=rloo", "model.name=tiny-random-llama", "data.path=builtin:movie_review_prompts",
                                 "model.lora.enabled=true", "model.lora.dropout=0.3", "rloo.reward=vader"])
    import torch

    drops = [m for m in build_module(run).modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.0 for m in drops)
    run = load_run_config(None, ["algorithm=rloo", "model.name=tiny-random-llama", "data.path=builtin:movie_review_prompts",
                                 "model.lora.enabled=true", "model.lora.dropout=0.3", "rloo.disable_dropout=false"])
    assert any(m.p == 0.3 for m in build_module(run).modules() if isinstance(m, torch.nn.Dropout))


def _fail_if_model_loads(monkeypatch):
    import preftune.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the output_dir check")

    monkeypatch.setattr(loading, "load_model", boom)


@pytest.mark.parametrize("make, words", [
    (lambda tmp: (tmp / "afile").write_text("x") and tmp / "afile", "exists and is not a folder"),
    (lambda tmp: (tmp / "afile").write_text("x") and tmp / "afile" / "run", "cannot create or write"),
])  # fmt: skip
def test_unusable_output_dir_fails_before_any_model_loads(tmp_path, monkeypatch, make, words):
    out = make(tmp_path)
    _fail_if_model_loads(monkeypatch)
    run = load_run_config(None, ["algorithm=dpo", "model.name=tiny-random-llama", "data.path=builtin:tiny_pairs",
                                 f"output_dir={out}", "train.max_steps=1", "train.progress_bar=false"])
    with pytest.raises(ConfigError, match=f"output_dir: .*{words}"):
        train(run)


def test_unloadable_reference_names_its_key(tmp_path):
    from preftune.models.loading import ModelLoadError

    # Not a hub id either, so it fails at once, without network retries.
    with pytest.raises(ModelLoadError) as err:
        train(_run(tmp_path, "dpo", "builtin:tiny_pairs", "dpo.reference=no such model"))
    assert str(err.value).startswith("dpo.reference: could not load model 'no such model'")


def test_offline_advice_only_when_not_offline(monkeypatch):
    from preftune.models.loading import _not_found_message

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert "set HF_HUB_OFFLINE=1" in _not_found_message("x", "why")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" not in _not_found_message("x", "why")


@pytest.mark.parametrize("label", [True, False])
def test_kto_with_a_single_label_value(tmp_path, label):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}", "label": label} for i in range(4)]
    data = write_jsonl(tmp_path / "one_label.jsonl", rows)
    with pytest.raises(DataError) as err:
        train(_run(tmp_path, "kto", data))
    msg = str(err.value)
    assert msg.startswith(f"{data}, field 'label': all 4 rows are labelled {str(label).lower()}")
    assert ("add rows with label false" if label else "add rows with label true") in msg
