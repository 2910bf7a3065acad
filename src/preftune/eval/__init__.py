"""Evaluation: models against a reference on a prompts file -> numbers, plots, one HTML report.

    from preftune.eval import evaluate, best_of_n_curve, write_report, frontier_plot
    results = evaluate({"dpo": "runs/dpo/model"}, "smollm2-135m-instruct", prompts, "vader")

``metrics.py`` pure statistics (KL estimator, win rate + Wilson interval, distinct-n, best-of-n KL,
Pareto front); ``evaluate.py`` sampling and scoring; ``plots.py`` PNGs; ``report.py`` results.json and
report.html. ``preftune eval`` (``run_eval`` in ``preftune.eval.run``) puts them together.
"""

from preftune.eval.evaluate import REFERENCE, best_of_n_curve, describe_model, evaluate
from preftune.eval.metrics import (
                                   best_of_n_kl,
                                   distinct_n,
                                   mean_and_se,
                                   mean_repeated_ngram_fraction,
                                   pareto_front,
                                   repeated_ngram_fraction,
                                   sequence_kl,
                                   wilson_interval,
                                   win_rate,
)
from preftune.eval.plots import bar_plot, frontier_plot, overoptimization_plot
from preftune.eval.formatting import format_number
from preftune.eval.report import environment, write_report

__all__ = [
    "REFERENCE", "bar_plot", "best_of_n_curve", "best_of_n_kl", "describe_model", "distinct_n", "environment",
    "evaluate", "format_number", "frontier_plot", "mean_and_se", "mean_repeated_ngram_fraction",
    "overoptimization_plot", "pareto_front", "repeated_ngram_fraction", "sequence_kl", "wilson_interval",
    "win_rate", "write_report",
]
