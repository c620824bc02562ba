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
    assert (tmp_path / "checkpoint_000001" / "dcp" / "__0_0.distcp").is_file()
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
    weights = tmp_path / "checkpoint_b" / "dcp" / "__0_0.distcp"
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


def test_optimizer_scaler_and_rng_state_round_trip(tmp_path):
    """fp16: optimiser moments, scheduler, GradScaler scale and RNG streams all come back."""
    trainer = _trainer(precision="fp16")
    for step in range(3):
        trainer.train_step([_batch(step)])
    trainer.save_checkpoint(tmp_path / "checkpoint_1", {"epoch": 0, "batches_in_epoch": 3},
                            history=[{"step": 1, "loss": 5.0}, {"step": 3, "loss": 4.0}])
    expected_random = torch.rand(3)

    restored = _trainer(precision="fp16")
    torch.manual_seed(12345)  # a different stream, which the checkpoint must replace
    state = restored.load_checkpoint(tmp_path / "checkpoint_1")
    assert state["rng_restored"] and state["world_size"] == 1
    assert torch.equal(torch.rand(3), expected_random)
    assert restored.scaler.get_scale() == trainer.scaler.get_scale()
    assert restored.scheduler.last_epoch == trainer.scheduler.last_epoch == 3
    saved_state, restored_state = trainer.optimizer.state_dict()["state"], restored.optimizer.state_dict()["state"]
    assert saved_state.keys() == restored_state.keys()
    for key in saved_state:
        torch.testing.assert_close(restored_state[key]["exp_avg_sq"], saved_state[key]["exp_avg_sq"], rtol=0, atol=0)
    from raylm.train.checkpoint import read_history

    assert read_history(tmp_path / "checkpoint_1") == [{"step": 1, "loss": 5.0}, {"step": 3, "loss": 4.0}]


def test_optimizer_state_is_keyed_by_parameter_name(tmp_path):
    """Names, not positions: what lets FSDP-sharded and unsharded runs load each other's state."""
    from raylm.train.dcp import saved_keys

    trainer = _trainer()
    trainer.train_step([_batch(0)])
    trainer.save_checkpoint(tmp_path / "checkpoint_1", {})
    keys = saved_keys(tmp_path / "checkpoint_1")
    assert "model.transformer.h.0.attn.c_attn.weight" in keys
    assert "optimizer.state.transformer.h.0.attn.c_attn.weight.exp_avg_sq" in keys
    assert not list((tmp_path / "checkpoint_1").glob("*.safetensors"))  # no gathered weights per checkpoint


def test_export_writes_the_full_weights(tmp_path):
    from safetensors.torch import load_file

    from raylm.train.dcp import export_weights

    trainer = _trainer()
    trainer.train_step([_batch(0)])
    trainer.save_checkpoint(tmp_path / "checkpoint_1", {})
    folder = export_weights(tmp_path / "checkpoint_1", tmp_path / "model")
    weights = load_file(str(folder / "model.safetensors"))
    for name, value in trainer.base_model.state_dict().items():
        if name in weights:
            torch.testing.assert_close(weights[name], value, rtol=0, atol=0)
    assert "transformer.h.0.attn.c_attn.weight" in weights


def test_checkpoint_of_another_model_fails_clearly(tmp_path):
    from raylm.train.trainer import CheckpointMismatchError

    trainer = _trainer()
    trainer.save_checkpoint(tmp_path / "checkpoint_1", {})
    config = TrainConfig(num_workers=1, max_steps=20, warmup_steps=2, micro_batch_size=2)
    other = LMTrainer(build_model(ModelConfig(arch="llama", size="debug"), 128, 16), config, torch.device("cpu"))
    with pytest.raises(CheckpointMismatchError, match="lacks"):
        other.load_checkpoint(tmp_path / "checkpoint_1")


def test_open_valid_checkpoint_orders_siblings_by_step(tmp_path):
    from raylm.train.checkpoint import open_valid_checkpoint

    trainer = _trainer()
    for name in ("checkpoint_b", "checkpoint_a", "checkpoint_c"):  # steps 1, 2, 3; names deliberately unordered
        trainer.train_step([_batch(0)])
        trainer.save_checkpoint(tmp_path / name, {})
    (tmp_path / "checkpoint_c" / "trainer.pt").write_bytes(b"truncated")
    (tmp_path / "checkpoint_a" / "manifest.json").unlink()
    with open_valid_checkpoint(tmp_path / "checkpoint_c") as (folder, problems):
        assert folder == tmp_path / "checkpoint_b"
        assert len(problems) == 2 and "checksum" in problems[0] and "no manifest" in problems[1]


def test_publish_folder_replaces_the_copy(tmp_path):
    from raylm.train.checkpoint import publish_folder

    trainer = _trainer()
    trainer.save_checkpoint(tmp_path / "checkpoint_1", {"eval_loss": 3.0})
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "stale.txt").write_text("old")
    publish_folder(tmp_path / "checkpoint_1", str(tmp_path / "best"))
    verify_checkpoint(tmp_path / "best")
    assert not (tmp_path / "best" / "stale.txt").exists()
