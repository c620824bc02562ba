"""An elastic worker range under real Ray Train V2: it starts with what fits and keeps the global batch.

``train.num_workers: [2, 4]`` on the session's local Ray (4 CPUs, 2 per worker):
Ray Train's elastic policy starts with the 2 workers the cluster can hold
instead of waiting for 4, and the worker loop
recomputes gradient accumulation so that every step still trains on the
configured global batch of 24 sequences (``micro_batch_size=2``; 24 splits on
every count from 2 to 4): the tokens counted per step are 24 x seq_len
whatever the worker count. (Losing and
regaining nodes mid-run is not exercised here; see docs/clusters.md.)
"""

from __future__ import annotations

import pytest

from raylm.train.checkpoint import read_state

from tests.integration.test_train_checkpoints import SEQ_LEN, SyntheticTokenizer, make_job, synthetic_datasets

GLOBAL_BATCH, MAX_STEPS = 24, 3


@pytest.fixture(scope="module")
def elastic_run(ray_session, tmp_path_factory):
    from raylm.train.driver import run_training

    job = make_job(tmp_path_factory.mktemp("elastic"), "elastic", "train.num_workers=[2, 4]",
                   f"train.global_batch_size={GLOBAL_BATCH}", "train.micro_batch_size=2", "train.cpus_per_worker=2",
                   f"train.max_steps={MAX_STEPS}", "train.eval_every=0", "train.keep_best_checkpoint=false")
    train, dev = synthetic_datasets()
    return job, run_training(job, train, dev, SyntheticTokenizer())


def test_elastic_range_starts_with_what_fits_and_keeps_the_global_batch(elastic_run):
    job, result = elastic_run
    assert (job.train.min_workers, job.train.num_workers, job.train.is_elastic) == (2, 4, True)
    workers = read_state(result.checkpoint_dir)["world_size"]
    assert workers == 2  # what the 4-CPU cluster holds, not the maximum of 4
    assert result.metrics["step"] == MAX_STEPS
    per_step = [row["tokens_seen"] for row in result.history]
    # 6 micro-batches of 2 on each of 2 workers per step (3 on each of 4 would give the same).
    assert per_step == [GLOBAL_BATCH * SEQ_LEN * step for step in range(1, MAX_STEPS + 1)]
