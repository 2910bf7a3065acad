"""Rounds: one pipeline file from SFT through repeated generate -> label -> train -> evaluate.

    preftune pipeline configs/pipelines/iterative_dpo.yaml            # every stage, in order
    preftune pipeline configs/pipelines/iterative_dpo.yaml --resume   # after a crash: finished stages are skipped
    preftune pipeline configs/pipelines/llama3_recipe.yaml rounds=2   # SFT -> (RS -> DPO) x R

``spec.py`` the file and the plan (validated before any model loads), ``state.py`` stage records,
``stages.py`` / ``people.py`` / ``training.py`` what each kind of stage does, ``runner.py`` the order
and resume, ``report.py`` the pipeline's page.
"""

from preftune.pipeline.runner import run_pipeline
from preftune.pipeline.spec import Pipeline, PipelineConfig, load_pipeline

__all__ = ["Pipeline", "PipelineConfig", "load_pipeline", "run_pipeline"]
