"""``train.compile``: every transformer block compiled in place (CPU inductor here; GPUs in bench/gpu_check.sh)."""

import pytest
import torch

from raylm.config import ModelConfig, TrainConfig
from raylm.models.registry import build_model
from raylm.train.trainer import LMTrainer


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    def trainer(compile_blocks):
        config = TrainConfig(num_workers=1, micro_batch_size=2, max_steps=10, warmup_steps=1, compile=compile_blocks)
        return LMTrainer(build_model(ModelConfig(size="debug"), 128, 16, seed=0), config, torch.device("cpu"))

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = trainer(False), trainer(True)
    blocks = compiled.base_model.transformer.h
    assert all(block._compiled_call_impl is not None for block in blocks)
    # Parameter names are unchanged, so checkpoints of compiled and eager runs are interchangeable.
    assert [name for name, _ in compiled.base_model.named_parameters()] == \
        [name for name, _ in eager.base_model.named_parameters()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        batch = [{"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(16).repeat(2, 1)}]
        a, b = eager.train_step(batch), compiled.train_step(batch)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # really compiled, not eager
