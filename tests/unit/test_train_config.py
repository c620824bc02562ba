"""Batch arithmetic and the train/model config fields the trainer relies on."""

import pytest

from raylm.config import ConfigError, load_config


def test_grad_accum_is_derived_from_the_global_batch():
    job = load_config(None, ["train.global_batch_size=64", "train.micro_batch_size=8", "train.num_workers=2"])
    assert job.train.grad_accum_steps == 4
    assert job.train.effective_global_batch_size == 64


def test_explicit_values_must_agree():
    job = load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=8", "train.num_workers=2",
                             "train.grad_accum_steps=2"])
    assert job.train.effective_global_batch_size == 32
    with pytest.raises(ConfigError, match=r"global_batch_size=32 does not equal .* = 48"):
        load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=8", "train.num_workers=2",
                           "train.grad_accum_steps=3"])


def test_a_global_batch_that_cannot_be_split_names_the_fields():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.global_batch_size=40", "train.micro_batch_size=8", "train.num_workers=3"])
    message = str(info.value)
    assert message.startswith("config error: train:")
    assert "micro_batch_size (8)" in message and "num_workers (3)" in message and "multiple of 24" in message


def test_same_global_batch_on_fewer_workers():
    """What a resume with fewer workers does: the same global batch through more accumulation."""
    two = load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=4", "train.num_workers=2"])
    one = load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=4", "train.num_workers=1"])
    assert (two.train.grad_accum_steps, one.train.grad_accum_steps) == (2, 4)


@pytest.mark.parametrize("overrides, field", [
    (["train.parallel=zero3"], "train.parallel"),
    (["train.precision=fp8"], "train.precision"),
    (["model.task=seq2seq"], "model.task"),
    (["model.num_labels=1"], "model.num_labels"),
    (["train.max_failures=-2"], "train.max_failures"),
])
def test_invalid_choices_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"config error: {field}:"):
        load_config(None, overrides)


def test_classification_defaults():
    job = load_config(None, ["model.task=sequence_classification"])
    assert job.model.num_labels == 2 and job.train.keep_best_checkpoint


def test_worker_niceness_reaches_the_training_workers_runtime_env():
    from raylm.train.driver import worker_runtime_env

    default = load_config(None, [])
    assert default.train.worker_niceness == 0
    assert worker_runtime_env(default.train) == {"env_vars": {"RAY_worker_niceness": "0"}}
    assert worker_runtime_env(load_config(None, ["train.worker_niceness=5"]).train)["env_vars"] == \
        {"RAY_worker_niceness": "5"}
    assert worker_runtime_env(load_config(None, ["train.worker_niceness=null"]).train) == {}  # the cluster's
    with pytest.raises(ConfigError, match="train.worker_niceness"):
        load_config(None, ["train.worker_niceness=-5"])  # raising priority needs privileges Ray workers lack


def test_best_metric_must_be_one_the_task_measures():
    assert load_config(None, []).train.best_metric == "eval_loss"
    job = load_config(None, ["model.task=sequence_classification", "train.best_metric=eval_accuracy"])
    assert job.train.best_metric == "eval_accuracy"
    with pytest.raises(ConfigError, match="best_metric=eval_accuracy is measured for model.task=sequence_classif"):
        load_config(None, ["train.best_metric=eval_accuracy"])  # a causal LM has no dev accuracy
    with pytest.raises(ConfigError, match="config error: train.best_metric:"):
        load_config(None, ["train.best_metric=bleu"])


@pytest.mark.parametrize("overrides, message", [
    (["train.num_workers=3"], r"tensor_parallel \(2\) must divide num_workers \(3\)"),
    (["train.parallel=ddp"], "tensor_parallel=2 needs parallel=fsdp"),
    (["train.placement_strategy=STRICT_SPREAD"], "STRICT_SPREAD puts every worker on its own node"),
    (["train.compile=true"], "tensor_parallel=2 does not combine with compile yet"),
    (["model.arch=gpt2"], "train.tensor_parallel: 2 needs model.arch=llama"),
    (["model.num_kv_heads=1"], r"train.tensor_parallel: 2 does not divide model num_kv_heads \(1\)"),
    (["model.num_heads=3", "model.hidden_size=66", "model.num_kv_heads=3"],
     r"does not divide model num_heads \(3\)"),
])
def test_tensor_parallel_configs_that_cannot_work_are_one_line_errors(overrides, message):
    from raylm.checks import load_job

    base = ["model.arch=llama", "model.size=debug", "train.num_workers=4", "train.tensor_parallel=2",
            "train.parallel=fsdp"]
    assert load_job(None, base).train.tensor_parallel == 2
    with pytest.raises(ConfigError, match=message) as info:
        load_job(None, base + overrides)
    assert "\n" not in str(info.value)


def test_an_elastic_worker_range_keeps_the_global_batch():
    job = load_config(None, ["train.num_workers=[2, 4]", "train.global_batch_size=24", "train.micro_batch_size=2"])
    train = job.train
    assert (train.min_workers, train.num_workers, train.is_elastic) == (2, 4, True)
    assert [train.grad_accum_steps_for(w) * w * train.micro_batch_size for w in (2, 3, 4)] == [24, 24, 24]
    assert load_config(None, ["train.num_workers=[3, 3]"]).train.is_elastic is False


@pytest.mark.parametrize("overrides, message", [
    (["train.num_workers=[2, 4]", "train.global_batch_size=16", "train.micro_batch_size=2"],
     r"the global batch of 16 sequences does not split .* on 3 worker\(s\)"),
    (["train.num_workers=[4, 2]"], r"min \(4\) must be <= max \(2\)"),
    (["train.num_workers=[1, 2, 3]"], r"a count or a range \[min, max\]"),
    (["train.num_workers=[2, 4]", "train.global_batch_size=24", "train.micro_batch_size=1", "train.parallel=fsdp",
      "train.tensor_parallel=2"], "elastic num_workers range and tensor_parallel > 1 do not combine"),
])
def test_elastic_ranges_that_cannot_keep_the_batch_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)
