"""Serving without Ray: the serve config and the deployment options it becomes, the serve YAML files, the
request schemas, and the guard that checks the API key and the body size before any parsing."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import yaml
from pydantic import ValidationError

from raylm.config import ConfigError, ServeConfig, load_config, validate_config
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("overrides, fragment", [
    (["serve.max_batch_size=100"], "max_ongoing_requests (64) must be >= max_batch_size (100)"),
    (["serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2"], "min_replicas (3) must be <="),
    (["serve.autoscaling.initial_replicas=5"], "initial_replicas (5)"),
    (["serve.autoscaling.target_ongoing_requests=500"], "target_ongoing_requests (500.0) must be <="),
    (["serve.device=cuda"], "num_gpus_per_replica is 0"),
    (["serve.device=cpu", "serve.num_gpus_per_replica=1"], "never used"),
    (["serve.models.summarize=x"], "serve.models.summarize"),
    (["serve.max_queued_requests=0"], "serve.max_queued_requests"),
    (["serve.batch_wait_timeout_s=-1"], "serve.batch_wait_timeout_s"),
    (["serve.autoscaling.upscale_delay=3"], "serve.autoscaling.upscale_delay: unknown key"),
    (["serve.max_request_tokens=0"], "serve.max_request_tokens"),
    (["serve.max_request_tokens=32"], "max_request_tokens (32) must be >= max_new_tokens (64)"),
])
def test_bad_serve_settings_are_one_line_config_errors(overrides, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_task_models_default_to_model_path():
    config = ServeConfig(model_path="models:/m@prod", models={"sentiment": "/models/clf"})
    assert config.task_models() == {"sentiment": "/models/clf", "qa": "models:/m@prod", "translate": "models:/m@prod",
                                    "completions": "models:/m@prod", "chat": "models:/m@prod"}
    assert ServeConfig(models={"qa": "/q"}).task_models() == {"qa": "/q"}
    assert ServeConfig(num_gpus_per_replica=1).resolved_device() == "cuda"
    assert ServeConfig().resolved_device() == "cpu"


def test_deployment_options_carry_replicas_autoscaling_queue_and_resources():
    from raylm.serving.app import deployment_options

    fixed = deployment_options(ServeConfig(num_replicas=3, num_cpus_per_replica=2, max_queued_requests=10,
                                           retry_after_s=4))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.0}
    assert fixed["max_queued_requests"] == 10 and fixed["max_ongoing_requests"] == 64
    assert (fixed["backpressure_config"].status_code, fixed["backpressure_config"].retry_after_s) == (503, 4)
    scaled = deployment_options(ServeConfig(
        num_gpus_per_replica=1, autoscaling={"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8,
                                             "upscale_delay_s": 2, "downscale_delay_s": 30}))
    assert "num_replicas" not in scaled and scaled["ray_actor_options"]["num_gpus"] == 1
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                            "target_ongoing_requests": 8, "upscale_delay_s": 2,
                                            "downscale_delay_s": 30}


@pytest.fixture
def key_home(tmp_path, monkeypatch):
    """A home folder of its own, no key in the environment: ``~/.raylm/api_key`` is whatever the test writes."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    monkeypatch.delenv("RAYLM_API_KEY_FILE", raising=False)
    return tmp_path


def _write_key(home, text="k3y-from-file\n"):
    (home / ".raylm").mkdir(exist_ok=True)
    (home / ".raylm" / "api_key").write_text(text)
    return home / ".raylm" / "api_key"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "serve").glob("*.yaml")), ids=lambda p: p.name)
