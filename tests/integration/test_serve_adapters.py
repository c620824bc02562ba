"""LoRA adapters served side by side (serve.adapters), over real HTTP against real Serve: one replica holds the
base once and loads adapters on first use; the OpenAI `model` field and serve.models select them; each answers as
it does alone, concurrently too; beyond serve.max_adapters_per_replica the least recently used is unloaded; an
alias moved to a new adapter version is served without a restart."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from raylm.config import ServeConfig
from tests.conftest import SERVE_PORT
from tests.model_folders import build_adapter_folder, register_with_alias

APP, PREFIX = "raylm-adapters", "/adapters"
MAX_TOKENS = 10
PROMPTS = ["the cat sat on", "once upon a time", "question: who wrote it?"]


def _greedy_alone(folder, prompts=PROMPTS) -> list[str]:
    """What the model folder answers served alone: raylm's engine on the folder (an adapter merged into its base)."""
    from raylm.inference.engine import Engine
    from raylm.inference.task_model import GenerationRequest, SamplingParams

    engine = Engine.from_directory(folder)
    return [result.text for result in engine.generate(
        [GenerationRequest(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)) for prompt in prompts])]


@pytest.fixture(scope="module")
def served(ray_session, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from raylm.serving.app import build_app, check_model_references

    root = tmp_path_factory.mktemp("adapters")
    folders = {key: build_adapter_folder(tiny_model_dir, root / key, seed=seed)
               for seed, key in enumerate(["a", "b", "c", "v1", "v2"], start=1)}
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    live = register_with_alias(folders["v1"], tracking_uri, "tiny-adapter", "prod")
    config = ServeConfig(port=SERVE_PORT, route_prefix=PREFIX, model_path=str(tiny_model_dir), max_new_tokens=MAX_TOKENS,
                         adapters={"a": str(folders["a"]), "b": str(folders["b"]), "c": str(folders["c"]), "live": live},
                         models={"translate": "b"}, max_adapters_per_replica=2, adapter_alias_ttl_s=0.5,
                         batch_wait_timeout_s=0.05)
    check_model_references(config, tracking_uri)
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    serve.run(build_app(None, config, tracking_uri), name=APP, route_prefix=PREFIX)
    expected = {key: _greedy_alone(folder) for key, folder in {"base": tiny_model_dir, **folders}.items()}
    assert len({tuple(texts) for texts in expected.values()}) == len(expected), \
        "each test adapter must answer differently from the base and the others, or these tests prove nothing"
    yield {"url": f"http://127.0.0.1:{SERVE_PORT}{PREFIX}", "folders": folders, "expected": expected,
           "tracking_uri": tracking_uri, "base_dir": tiny_model_dir}
    serve.delete(APP)


def _complete(served, model: str, prompt: str) -> str:
    response = requests.post(f"{served['url']}/v1/completions", timeout=120,
                             json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.json()["choices"][0]["text"]


def _health(served) -> dict:
    return requests.get(f"{served['url']}/healthz", timeout=30).json()


def test_models_lists_the_base_and_every_adapter_with_its_parent(served):
    data = requests.get(f"{served['url']}/v1/models", timeout=30).json()["data"]
    base = data[0]["id"]
    assert [entry["id"] for entry in data] == [base, "a", "b", "c", "live"]
    assert all(entry["parent"] == base for entry in data[1:]) and "parent" not in data[0]


def test_each_adapter_answers_as_it_does_alone_through_the_openai_client(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0)
    base = requests.get(f"{served['url']}/v1/models", timeout=30).json()["data"][0]["id"]
    for model, key in [("a", "a"), (base, "base"), ("b", "b"), ("a", "a")]:
        texts = [client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
                 .choices[0].text for prompt in PROMPTS]
        assert texts == served["expected"][key], model


def test_requests_for_two_adapters_at_once_each_get_their_adapters_answer(served):
    jobs = [(model, index) for index in range(len(PROMPTS)) for model in ("a", "b")] * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: _complete(served, job[0], PROMPTS[job[1]]), jobs))
    for (model, index), answer in zip(jobs, answers):
        assert answer == served["expected"][model][index], (model, index)


def test_a_task_route_answers_with_the_adapter_serve_models_names(served):
    from raylm.inference.engine import Engine

    text = "a man rides a horse"
    alone = {key: Engine.from_directory(folder).translate([text], MAX_TOKENS)[0]
             for key, folder in [("b", served["folders"]["b"]), ("base", served["base_dir"])]}
    assert alone["b"] != alone["base"]
    response = requests.post(f"{served['url']}/v1/translate", json={"text": text}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["translation"] == alone["b"]
    assert _health(served)["tasks"]["translate"] == "b"


def test_beyond_the_limit_the_least_recently_used_adapter_is_unloaded_and_comes_back_on_demand(served):
    for model in ("a", "b", "c"):
        assert _complete(served, model, PROMPTS[0]) == served["expected"][model][0]
    adapters = _health(served)["adapters"]
    assert adapters["max_per_replica"] == 2
    assert sorted(entry["id"] for entry in adapters["loaded"]) == ["b", "c"]  # "a" was the least recently used
    assert _complete(served, "a", PROMPTS[1]) == served["expected"]["a"][1]
    assert sorted(entry["id"] for entry in _health(served)["adapters"]["loaded"]) == ["a", "c"]


def test_an_alias_moved_to_a_new_adapter_version_is_served_without_a_restart(served):
    assert _complete(served, "live", PROMPTS[0]) == served["expected"]["v1"][0]
    before = _health(served)
    assert {"id": "live", "version": "1"} in before["adapters"]["loaded"]
    register_with_alias(served["folders"]["v2"], served["tracking_uri"], "tiny-adapter", "prod")  # version 2
    deadline = time.monotonic() + 30
    while (answer := _complete(served, "live", PROMPTS[0])) != served["expected"]["v2"][0]:
        assert answer == served["expected"]["v1"][0]
        assert time.monotonic() < deadline, "the moved alias was not served within 30 s"
        time.sleep(0.2)
    after = _health(served)
    assert {"id": "live", "version": "2"} in after["adapters"]["loaded"]
    assert after["uptime_s"] > before["uptime_s"], "the replica restarted"
    assert [_complete(served, "live", prompt) for prompt in PROMPTS] == served["expected"]["v2"]


def test_an_unknown_model_is_a_404_naming_what_is_served(served):
    response = requests.post(f"{served['url']}/v1/completions", json={"model": "nope", "prompt": "hi"}, timeout=30)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'nope' is not served here" in error["message"] and "a, b, c, live" in error["message"]
