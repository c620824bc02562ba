"""The `raylm` command end to end, in a subprocess with its own local Ray."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import REPO_ROOT


def _raylm(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "platform"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "raylm.cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=timeout)


def test_demo_smoke_prints_summary_path_last(tmp_path):
    result = _raylm("demo", "--config", "jobs/configs/smoke.yaml", f"workdir={tmp_path}", "serve.port=8124")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    summary_path = Path(last_line)
    assert summary_path.is_file() and summary_path.parent.parent == tmp_path
    summary = json.loads(summary_path.read_text())
    for key in ("sentiment_accuracy", "qa_exact_match", "translation_bleu"):
        assert 0 <= summary["metrics"][key] <= (100 if key == "translation_bleu" else 1)
    assert set(summary["answers"]) == {"translate", "qa", "sentiment"}
    assert summary["answers"]["sentiment"]["response"]["label"] in ("positive", "negative")
    assert summary["registry_uri"].startswith("models:/raylm-smoke/")
    assert "[raylm] training" in result.stdout
    # Progress: every logged step shows once (Ray Train's print patch once printed each line twice),
    # and Ray Train's placement-group cleaner does not warn every second on a local Ray.
    output = result.stdout + result.stderr
    step_lines = [line[line.index("[raylm] step="):] for line in output.splitlines() if "[raylm] step=" in line]
    assert step_lines and len(step_lines) == len(set(step_lines)), step_lines
    assert "Failed to query Ray Train Controller" not in output
    # Ray Train's per-checkpoint and per-report INFO lines (driver and workers) stay behind --verbose.
    assert "Checkpoint successfully created" not in output and "Reporting training result" not in output


def test_train_missing_model_folder_fails_cleanly(tmp_path):
    result = _raylm("train", "--config", "jobs/configs/smoke.yaml", f"workdir={tmp_path}",
                    f"model.init_from={tmp_path / 'missing'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_serve_missing_model_fails_cleanly(tmp_path):
    result = _raylm("serve", "--model", str(tmp_path / "nope"), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: model folder not found: {tmp_path / 'nope'}"


def test_read_only_commands_with_missing_inputs_leave_an_empty_folder_empty(tmp_path):
    """Each command, run in an empty folder, fails with one line: no store created (MLflow would make
    runs/mlflow.db to look in it), no library INFO lines, no traceback."""
    commands = {
        "recommend": ["tune", "recommend", "--sweep", "/no/such/sweep", "--flops", "1e18"],
        "recommend_run_id": ["tune", "recommend", "--sweep", "0123456789abcdef", "--flops", "1e18"],
        "eval_folder": ["eval", "--model", "/no/such/model"],
        "eval_registry": ["eval", "--model", "models:/nope/1"],
        "promote": ["promote", "models:/nope/3", "--alias", "production"],
        "jobs_logs": ["jobs", "logs", "raysubmit_nope", "--address", "http://127.0.0.1:9"],
    }
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "platform"), "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)

    def run(name):
        folder = tmp_path / name
        folder.mkdir()
        return subprocess.run([sys.executable, "-m", "raylm.cli", *commands[name]], capture_output=True, text=True,
                              cwd=folder, env=env, timeout=300)

    with ThreadPoolExecutor(len(commands)) as pool:
        results = dict(zip(commands, pool.map(run, commands)))
    for name, result in results.items():
        output = result.stdout + result.stderr
        assert result.returncode != 0, (name, output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, output)
        assert "Traceback" not in output and "INFO" not in output, (name, output)
        assert list((tmp_path / name).rglob("*")) == [], name
    missing_store = "no MLflow tracking store at sqlite:///"
    assert missing_store in results["eval_registry"].stderr and missing_store in results["promote"].stderr
    assert "there is no tracking store at sqlite:///" in results["recommend"].stderr
    assert results["eval_folder"].stderr.strip() == "error: model folder not found: /no/such/model"
