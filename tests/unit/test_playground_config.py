"""The playground without Ray or a browser: ``serve.playground`` (its default and its validation), the page's
package files and headers, and the routes a replica's app gets with and without it (driven as ASGI).

The page in a real browser: tests/integration/test_playground.py.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from raylm.config import ConfigError, ServeConfig, load_config
from raylm.serving.playground import CONTENT_SECURITY_POLICY, PLAYGROUND_PATHS, read_page_files
from raylm.serving.routes import build_api


@pytest.mark.parametrize("host, local_server, expected", [
    ("127.0.0.1", True, True), ("localhost", True, True), ("::1", True, True),
    ("0.0.0.0", True, False), ("10.1.2.3", True, False), (None, True, False),
    ("127.0.0.1", False, False),  # serve run, serve deploy, raylm deploy, the demo
])
def test_the_playground_is_on_by_default_only_for_raylm_serve_on_loopback(host, local_server, expected):
    assert ServeConfig().playground is None
    assert ServeConfig().playground_enabled(host, local_server) is expected
    # Set, it wins either way.
    assert ServeConfig(playground=True).playground_enabled(host, local_server) is True
    assert ServeConfig(playground=False).playground_enabled(host, local_server) is False


def test_serve_playground_is_validated_like_the_other_serve_keys():
    assert load_config(None, ["serve.playground=false"]).serve.playground is False
    assert load_config(None, ["serve.playground=true"]).serve.playground is True
    with pytest.raises(ConfigError) as error:
        load_config(None, ["serve.playground=maybe"])
    assert str(error.value).startswith("config error: serve.playground: ") and "\n" not in str(error.value)


def test_the_page_loads_nothing_from_elsewhere():
    files = read_page_files()
    assert set(files) == set(PLAYGROUND_PATHS)
    html = files["/playground"][0].decode()
    # Its script and style are the package's own files, beside the page; nothing inline.
    assert re.findall(r'(?:src|href)="([^"#]+)"', html) == ["data:,", "playground/app.css", "playground/app.js"]
    assert "<style" not in html and " style=" not in html and "<script>" not in html
    for path, (content, _) in files.items():
        text = content.decode()
        assert not re.search(r"https?://|//[a-z]", text.replace("http://www.w3.org", "")), path
    policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"


def _get(app, path: str, headers=()) -> tuple[int, dict[str, str], bytes]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 80),
             "headers": [(key.lower().encode(), value.encode()) for key, value in headers]}
    asyncio.run(app(scope, receive, send))
    response_headers = {key.decode(): value.decode() for key, value in sent[0]["headers"]}
    return sent[0]["status"], response_headers, b"".join(message.get("body", b"") for message in sent[1:])


class _Replica:
    """What build_api reads of a replica when only GET routes that touch no model are called."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.started = 0.0


def test_the_page_is_served_without_a_key_only_when_the_playground_is_on():
    api = build_api(_Replica(ServeConfig(api_key="k3y", playground=True)))
    for path in PLAYGROUND_PATHS:
        status, headers, body = _get(api, path)
        assert status == 200 and body, path
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert headers["x-content-type-options"] == "nosniff"
    assert _get(api, "/playground")[1]["content-type"].startswith("text/html")
    assert _get(api, "/v1/models")[0] == 401  # every call the page makes still needs the key
    assert _get(api, "/playground/other.js")[0] == 401  # only the page's own files are open
    closed = build_api(_Replica(ServeConfig(api_key="k3y", playground=False)))
    assert _get(closed, "/playground")[0] == 401
    assert _get(closed, "/playground", [("Authorization", "Bearer k3y")])[0] == 404
    assert _get(build_api(_Replica(ServeConfig())), "/playground")[0] == 404  # the default, unresolved: off
