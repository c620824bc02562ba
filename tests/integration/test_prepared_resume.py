"""A run over a prepared Parquet corpus resumes exactly: the same losses as the uninterrupted run.

A small two-source corpus is prepared with `raylm prepare data` (many small
Parquet files, so that the file order matters) and trained on by 2 Ray Train
workers for several epochs. A second run starts from the first run's checkpoint
at step 16 (epoch 3, mid-epoch) over freshly opened datasets, as a restarted
worker group or a `--resume` does, and must log exactly the losses the first run
logged for steps 17-24. Ray Data used to reseed the file shuffle on each
execution, counting from zero again for a new dataset, so the resumed epoch read
its rows in another order.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from raylm.config import load_config

MAX_STEPS, CHECKPOINT_EVERY, RESUME_AT = 24, 8, 16


def _write_corpus(root):
    """Eight small files (one Parquet file each once prepared): six of stories, two of reviews."""
    words = "the a cat dog sat ran on under mat table quickly slowly red blue big small over near".split()
    rng = np.random.default_rng(7)
    (root / "stories").mkdir()
    (root / "reviews").mkdir()
    for index in range(6):
        (root / "stories" / f"part{index}.txt").write_text(
            "\n\n".join(" ".join(rng.choice(words, size=6)) + "." for _ in range(8)) + "\n")
    for index in range(2):
        (root / "reviews" / f"part{index}.jsonl").write_text("".join(
            json.dumps({"text": " ".join(rng.choice(words, size=4)), "label": i % 2}) + "\n" for i in range(14)))


def _job(root, run_id):
    if not (root / "stories").exists():
        _write_corpus(root)
    return load_config(None, [
        f"workdir={root / 'runs'}", f"run_id={run_id}", "run_name=prepared",
        f"data.sources=[{{path: '{root / 'stories'}/*.txt', task: lm, text_unit: paragraph}}, "
        f"{{path: '{root / 'reviews'}/*.jsonl', task: sentiment}}]",
        "data.dev_fraction=0.1", "data.seq_len=32", "data.vocab_size=300", "data.segment_bytes=1024",
        "model.size=debug", "train.num_workers=2", "train.micro_batch_size=4", f"train.max_steps={MAX_STEPS}",
        "train.warmup_steps=2", "train.lr=3e-3", "train.log_every=1", "train.eval_every=0", "train.eval_batches=2",
        f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.keep_checkpoints=3", "tracking.enabled=false",
    ])


@pytest.fixture(scope="module")
def uninterrupted_and_resumed(ray_session, tmp_path_factory):
    from raylm.data.pipeline import prepare_data
    from raylm.train.checkpoint import read_state
    from raylm.train.driver import experiment_dir, run_training

    root = tmp_path_factory.mktemp("prepared")
    first_job = _job(root, "uninterrupted")
    data = prepare_data(first_job)
    files = sorted((root / "runs" / "prepared").rglob("train/*.parquet"))
    first = run_training(first_job, data.train, data.dev, data.tokenizer)

    # The second run gets the first one's checkpoint of step 16 and nothing else: its workers find it in
    # storage and resume there (epoch, position in the epoch, optimiser, RNG), over datasets opened anew.
    second_job = _job(root, "resumed")
    # Ray Train also keeps a checkpoint_manager_snapshot.json file beside the checkpoint_* folders
    checkpoint = next(folder for folder in experiment_dir(first_job).glob("checkpoint_*")
                      if folder.is_dir() and read_state(folder)["step"] == RESUME_AT)
    experiment_dir(second_job).mkdir(parents=True)
    shutil.copytree(checkpoint, experiment_dir(second_job) / checkpoint.name)
    reopened = prepare_data(second_job)
    second = run_training(second_job, reopened.train, reopened.dev, reopened.tokenizer)
    return data, reopened, files, read_state(checkpoint), first, second


def test_the_corpus_spans_several_files_and_epochs(uninterrupted_and_resumed):
    data, reopened, files, state, first, _ = uninterrupted_and_resumed
    assert data.stats["cache"] == "miss" and reopened.stats["cache"] == "hit"  # read back, not re-tokenized
    assert reopened.fingerprint == data.fingerprint
    assert len(files) >= 8
    steps_per_epoch = data.stats["num_train_blocks"] // 8  # 2 workers x 4 blocks per step
    assert 2 <= steps_per_epoch < RESUME_AT // 2
    # The checkpoint the second run starts from lies inside a later epoch, not at its start.
    assert state["epoch"] >= 2 and state["rows_in_epoch"] > 0


def test_resume_on_prepared_parquet_repeats_the_uninterrupted_losses(uninterrupted_and_resumed):
    *_, first, second = uninterrupted_and_resumed
    assert second.metrics["resumed_from_step"] == RESUME_AT and second.metrics["step"] == MAX_STEPS
    before = {row["step"]: row for row in first.history}
    after = {row["step"]: row for row in second.history}
    assert sorted(after) == list(range(1, MAX_STEPS + 1))
    for step in range(RESUME_AT + 1, MAX_STEPS + 1):
        assert after[step]["epoch"] == before[step]["epoch"], step
        assert after[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-5), step
    assert second.metrics["eval_loss"] == pytest.approx(first.metrics["eval_loss"], rel=1e-5)
