"""``raylm tune recommend``: the compute-optimal model and token count for a FLOP budget, from a sweep's fit.

Under C = 6ND (Hoffmann et al. 2022; N non-embedding parameters, D tokens)
the fitted law gives N_opt(C) and D_opt(C) in closed form. The interval of the
predicted loss and of N_opt comes from the fit's bootstrap resamples. The
recommendation is written as a job config ready for ``raylm train``: the
sweep's base config with the buildable shape nearest to N_opt (same
architecture, the depth-to-width ratio and head size of the sweep's largest
finished model) and the steps that give D_opt tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from raylm.checks import validate_job
from raylm.common.tracking import store_exists
from raylm.config import ConfigError, JobConfig, ModelConfig
from raylm.config.redaction import redact_uri
from raylm.models.shapes import model_shape, non_embedding_parameters
from raylm.tune.scaling import FitError, ScalingFit, compute_optimal, predict_loss
from raylm.tune.records import RESULTS_FILE
from raylm.tune.space import trial_config, validate_trial


def load_results(reference: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """A sweep's ``results.json``: from a sweep folder, or from the artifacts of its MLflow parent run (by id)."""
    folder = Path(reference)
    if (folder / RESULTS_FILE).is_file():
        return json.loads((folder / RESULTS_FILE).read_text())
    if folder.exists():
        raise ConfigError(f"recommend: {reference} has no {RESULTS_FILE}; is it a finished sweep folder?")
    if tracking_uri is None or not store_exists(tracking_uri):
        # Checked before MLflow opens the store: a read would create an empty one.
        where = f" (there is no tracking store at {redact_uri(tracking_uri)})" if tracking_uri else ""
        raise ConfigError(f"recommend: {reference} is neither a sweep folder nor an MLflow run of the tracking "
                          f"store{where}")
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(run_id=reference, artifact_path=RESULTS_FILE,
                                                    tracking_uri=tracking_uri)
    except (MlflowException, OSError):
        raise ConfigError(f"recommend: {reference} is neither a sweep folder nor an MLflow sweep run with "
                          f"{RESULTS_FILE} at {redact_uri(tracking_uri)}") from None
    return json.loads(Path(local).read_text())


def _shape_family(results: dict[str, Any]) -> dict[str, Any]:
    """Depth-to-width ratio and head size (and Llama's MLP and KV ratios) of the largest finished trial."""
    finished = [row for row in results["trials"] if row["status"] == "finished" and row["N"]]
    largest = max(finished, key=lambda row: row["N"])
    model = validate_trial(results["base_config"], largest["params"]).model
    shape = model_shape(model)
    family = {"arch": model.arch, "size": model.size, "width_per_layer": shape["hidden_size"] / shape["num_layers"],
              "head_dim": shape["hidden_size"] // shape["num_heads"]}
    if model.arch == "llama":
        family["mlp_ratio"] = shape["intermediate_size"] / shape["hidden_size"]
        family["kv_group"] = shape["num_heads"] // shape["num_kv_heads"]
    return family


def buildable_shapes(family: dict[str, Any], max_layers: int = 128, max_heads: int = 128,
                     aspect_tolerance: float = 2.0) -> list[ModelConfig]:
    """Model configs of the family: whole heads of the family's head size, depth-to-width ratio within a factor
    ``aspect_tolerance`` of the family's (Kaplan et al. 2020: loss depends weakly on shape in that range)."""
    shapes = []
    head_dim = family["head_dim"]
    for layers in range(1, max_layers + 1):
        for heads in range(1, max_heads + 1):
            width = heads * head_dim
            ratio = width / layers / family["width_per_layer"]
            if not 1 / aspect_tolerance <= ratio <= aspect_tolerance:
                continue
            overrides: dict[str, Any] = {"num_layers": layers, "hidden_size": width, "num_heads": heads}
            if family["arch"] == "llama":
                group = family["kv_group"] if heads % family["kv_group"] == 0 else 1
                overrides["num_kv_heads"] = heads // group
                overrides["intermediate_size"] = max(8, int(round(family["mlp_ratio"] * width / 8)) * 8)
            shapes.append(ModelConfig(arch=family["arch"], size=family["size"], **overrides))
    return shapes


def nearest_shape(target_n: float, family: dict[str, Any]) -> tuple[ModelConfig, int]:
    """The buildable model of the family whose non-embedding parameter count is nearest N (in log space)."""
    best = min(((shape, non_embedding_parameters(shape)) for shape in buildable_shapes(family)),
               key=lambda item: abs(math.log(item[1]) - math.log(target_n)))
    return best


def recommend(results: dict[str, Any], flops: float, out: Path | None = None) -> dict[str, Any]:
    """The compute-optimal (N, D) for ``flops``, its predicted loss with an interval, and a train config file.

    Raises :class:`ConfigError` for a sweep without a fit, a budget that is not
    positive, or one below the smallest finished trial's compute.
    """
    if not results.get("fit"):
        raise ConfigError(f"recommend: sweep {results.get('sweep_id')} has no scaling-law fit: "
                          f"{results.get('fit_problem') or 'too few finished trials'}")
    if not flops > 0:
        raise ConfigError("recommend: --flops must be a positive number of FLOPs, e.g. 1e18")
    fit = ScalingFit.from_dict(results["fit"])
    finished = [row for row in results["trials"] if row["status"] == "finished" and row["N"]]
    smallest = min(6.0 * row["N"] * row["D"] for row in finished)
    if flops < smallest:
        raise ConfigError(f"recommend: the budget {flops:.3g} FLOPs is below the smallest finished trial's compute "
                          f"({smallest:.3g} FLOPs, C = 6ND): the fit says nothing there")
    try:
        optimal_n, optimal_d = fit.compute_optimal(flops)
    except FitError as err:
        raise ConfigError(f"recommend: {err}") from None
    predicted = float(fit.predict(optimal_n, optimal_d))
    samples_loss, samples_n = [], []
    for params in fit.bootstrap:
        try:
            samples_n.append(compute_optimal(params, flops)[0])
        except FitError:
            continue
        samples_loss.append(float(predict_loss(params, optimal_n, optimal_d)))
    base = JobConfig.model_validate(results["base_config"])
    shape, shape_n = nearest_shape(optimal_n, _shape_family(results))
    tokens_per_step = base.train.effective_global_batch_size * base.data.seq_len
    steps = max(2, math.ceil((flops / (6.0 * shape_n)) / tokens_per_step))
    config = _recommended_config(results, shape, steps)
    recommendation = {
        "flops": flops, "N": optimal_n, "D": optimal_d, "tokens_per_parameter": optimal_d / optimal_n,
        "N_interval": list(fit.interval(samples_n)) if samples_n else None,
        "predicted_loss": predicted,
        "predicted_loss_interval": list(fit.interval(samples_loss)) if samples_loss else None,
        "model": shape.describe(), "model_N": shape_n, "max_steps": steps,
        "model_D": steps * tokens_per_step, "predicted_loss_model": float(fit.predict(shape_n, steps * tokens_per_step)),
        "confidence": fit.confidence,
    }
    path = Path(out) if out else Path(results["sweep_dir"]) / f"recommended-{flops:.0e}.yaml".replace("+", "")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# raylm tune recommend: compute-optimal for {flops:.3g} FLOPs (C = 6ND) from sweep "
              f"{results['sweep_id']}\n# N = {optimal_n:.4g} non-embedding parameters, D = {optimal_d:.4g} tokens; "
              f"this model: N = {shape_n}, {steps} steps = {steps * tokens_per_step} tokens\n"
              f"# predicted dev loss {predicted:.4f}\n")
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    recommendation["config_path"] = str(path)
    return recommendation