def test_serve_files_build_the_app_with_their_settings(path, key_home):
    from ray.serve.config import AutoscalingConfig

    from raylm.serving.app import app_builder

    _write_key(key_home)  # where cluster.yaml mounts it: config_gpu.yaml names it
    application = yaml.safe_load(path.read_text())["applications"][0]
    assert application["import_path"] == "raylm.serving.app:app_builder"
    built = app_builder(application["args"])
    deployment = built._bound_deployment
    config = deployment._deployment_config
    assert config.max_ongoing_requests == application["args"]["max_ongoing_requests"]
    assert config.max_queued_requests == application["args"]["max_queued_requests"]
    scaling = config.autoscaling_config
    assert isinstance(scaling, AutoscalingConfig)
    assert scaling.max_replicas == application["args"]["autoscaling"]["max_replicas"]
    gpus = application["args"].get("num_gpus_per_replica", 0)
    assert deployment.ray_actor_options["num_gpus"] == gpus


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "serve").glob("*.yaml")), ids=lambda p: p.name)
def test_serve_files_that_listen_beyond_loopback_need_their_key_file(path, key_home):
    from raylm.config import is_loopback

    loaded = yaml.safe_load(path.read_text())
    host = loaded["http_options"]["host"]
    args = {key: value for key, value in loaded["applications"][0]["args"].items() if key != "tracking_uri"}
    config = validate_config({"serve": args}).serve
    if is_loopback(host):
        config.check_exposure(host)
        return
    assert config.api_key_file == "~/.raylm/api_key"  # as cluster.yaml mounts it, "~" expanded on each node
    with pytest.raises(ConfigError, match=r"^config error: serve.api_key_file: cannot read ~/.raylm/api_key "
                                          r"on this node \(No such file or directory\)$"):
        config.check_exposure(host)
    _write_key(key_home)
    config.check_exposure(host)
    assert config.api_key_value() == "k3y-from-file"


def test_app_builder_rejects_bad_args(monkeypatch):
    from raylm.serving.app import app_builder

    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="serve args: max_batch_sise: unknown key"):
        app_builder({"model_path": "x", "max_batch_sise": 4})
    with pytest.raises(ConfigError, match="need model_path"):
        app_builder({})


def test_api_key_file_is_read_where_the_key_is_needed(key_home):
    key_file = _write_key(key_home, "  s3cret-in-a-file \n")
    job = load_config(None, ["serve.api_key_file=~/.raylm/api_key"])
    assert job.serve.api_key_file == "~/.raylm/api_key"  # kept as written: each node expands "~" itself
    assert job.serve.api_key_value() == "s3cret-in-a-file"
    dumped = json.dumps(job.public_dict())
    assert "s3cret" not in dumped and "s3cret" not in job.to_yaml() and "~/.raylm/api_key" in dumped
    # A replica validates the dump it is given and reads the file again, on its own node.
    assert ServeConfig.model_validate(job.serve.model_dump()).api_key_value() == "s3cret-in-a-file"
    key_file.write_text("rotated\n")
    assert job.serve.api_key_value() == "rotated"


@pytest.mark.parametrize("content, fragment", [
    (None, "cannot read ~/.raylm/api_key on this node (No such file or directory)"),
    ("", "~/.raylm/api_key is empty"),
    (" \n\n", "~/.raylm/api_key is empty"),
    ("one\ntwo\n", "~/.raylm/api_key holds more than one line; it must hold the key alone"),
    ("folder", "cannot read ~/.raylm/api_key on this node (Is a directory)"),
])
def test_an_unusable_key_file_is_one_config_error(key_home, content, fragment):
    if content == "folder":
        (key_home / ".raylm" / "api_key").mkdir(parents=True)
    elif content is not None:
        _write_key(key_home, content)
    config = load_config(None, ["serve.api_key_file=~/.raylm/api_key"]).serve  # loading does not read it
    for check in (config.api_key_value, lambda: config.check_exposure("127.0.0.1")):
        with pytest.raises(ConfigError) as info:
            check()
        assert str(info.value) == f"config error: serve.api_key_file: {fragment}" and "two" not in str(info.value)


def test_one_key_source(key_home, monkeypatch, tmp_path):
    config_file = tmp_path / "both.yaml"
    config_file.write_text("serve:\n  api_key: k1\n  api_key_file: ~/.raylm/api_key\n")
    with pytest.raises(ConfigError, match=r"^config error: serve: api_key and api_key_file are both given: "
                                          r"keep one \(on a cluster, the key file\)$"):
        load_config(config_file)
    key_file = _write_key(key_home, "from-file")
    monkeypatch.setenv("RAYLM_API_KEY_FILE", str(key_file))
    assert load_config().serve.api_key_value() == "from-file"
    monkeypatch.setenv("RAYLM_API_KEY", "from-env")
    with pytest.raises(ConfigError, match=r"\$RAYLM_API_KEY and \$RAYLM_API_KEY_FILE are both set: keep one"):
        load_config()
    monkeypatch.delenv("RAYLM_API_KEY_FILE")
    assert load_config().serve.api_key_value() == "from-env"
    # A key file named in the config wins over the environment's key.
    assert load_config(None, ["serve.api_key_file=~/.raylm/api_key"]).serve.api_key_value() == "from-file"


