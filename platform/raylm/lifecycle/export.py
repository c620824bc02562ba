"""Export: from a finished training run to a model folder with its model card.

:func:`export_run_model` writes the model folder from the checkpoint that
``train.export`` selects, with a model card (``raylm.json``) that says which
kind of model it is, which step it came from, both dev losses and the lineage
so far (:mod:`raylm.lifecycle.lineage`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from raylm.config import JobConfig
from raylm.data.formatting import SENTIMENT_LABELS
from raylm.lifecycle.lineage import build_lineage
from raylm.train.driver import choose_export, export_model

logger = logging.getLogger(__name__)

CARD_FILE = "raylm.json"


def write_card(model_dir: Path, card: dict[str, Any]) -> None:
    """Write the model card ``raylm.json`` into ``model_dir`` (whole, replacing the previous one)."""
    (Path(model_dir) / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))


def merged_model_dir(model_dir: Path) -> Path:
    """Where ``train.export_merged`` writes the merged model of a LoRA run: ``model-merged`` beside ``model``."""
    return Path(model_dir).with_name(Path(model_dir).name + "-merged")


def train_loss_at(history: list[dict[str, Any]], step: Any) -> Optional[float]:
    """The training loss logged at ``step`` in a run's history, or None when that step logged none."""
    for row in reversed(history):
        if row.get("step") == step and "loss" in row:
            return row["loss"]
    return None


def export_run_model(job: JobConfig, result, data, record: dict[str, Any], model_dir: Path,
                     mlflow_run_id: Optional[str] = None,
                     parent_run_id: Optional[str] = None) -> tuple[Path, dict[str, Any]]:
    """Export the checkpoint ``train.export`` selects into ``model_dir``; returns the folder and its card.

    The card holds the run id, the secret-free config, the model's kind (which
    task model serves it), the export record (policy, step, dev loss of the
    exported and of the last checkpoint, train loss at both) and the lineage so far.
    """
    chosen, export = choose_export(job, result)
    export["train_loss"] = train_loss_at(result.history, export.get("step"))
    export["last_train_loss"] = train_loss_at(result.history, export.get("last_step"))
    if export.get("fallback"):
        logger.info(f"exporting the last checkpoint: {export['fallback']}")
    elif export["step"] != export["last_step"]:
        logger.info(f"exporting step {export['step']} (dev loss {export['eval_loss']:.4f}), not the last step "
                    f"{export['last_step']} (dev loss {export['last_eval_loss']:.4f})")
    card: dict[str, Any] = {
        "run_id": job.run_id,
        "kind": job.model.task,
        "config": job.public_dict(),
        "config_hash": record["config_hash"],
        "data_fingerprint": data.fingerprint,
        "export": export,
        "train_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }
    if job.model.task != "causal_lm":
        card["max_length"] = job.data.seq_len
    if job.model.task == "sequence_classification":
        card["labels"] = list(SENTIMENT_LABELS[: job.model.num_labels])
    trained_steps = export["last_step"]
    lora = job.train.lora
    merged_dir = merged_model_dir(model_dir) if job.train.export_merged else None
    model_dir = export_model(chosen, data.tokenizer, Path(model_dir), card, trained_steps=trained_steps, lora=lora,
                             base=job.model.init_from if lora is not None else None, merged_dir=merged_dir)
    adapter = card.get("adapter") or {}
    card["lineage"] = build_lineage(run_id=job.run_id, config_hash=record["config_hash"],
                                    data_fingerprint=data.fingerprint, mlflow_run_id=mlflow_run_id,
                                    parent_run_id=parent_run_id, exported_step=export["step"],
                                    base_model=adapter.get("base"), base_fingerprint=adapter.get("base_fingerprint"))
    if merged_dir is not None:
        write_card(merged_dir, {**card, "merged_into_base": True})
    write_card(model_dir, card)
    return model_dir, card