def _recommended_config(results: dict[str, Any], shape: ModelConfig, steps: int) -> dict[str, Any]:
    """The sweep's base config with the recommended shape and steps, and the best trial's swept values of the rest."""
    best = next((row for row in results["trials"] if row["trial_id"] == results.get("best_trial")), None)
    keep = {key: value for key, value in (best["params"] if best else {}).items()
            if not key.startswith("model.") and key != "train.max_steps"}
    overrides = {f"model.{name}": getattr(shape, name) for name in ("size", "num_layers", "hidden_size", "num_heads",
                                                                    "num_kv_heads", "intermediate_size")
                 if getattr(shape, name) is not None}
    raw = trial_config(results["base_config"], {**keep, **overrides, "train.max_steps": steps})
    raw.pop("tune", None)
    train = raw["train"]
    train["warmup_steps"] = min(train.get("warmup_steps", 0), max(0, steps // 10))
    for key in ("eval_every", "checkpoint_every"):
        if train.get(key) and train[key] > steps:
            train[key] = 0
    raw["run_name"] = f"{raw.get('run_name', 'sweep')}-recommended"[:100]
    raw.pop("run_id", None)
    validate_job(raw)  # the file must load in raylm train
    return raw


def format_recommendation(recommendation: dict[str, Any]) -> list[str]:
    """The recommendation as lines for the terminal."""
    def interval(values):
        return f" [{values[0]:.4g}, {values[1]:.4g}]" if values else ""

    level = f"{int(recommendation['confidence'] * 100)}%"
    return [
        f"budget: {recommendation['flops']:.3g} FLOPs (C = 6ND)",
        f"compute-optimal N: {recommendation['N']:.4g} non-embedding parameters{interval(recommendation['N_interval'])}",
        f"compute-optimal D: {recommendation['D']:.4g} tokens "
        f"({recommendation['tokens_per_parameter']:.1f} tokens per parameter)",
        f"predicted dev loss: {recommendation['predicted_loss']:.4f}{interval(recommendation['predicted_loss_interval'])}"
        f" ({level} bootstrap interval)",
        f"nearest buildable model: {recommendation['model']} with N = {recommendation['model_N']}, "
        f"{recommendation['max_steps']} steps = {recommendation['model_D']} tokens "
        f"(predicted {recommendation['predicted_loss_model']:.4f})",
        f"config: {recommendation['config_path']}  (raylm train --config {recommendation['config_path']})",
    ]