@pytest.mark.parametrize("override", ["serve.api_key=sk-abc123", "serve.api_key='sk-abc123'", " serve.api_key =x"])
def test_api_key_override_is_refused_with_a_hint(override, key_home):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["serve.port=9000", override])
    message = str(info.value)
    assert message == ("config error: serve.api_key is not taken on the command line (shell history, process lists "
                       "and job records keep it): set $RAYLM_API_KEY in the environment, or name a file that holds "
                       "the key in serve.api_key_file")
    assert "sk-abc123" not in message
    # The key file and the switch are ordinary overrides.
    job = load_config(None, ["serve.api_key_file=/keys/k", "serve.allow_unauthenticated=true"])
    assert job.serve.api_key_file == "/keys/k" and job.serve.allow_unauthenticated


@pytest.mark.parametrize("host, key, allowed, refused", [
    ("127.0.0.1", None, False, False), ("localhost", None, False, False), ("::1", None, False, False),
    ("127.0.0.2", None, False, False), (None, None, False, False),
    ("0.0.0.0", None, False, True), ("::", None, False, True), ("10.0.0.5", None, False, True),
    ("serve.internal", None, False, True),
    ("0.0.0.0", "k3y", False, False), ("0.0.0.0", None, True, False),
])
def test_fail_closed_beyond_loopback(host, key, allowed, refused, key_home):
    config = ServeConfig(api_key=key, allow_unauthenticated=allowed)
    if not refused:
        config.check_exposure(host)
        return
    with pytest.raises(ConfigError) as info:
        config.check_exposure(host)
    assert str(info.value) == (
        f"config error: Serve listens on {host}, not a loopback address, and serve has no API key: name a file "
        "that holds one in serve.api_key_file (or set $RAYLM_API_KEY where the app is built), or set "
        "serve.allow_unauthenticated: true to serve without one")


def test_build_app_fails_closed_and_serve_shows_the_builders_line(key_home, tmp_path):
    from ray.serve.exceptions import RayServeException

    from raylm.serving.app import app_builder, build_app

    with pytest.raises(ConfigError, match="Serve listens on 0.0.0.0"):
        build_app("some/model", ServeConfig(), host="0.0.0.0")
    assert build_app("some/model", ServeConfig(allow_unauthenticated=True), host="0.0.0.0") is not None
    assert build_app("some/model", ServeConfig(), host="127.0.0.1") is not None
    _write_key(key_home)
    assert build_app("some/model", ServeConfig(api_key_file="~/.raylm/api_key"), host="0.0.0.0") is not None
    # No Ray here: the builder takes the host a Serve started now would get (127.0.0.1).
    assert app_builder({"model_path": "some/model"}) is not None
    with pytest.raises(RayServeException) as info:  # Serve shows such an error's message alone
        app_builder({"model_path": "some/model", "api_key_file": str(tmp_path / "missing")})
    assert isinstance(info.value, ConfigError)
    assert str(info.value).startswith("config error: serve args: api_key_file: cannot read ")


def test_api_key_comes_from_the_environment_and_never_reaches_dumps(monkeypatch):
    monkeypatch.setenv("RAYLM_API_KEY", "s3cret")
    job = load_config(None, [])
    assert job.serve.api_key_value() == "s3cret"
    assert "s3cret" not in json.dumps(job.public_dict()) and "s3cret" not in job.to_yaml()


