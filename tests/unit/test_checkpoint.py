import json

import pytest
import torch

from raylm.config import ModelConfig, TrainConfig
from raylm.models.registry import build_model
from raylm.train.checkpoint import CorruptCheckpointError, find_valid_checkpoint, verify_checkpoint
from raylm.train.trainer import LMTrainer


def _trainer(**overrides):
    config = TrainConfig(num_workers=1, max_steps=20, warmup_steps=2, micro_batch_size=2, **overrides)
    model = build_model(ModelConfig(size="debug"), vocab_size=128, max_positions=16, seed=0)
    return LMTrainer(model, config, torch.device("cpu"))


def _batch(seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 16), generator=generator)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(16).repeat(2, 1)}


def test_save_load_restores_training_exactly(tmp_path):
    trainer = _trainer()
    for step in range(3):
        trainer.train_step([_batch(step)])
    trainer.save_checkpoint(tmp_path / "checkpoint_000001", {"epoch": 0, "batches_in_epoch": 3})
    verify_checkpoint(tmp_path / "checkpoint_000001")
    assert (tmp_path / "checkpoint_000001" / "model.safetensors").is_file()
    expected = trainer.train_step([_batch(99)])

    restored = _trainer()
    state = restored.load_checkpoint(tmp_path / "checkpoint_000001")
    assert state["step"] == 3 and state["batches_in_epoch"] == 3
    got = restored.train_step([_batch(99)])
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert got["lr"] == pytest.approx(expected["lr"])


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path):
    trainer = _trainer()
    trainer.train_step([_batch(0)])
    trainer.save_checkpoint(tmp_path / "checkpoint_a", {})
    trainer.train_step([_batch(1)])
    trainer.save_checkpoint(tmp_path / "checkpoint_b", {})
    weights = tmp_path / "checkpoint_b" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        verify_checkpoint(tmp_path / "checkpoint_b")
    folder, problems = find_valid_checkpoint(tmp_path / "checkpoint_b")
    assert folder == tmp_path / "checkpoint_a"
    assert len(problems) == 1
    assert json.loads((folder / "trainer_state.json").read_text())["step"] == 1


def test_partial_checkpoint_without_manifest(tmp_path):
    trainer = _trainer()
    trainer.save_checkpoint(tmp_path / "checkpoint_x", {})
    (tmp_path / "checkpoint_x" / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="no manifest"):
        verify_checkpoint(tmp_path / "checkpoint_x")
    assert find_valid_checkpoint(tmp_path / "checkpoint_x")[0] is None
