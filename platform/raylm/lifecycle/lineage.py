"""Lineage: which data, config, code, eval set and run produced a model version.

:func:`build_lineage` collects it once, at export: the data fingerprint, the
run's config hash, the code version (the git commit of the raylm checkout, with
``-dirty`` when it has uncommitted changes, else the installed version), the
eval set's fingerprint, the eval metrics with their confidence intervals, and
the run (raylm run id, MLflow run id) with its parent sweep or run when it has
one. It goes into the model card (``raylm.json``: ``lineage``) and, flattened,
onto the registered model version as ``raylm.*`` tags. It holds no config
values, so no secret can reach it; the config itself travels only as
``JobConfig.public_dict()``.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any, Optional

from raylm import __version__
from raylm.common.tracking import mlflow_client

# MLflow's tag naming a run's parent (set by sweeps on their trials).
PARENT_RUN_TAG = "mlflow.parentRunId"
TAG_PREFIX = "raylm."


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git:<commit>`` (``-dirty`` with local changes) of the raylm source, else ``raylm-<version>``."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=source,
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"raylm-{__version__}"
    return f"git:{commit}" + ("-dirty" if status else "")


def build_lineage(*, run_id: str, config_hash: str, data_fingerprint: str, eval_summary: Optional[dict] = None,
                  mlflow_run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
                  exported_step: Optional[int] = None, base_model: Optional[str] = None,
                  base_fingerprint: Optional[str] = None) -> dict[str, Any]:
    """The lineage record of a model exported from run ``run_id`` (see the module docstring); a LoRA
    adapter's also names its base checkpoint and that checkpoint's fingerprint."""
    lineage: dict[str, Any] = {
        "run_id": run_id,
        "mlflow_run_id": mlflow_run_id,
        "parent_run_id": parent_run_id,
        "config_hash": config_hash,
        "data_fingerprint": data_fingerprint,
        "code_version": code_version(),
        "exported_step": exported_step,
    }
    if base_fingerprint is not None:
        lineage.update(base_model=base_model, base_fingerprint=base_fingerprint)
    if eval_summary:
        lineage["eval"] = {
            "split": eval_summary.get("split"),
            "fingerprint": eval_summary.get("fingerprint"),
            "task_fingerprints": eval_summary.get("task_fingerprints"),
            "confidence": eval_summary.get("confidence"),
            "metrics": {name: {"value": value, "ci": eval_summary["intervals"].get(name)}
                        for name, value in eval_summary.get("metrics", {}).items()},
        }
    return lineage


def lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    """The lineage as flat ``raylm.*`` tags for a registered model version (metrics as ``value [low, high]``)."""
    tags = {f"{TAG_PREFIX}{key}": str(value) for key, value in lineage.items()
            if key != "eval" and value is not None}
    evaluation = lineage.get("eval") or {}
    if evaluation:
        tags[f"{TAG_PREFIX}eval_fingerprint"] = str(evaluation.get("fingerprint"))
        tags[f"{TAG_PREFIX}eval_split"] = str(evaluation.get("split"))
        for task, fingerprint in (evaluation.get("task_fingerprints") or {}).items():
            tags[f"{TAG_PREFIX}eval_fingerprint.{task}"] = str(fingerprint)
        for name, entry in (evaluation.get("metrics") or {}).items():
            low, high = entry.get("ci") or (None, None)
            tags[f"{TAG_PREFIX}metric.{name}"] = (f"{entry['value']:.6g} [{low:.6g}, {high:.6g}] "
                                                  f"({evaluation.get('confidence', 0.95):.0%} CI)"
                                                  if low is not None else f"{entry['value']:.6g}")
    return tags


def parent_run_of(tracking_uri: str, mlflow_run_id: Optional[str]) -> Optional[str]:
    """The MLflow parent run (a sweep's run) of ``mlflow_run_id``, if it has one."""
    if not mlflow_run_id:
        return None
    return mlflow_client(tracking_uri).get_run(mlflow_run_id).data.tags.get(PARENT_RUN_TAG)
