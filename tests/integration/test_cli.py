"""The `raylm` command end to end, in a subprocess with its own local Ray."""

import json
import os
import subprocess
import sys
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
