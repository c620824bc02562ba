"""The ``raylm`` command.

User errors (bad config, missing files, bad data) print one line to stderr and
exit non-zero without a traceback; config errors exit with code 2, before Ray
starts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from raylm.config import ConfigError, JobConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, tune and serve language models on Ray.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
app.add_typer(config_app, name="config")
prepare_app = typer.Typer(no_args_is_help=True, help="Train the corpus tokenizer; tokenize and pack the corpus.")
app.add_typer(prepare_app, name="prepare")

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file")
OverridesArgument = typer.Argument(None, help="dotted overrides, e.g. train.lr=1e-3")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(config: Optional[Path], overrides: Optional[List[str]]) -> JobConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        _fail(str(err), 2)
        raise  # unreachable; keeps type checkers quiet


def _user_errors():
    """Map the error types users can cause to one-line messages."""
    from raylm.data.pipeline import DataError
    from raylm.tracking import RegistryError
    from raylm.train.checkpoint import CorruptCheckpointError

    return (ConfigError, DataError, FileNotFoundError, CorruptCheckpointError, RegistryError)


def _run(fn, *args):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return fn(*args)
    except _user_errors() as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted", 130)


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Print the resolved config (defaults + YAML + overrides) as YAML."""
    typer.echo(_load(config, overrides).to_yaml(), nl=False)


@prepare_app.command("tokenizer")
def prepare_tokenizer(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Train a byte-level BPE tokenizer on a sample of data.sources (cached); prints its description as JSON."""
    job = _load(config, overrides)
    from raylm import workflow

    info = _run(workflow.prepare_tokenizer, job)
    typer.echo(json.dumps(info, indent=2, default=str))


@prepare_app.command("data")
def prepare_data(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Tokenize and pack data.sources into Parquet with a manifest; prints the manifest as JSON."""
    job = _load(config, overrides)
    from raylm import workflow

    manifest = _run(workflow.prepare_dataset, job)
    typer.echo(json.dumps(manifest, indent=2, default=str))


@app.command()
def train(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
    resume: Optional[str] = typer.Option(
        None, "--resume", help="continue this run (its id, or its folder) instead of starting a new one"),
) -> None:
    """Prepare data, train with Ray Train, evaluate, and log to MLflow (a new run unless --resume)."""
    job = _load(config, overrides)
    from raylm import workflow

    summary = _run(workflow.train, job, workflow._print, resume)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command("eval")
def evaluate(
    model: str = typer.Option(..., "--model", "-m", help="model folder or models:/name/version"),
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
) -> None:
    """Evaluate a trained model on the dev split; prints the metrics as JSON."""
    job = _load(config, overrides)
    from raylm import workflow

    metrics = _run(workflow.evaluate, job, model)
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or models:/name/version"),
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
) -> None:
    """Serve a model on Ray Serve until interrupted."""
    job = _load(config, overrides)
    model_path = model or job.serve.model_path
    if not model_path:
        _fail("give --model or serve.model_path", 2)
    if not model_path.startswith("models:/") and not Path(model_path).is_dir():
        _fail(f"model folder not found: {model_path}")
    from raylm import workflow
    from raylm.serving.app import start_serving

    def run() -> None:
        import time

        workflow.ensure_ray(job)
        url = start_serving(model_path, job.serve, tracking_uri=job.resolved_tracking_uri())
        typer.echo(f"serving {model_path} at {url} (Ctrl-C to stop)")
        while True:
            time.sleep(3600)

    _run(run)


@app.command()
def demo(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Run the whole pipeline on the built-in demo corpus and print the summary path last."""
    job = _load(config, overrides)
    from raylm import workflow

    path = _run(workflow.demo, job)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    typer.echo(str(path))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
