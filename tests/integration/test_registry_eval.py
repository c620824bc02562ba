"""A large eval set runs as Ray Data batch inference over a pool of model actors, with the same results.

The same model folder is evaluated twice on the same rows of every task: in
this process, and with ``eval.distributed_min_examples`` below the row count so
that Ray Data maps batches over two model actors (each loads the folder through
the serving loader). Predictions, metrics and intervals must be identical.
"""

from __future__ import annotations

import pytest

from raylm.config import EvalConfig


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    """The run's tiny model folder (conftest) and 15 dev rows of each task."""
    from raylm.data.demo import generate_demo_corpus

    return tiny_model_dir, generate_demo_corpus(seed=0, num_train=200, num_dev=15)["dev"]


def test_distributed_evaluation_matches_in_process(ray_session, model_dir):
    from raylm.eval import runner
    from raylm.inference.task_model import InferenceOptions, load_task_model

    folder, rows = model_dir
    assert len(rows) == 60  # 15 rows of each of the four tasks
    task_model = load_task_model(folder, InferenceOptions(max_new_tokens=6))
    # Batches of one row: the same arithmetic in both modes (no padding differences between batches).
    local = runner.evaluate_model(task_model, rows, EvalConfig(batch_size=1, max_new_tokens=6, bootstrap_samples=200),
                                  model_ref=str(folder))
    assert local.mode == "in_process"

    distributed_config = EvalConfig(batch_size=1, max_new_tokens=6, bootstrap_samples=200, distributed_min_examples=50,
                                    num_actors=2, cpus_per_actor=0.5)
    remote = runner.evaluate_model(task_model, rows, distributed_config, model_ref=str(folder))
    assert remote.mode == "ray_data"
    assert remote.predictions == local.predictions
    # Thread counts differ (actors use one), so float sums may differ in the last bits.
    assert remote.metrics == pytest.approx(local.metrics, rel=1e-6)
    assert remote.intervals.keys() == local.intervals.keys()
    for name, interval in local.intervals.items():
        assert remote.intervals[name] == pytest.approx(interval, rel=1e-6)
    assert remote.task_fingerprints == local.task_fingerprints
    assert set(remote.examples.values()) == {15}
