"""``train.lora``: the config's rules, default targets per architecture, and what trains (no Ray)."""

from __future__ import annotations

import pytest
import torch

from raylm.config import ConfigError, LoraConfig, ModelConfig, load_config
from raylm.models.lora import AdapterError, DEFAULT_TARGETS, apply_lora, is_adapted, resolve_targets, trainable_names
from raylm.models.registry import build_model, flops_per_token


def test_lora_is_off_by_default_and_on_with_an_empty_section(tmp_path):
    assert load_config(None, []).train.lora is None
    job = load_config(None, [f"model.init_from={tmp_path}", "train.lora={}"])
    assert job.train.lora == LoraConfig() and (job.train.lora.r, job.train.lora.alpha) == (8, 16.0)
    assert load_config(None, [f"model.init_from={tmp_path}", "train.lora.r=4"]).train.lora.r == 4


@pytest.mark.parametrize("overrides, message", [
    (["train.lora.r=4"], "train.lora adapts a pretrained causal LM: it needs model.init_from"),
    (["model.init_from=/x", "model.task=sequence_classification", "train.lora.r=4"], "model.task=causal_lm"),
    (["train.export_merged=true"], "export_merged merges LoRA adapters: it needs train.lora"),
    (["model.init_from=/x", "train.lora.r=0"], "train.lora.r"),
    (["model.init_from=/x", "train.lora.rank=4"], "train.lora.rank"),
    (["model.init_from=/x", "train.lora.r=4", "train.num_workers=2", "train.parallel=fsdp",
      "train.tensor_parallel=2"], "tensor_parallel=2 does not combine with train.lora yet: use tensor_parallel=1"),
])
def test_bad_lora_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_default_targets_are_the_attention_and_mlp_projections(arch):
    model = build_model(ModelConfig(arch=arch, size="debug"), 64, 32)
    expected = list(DEFAULT_TARGETS[arch])
    assert resolve_targets(model, None) == expected
    frozen_flops = flops_per_token(model, 32, frozen_weights=True)
    full_flops = flops_per_token(model, 32)
    apply_lora(model, LoraConfig(r=2))
    assert is_adapted(model)
    names = trainable_names(model)
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names} == set(expected)
    assert frozen_flops < full_flops  # no weight gradients for the frozen base


def test_unknown_target_modules_name_what_the_model_has():
    model = build_model(ModelConfig(arch="llama", size="debug"), 64, 32)
    with pytest.raises(AdapterError) as error:
        resolve_targets(model, ["q_proj", "c_attn", "qkv"])
    message = str(error.value)
    assert message.startswith("train.lora.target_modules: c_attn, qkv not in LlamaForCausalLM")
    assert "q_proj" in message.split("linear modules:")[1] and len(message.splitlines()) == 1


def test_a_step_changes_only_the_adapters_and_only_they_are_checkpointed(tmp_path):
    from raylm.train.dcp import read_model_state
    from raylm.train.driver import is_adapter_checkpoint
    from raylm.train.trainer import LMTrainer

    job = load_config(None, ["model.init_from=/x", "train.lora.r=2", "train.num_workers=1", "train.warmup_steps=0",
                             "train.max_steps=2"])
    model = apply_lora(build_model(ModelConfig(arch="gpt2", size="debug"), 64, 16), job.train.lora)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = LMTrainer(model, job.train, torch.device("cpu"))
    ids = torch.randint(1, 64, (2, 16))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(16).expand(2, 16)}
    trainer.train_step([batch])
    trainer.train_step([batch])  # lora_B starts at zero: the second step moves lora_A too
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed == set(trainable_names(model))
    # GPT-2 ties its head to the (frozen) embedding: neither name of it is written.
    trainer.save_checkpoint(tmp_path / "checkpoint", {})
    saved = read_model_state(tmp_path / "checkpoint")
    assert set(saved) == changed and is_adapter_checkpoint(tmp_path / "checkpoint")
    assert all(torch.equal(saved[name], model.get_parameter(name).detach()) for name in changed)


def test_a_sweep_may_search_lora_rank_and_learning_rate_of_a_pretrained_model(tmp_path):
    from raylm.tune.space import tune_param_space, validate_sweep, validate_trial

    space = "tune.space={train.lora.r: {grid: [4, 16]}, train.lr: {grid: [1.0e-4, 1.0e-3]}}"
    base = [f"model.init_from={tmp_path}", "train.eval_every=10", "train.warmup_steps=2", "train.max_steps=20", space]
    job = load_config(None, base + ["train.lora.alpha=32"])
    assert validate_sweep(job)["num_trials"] == 4
    assert set(tune_param_space(job)) == {"train.lora.r", "train.lr"}
    trial = validate_trial(job.public_dict(), {"train.lora.r": 16, "train.lr": 1e-3})
    assert (trial.train.lora.r, trial.train.lora.alpha, trial.train.lr) == (16, 32.0, 1e-3)
    with pytest.raises(ConfigError, match="model.init_from: a sweep trains models built from sizes, or LoRA"):
        validate_sweep(load_config(None, [f"model.init_from={tmp_path}", "train.eval_every=10",
                                          "train.warmup_steps=2", "tune.space={train.lr: {grid: [1.0e-4, 1.0e-3]}}"]))
    with pytest.raises(ConfigError, match="cannot be swept"):
        validate_sweep(load_config(None, base + ["tune.space={model.init_from: {choice: [a, b]}}", "train.lora.r=4"]))


