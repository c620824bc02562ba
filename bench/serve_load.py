"""Serving under load: raylm on Ray Serve against a plain FastAPI + transformers ``generate`` server.

An asyncio HTTP client (aiohttp, closed loop: each of C workers sends its next
request when the previous one is answered) sends a fixed number of requests at
concurrency 1, 8 and 32 to ``/v1/sentiment``, ``/v1/translate`` and
``/v1/completions`` of

- raylm: ``build_app`` on a local Ray Serve (``--replicas`` replicas of
  ``--cpus-per-replica`` CPUs, torch threads = CPUs; batching as in
  ``ServeConfig``'s defaults);
- baseline: one uvicorn process serving the same model folder with FastAPI and
  plain ``transformers``: sync handlers (FastAPI runs them on its thread pool,
  as such a server does), one request per model call: sentiment scores the two
  label continuations in one forward pass, translate and completions call
  ``model.generate`` (greedy with ``stop_strings=["\\n"]``; sampled with the
  request's temperature / top_p). Same prompts, same tokens, same torch threads
  as one raylm replica.

Figures: throughput (requests/s) and p50 / p99 latency per endpoint and
concurrency; ``sentiment_scaling`` and ``translate_scaling`` (raylm at
concurrency 32 / at 1) and ``*_vs_baseline`` (raylm / baseline at 32).

Fault run (same script, raylm with ``--fault-replicas`` replicas): 2,000
requests at concurrency 32, 20% of them bad (malformed JSON, wrong types, empty
or over-long text, invalid UTF-8, oversized body, unknown route, NaN or
negative temperature, ...), while one replica process is SIGKILLed midway. The
client retries a request that got no answer, a 5xx or a 503 up to 5 times
(honouring ``Retry-After``), as the OpenAI client does. ``good_request_failures``:
good requests without a 200 after the retries; ``bad_request_5xx``: bad requests
whose final answer was a 5xx (``bad_request_not_4xx``: not a 4xx at all);
``transient_5xx``: 5xx answers (or dropped connections) that a retry then cured.

Model: ``--model`` (a folder or registry URI; the trained demo model is the
realistic choice), else a demo-shaped model (gpt2-tiny, BPE on the demo
corpus) with untrained weights, whose generations run to their budget.

Prints one JSON object (load average at start included). Not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "platform"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from _common import json_stdout  # noqa: E402  (bench/ on the path above)

ENDPOINTS = ("sentiment", "translate", "completions")
COMPLETION_TOKENS = 32


# --------------------------------------------------------------------------- model and inputs


def build_demo_shaped_model(folder: Path) -> Path:
    """gpt2-tiny with the demo's vocabulary and context (128), untrained; tokenizer with the chat template."""
    from raylm.config import ModelConfig
    from raylm.data.demo import generate_demo_corpus
    from raylm.data.formatting import CHAT_TEMPLATE, format_example
    from raylm.data.tokenizer import special_token_ids, train_bpe_tokenizer
    from raylm.models.registry import build_model

    corpus = generate_demo_corpus(seed=0, num_train=2000, num_dev=10)
    tokenizer = train_bpe_tokenizer((p + a for p, a in map(format_example, corpus["train"])), vocab_size=2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_model(ModelConfig(size="tiny"), len(tokenizer), 128, special_token_ids(tokenizer))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "raylm.json").write_text(json.dumps({"run_id": "bench-untrained-gpt2-tiny"}))
    return folder


def demo_inputs(count: int = 400) -> dict[str, list[dict]]:
    """Request bodies per endpoint, from the demo corpus's dev split (never seen in training)."""
    from raylm.data.demo import generate_demo_corpus

    dev = generate_demo_corpus(seed=0, num_train=10, num_dev=count)["dev"]
    sentiment = [{"text": row["text"]} for row in dev if row["task"] == "sentiment"]
    translate = [{"text": row["source"]} for row in dev if row["task"] == "translate"]
    prompts = [row["text"][:80] for row in dev if row["task"] == "lm"] or [row["text"] for row in dev[:50]]
    completions = [{"prompt": prompt, "max_tokens": COMPLETION_TOKENS, "temperature": 0.8, "top_p": 0.95,
                    "seed": index} for index, prompt in enumerate(prompts)]
    return {"sentiment": sentiment, "translate": translate, "completions": completions}


