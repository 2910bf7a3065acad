"""`preftune <command>`: every command is a config (YAML file and/or dotted key=value overrides).

    preftune train CONFIG.yaml [key=value ...] [--resume]
    preftune generate [CONFIG.yaml] [key=value ...]
    preftune score [CONFIG.yaml] [key=value ...]    # reward-model scores of (prompt, completion) rows
    preftune eval [CONFIG.yaml] [key=value ...]     # models vs a reference -> results.json + report.html
    preftune label [CONFIG.yaml] [key=value ...]    # rank samples in a web UI (or with a judge) -> labels
    preftune collect create|invite|serve|status|export PROJECT [...]   # team labelling: accounts, overlap, agreement
    preftune export CHECKPOINT [--output DIR]       # a training checkpoint -> a loadable model folder
    preftune config [ALGORITHM] [--markdown]      # every field, its default and its help
    preftune algorithms
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from preftune.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    commented_yaml,
    describe,
    from_dict,
    load_run_config,
    read_yaml,
)


def _field_help(cls: type, title: str) -> str:
    lines = [title]
    for key, tp, default, help_text in describe(cls):
        lines.append(f"  {key} ({tp}, default {default!r})\n      {help_text}")
    return "\n".join(lines)


def _train_help() -> str:
    from preftune.algorithms import ALGORITHMS

    parts = [_field_help(RunConfig, "Run settings (dotted keys):")]
    for name, cls in ALGORITHMS.items():
        parts.append(_field_help(cls.Config, f"Section '{name}:' (algorithm: {name}):").replace("\n  ", f"\n  {name}."))
    return "\n\n".join(parts)


def cmd_train(args: argparse.Namespace) -> int:
    from preftune.train.loop import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume_from=latest")
    run = load_run_config(args.config, overrides)
    from preftune.algorithms import ALGORITHMS

    for member in ALGORITHMS[run.algorithm].member_runs(run):  # one run, or e.g. each ensemble member
        result = train(member)
        print(f"model saved to {result.model_dir}")
        print(f"metrics in {result.metrics_path}")
        if result.last_metrics:
            print("last step: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.last_metrics.items()))
    return 0


def _settings(cls: type, args: argparse.Namespace, name: str):
    """A command's settings: the optional YAML file, then the key=value overrides, validated."""
    data = read_yaml(args.config) if args.config else {}
    return from_dict(cls, apply_overrides(data, list(args.overrides)), name)


