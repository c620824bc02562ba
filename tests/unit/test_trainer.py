"""Single-process checks of the trainer's arithmetic (the distributed ones run under Ray)."""

import math

import pytest
import torch

from raylm.config import ModelConfig, TrainConfig
from raylm.models.registry import build_model
from raylm.train.optim import lr_lambda, param_groups
from raylm.train.trainer import LMTrainer


def _batches(num, batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, 128, (batch_size, 16), generator=generator)
        labels = ids.clone()
        # uneven label counts per micro-batch make naive per-micro-batch averaging wrong
        labels[:, : int(torch.randint(1, 12, (1,), generator=generator))] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _trainer(micro_batch_size, grad_accum_steps):
    config = TrainConfig(num_workers=1, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                         max_steps=10, warmup_steps=1, lr=1e-2)
    return LMTrainer(build_model(ModelConfig(size="debug"), 128, 16, seed=0), config, torch.device("cpu"))


def test_gradient_accumulation_matches_large_batch():
    """4 micro-batches of 2 == one batch of 8.

    Tolerance: loss within rtol 1e-5, gradient norm within rtol 1e-4, and weights
    within atol 1e-6 after 3 steps. Plain SGD replaces AdamW here because Adam's
    first steps are sign-like and would magnify float32 round-off in near-zero
    gradients; the accumulation arithmetic is what is under test.
    """
    micro = _batches(4, 2)
    big = {key: torch.cat([b[key] for b in micro]) for key in micro[0]}
    accumulated = _trainer(2, 4)
    single = _trainer(8, 1)
    for trainer in (accumulated, single):
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.5)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    for _ in range(3):
        a = accumulated.train_step(micro)
        b = single.train_step([big])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for pa, pb in zip(accumulated.model.parameters(), single.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_schedule_warmup_then_cosine():
    schedule = lr_lambda(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)
    assert schedule(110) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_embeddings():
    model = build_model(ModelConfig(size="debug"), 128, 16)
    decay, no_decay = param_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert id(model.transformer.wte.weight) not in decay_ids
    assert id(model.transformer.wpe.weight) not in decay_ids
    assert id(model.transformer.ln_f.weight) not in decay_ids
    assert id(model.transformer.h[0].attn.c_attn.weight) in decay_ids
    assert all(p.ndim >= 2 for p in decay["params"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_on_cpu(precision):
    config = TrainConfig(num_workers=1, micro_batch_size=2, max_steps=5, warmup_steps=1, precision=precision)
    trainer = LMTrainer(build_model(ModelConfig(size="debug"), 128, 16, seed=0), config, torch.device("cpu"))
    losses = [trainer.train_step(_batches(1, 2, seed=0))["loss"] for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_examples_do_not_attend_to_each_other(arch):
    """The trainer's forward over a packed block equals forwarding each example alone."""
    config = TrainConfig(num_workers=1, micro_batch_size=1, max_steps=2, warmup_steps=0)
    trainer = LMTrainer(build_model(ModelConfig(arch=arch, size="debug"), 128, 32, seed=0), config, torch.device("cpu"))
    first, second = torch.randint(0, 128, (1, 12)), torch.randint(0, 128, (1, 9))
    packed = {"input_ids": torch.cat([first, second], 1),
              # the first token of an example is never a target (in real data it is the separator)
              "labels": torch.cat([torch.full_like(first, -100), torch.full((1, 1), -100), second[:, 1:]], 1),
              "position_ids": torch.cat([torch.arange(12), torch.arange(9)]).unsqueeze(0)}
    alone = {"input_ids": second, "labels": second.clone(), "position_ids": torch.arange(9).unsqueeze(0)}
    trainer.model.eval()
    with torch.no_grad():
        assert trainer._loss_sum(packed).item() == pytest.approx(trainer._loss_sum(alone).item(), rel=1e-5)


def test_gradient_accumulation_matches_large_batch_with_adamw():
    """The real optimiser too: 4 x 2 with accumulation == 1 x 8, loss within rel 1e-5 over 5 steps."""
    micro = _batches(4, 2, seed=3)
    big = {key: torch.cat([b[key] for b in micro]) for key in micro[0]}
    accumulated, single = _trainer(2, 4), _trainer(8, 1)
    for _ in range(5):
        a, b = accumulated.train_step(micro), single.train_step([big])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == b["lr"]


def test_activation_checkpointing_gives_the_same_step():
    plain = _trainer(2, 2)
    config = TrainConfig(num_workers=1, micro_batch_size=2, grad_accum_steps=2, max_steps=10, warmup_steps=1,
                         lr=1e-2, activation_checkpointing=True)
    checkpointed = LMTrainer(build_model(ModelConfig(size="debug"), 128, 16, seed=0), config, torch.device("cpu"))
    assert any(type(m).__name__ == "CheckpointWrapper" or getattr(m, "gradient_checkpointing", False)
               for m in checkpointed.base_model.modules())
    micro = _batches(2, 2, seed=5)
    for _ in range(2):
        a, b = plain.train_step(micro), checkpointed.train_step(micro)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_clipping_bounds_the_update_and_reports_the_raw_norm():
    config = TrainConfig(num_workers=1, micro_batch_size=2, max_steps=10, warmup_steps=0, max_grad_norm=1e-3)
    trainer = LMTrainer(build_model(ModelConfig(size="debug"), 128, 16, seed=0), config, torch.device("cpu"))
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=1.0)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step(_batches(1, 2))
    assert metrics["grad_norm"] > 1e-3  # the norm before clipping
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)])
    assert float(update.norm()) == pytest.approx(1e-3, rel=1e-3)  # SGD lr 1: the update is the clipped gradient