def test_an_adapter_checkpoint_exports_as_a_peft_folder_that_loads_with_the_trained_logits(tmp_path):
    """The adapters read back from a sharded checkpoint, in one process, become a PEFT adapter folder of the
    adapters alone (the base's tied embedding is not copied), which loads as the trained model."""
    from raylm.models.lora import load_adapted_model, write_adapter_folder
    from raylm.train.dcp import read_model_state
    from raylm.train.trainer import LMTrainer

    base = tmp_path / "base"
    build_model(ModelConfig(arch="llama", size="debug"), 64, 16).save_pretrained(base, safe_serialization=True)
    job = load_config(None, [f"model.init_from={base}", "train.lora.r=2", "train.num_workers=1",
                             "train.warmup_steps=0", "train.max_steps=3", "train.lr=1e-2"])
    model = apply_lora(build_model(job.model, 64, 16), job.train.lora)
    trainer = LMTrainer(model, job.train, torch.device("cpu"))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        trainer.train_step([{"input_ids": ids, "labels": ids, "position_ids": torch.arange(16).expand(2, 16)}])
    trainer.save_checkpoint(tmp_path / "checkpoint", {})
    write_adapter_folder(base, job.train.lora, read_model_state(tmp_path / "checkpoint"), tmp_path / "adapter")
    files = {path.name: path.stat().st_size for path in (tmp_path / "adapter").iterdir()}
    assert files["adapter_model.safetensors"] < 0.2 * (base / "model.safetensors").stat().st_size
    loaded = load_adapted_model(tmp_path / "adapter").eval()
    untouched = build_model(job.model, 64, 16).eval()
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert (expected - untouched(input_ids=ids).logits).abs().max() > 1e-3  # the adapters trained


def _llama_folder(folder, rows_short_by: int, vocab_size: int = 300):
    """A tiny Llama folder with a real BPE tokenizer; its embedding has ``rows_short_by`` rows fewer than the
    tokenizer has ids (0: exactly as many)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylm.data.demo import generate_demo_corpus
    from raylm.data.formatting import format_example
    from raylm.data.tokenizer import train_bpe_tokenizer

    corpus = generate_demo_corpus(seed=0, num_train=50, num_dev=5)
    tokenizer = train_bpe_tokenizer((p + a for p, a in map(format_example, corpus["train"])), vocab_size=vocab_size)
    config = LlamaConfig(vocab_size=len(tokenizer) - rows_short_by, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder, len(tokenizer)


def test_a_tokenizer_beyond_the_frozen_embeddings_is_refused_under_lora_only(tmp_path):
    from raylm.lifecycle.workflow import train
    from raylm.train.driver import check_lora

    folder, ids = _llama_folder(tmp_path / "longer", rows_short_by=3)
    workdir = tmp_path / "runs"
    overrides = [f"workdir={workdir}", f"model.init_from={folder}", "data.seq_len=32"]
    with pytest.raises(ConfigError) as error:
        train(load_config(None, [*overrides, "train.lora.r=2"]))  # what `raylm train` runs: one line, exit 2
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith(
        f"config error: train.lora: the tokenizer's ids reach {ids - 1}, beyond the {ids - 3} embedding rows")
    assert "fine-tune without train.lora" in message
    assert not workdir.exists()  # before the run's folder is made
    check_lora(load_config(None, overrides))  # full fine-tuning grows the embeddings: no objection
    # A tokenizer given as data.tokenizer_path is the one that trains: a smaller one fits the same rows, a larger
    # one does not fit a checkpoint whose own tokenizer does.
    smaller, small_ids = _llama_folder(tmp_path / "smaller", rows_short_by=0, vocab_size=260)
    larger, _ = _llama_folder(tmp_path / "larger", rows_short_by=0, vocab_size=340)
    assert small_ids <= ids - 3
    check_lora(load_config(None, [*overrides, "train.lora.r=2", f"data.tokenizer_path={smaller}"]))
    check_lora(load_config(None, [*overrides, "train.lora.r=2", f"model.init_from={smaller}"]))
    with pytest.raises(ConfigError, match="beyond the"):
        check_lora(load_config(None, [*overrides, "train.lora.r=2", f"model.init_from={smaller}",
                                      f"data.tokenizer_path={larger}"]))