def cmd_export(args: argparse.Namespace) -> int:
    from preftune.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, reuse=False)
    print(f"model exported to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from preftune.generate_cmd import run_generate
    from preftune.generate_config import GenerateConfig

    path = run_generate(_settings(GenerateConfig, args, "generate"))
    print(f"wrote {path}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from preftune.score_cmd import ScoreConfig, run_score

    path, report = run_score(_settings(ScoreConfig, args, "score"))
    print(f"wrote {path}")
    print(f"summary in {report}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from preftune.eval_config import EvalConfig, run_eval

    path = run_eval(_settings(EvalConfig, args, "eval"))
    print(f"results in {path.parent / 'results.json'}")
    print(f"report written to {path}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from preftune.label import LabelConfig, run_label

    cfg = _settings(LabelConfig, args, "label")

    def ready(url: str) -> None:
        print(f"labelling {cfg.input} -> {cfg.output}: open {url} (Ctrl-C stops; every label is saved as it is given)", flush=True)

    result = run_label(cfg, on_ready=ready)
    extra = "".join(f", {k.replace('_', ' ')}: {v}" for k, v in result.items() if k not in ("output", "done", "total"))
    print(f"labels in {result['output']}: {result['done']} of {result['total']} items done{extra}")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from preftune.collect.commands import run_collect

    return run_collect(args.action, args.project, list(args.rest))


def cmd_config(args: argparse.Namespace) -> int:
    from preftune.algorithms import ALGORITHMS

    names = [args.algorithm] if args.algorithm else list(ALGORITHMS)
    for name in names:
        if name not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm '{name}'. Valid: {', '.join(ALGORITHMS)}")
    if args.markdown:
        print(config_markdown(), end="")
        return 0
    for name in names:
        run = RunConfig(algorithm=name, output_dir=f"runs/{name}")
        print(commented_yaml(RunConfig, run))
        print(f"# Settings of the '{name}' algorithm.\n{name}:")
        print(commented_yaml(ALGORITHMS[name].Config, indent=2))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from preftune.experiments.sentiment import load_study_config, run_study, summary

    if args.config and _study_kind(args.config) == "diverse":
        from preftune.experiments.diverse import load_diverse_config, run_diverse_study, summary

        load_study_config, run_study = load_diverse_config, run_diverse_study
    cfg = load_study_config(args.config, list(args.overrides))
    report = run_study(cfg)
    print(summary(report))
    print(f"report: {report}")
    print(f"results: {report.parent / 'results.json'}")
    return 0


def _study_kind(path: str) -> str | None:
    """The ``study:`` key of a study file (None = the sentiment study, whose files have none)."""
    from preftune.config import read_yaml

    data = read_yaml(path)
    return data.get("study") if isinstance(data, dict) else None


def config_markdown() -> str:
    """docs/config.md: every config field, generated from the one help text each field has."""
    from preftune.algorithms import ALGORITHMS
    from preftune.generate_config import GenerateConfig

    def table(cls: type, prefix: str = "") -> str:
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default, help_text in describe(cls):
            rows.append(f"| `{prefix}{key}` | {tp.replace('|', '&#124;')} | `{default!r}` | {help_text} |")
        return "\n".join(rows)

    parts = [
        "# Configuration reference",
        "",
        "Generated by `preftune config --markdown` from the help text of each field; do not edit by hand.",
        "",
        "## `preftune train`",
        "",
        table(RunConfig),
    ]
    for name, cls in ALGORITHMS.items():
        parts += ["", f"### `{name}:` section (algorithm: {name})", "", table(cls.Config, f"{name}.")]
    parts += ["", "## `preftune generate`", "", table(GenerateConfig)]
    from preftune.score_cmd import ScoreConfig

    parts += ["", "## `preftune score`", "", table(ScoreConfig)]
    from preftune.eval_config import EvalConfig

    parts += ["", "## `preftune eval`", "", table(EvalConfig)]
    from preftune.label import LabelConfig

    parts += ["", "## `preftune label`", "", table(LabelConfig)]
    from preftune.collect.settings import CollectConfig

    parts += ["", "## `preftune collect`", "", table(CollectConfig)]
    from preftune.experiments.sentiment import StudyConfig

    parts += ["", "## `preftune demo` / `preftune study`", "", table(StudyConfig)]
    from preftune.experiments.diverse import DiverseStudyConfig

    parts += ["", "## `preftune study` with `study: diverse`", "", table(DiverseStudyConfig)]
    return "\n".join(parts) + "\n"


def cmd_algorithms(args: argparse.Namespace) -> int:
    from preftune.algorithms import ALGORITHMS

    for name, cls in ALGORITHMS.items():
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        n = cls.needs
        flags = f"data={n.data_kind:9s} loss per {n.loss_unit:5s} reference={'yes' if n.reference_model else 'no '} length-averaged={'yes' if n.length_averaged else 'no '}"
        print(f"{name:13s} {flags}  {doc}")
    return 0


def _add_collect(sub) -> None:
    from preftune.collect.settings import ACTIONS as COLLECT_ACTIONS
    from preftune.collect.settings import CollectConfig

    k = sub.add_parser("collect", help="Preference collection for a team: a project, invite links, the web app, status, export.",
                       epilog=_field_help(CollectConfig, "Settings (key=value):"), formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("action", choices=COLLECT_ACTIONS)
    k.add_argument("project", help="The project folder (holds collect.db, or collect.json naming a PostgreSQL database).")
    k.add_argument("rest", nargs="*", help="create: the samples file; invite: annotator names; then key=value settings")
    k.set_defaults(func=cmd_collect)


def build_parser() -> argparse.ArgumentParser:
    from preftune import __version__
    from preftune.generate_config import GenerateConfig

    parser = argparse.ArgumentParser(prog="preftune", description="Preference-based fine-tuning of language models.")
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="Train any algorithm from a config.", epilog=_train_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file (see configs/).")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.learning_rate=1e-4")
    p.add_argument("--resume", action="store_true", help="Continue from the newest checkpoint in output_dir (same as train.resume_from=latest).")
    p.set_defaults(func=cmd_train)

    from preftune.eval_config import EvalConfig
    from preftune.experiments.sentiment import StudyConfig
    from preftune.label import LabelConfig
    from preftune.score_cmd import ScoreConfig

    def settings_command(name: str, text: str, cls: type, example: str, func) -> None:
        """A command configured by an optional YAML file plus key=value settings of ``cls``."""
        c = sub.add_parser(name, help=text, epilog=_field_help(cls, "Settings (key=value):"), formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_argument("config", nargs="?", help="Optional YAML file with the settings below.")
        c.add_argument("overrides", nargs="*", help=f"key=value settings, e.g. {example}")
        c.set_defaults(func=func)

    settings_command("generate", "Sample completions for a prompts file; writes JSONL.", GenerateConfig,
                     "prompts=p.jsonl temperature=0.7", cmd_generate)
    settings_command("score", "Score (prompt, completion) rows or pairs with reward model(s); writes JSONL.", ScoreConfig,
                     "model=runs/reward data=rows.jsonl", cmd_score)
    settings_command("eval", "Compare models with a reference: reward, KL, win rate, ...; writes report.html.", EvalConfig,
                     "models=[dpo=runs/dpo/model] max_rows=64", cmd_eval)
    settings_command("demo", "The short sentiment-control study on the default model (~10 min on a 2-core CPU); writes report.html.",
                     StudyConfig, "output_dir=runs/demo2", cmd_study)
    settings_command("study", "The sentiment-control study with any mix of jobs (configs/studies/sentiment.yaml: the full one).",
                     StudyConfig, "output_dir=runs/study", cmd_study)
    settings_command("label", "Rank sampled completions in a local web UI, or with a judge; writes labels JSONL.", LabelConfig,
                     "input=samples.jsonl output=labels.jsonl judge=vader", cmd_label)

    _add_collect(sub)
    x = sub.add_parser("export", help="Turn a training checkpoint into a model folder (full weights or LoRA adapter).")
    x.add_argument("checkpoint", help="A checkpoint folder, OUTPUT_DIR/checkpoints/step-N.")
    x.add_argument("--output", help="Where to write the model (default: OUTPUT_DIR/exports/step-N).")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("config", help="Print every config field with its default and help (commented YAML).")
    c.add_argument("algorithm", nargs="?")
    c.add_argument("--markdown", action="store_true", help="Print the Markdown reference (docs/config.md).")
    c.set_defaults(func=cmd_config)

    a = sub.add_parser("algorithms", help="List the algorithms and what each needs.")
    a.set_defaults(func=cmd_algorithms)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists() and args.command in ("generate", "score", "eval", "label", "demo", "study"):
        args.overrides = [args.config] + list(args.overrides)
        args.config = None
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from preftune.data.records import DataError
    from preftune.models.loading import ModelLoadError
    from preftune.train.checkpoint import CheckpointError

    from preftune.train.guard import NonFiniteError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelLoadError, CheckpointError) as exc:
        print(f"preftune: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"preftune: error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