def test_the_request_token_budget_defaults_to_one_full_batch_of_the_model():
    # One request may ask for at most what one model call can hold: max_batch_size rows of the full context.
    assert ServeConfig().max_request_tokens is None
    assert ServeConfig().request_token_budget(1024) == 32 * 1024
    assert ServeConfig(max_batch_size=4).request_token_budget(256) == 4 * 256
    assert ServeConfig(max_request_tokens=500).request_token_budget(256) == 500  # a set value wins
    assert load_config(None, ["serve.max_request_tokens=4096"]).serve.request_token_budget(10) == 4096


def test_request_tokens_are_inputs_x_n_x_max_tokens_and_over_the_limit_a_400():
    from raylm.serving.guard import APIError, check_request_tokens

    # At the limit: allowed, and the count is returned.
    assert check_request_tokens([40] * 4, 2, 320, unit="prompt", budget_name="max_tokens", limit_source="s") == 320
    assert check_request_tokens([8] * 40, 1, 320, unit="input", budget_name="max_new_tokens",
                                limit_source="s") == 320
    cases = [  # (max_tokens per input, n, unit, limit) -> what the message says
        ([107] * 3, 1, "prompt", 320, "up to 321 tokens (3 prompts x max_tokens=107); the limit is 320 per "
                                      "request (s)"),
        ([107], 3, None, 320, "up to 321 tokens (n=3 x max_tokens=107)"),  # chat: one conversation, n copies
        ([41], 4, "prompt", 160, "up to 164 tokens (1 prompt x n=4 x max_tokens=41)"),
        ([16, 16, 5] * 3, 4, "prompt", 320, "up to 444 tokens (9 prompts x n=4 x max_tokens up to 16 each)"),
    ]
    for max_tokens, copies, unit, limit, message in cases:
        with pytest.raises(APIError) as refused:
            check_request_tokens(max_tokens, copies, limit, unit=unit, budget_name="max_tokens", limit_source="s")
        assert message in refused.value.message
        assert (refused.value.status, refused.value.code, refused.value.param) == \
            (400, "max_request_tokens_exceeded", "max_tokens")
    # The largest completion the schema allows (64 prompts, n = 16, a 1024-token context) is over the default.
    with pytest.raises(APIError, match="up to 1048576 tokens"):
        check_request_tokens([1024] * 64, 16, ServeConfig().request_token_budget(1024), unit="prompt",
                             budget_name="max_tokens", limit_source="serve.max_request_tokens")


# ------------------------------------------------------------------ schemas


