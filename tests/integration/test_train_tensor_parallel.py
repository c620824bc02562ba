"""Tensor parallelism (dp x tp meshes) on real torch.distributed processes (gloo, CPU) against one process.

Plain ``torch.multiprocessing`` processes check the arithmetic: a debug Llama
trained for a few steps by raylm's ``LMTrainer`` with ``tensor_parallel=2`` on
2 processes (one tp group) and on 4 processes (dp=2 x tp=2) follows the
single-process run on the same global batches. Each rank reads its own rows
(rank r: rows [r*G/world, (r+1)*G/world) of each global batch) and its tp group
trains on the union of its members' rows. The reference is one process with no
wrapper on the whole global batch.

Tolerances, per step (AdamW, lr 3e-3, clipping at 1.0): loss within rel 1e-5
and gradient norm within rel 1e-4 (only the reduction order differs: the
row-wise projections' reduce-scatters, FSDP2's reduce-scatter over dp). A
normaliser that counted each tp group's rows tp times, or an unsharded head
count in attention, is off by far more at the first step.

The same runs save sharded (DCP) checkpoints half-way, and resuming them on
another worker count and layout (4 -> 2, 4 -> 1, 1 -> 2 into a tp group,
2 -> 1) continues with the uninterrupted run's losses, to the same tolerances.

One Ray Train run wires it through raylm's driver and worker loop
(``run_training``: 2 workers, ``tensor_parallel=2``), and a group larger than
any node of the local Ray is refused before workers start.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raylm.config import ConfigError, ModelConfig, TrainConfig
from raylm.models.registry import build_model
from raylm.train.trainer import LMTrainer

VOCAB, SEQ_LEN, GLOBAL_BATCH, NUM_STEPS, SAVE_AT = 96, 32, 8, 6, 3


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Arithmetic sequences mod VOCAB, two packed documents per row, a varying masked prefix per row."""
    generator = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=generator)
    strides = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=generator)
    ids = (starts + strides * torch.arange(SEQ_LEN)) % VOCAB
    labels = ids.clone()
    for row in range(GLOBAL_BATCH):
        labels[row, : int(torch.randint(1, SEQ_LEN - 4, (1,), generator=generator))] = -100
    positions = torch.arange(SEQ_LEN).repeat(GLOBAL_BATCH, 1)
    positions[:, SEQ_LEN // 2:] -= SEQ_LEN // 2  # the packed-document mask is in play
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def local_rows(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    per_rank = GLOBAL_BATCH // world
    return {key: value[rank * per_rank: (rank + 1) * per_rank] for key, value in global_batch(step).items()}


def make_trainer(world: int, tensor_parallel: int) -> LMTrainer:
    config = TrainConfig(num_workers=world, micro_batch_size=GLOBAL_BATCH // world, tensor_parallel=tensor_parallel,
                         parallel="fsdp" if world > 1 else "ddp", max_steps=20, warmup_steps=2, lr=3e-3)
    model = build_model(ModelConfig(arch="llama", size="debug"), VOCAB, SEQ_LEN, seed=0)
    return LMTrainer(model, config, torch.device("cpu"))


def train(rank: int, world: int, tensor_parallel: int = 1, save_to: str | None = None,
          resume_from: str | None = None) -> list[dict]:
    """Steps [0, NUM_STEPS) (from the checkpoint's step when resuming), saving after SAVE_AT steps if asked."""
    trainer = make_trainer(world, tensor_parallel)
    if resume_from:
        trainer.load_checkpoint(Path(resume_from))
    steps = []
    for step in range(trainer.step, NUM_STEPS):
        steps.append(trainer.train_step([local_rows(step, rank, world)]))
        if save_to and trainer.step == SAVE_AT:
            trainer.save_checkpoint(Path(save_to), {})
    return steps


def _worker(rank: int, world: int, folder: str, scenarios: dict[str, dict]) -> None:
    """Run ``scenarios`` (name -> ``train`` keywords) one after another in one process group (a process start
    costs more than a scenario); each rank writes its steps per scenario."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        steps = {name: train(rank, world, **keywords) for name, keywords in scenarios.items()}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(steps))
    finally:
        dist.destroy_process_group()


def spawn(folder: Path, world: int, scenarios: dict[str, dict]) -> dict[str, list[list[dict]]]:
    """{scenario: [steps of rank 0, rank 1, ...]} from ``world`` spawned processes."""
    folder.mkdir(parents=True)
    mp.spawn(_worker, args=(world, str(folder), scenarios), nprocs=world, join=True)
    per_rank = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]
    return {name: [steps[name] for steps in per_rank] for name in scenarios}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every layout's steps per rank. One process (the reference), dp=2 x tp=2 (4 processes) and tp=2
    (2 processes) each save a sharded checkpoint after SAVE_AT steps; then the 4-process checkpoint is resumed
    on 2 FSDP processes (4 -> 2) and on 1 (4 -> 1), the 1-process one on a tp=2 group (1 -> 2), and the tp=2 one
    on 1 process (2 -> 1)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tp")
    results = {"reference": train(0, 1, 1, save_to=str(root / "checkpoint_1"))}
    results.update(spawn(root / "four", 4, {"dp2xtp2": {"tensor_parallel": 2,
                                                        "save_to": str(root / "checkpoint_4")}}))
    results.update(spawn(root / "two", 2, {
        "tp2": {"tensor_parallel": 2, "save_to": str(root / "checkpoint_tp2")},
        "4to2": {"tensor_parallel": 1, "resume_from": str(root / "checkpoint_4")},
        "1to2": {"tensor_parallel": 2, "resume_from": str(root / "checkpoint_1")},
    }))
    results["4to1"] = [train(0, 1, 1, resume_from=str(root / "checkpoint_4"))]
    results["2to1"] = [train(0, 1, 1, resume_from=str(root / "checkpoint_tp2"))]
    results["checkpoint"] = root / "checkpoint_4"
    return results


@pytest.fixture(scope="module")
def reference(runs):
    return runs["reference"]


def _assert_close(steps, reference_steps):
    for step, (got, want) in enumerate(zip(steps, reference_steps)):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), f"step {step}"
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), f"step {step}"
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-9), f"step {step}"


def test_reference_learns(reference):
    assert reference[-1]["loss"] < 0.95 * reference[0]["loss"]


@pytest.mark.parametrize("layout", ["tp2", "dp2xtp2"])
def test_tensor_parallel_follows_one_process(reference, runs, layout):
    for rank_steps in runs[layout]:  # every rank reports the global figures
        _assert_close(rank_steps, reference)


@pytest.mark.parametrize("resume", ["4to2", "4to1", "1to2", "2to1"])
def test_sharded_checkpoint_resumes_on_another_worker_count_and_layout(reference, runs, resume):
    """Weights, AdamW moments and schedule resharded: the resumed steps are the uninterrupted run's."""
    for rank_steps in runs[resume]:
        assert len(rank_steps) == NUM_STEPS - SAVE_AT
        _assert_close(rank_steps, reference[SAVE_AT:])


def test_each_rank_wrote_its_own_part(runs):
    from raylm.train.checkpoint import verify_checkpoint

    folder = runs["checkpoint"]
    verify_checkpoint(folder)
    parts = sorted(path.name for path in (folder / "dcp").glob("*.distcp"))
    assert parts == [f"__{rank}_0.distcp" for rank in range(4)]
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert all(f"dcp/{name}" in manifest for name in parts)


# ----------------------------------------------------------------- through Ray Train

TP_MAX_STEPS = 8


@pytest.fixture(scope="module")
def ray_train_run(ray_session, tmp_path_factory):
    from tests.integration.test_train_checkpoints import SyntheticTokenizer, make_job, synthetic_datasets

    from raylm.checks import check_job
    from raylm.train.driver import run_training

    job = check_job(make_job(tmp_path_factory.mktemp("tp"), "tp", "model.arch=llama", "train.parallel=fsdp",
                             "train.tensor_parallel=2", f"train.max_steps={TP_MAX_STEPS}", "train.eval_every=0",
                             "train.keep_best_checkpoint=false"))
    train_rows, dev_rows = synthetic_datasets()
    return job, run_training(job, train_rows, dev_rows, SyntheticTokenizer())


def test_ray_train_run_with_tensor_parallel_trains_and_exports(ray_train_run, tmp_path):
    from tests.integration.test_train_checkpoints import SyntheticTokenizer
    from transformers import AutoModelForCausalLM

    from raylm.train.checkpoint import read_state
    from raylm.train.driver import export_model

    job, result = ray_train_run
    assert result.metrics["step"] == TP_MAX_STEPS
    assert read_state(result.checkpoint_dir)["world_size"] == 2
    losses = [row["loss"] for row in result.history]
    assert len(losses) == TP_MAX_STEPS and losses[-1] < 0.9 * losses[0], losses

    class Tokenizer(SyntheticTokenizer):
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer_config.json").write_text("{}")

    model = AutoModelForCausalLM.from_pretrained(export_model(result.checkpoint_dir, Tokenizer(), tmp_path / "m", {}),
                                                 local_files_only=True)
    # The exported weights are the full (gathered) ones: the dev loss they give is the run's.
    assert model.config.num_attention_heads == 2 and model.lm_head.weight is model.model.embed_tokens.weight
    batch = global_batch(0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == VOCAB


def test_a_group_larger_than_any_node_is_refused_before_workers_start(ray_session, tmp_path):
    from tests.integration.test_train_checkpoints import make_job

    from raylm.train.driver import build_trainer

    job = make_job(tmp_path, "too-wide", "model.arch=llama", "train.parallel=fsdp", "train.num_workers=8",
                   "train.tensor_parallel=8")
    with pytest.raises(ConfigError, match="train.tensor_parallel: 8 workers must share a node, but no node of this "
                                          "cluster holds more than 4"):
        build_trainer(job, None, None, None)
