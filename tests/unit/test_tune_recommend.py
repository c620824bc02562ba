"""raylm tune recommend: compute-optimal N and D from a sweep's fit, a train config, and its errors."""

import json
import math
import subprocess
import sys

import pytest

from raylm.checks import load_job
from raylm.config import ConfigError, load_config
from raylm.models.shapes import non_embedding_parameters
from raylm.tune.recommend import recommend
from raylm.tune.scaling import ScalingPoint, fit_scaling_law
from raylm.tune.space import validate_trial

LAW = {"E": 1.2, "A": 60.0, "alpha": 0.35, "B": 300.0, "beta": 0.3}


@pytest.fixture(scope="module")
def sweep_results(tmp_path_factory):
    """A finished sweep's results.json: the demo sweep's config, trials whose losses follow a known law."""
    folder = tmp_path_factory.mktemp("sweep")
    job = load_config("jobs/configs/sweep_demo.yaml", [f"workdir={folder}"])
    base = job.public_dict()
    tokens_per_step = job.train.effective_global_batch_size * job.data.seq_len
    trials = []
    for width in (32, 64, 96, 128):
        for steps in (40, 80, 160, 320):
            params = {"model.hidden_size": width, "train.max_steps": steps}
            n = non_embedding_parameters(validate_trial(base, params).model)
            d = steps * tokens_per_step
            loss = LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]
            loss *= 1 + 0.003 * math.sin(width * steps)  # deterministic measurement noise
            trials.append({"trial_id": f"t{width}_{steps}", "params": params, "status": "finished", "N": n,
                           "D": float(d), "eval_loss": loss, "step": steps, "max_steps": steps})
    trials.append({"trial_id": "stopped", "params": {"model.hidden_size": 16, "train.max_steps": 40},
                   "status": "stopped", "N": 1000, "D": 10.0, "eval_loss": 9.0, "step": 20, "max_steps": 40})
    fit = fit_scaling_law([ScalingPoint(t["N"], t["D"], t["eval_loss"]) for t in trials if t["status"] == "finished"],
                          bootstrap_samples=20)
    results = {"sweep_id": "sweep-demo-test", "sweep_dir": str(folder), "base_config": base, "trials": trials,
               "best_trial": "t128_320", "fit": fit.to_dict(), "fit_problem": None}
    (folder / "results.json").write_text(json.dumps(results))
    return results


def test_recommendation_grows_with_budget_and_writes_a_loadable_config(sweep_results, tmp_path):
    largest = max(6 * t["N"] * t["D"] for t in sweep_results["trials"] if t["status"] == "finished")
    previous = None
    for factor in (10, 100, 1000):
        rec = recommend(sweep_results, largest * factor, out=tmp_path / f"x{factor}.yaml")
        assert 6 * rec["N"] * rec["D"] == pytest.approx(largest * factor)
        assert rec["tokens_per_parameter"] == pytest.approx(rec["D"] / rec["N"])
        low, high = rec["predicted_loss_interval"]
        assert low < high and low - 1e-6 <= rec["predicted_loss"] <= high + 1e-6
        job = load_job(rec["config_path"])
        # The file trains the recommended shape for the recommended tokens, with no sweep left in it.
        assert non_embedding_parameters(job.model) == rec["model_N"]
        assert abs(math.log(rec["model_N"] / rec["N"])) < math.log(2.5)
        assert job.train.max_steps == rec["max_steps"] and not job.tune.space
        assert job.run_name == "sweep-demo-recommended" and job.train.schedule == "wsd"
        if previous:
            assert rec["N"] > previous["N"] and rec["D"] > previous["D"]
            assert rec["model_N"] >= previous["model_N"] and rec["predicted_loss"] < previous["predicted_loss"]
        previous = rec


def test_budget_below_the_smallest_trial_and_sweep_without_fit_are_errors(sweep_results):
    smallest = min(6 * t["N"] * t["D"] for t in sweep_results["trials"] if t["status"] == "finished")
    with pytest.raises(ConfigError, match="below the smallest finished trial's compute"):
        recommend(sweep_results, smallest / 2)
    with pytest.raises(ConfigError, match="positive"):
        recommend(sweep_results, -1.0)
    without_fit = {**sweep_results, "fit": None, "fit_problem": "2 trials finished; the scaling-law fit needs 5"}
    with pytest.raises(ConfigError, match="has no scaling-law fit: 2 trials finished"):
        recommend(without_fit, 1e18)


def test_cli_prints_the_recommendation_or_one_line_errors(sweep_results, tmp_path):
    folder = sweep_results["sweep_dir"]
    largest = max(6 * t["N"] * t["D"] for t in sweep_results["trials"] if t["status"] == "finished")
    command = [sys.executable, "-m", "raylm.cli", "tune", "recommend", "--sweep", folder]
    result = subprocess.run(command + ["--flops", f"{largest * 10:.3e}", "--out", str(tmp_path / "r.yaml")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "compute-optimal N:" in result.stdout and "tokens per parameter" in result.stdout
    assert (tmp_path / "r.yaml").is_file()
    for flops, expected in (("1e3", "below the smallest finished trial"), ("-5", "positive")):
        bad = subprocess.run(command + ["--flops", flops], capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and expected in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    missing = subprocess.run([sys.executable, "-m", "raylm.cli", "tune", "recommend", "--sweep", str(tmp_path / "no"),
                              "--flops", "1e18", f"workdir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "neither a sweep folder nor an MLflow" in missing.stderr
    assert "Traceback" not in missing.stderr
