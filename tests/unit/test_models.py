import pytest
import torch

from raylm.config import ModelConfig
from raylm.models.registry import MODEL_SIZES, build_hf_config, build_model, count_parameters, flops_per_token


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_sizes_build_and_run(arch):
    model = build_model(ModelConfig(arch=arch, size="debug"), vocab_size=300, max_positions=32)
    out = model(input_ids=torch.randint(0, 300, (2, 16)))
    assert out.logits.shape == (2, 16, 300)


def test_build_is_deterministic_for_a_seed():
    a = build_model(ModelConfig(size="debug"), 300, 32, seed=5)
    b = build_model(ModelConfig(size="debug"), 300, 32, seed=5)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_named_sizes_match_known_parameter_counts():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        gpt2_small = AutoModelForCausalLM.from_config(build_hf_config("gpt2", "small", 50257, 1024))
        gpt2_medium = AutoModelForCausalLM.from_config(build_hf_config("gpt2", "medium", 50257, 1024))
        llama_160m = AutoModelForCausalLM.from_config(build_hf_config("llama", "160m", 32000, 2048))
        llama_1b = AutoModelForCausalLM.from_config(build_hf_config("llama", "1b", 32000, 2048))
    assert 120e6 < count_parameters(gpt2_small) < 130e6
    assert 340e6 < count_parameters(gpt2_medium) < 365e6
    assert 140e6 < count_parameters(llama_160m) < 180e6
    assert 0.9e9 < count_parameters(llama_1b) < 1.4e9


def test_flops_per_token_formula():
    model = build_model(ModelConfig(size="debug"), vocab_size=300, max_positions=64)
    config = model.config
    dense = count_parameters(model, exclude_embeddings=True)
    expected = 6 * (dense + 300 * config.n_embd) + 12 * config.n_layer * config.n_embd * 64
    assert flops_per_token(model, 64) == pytest.approx(expected)


def test_init_from_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_model(ModelConfig(init_from=str(tmp_path / "nope")), 300, 32)


def test_sizes_table_covers_both_architectures():
    assert {"debug", "tiny", "small", "medium"} <= set(MODEL_SIZES["gpt2"])
    assert {"debug", "tiny", "160m", "1b"} <= set(MODEL_SIZES["llama"])
