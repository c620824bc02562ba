"""Contract tests of raylm.compat: each private API raylm uses still exists in the installed dependency.

Each test names the version its compat module was written for (``WRITTEN_FOR``). When an upgrade
removes or moves an attribute, the test fails with the message the compat function raises:
"raylm.compat: <attribute> is gone in <dependency> <version> (written for <version>)".
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
import types

import pytest

from raylm.compat import ray as ray_compat
from raylm.compat import sacrebleu as sacrebleu_compat
from raylm.compat import transformers as transformers_compat


def _contract(call, *args):
    """Call a compat function; a missing attribute fails the test with the compat function's message."""
    try:
        return call(*args)
    except RuntimeError as err:
        pytest.fail(str(err))


# --------------------------------------------------------------------------- Ray 2.60


def test_ray_is_the_version_the_compat_module_was_written_for():
    import ray

    assert ray.__version__.startswith(ray_compat.WRITTEN_FOR + "."), (
        f"raylm.compat.ray was written for Ray {ray_compat.WRITTEN_FOR}; Ray {ray.__version__} is installed: "
        "re-check each function of raylm/compat/ray.py against it, then update WRITTEN_FOR")


def test_a_missing_ray_attribute_names_itself_and_the_version():
    with pytest.raises(ray_compat.CompatError,
                       match=r"raylm.compat: ray._raylet.NoSuchThing is gone in Ray 2\.60\.\d+ \(written for 2.60\)"):
        ray_compat.require_attribute("ray._raylet", "NoSuchThing")
    with pytest.raises(ray_compat.CompatError, match="ray.no_such_module.X is gone"):
        ray_compat.require_attribute("ray.no_such_module", "X")


def test_job_config_env_var_ray_2_60():
    # Ray's job supervisor hands a submitted driver its job config in this variable.
    assert _contract(ray_compat.job_config_env_var) == "RAY_JOB_CONFIG_JSON_ENV_VAR"


def test_worker_group_callback_ray_2_60():
    from ray.train.v2._internal.execution.worker_group.placement_group_handle import PlacementGroupHandle
    from ray.train.v2._internal.execution.worker_group.state import WorkerGroupState
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    base = _contract(ray_compat.worker_group_callback_class)
    assert callable(getattr(base, "after_worker_group_start", None)), \
        "raylm.compat: WorkerGroupCallback.after_worker_group_start is gone (written for Ray 2.60)"
    callback = _contract(ray_compat.on_worker_group_start, lambda group_id: None)
    assert isinstance(callback, base)
    # What worker_group_placement_group reads, from the group Ray hands the callback.
    assert callable(getattr(WorkerGroup, "get_worker_group_state", None)), \
        "raylm.compat: WorkerGroup.get_worker_group_state is gone (written for Ray 2.60)"
    assert "placement_group_handle" in {field.name for field in dataclasses.fields(WorkerGroupState)}, \
        "raylm.compat: WorkerGroupState.placement_group_handle is gone (written for Ray 2.60)"
    assert isinstance(getattr(PlacementGroupHandle, "placement_group", None), property), \
        "raylm.compat: PlacementGroupHandle.placement_group is gone (written for Ray 2.60)"


def test_a_worker_group_without_that_state_raises_a_clear_error():
    with pytest.raises(ray_compat.CompatError, match=r"get_worker_group_state\(\).* is gone in Ray"):
        ray_compat.worker_group_placement_group(object())


def test_placement_group_from_hex_ray_2_60():
    from ray.util.placement_group import PlacementGroup

    group_id = "ab" * 18  # Ray 2.60's placement group ids are 18 bytes
    group = _contract(ray_compat.placement_group_from_hex, group_id)
    assert isinstance(group, PlacementGroup) and group.id.hex() == group_id