# --------------------------------------------------------------------------- the baseline server


def run_baseline_server(model_dir: str, port: int, threads: int) -> None:
    """A plain single-process FastAPI + transformers server of the same model (blocks)."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM

    from raylm.data.formatting import SENTIMENT_LABELS, sentiment_prompt, translate_prompt
    from raylm.data.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True).eval()
    tokenizer = load_tokenizer(model_dir)
    eos = tokenizer.eos_token_id
    api = FastAPI()

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([[eos, *tokenizer(text, add_special_tokens=False)["input_ids"]]])

    @api.post("/v1/sentiment")
    def sentiment(body: dict):
        prompt = encode(sentiment_prompt(body["text"]))[0].tolist()
        choices = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in SENTIMENT_LABELS]
        width = max(len(prompt) + len(ids) for ids in choices)
        rows = [[tokenizer.pad_token_id] * (width - len(prompt) - len(ids)) + prompt + ids for ids in choices]
        mask = [[0] * (width - len(prompt) - len(ids)) + [1] * (len(prompt) + len(ids)) for ids in choices]
        ids, attention = torch.tensor(rows), torch.tensor(mask)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attention,
                           position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        scores = [log_probs[row, -len(choice) - 1:-1].gather(-1, ids[row, -len(choice):, None]).sum().item()
                  for row, choice in enumerate(choices)]
        probs = torch.softmax(torch.tensor(scores), dim=-1)
        best = int(probs.argmax())
        return {"label": SENTIMENT_LABELS[best], "score": round(float(probs[best]), 6)}

    def generate(prompt: str, **kwargs) -> str:
        ids = encode(prompt)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos, tokenizer=tokenizer, **kwargs)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    @api.post("/v1/translate")
    def translate(body: dict):
        text = generate(translate_prompt(body["text"]), max_new_tokens=64, do_sample=False, stop_strings=["\n"])
        return {"translation": text.split("\n", 1)[0].strip()}

    @api.post("/v1/completions")
    def completions(body: dict):
        text = generate(body["prompt"], max_new_tokens=body.get("max_tokens", 16), do_sample=True,
                        temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0), top_k=0)
        return {"choices": [{"text": text, "index": 0}]}

    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------- the load client


async def _wait_ready(url: str, timeout: float = 180.0) -> None:
    import aiohttp

    deadline = time.time() + timeout
    async with aiohttp.ClientSession() as session:
        while time.time() < deadline:
            try:
                async with session.post(url, json={"text": "ready?"}) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"server at {url} did not get ready")


async def load_run(base_url: str, endpoint: str, bodies: list[dict], num_requests: int, concurrency: int,
                   warmup: int = 4) -> dict[str, Any]:
    """``num_requests`` requests at ``concurrency`` (closed loop); throughput and latency percentiles."""
    import aiohttp

    url = f"{base_url}/v1/{endpoint}"
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    latencies: list[float] = []
    errors = 0
    batch_sizes: list[int] = []
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        for index in range(warmup):
            async with session.post(url, json=bodies[index % len(bodies)]) as response:
                await response.read()
        next_index = 0

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < num_requests:
                index = next_index
                next_index += 1
                started = time.perf_counter()
                async with session.post(url, json=bodies[index % len(bodies)]) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                    size = response.headers.get("X-Raylm-Batch-Size")
                    if size:
                        batch_sizes.append(int(size))
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    result = {"requests": num_requests, "throughput_rps": round(num_requests / wall, 2),
              "p50_s": round(latencies[len(latencies) // 2], 4),
              "p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 4),
              "errors": errors}
    if batch_sizes:
        result["mean_batch_size"] = round(statistics.mean(batch_sizes), 2)
    return result


# --------------------------------------------------------------------------- fault run

BAD_REQUESTS: list[tuple[str, str, Any, dict]] = [
    # (name, route, body: dict for JSON or bytes, extra headers)
    ("malformed_json", "/v1/sentiment", b'{"text": "unterminated', {}),
    ("wrong_type", "/v1/sentiment", {"text": 42}, {}),
    ("empty_text", "/v1/translate", {"text": "   "}, {}),
    ("missing_field", "/v1/qa", {"context": "Anna lives in Oslo."}, {}),
    ("invalid_utf8", "/v1/sentiment", b'{"text": "\xff\xfe\xfd"}', {}),
    ("over_long_input", "/v1/sentiment", {"text": "word " * 2000}, {}),
    ("oversized_body", "/v1/translate", None, {}),  # filled in with a body over max_body_bytes
    ("unknown_route", "/v1/summarize", {"text": "hello"}, {}),
    ("nan_temperature", "/v1/completions", b'{"prompt": "hello", "temperature": NaN}', {}),
    ("negative_temperature", "/v1/completions", {"prompt": "hello", "temperature": -1}, {}),
    ("bad_top_p", "/v1/completions", {"prompt": "hello", "top_p": 0}, {}),
    ("unknown_model", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, {}),
    ("too_many_tokens", "/v1/completions", {"prompt": "hello", "max_tokens": 100000}, {}),
    ("unknown_field", "/v1/sentiment", {"text": "fine", "colour": "red"}, {}),
]


async def fault_run(base_url: str, bodies: dict[str, list[dict]], num_requests: int, concurrency: int,
                    bad_fraction: float, kill_replica, max_body_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Mixed good and bad requests with retries; ``kill_replica()`` is called once half have been sent."""
    import aiohttp

    rng = random.Random(seed)
    plan = []
    for index in range(num_requests):
        if rng.random() < bad_fraction:
            plan.append(("bad",) + BAD_REQUESTS[index % len(BAD_REQUESTS)])
        else:
            endpoint = rng.choices(ENDPOINTS, weights=(0.6, 0.2, 0.2))[0]
            body = dict(rng.choice(bodies[endpoint]))
            if endpoint == "completions":
                body["max_tokens"] = 16
            plan.append(("good", endpoint, f"/v1/{endpoint}", body, {}))
    oversized = b'{"text": "' + b"a" * (max_body_bytes + 10) + b'"}'
    outcome = {"good": 0, "bad": 0, "good_request_failures": 0, "bad_request_5xx": 0, "bad_request_not_4xx": 0,
               "transient_5xx": 0, "retries": 0}
    bad_statuses: dict[str, set] = {}
    next_index = 0
    killed_at: Optional[float] = None
    started = time.perf_counter()

    async def send(session, route: str, body) -> tuple[Optional[int], float]:
        data = body if isinstance(body, bytes) else None
        try:
            async with session.post(base_url + route, data=data, json=None if data is not None else body,
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
                retry_after = float(response.headers.get("Retry-After", 0) or 0)
                return response.status, retry_after
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None, 0.0

    async def worker(session) -> None:
        nonlocal next_index, killed_at
        while next_index < num_requests:
            index = next_index
            next_index += 1
            if index == num_requests // 2 and killed_at is None:
                killed_at = time.perf_counter() - started
                await asyncio.get_running_loop().run_in_executor(None, kill_replica)
            kind, name, route, body, _ = plan[index]
            if name == "oversized_body":
                body = oversized
            status, delay = None, 0.0
            for attempt in range(6):
                status, retry_after = await send(session, route, body)
                if status is not None and status < 500:
                    break
                if attempt < 5:
                    outcome["retries"] += 1
                    await asyncio.sleep(max(retry_after, 0.25 * 2 ** attempt))
            first_failed = attempt > 0
            outcome[kind] += 1
            if kind == "good":
                if status != 200:
                    outcome["good_request_failures"] += 1
                elif first_failed:
                    outcome["transient_5xx"] += 1
            else:
                bad_statuses.setdefault(name, set()).add(status)
                if status is None or status >= 500:
                    outcome["bad_request_5xx"] += 1
                elif not 400 <= status < 500:
                    outcome["bad_request_not_4xx"] += 1
                elif first_failed:
                    outcome["transient_5xx"] += 1

    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    outcome["wall_s"] = round(time.perf_counter() - started, 1)
    outcome["killed_at_s"] = round(killed_at or 0, 1)
    outcome["bad_statuses"] = {name: sorted(s for s in statuses if s is not None) + (["none"] if None in statuses else [])
                               for name, statuses in sorted(bad_statuses.items())}
    return outcome


# --------------------------------------------------------------------------- raylm on Serve


def replica_pids() -> list[int]:
    """Process ids of the running replicas of raylm's deployment (from Serve's instance details)."""
    from ray.serve.context import _get_global_client

    deployment = _get_global_client().get_serve_details()["applications"]["raylm"]["deployments"]["RaylmModel"]
    return [replica["pid"] for replica in deployment["replicas"] if replica["state"] == "RUNNING"]


def deploy_raylm(model: str, port: int, replicas: int, cpus_per_replica: float, max_body_bytes: int,
                 tracking_uri: Optional[str], ingress: str = "haproxy") -> str:
    from ray import serve

    from raylm.config import ServeConfig
    from raylm.serving.app import start_serving

    config = ServeConfig(port=port, ingress=ingress, num_replicas=replicas, num_cpus_per_replica=cpus_per_replica,
                         max_body_bytes=max_body_bytes, max_input_chars=4000, max_new_tokens=64)
    serve.delete("raylm") if "raylm" in serve.status().applications else None
    return start_serving(model, config, tracking_uri=tracking_uri)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder or registry URI (default: a demo-shaped untrained model)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for a models:/ --model")
    parser.add_argument("--requests", type=int, default=192, help="requests per endpoint and concurrency")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--fault-requests", type=int, default=2000)
    parser.add_argument("--fault-replicas", type=int, default=2)
    parser.add_argument("--skip-fault", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                        help="serve.ingress: HAProxy in front of the replicas (default) or Serve's Python proxy")
    parser.add_argument("--port", type=int, default=8250)
    parser.add_argument("--baseline-port", type=int, default=8251)
    parser.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        run_baseline_server(args.model, args.baseline_port, max(1, int(args.cpus_per_replica)))
        return

    with json_stdout() as emit:  # Ray's raylet messages reach this process's stdout
        emit(measure(args))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of the benchmark (the printed JSON object)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    load_at_start = [round(value, 2) for value in os.getloadavg()]
    import ray
    from ray import serve

    from raylm.common.tracking import resolve_model_path

    scratch = Path(tempfile.mkdtemp(prefix="raylm-serve-bench-"))
    model = args.model or str(build_demo_shaped_model(scratch / "model"))
    model_folder = str(resolve_model_path(model, args.tracking_uri))
    bodies = demo_inputs()
    concurrencies = [int(value) for value in args.concurrency.split(",")]
    max_body_bytes = 64 << 10
    report: dict[str, Any] = {"benchmark": "serve_load", "load_average_at_start": load_at_start,
                              "cpu_count": os.cpu_count(), "model": model if args.model else
                              "untrained demo-shaped gpt2-tiny (pass --model for the trained demo model)",
                              "requests_per_run": args.requests, "replicas": args.replicas,
                              "cpus_per_replica": args.cpus_per_replica, "ingress": args.ingress}

    from raylm.serving.ingress import set_ingress_env

    report["ingress"] = set_ingress_env(args.ingress)  # proxy where no HAProxy binary exists
    ray.init(num_cpus=max(4, args.replicas * int(args.cpus_per_replica) + 2, args.fault_replicas + 2),
             include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                                       "PYTHONPATH": str(REPO_ROOT / "platform")}})
    try:
        base_url = deploy_raylm(model, args.port, args.replicas, args.cpus_per_replica, max_body_bytes,
                                args.tracking_uri, report["ingress"])
        asyncio.run(_wait_ready(f"{base_url}/v1/sentiment"))
        raylm: dict[str, dict] = {}
        for endpoint in ENDPOINTS:
            for concurrency in concurrencies:
                raylm[f"{endpoint}_c{concurrency}"] = asyncio.run(
                    load_run(base_url, endpoint, bodies[endpoint], args.requests, concurrency))
                print(f"raylm {endpoint} c{concurrency}: {raylm[f'{endpoint}_c{concurrency}']}", file=sys.stderr)
        report["raylm"] = raylm
        low, high = min(concurrencies), max(concurrencies)
        for endpoint in ("sentiment", "translate"):
            report[f"{endpoint}_scaling"] = round(raylm[f"{endpoint}_c{high}"]["throughput_rps"]
                                                  / raylm[f"{endpoint}_c{low}"]["throughput_rps"], 2)

        if not args.skip_baseline:
            baseline_process = subprocess.Popen(
                [sys.executable, __file__, "--serve-baseline", "--model", model_folder,
                 "--baseline-port", str(args.baseline_port), "--cpus-per-replica", str(args.cpus_per_replica)],
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, stdout=subprocess.DEVNULL)
            try:
                baseline_url = f"http://127.0.0.1:{args.baseline_port}"
                asyncio.run(_wait_ready(f"{baseline_url}/v1/sentiment"))
                baseline: dict[str, dict] = {}
                for endpoint in ENDPOINTS:
                    for concurrency in (low, high):
                        baseline[f"{endpoint}_c{concurrency}"] = asyncio.run(
                            load_run(baseline_url, endpoint, bodies[endpoint], args.requests, concurrency))
                        print(f"baseline {endpoint} c{concurrency}: {baseline[f'{endpoint}_c{concurrency}']}",
                              file=sys.stderr)
                report["baseline"] = baseline
                for endpoint in ENDPOINTS:
                    report[f"{endpoint}_vs_baseline"] = round(
                        raylm[f"{endpoint}_c{high}"]["throughput_rps"]
                        / baseline[f"{endpoint}_c{high}"]["throughput_rps"], 2)
            finally:
                baseline_process.send_signal(signal.SIGTERM)
                baseline_process.wait(timeout=30)

        if not args.skip_fault:
            base_url = deploy_raylm(model, args.port, args.fault_replicas, args.cpus_per_replica, max_body_bytes,
                                    args.tracking_uri, report["ingress"])
            asyncio.run(_wait_ready(f"{base_url}/v1/sentiment"))
            killed: dict[str, Any] = {}

            def kill_replica() -> None:
                pids = replica_pids()
                killed["replicas_before"] = len(pids)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed["pid"] = pids[0]

            fault = asyncio.run(fault_run(base_url, bodies, args.fault_requests, 32, 0.2, kill_replica,
                                          max_body_bytes))
            deadline = time.time() + 120
            while time.time() < deadline and len(replica_pids()) < args.fault_replicas:
                time.sleep(1)
            fault["replicas_after"] = len(replica_pids())
            fault.update({f"killed_{key}": value for key, value in killed.items()})
            report["fault"] = fault
            report["good_request_failures"] = fault["good_request_failures"]
            report["bad_request_5xx"] = fault["bad_request_5xx"]
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    report["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    return report


if __name__ == "__main__":
    main()