def test_openai_schemas_validate_what_they_use_and_ignore_the_rest():
    from raylm.serving.schemas import ChatCompletionRequest, CompletionRequest

    request = CompletionRequest.model_validate({"prompt": "hi", "temperature": 0, "user": "u", "logit_bias": {},
                                                "presence_penalty": 0.5, "stop": "\n"})
    assert request.prompts() == ["hi"] and request.stop_sequences() == ("\n",) and request.temperature == 0
    assert CompletionRequest.model_validate({"prompt": [[1, 2], [3]]}).prompts() == [(1, 2), (3,)]
    assert CompletionRequest.model_validate({"prompt": [5, 6]}).prompts() == [(5, 6)]
    for bad in ({"prompt": "hi", "temperature": math.nan}, {"prompt": "hi", "temperature": math.inf},
                {"prompt": "hi", "temperature": -1}, {"prompt": "hi", "temperature": 2.5},
                {"prompt": "hi", "temperature": "1"}, {"prompt": "hi", "temperature": True},
                {"prompt": "hi", "top_p": 0}, {"prompt": "hi", "max_tokens": 0}, {"prompt": "hi", "max_tokens": 1.5},
                {"prompt": "hi", "n": 17}, {"prompt": "hi", "stop": ["a"] * 5}, {"prompt": "hi", "stop": [""]},
                {"prompt": ""}, {"prompt": []}, {"prompt": [[]]}, {"prompt": 7}, {"prompt": "hi", "logprobs": 9},
                {"prompt": "hi", "stream_options": {"include_usage": True}}, {"prompt": "hi", "stream": "yes"}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "tools": [], "max_completion_tokens": 3})
    assert chat.messages[0].text() == "ab" and chat.token_budget() == 3
    for bad in ({"messages": []}, {"messages": [{"role": "user", "content": "   "}]},
                {"messages": [{"role": "tool", "content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(bad)


def test_task_schemas_take_one_input_or_a_list():
    from raylm.serving.schemas import QARequest, SentimentRequest, TranslateRequest

    assert [item.text for item in SentimentRequest.model_validate({"text": "a"}).items()] == ["a"]
    listed = QARequest.model_validate({"inputs": [{"context": "c", "question": "q"}] * 2})
    assert len(listed.items()) == 2
    assert TranslateRequest.model_validate({"text": "t", "max_new_tokens": 3}).items()[0].max_new_tokens == 3
    for model, bad in ((SentimentRequest, {}), (SentimentRequest, {"text": " "}), (SentimentRequest, {"text": 1}),
                       (SentimentRequest, {"inputs": []}), (SentimentRequest, {"inputs": [{"text": ""}]}),
                       (SentimentRequest, {"text": "a", "inputs": [{"text": "b"}]}), (QARequest, {"context": "c"}),
                       (TranslateRequest, {"text": "t", "colour": 1})):
        with pytest.raises(ValidationError):
            model.model_validate(bad)


# ------------------------------------------------------------------ the guard


def _call(app, path: str, body: bytes = b"", headers=(), method: str = "POST", chunks=None, root_path: str = ""):
    """Run an ASGI app once; returns (status, headers, body) and whether the inner app ran."""
    messages = [{"type": "http.request", "body": part, "more_body": index < len(chunks) - 1}
                for index, part in enumerate(chunks)] if chunks else [{"type": "http.request", "body": body}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": method, "root_path": root_path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    payload = b"".join(message.get("body", b"") for message in sent[1:])
    return status, json.loads(payload) if payload else None


def _inner():
    calls = []

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        calls.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"echo": body.decode()}).encode()})

    return app, calls


def test_guard_checks_the_key_before_reading_the_body():
    from raylm.serving.guard import GuardMiddleware

    inner, calls = _inner()
    guard = GuardMiddleware(inner, api_key="k3y", max_body_bytes=100)
    status, body = _call(guard, "/v1/sentiment", b'{"not": "valid for the route"}')
    assert status == 401 and "API key" in body["error"] and calls == []
    status, body = _call(guard, "/v1/completions", b"{}", headers=[("Authorization", "Bearer wrong")])
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and calls == []
    assert _call(guard, "/docs", method="GET")[0] == 401 and _call(guard, "/openapi.json", method="GET")[0] == 401
    assert _call(guard, "/healthz", method="GET")[0] == 200
    status, body = _call(guard, "/v1/sentiment", b'{"text": "x"}', headers=[("authorization", "bearer k3y")])
    assert status == 200 and body == {"echo": '{"text": "x"}'}


def test_guard_limits_the_body_before_parsing():
    from raylm.serving.guard import GuardMiddleware

    inner, calls = _inner()
    guard = GuardMiddleware(inner, api_key=None, max_body_bytes=100)
    status, body = _call(guard, "/v1/translate", b"x" * 101, headers=[("Content-Length", "101")])
    assert status == 413 and "larger than 100 bytes" in body["error"]
    # A body sent in chunks without Content-Length is counted as it arrives.
    status, _ = _call(guard, "/v1/translate", chunks=[b"x" * 60, b"x" * 60])
    assert status == 413 and calls == []
    status, body = _call(guard, "/v1/translate", chunks=[b"ab", b"cd"])
    assert status == 200 and body == {"echo": "abcd"}
    status, body = _call(guard, "/v1/completions", b"x" * 200, headers=[("Content-Length", "200")])
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_guard_judges_paths_below_the_route_prefix():
    from raylm.serving.guard import GuardMiddleware

    inner, _ = _inner()
    guard = GuardMiddleware(inner, api_key="k3y", max_body_bytes=100)
    # An app deployed at /open: its health check stays open, its OpenAI routes answer in OpenAI's shape.
    assert _call(guard, "/open/healthz", method="GET", root_path="/open")[0] == 200
    status, body = _call(guard, "/open/v1/chat/completions", b"{}", root_path="/open")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = _call(guard, "/open/v1/qa", b"{}", root_path="/open")
    assert status == 401 and isinstance(body["error"], str)