def test_run_storage_ray_2_60(tmp_path):
    from ray.train.v2._internal.execution.storage import StorageContext
    from ray.train.v2.api.context import TrainContext

    assert callable(getattr(TrainContext, "get_storage", None)), \
        "raylm.compat: TrainContext.get_storage is gone (written for Ray 2.60)"
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="run")
    # A worker's context hands out Ray's own StorageContext; this stand-in hands out a real one.
    context = types.SimpleNamespace(get_storage=lambda: storage)
    found = _contract(ray_compat.run_storage, context)
    assert found.path == storage.experiment_fs_path and found.path.endswith("run")
    assert found.filesystem is storage.storage_filesystem
    with pytest.raises(ray_compat.CompatError, match="get_storage.* is gone in Ray"):
        ray_compat.run_storage(types.SimpleNamespace(get_storage=lambda: object()))


def test_result_grid_trials_ray_2_60():
    from ray.tune import ResultGrid

    analysis = types.SimpleNamespace(trials=[])  # the ExperimentAnalysis Tune builds after a run
    assert _contract(ray_compat.result_grid_trials, ResultGrid(analysis)) == []


def _render_ray_haproxy_config(folder, host: str, ports: dict[str, int]) -> str:
    """The HAProxy configuration Ray 2.60's Serve writes (its own template and renderer), in ``folder``."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    config = HAProxyConfig(http_options=HTTPOptions(host=host, port=ports["serve"]), stats_port=ports["stats"],
                           metrics_port=ports["metrics"], socket_path=str(folder / "admin.sock"),
                           metrics_socket_path=str(folder / "metrics.sock"),
                           server_state_base=str(folder), server_state_file=str(folder / "state"))
    api = HAProxyApi(cfg=config, config_file_path=str(folder / "node" / "haproxy.cfg"))
    api._generate_config_file_internal()
    return api.config_file_path


def _bind_lines(path) -> list[str]:
    return sorted(line.strip() for line in open(path, encoding="utf-8") if line.strip().startswith("bind "))


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_haproxy_stats_and_exporter_move_to_loopback_ray_2_60(tmp_path, monkeypatch, host):
    """Ray's HAProxy template binds the stats page and the Prometheus exporter on every interface, with no
    setting for it; raylm's launcher moves those two binds (and only those) to 127.0.0.1, and the real
    HAProxy accepts the result (``-c``: check the configuration)."""
    import subprocess

    from raylm.serving.ingress import _real_haproxy_binary, write_recording_launcher

    binary = _real_haproxy_binary()
    if binary is None:
        pytest.skip("no HAProxy binary (ray-haproxy ships one for Linux)")
    ports = {"serve": 18100, "stats": 18404, "metrics": 19101}
    path = _render_ray_haproxy_config(tmp_path, host, ports)
    frontend = "*" if host == "0.0.0.0" else host
    assert _bind_lines(path) == sorted(["bind *:18404", "bind :19101", f"bind {frontend}:18100"]), \
        "Ray's HAProxy template binds its stats page and exporter differently from Ray 2.60: re-check " \
        "raylm.compat.ray.haproxy_bind_rewrite"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "19101")
    checked = subprocess.run([write_recording_launcher(str(tmp_path), binary), "-c", "-f", path],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    # The served port keeps the host it was configured with.
    assert _bind_lines(path) == sorted(["bind 127.0.0.1:18404", "bind 127.0.0.1:19101", f"bind {frontend}:18100"])
    # The launcher reads the ports from Ray's variables, with Ray's defaults when they are unset.
    constants = inspect.getsource(importlib.import_module("ray.serve._private.constants"))
    for key, default in ray_compat.HAPROXY_MONITOR_PORTS.items():
        assert re.search(rf'"{key}",\s*"?{default}"?\s*\)', constants), f"{key} (default {default}) changed"


def test_running_serve_http_host_ray_2_60():
    from ray.serve._private.client import ServeControllerClient
    from ray.serve.context import _get_global_client

    # What running_serve_http_host calls, with the keyword it passes; unit tests start no Ray, so the
    # controller client itself is checked for the property it reads (test_serve_deploy_auth.py asks a real one).
    assert "raise_if_no_controller_running" in inspect.signature(_get_global_client).parameters, \
        "raylm.compat: ray.serve.context._get_global_client(raise_if_no_controller_running=) is gone (Ray 2.60)"
    assert isinstance(getattr(ServeControllerClient, "http_config", None), property), \
        "raylm.compat: ServeControllerClient.http_config is gone (written for Ray 2.60)"
    # Without a Ray connection it answers "no Serve running" and starts nothing. In a fresh process: in the
    # full suite this one is already connected to the integration tests' Ray.
    import subprocess
    import sys

    probe = ("import ray\nfrom raylm.compat.ray import running_serve_http_host\n"
             "print(running_serve_http_host(), ray.is_initialized())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(False, None) False", result.stdout + result.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="Ray Serve LLM needs vLLM (make install-vllm)")
def test_ray_serve_llm_openai_app_and_model_card_ray_2_60():
    from fastapi import FastAPI
    from ray.serve.llm import LLMConfig

    app = ray_compat.llm_openai_fastapi_app()
    assert isinstance(app, FastAPI) and app.user_middleware, "Ray Serve LLM's FastAPI app lost its middleware"
    config = LLMConfig(model_loading_config={"model_id": "m", "model_source": "/nowhere"},
                       accelerator_config={"kind": "cpu"})
    card = ray_compat.llm_model_card("m", config)
    assert (card.id, card.object) == ("m", "model")


# --------------------------------------------------------------------------- sacrebleu 2.6


def test_sacrebleu_is_the_version_the_compat_module_was_written_for():
    import sacrebleu

    assert sacrebleu.__version__.startswith(sacrebleu_compat.WRITTEN_FOR + "."), (
        f"raylm.compat.sacrebleu was written for sacrebleu {sacrebleu_compat.WRITTEN_FOR}; "
        f"{sacrebleu.__version__} is installed: re-check raylm/compat/sacrebleu.py, then update WRITTEN_FOR")


@pytest.mark.parametrize("kind", ["bleu", "chrf"])
def test_sufficient_statistics_give_sacrebleus_corpus_score_sacrebleu_2_6(kind):
    import numpy as np
    import sacrebleu
    from sacrebleu.metrics import BLEU, CHRF

    hypotheses = ["the cat sat on the mat", "a dog barks", "hello world there"]
    references = ["the cat sat on a mat", "the dog barks loudly", "hello there world"]
    metric = BLEU() if kind == "bleu" else CHRF()
    rows = _contract(sacrebleu_compat.corpus_statistics, metric, hypotheses, [references])
    assert len(rows) == len(hypotheses)
    score = _contract(sacrebleu_compat.score_from_statistics, metric, np.asarray(rows).sum(0).tolist())
    expected = (sacrebleu.corpus_bleu if kind == "bleu" else sacrebleu.corpus_chrf)(hypotheses, [references]).score
    assert score == pytest.approx(expected)


def test_a_missing_sacrebleu_method_names_itself_and_the_version():
    with pytest.raises(sacrebleu_compat.CompatError,
                       match=r"raylm.compat: sacrebleu.metrics.object._extract_corpus_statistics is gone in "
                             r"sacrebleu \S+ \(written for 2.6\)"):
        sacrebleu_compat.corpus_statistics(object(), ["a"], [["a"]])


# --------------------------------------------------------------------------- transformers 5.24


def test_transformers_is_the_version_the_compat_module_was_written_for():
    import transformers

    assert transformers.__version__.startswith(transformers_compat.WRITTEN_FOR + "."), (
        f"raylm.compat.transformers was written for transformers {transformers_compat.WRITTEN_FOR}; "
        f"{transformers.__version__} is installed: re-check raylm/compat/transformers.py, then update WRITTEN_FOR")


def test_attention_implementation_transformers_5_24():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8))
    model.config._attn_implementation = "sdpa"
    assert _contract(transformers_compat.attention_implementation, model) == "sdpa"
    model.config._attn_implementation = "eager"
    assert _contract(transformers_compat.attention_implementation, model) == "eager"
    assert transformers_compat.attention_implementation(types.SimpleNamespace()) is None  # not a transformers model
