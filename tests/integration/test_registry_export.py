"""train.export: the model folder holds the checkpoint with the best dev loss, not the last one.

A debug GPT-2 trained hard (high learning rate, no warmup) on 10 translation
pairs memorises them, and its dev loss, measured every 4 steps, turns upward
well before the end (lowest at step 8, then rising: +0.3 by step 24). The best evaluation falls between checkpoints (only the
last step writes a regular checkpoint), so this also checks that the loop keeps
a best copy at an evaluation that is not a checkpoint step.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from raylm.config import load_config
from raylm.train.dcp import read_model_state

MAX_STEPS = 24
OVERFIT = [
    "data.tasks=[translate]", "data.demo_num_train=10", "data.demo_num_dev=40", "data.seq_len=64",
    "data.vocab_size=400", "model.size=debug", "train.num_workers=1", "train.micro_batch_size=4",
    f"train.max_steps={MAX_STEPS}", "train.warmup_steps=0", "train.lr=1e-2", "train.min_lr_ratio=1.0",
    "train.weight_decay=0", "train.log_every=4", "train.eval_every=4", "train.eval_batches=4",
    "tracking.enabled=false",
]


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    from raylm.lifecycle import runs
    from raylm.data.pipeline import prepare_data
    from raylm.train.driver import run_training

    job = load_config(None, OVERFIT + [f"workdir={tmp_path_factory.mktemp('export')}", "run_name=overfit"])
    record = runs.begin_run(job)
    data = prepare_data(job)
    result = run_training(job, data.train, data.dev, data.tokenizer)
    return job, record, data, result


def _weights(folder):
    """An exported folder's safetensors, or the model tensors of a sharded training checkpoint (DCP)."""
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    return read_model_state(folder)


def test_dev_loss_turns_upward_before_the_end(trained):
    *_, result = trained
    evals = [(row["step"], row["eval_loss"]) for row in result.history if row.get("eval_loss") is not None]
    assert [step for step, _ in evals] == list(range(4, MAX_STEPS + 1, 4))
    best_step, best_loss = min(evals, key=lambda item: item[1])
    # The premise of the export tests below: the last evaluation is clearly not the best.
    assert best_step < MAX_STEPS and evals[-1][1] > best_loss + 0.05, evals


def test_export_best_takes_the_best_evaluation(trained, tmp_path):
    from raylm.lifecycle.export import export_run_model

    job, record, data, result = trained
    model_dir, card = export_run_model(job, result, data, record, tmp_path / "best")
    evals = {row["step"]: row["eval_loss"] for row in result.history if row.get("eval_loss") is not None}
    best_step = min(evals, key=evals.get)
    export = card["export"]
    assert export["policy"] == "best" and export["source"] == "best_checkpoint"
    assert export["step"] == best_step and export["eval_loss"] == pytest.approx(evals[best_step])
    assert export["last_step"] == MAX_STEPS and export["last_eval_loss"] == pytest.approx(evals[MAX_STEPS])
    assert export["eval_loss"] < export["last_eval_loss"]
    assert export["train_loss"] is not None and export["last_train_loss"] < export["train_loss"]
    saved = json.loads((model_dir / "raylm.json").read_text())
    assert saved["export"] == export and saved["trained_steps"] == MAX_STEPS and saved["exported_step"] == best_step
    assert saved["lineage"]["exported_step"] == best_step
    # The folder holds the best checkpoint's weights, which differ from the last one's.
    exported, last = _weights(model_dir), _weights(result.checkpoint_dir)
    best = _weights(result.best_checkpoint_dir)
    # Every exported tensor (a tied head is saved once) comes from the checkpoint.
    assert exported and set(exported) <= set(best) and set(exported) <= set(last)
    assert all(torch.equal(exported[name], best[name]) for name in exported)
    assert any(not torch.equal(exported[name], last[name]) for name in exported)


def test_export_best_model_reproduces_its_dev_loss(trained, tmp_path):
    """The exported weights score the dev loss the card claims (recomputed outside the training loop)."""
    from raylm.lifecycle.export import export_run_model
    from raylm.train.trainer import LMTrainer
    from transformers import AutoModelForCausalLM

    job, record, data, result = trained
    model_dir, card = export_run_model(job, result, data, record, tmp_path / "best")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    trainer = LMTrainer(model, job.train, torch.device("cpu"))
    batches = list(data.dev.iter_batches(batch_size=job.train.micro_batch_size, batch_format="numpy"))
    measured = trainer.evaluate(batches[: job.train.eval_batches])["eval_loss"]
    assert math.isclose(measured, card["export"]["eval_loss"], rel_tol=1e-4)


def test_export_last_takes_the_last_checkpoint(trained, tmp_path):
    from raylm.lifecycle.export import export_run_model

    job, record, data, result = trained
    last_job = job.model_copy(deep=True)
    last_job.train.export = "last"
    model_dir, card = export_run_model(last_job, result, data, record, tmp_path / "last")
    assert card["export"]["step"] == card["export"]["last_step"] == MAX_STEPS
    assert card["export"]["source"] == "last_checkpoint"
    exported, last = _weights(model_dir), _weights(result.checkpoint_dir)
    assert exported and set(exported) <= set(last)
    assert all(torch.equal(exported[name], last[name]) for name in exported)
