"""`raylm serve` as a user runs it: a subprocess with its own local Ray, stopped by SIGTERM while requests
are in flight. Every in-flight request must still get its whole answer, and the command must exit 0
without a stack dump; after it, nothing listens on the port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import requests

from tests.conftest import REPO_ROOT

PORT = 8220


def _start_serve(model_dir, workdir):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "platform"), "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAYLM_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, "-m", "raylm.cli", "serve", "--model", str(model_dir), f"workdir={workdir}",
         f"serve.port={PORT}", "serve.max_new_tokens=200", "train.num_workers=1"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir
    process = _start_serve(model_dir, tmp_path)
    lines: list[str] = []
    ready = threading.Event()

    def read_output() -> None:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("[raylm] serving "):
                ready.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        assert ready.wait(300), "raylm serve did not come up:\n" + "".join(lines[-40:])
        url = f"http://127.0.0.1:{PORT}/v1/completions"
        results: dict[int, tuple] = {}
        streaming_started = threading.Event()

        def call(index: int) -> None:
            stream = index % 2 == 0
            body = {"prompt": "once upon a time", "max_tokens": 150, "temperature": 1.0, "seed": index,
                    "stream": stream}
            with requests.post(url, json=body, timeout=300, stream=stream) as response:
                if not stream:
                    results[index] = (response.status_code, response.json())
                    return
                events = []
                for line in response.iter_lines(decode_unicode=True):
                    if line:
                        events.append(line)
                        streaming_started.set()
                results[index] = (response.status_code, events)

        callers = [threading.Thread(target=call, args=(index,)) for index in range(4)]
        for caller in callers:
            caller.start()
        assert streaming_started.wait(120), "no stream started"
        process.send_signal(signal.SIGTERM)
        for caller in callers:
            caller.join(300)
        assert process.wait(180) == 0, "".join(lines[-40:])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    reader.join(10)
    output = "".join(lines)
    for index, (status, body) in sorted(results.items()):
        assert status == 200, (index, body)
        if index % 2 == 0:
            assert body[-1] == "data: [DONE]"
            finish = [json.loads(event[6:])["choices"][0]["finish_reason"] for event in body[:-1]
                      if json.loads(event[6:])["choices"]]
            assert finish[-1] in ("stop", "length")
        else:
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert len(results) == 4
    assert "SIGTERM: draining in-flight requests" in output and "stopped" in output
    assert "Traceback" not in output and "Stack (most recent call first)" not in output
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{PORT}/healthz", timeout=10)
