"""Fused kernel substitutions compute the same function and leave weights and config alone."""

import copy

import pytest
import torch
from transformers.activations import GELUTanh, NewGELUActivation

from raylm.config import ModelConfig, TrainConfig
from raylm.models.registry import build_model
from raylm.train.kernels import fuse_kernels
from raylm.train.trainer import LMTrainer


def _types(model):
    return [type(module) for module in model.modules()]


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (4, 16), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def test_fused_gelu_gives_the_same_outputs_and_gradients():
    reference = build_model(ModelConfig(arch="gpt2", size="debug"), 128, 16, seed=0)
    fused = copy.deepcopy(reference)
    swapped = fuse_kernels(fused)
    layers = reference.config.n_layer
    assert swapped == {"NewGELUActivation": layers}
    assert NewGELUActivation not in _types(fused) and _types(fused).count(GELUTanh) == layers
    assert fused.config.activation_function == reference.config.activation_function == "gelu_new"
    assert fused.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), reference.state_dict().values()))

    batch = _batch()
    out_ref, out_fused = reference(**batch), fused(**batch)
    torch.testing.assert_close(out_fused.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    out_ref.loss.backward()
    out_fused.loss.backward()
    for (name, a), b in zip(reference.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert fuse_kernels(fused) == {}  # idempotent


def test_models_without_slow_modules_are_left_alone():
    llama = build_model(ModelConfig(arch="llama", size="debug"), 128, 16, seed=0)
    before = _types(llama)
    assert fuse_kernels(llama) == {}
    assert _types(llama) == before


def test_subclasses_are_not_swapped():
    class Scaled(NewGELUActivation):  # computes something else: must survive
        def forward(self, input):
            return 2 * super().forward(input)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Scaled(), NewGELUActivation())
    assert fuse_kernels(model) == {"NewGELUActivation": 1}
    assert type(model[1]) is Scaled and type(model[2]) is GELUTanh


@pytest.mark.parametrize("fused_kernels", [True, False])
def test_trainer_fuses_by_default_and_the_option_turns_it_off(fused_kernels):
    config = TrainConfig(num_workers=1, micro_batch_size=4, max_steps=5, warmup_steps=1, lr=1e-2,
                         fused_kernels=fused_kernels)
    trainer = LMTrainer(build_model(ModelConfig(size="debug"), 128, 16, seed=0), config, torch.device("cpu"))
    types = _types(trainer.base_model)
    assert (GELUTanh in types) is fused_kernels
    assert (NewGELUActivation in types) is not fused_kernels
    assert TrainConfig().fused_kernels is True


def test_fused_and_unfused_trainers_follow_the_same_trajectory():
    def losses(fused_kernels):
        config = TrainConfig(num_workers=1, micro_batch_size=4, max_steps=5, warmup_steps=1, lr=1e-2,
                             fused_kernels=fused_kernels)
        trainer = LMTrainer(build_model(ModelConfig(size="debug"), 128, 16, seed=0), config, torch.device("cpu"))
        return [trainer.train_step([_batch(seed)])["loss"] for seed in range(4)]

    assert losses(True) == pytest.approx(losses(False), rel=1e-5)
