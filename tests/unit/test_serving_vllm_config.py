"""``serve.engine: vllm`` without Ray and without vLLM: the config keys, their one-line errors, and the Ray Serve LLM
``LLMConfig`` they become. Serving through vLLM for real is tests/integration/test_serve_vllm.py."""

from __future__ import annotations

import importlib.util
import json

import pytest

from raylm.config import ConfigError, ServeConfig, load_config, validate_config
from raylm.serving.vllm_app import llm_config_args, resolve_served_model


def test_the_default_engine_is_raylms_and_vllm_keys_pass_only_what_is_set():
    assert ServeConfig().engine == "raylm"
    assert not ServeConfig(engine="vllm").playground_enabled("127.0.0.1", local_server=True)
    config = validate_config({"serve": {"engine": "vllm", "vllm": {"dtype": "bfloat16", "max_model_len": 2048,
                                                                   "enable_prefix_caching": True}}}).serve
    assert config.vllm.engine_kwargs() == {"dtype": "bfloat16", "max_model_len": 2048, "tensor_parallel_size": 1,
                                           "enable_prefix_caching": True}
    overridden = load_config(None, ["serve.engine=vllm", "serve.vllm.max_lora_rank=16",
                                    "serve.vllm.gpu_memory_utilization=0.8"]).serve
    assert overridden.vllm.engine_kwargs()["max_lora_rank"] == 16
    assert overridden.vllm.engine_kwargs()["gpu_memory_utilization"] == 0.8


@pytest.mark.parametrize("overrides, fragment", [
    (["serve.engine=tgi"], "serve.engine: Input should be 'raylm' or 'vllm'"),
    (["serve.vllm.dtype=bfloat16"], "vllm settings are given but engine is raylm"),
    (["serve.engine=vllm", "serve.vllm.swap_space=4"], "serve.vllm.swap_space: unknown key"),
    (["serve.engine=vllm", "serve.vllm.gpu_memory_utilization=1.5"], "serve.vllm.gpu_memory_utilization"),
    (["serve.engine=vllm", "serve.models.sentiment=/m"], "engine vllm serves one model"),
    (["serve.engine=vllm", "serve.num_gpus_per_replica=0.5"], "must be 0 (CPU) or vllm.tensor_parallel_size (1)"),
    (["serve.engine=vllm", "serve.vllm.accelerator_type=H100"], "num_gpus_per_replica is 0"),
    (["serve.engine=vllm", "serve.playground=true"], "the playground is served by engine raylm only"),
])
def test_bad_vllm_settings_are_one_line_config_errors(overrides, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_the_llm_config_carries_the_folder_engine_kwargs_replicas_and_placement(tmp_path):
    config = validate_config({"serve": {
        "engine": "vllm", "num_cpus_per_replica": 2, "max_queued_requests": 10,
        "autoscaling": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 8},
        "vllm": {"max_model_len": 512}}}).serve
    args = llm_config_args(tmp_path, "m", config)
    assert args["model_loading_config"] == {"model_id": "m", "model_source": str(tmp_path.resolve())}
    assert args["engine_kwargs"] == {"max_model_len": 512, "tensor_parallel_size": 1, "dtype": "auto"}
    assert args["accelerator_config"] == {"kind": "cpu"} and "accelerator_type" not in args
    deployment = args["deployment_config"]
    assert deployment["ray_actor_options"] == {"num_cpus": 2} and deployment["max_queued_requests"] == 10
    assert "num_replicas" not in deployment
    assert deployment["autoscaling_config"]["max_replicas"] == 3
    assert deployment["autoscaling_config"]["initial_replicas"] == 1
    gpu = validate_config({"serve": {"engine": "vllm", "num_gpus_per_replica": 2, "num_replicas": 2, "vllm": {
        "tensor_parallel_size": 2, "accelerator_type": "H100"}}}).serve
    gpu_args = llm_config_args(tmp_path, "m", gpu)
    # GPUs are placed by Ray Serve LLM (one per tensor-parallel worker), not asked for by the replica actor.
    assert gpu_args["accelerator_config"] == {"kind": "gpu"} and gpu_args["accelerator_type"] == "H100"
    assert gpu_args["deployment_config"]["num_replicas"] == 2
    assert "num_gpus" not in gpu_args["deployment_config"]["ray_actor_options"]


def test_a_folder_is_served_under_raylms_public_name(tmp_path):
    folder = tmp_path / "exported"
    folder.mkdir()
    assert resolve_served_model(str(folder)) == (folder, "exported")
    (folder / "raylm.json").write_text(json.dumps({"run_id": "run-7"}))
    assert resolve_served_model(str(folder))[1] == "run-7"
    with pytest.raises(FileNotFoundError):
        resolve_served_model(str(tmp_path / "missing"))


def test_the_guard_in_front_of_vllm_reads_the_key_where_it_runs(tmp_path, monkeypatch):
    from raylm.serving.vllm_app import ReplicaGuard

    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    monkeypatch.delenv("RAYLM_API_KEY_FILE", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("k3y\n")
    config = ServeConfig(engine="vllm", api_key_file=str(key_file), max_body_bytes=2048)
    guard = ReplicaGuard(app=None, serve_config=config.model_dump())
    assert (guard.api_key, guard.max_body_bytes) == ("k3y", 2048)
    assert ReplicaGuard(app=None, serve_config=ServeConfig(engine="vllm").model_dump()).api_key is None


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_engine_is_a_one_line_config_error(monkeypatch, tmp_path):
    from raylm.serving.app import build_app

    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    monkeypatch.delenv("RAYLM_API_KEY_FILE", raising=False)
    with pytest.raises(ConfigError) as error:
        build_app(str(tmp_path), validate_config({"serve": {"engine": "vllm"}}).serve, host="127.0.0.1")
    assert "make install-vllm" in str(error.value) and "\n" not in str(error.value)