def test_evaluate_reports_loss_and_perplexity():
    trainer = _trainer(2, 1)
    metrics = trainer.evaluate(_batches(3, 2))
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 3.0 < metrics["eval_loss"] < 7.0  # about ln(128) for an untrained model
    assert math.isnan(trainer.evaluate([])["eval_loss"])


def test_sequence_classification_task_learns():
    """The classifier path of the trainer: one label per sequence, padding masked out."""
    model_config = ModelConfig(size="debug", task="sequence_classification", num_labels=2)
    model = build_model(model_config, 128, 16, {"pad": 0, "eos": 1}, seed=0)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    config = TrainConfig(num_workers=1, micro_batch_size=8, max_steps=30, warmup_steps=2, lr=3e-3)
    trainer = LMTrainer(model, config, torch.device("cpu"))
    assert trainer.task == "sequence_classification"
    generator = torch.Generator().manual_seed(0)

    def batch():
        labels = torch.randint(0, 2, (8,), generator=generator)
        # The label decides which half of the vocabulary the tokens come from.
        ids = torch.randint(2, 64, (8, 16), generator=generator) + 62 * labels[:, None]
        mask = torch.ones_like(ids)
        mask[:, 12:] = 0
        ids[:, 12:] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    first = trainer.train_step([batch()])["loss"]
    for _ in range(25):
        last = trainer.train_step([batch()])["loss"]
    assert last < 0.5 * first
    metrics = trainer.evaluate([batch() for _ in range(2)])
    assert metrics["eval_accuracy"] > 0.9 and "eval_perplexity" not in metrics


def test_unsynced_metrics_stay_on_device_and_agree():
    synced, lazy = _trainer(2, 2), _trainer(2, 2)
    micro = _batches(2, 2, seed=7)
    a = synced.train_step(micro)
    b = lazy.train_step(micro, sync_metrics=False)
    assert isinstance(a["loss"], float) and isinstance(b["loss"], torch.Tensor)
    assert float(b["loss"]) == pytest.approx(a["loss"], rel=1e-6)
    assert float(b["grad_norm"]) == pytest.approx(a["grad_norm"], rel=1e-6)


def test_next_token_loss_matches_transformers_reference():
    """The loss predicts token t+1 at position t, only where the label is set: the same mean as HF's own loss."""
    trainer = _trainer(2, 1)
    trainer.model.eval()
    for batch in _batches(2, 2, seed=3):
        with torch.no_grad():
            reference = trainer.base_model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
            ours = trainer._loss_sum(batch) / trainer._num_targets(batch)
        assert trainer._num_targets(batch) == int((batch["labels"][:, 1:] != -100).sum())
        assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_steps_without_metrics_make_no_host_sync():
    """A bf16 step on packed blocks from pinned host batches never waits for the GPU.

    What the loop feeds a CUDA worker (``train.loop.host_batches``): pinned CPU
    tensors. A host sync (counting targets on a GPU copy, a blocking copy of the
    target count) would make every step wait for the one before it; CUDA's sync
    debug mode turns any such wait into an error here.
    """
    config = TrainConfig(num_workers=1, micro_batch_size=4, grad_accum_steps=2, max_steps=10, warmup_steps=1,
                         precision="bf16")
    trainer = LMTrainer(build_model(ModelConfig(size="debug"), 128, 32, seed=0), config, torch.device("cuda"))
    generator = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(2):
        ids = torch.randint(1, 128, (4, 32), generator=generator)
        positions = torch.cat([torch.arange(20), torch.arange(12)]).repeat(4, 1)
        micro.append({"input_ids": ids.pin_memory(), "labels": ids.clone().pin_memory(),
                      "position_ids": positions.pin_memory()})
    first = trainer.train_step(micro)  # the first step allocates optimiser state and may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        lazy = [trainer.train_step(micro, sync_metrics=False) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    losses = [float(step["loss"]) for step in lazy]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < first["loss"]
