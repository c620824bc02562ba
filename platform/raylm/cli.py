"""The ``raylm`` command.

User errors (bad config, missing files, bad data) print one line to stderr and
exit non-zero without a traceback; config errors exit with code 2, before Ray
starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from raylm.common import interrupts
from raylm.common.logging import configure_logging
from raylm.config import ConfigError, JobConfig
from raylm.config.redaction import redact_text, redact_values

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, tune and serve language models on Ray.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
app.add_typer(config_app, name="config")
prepare_app = typer.Typer(no_args_is_help=True, help="Train the corpus tokenizer; tokenize and pack the corpus.")
app.add_typer(prepare_app, name="prepare")
jobs_app = typer.Typer(no_args_is_help=True, help="Ray jobs on a cluster: list, logs, stop.")
app.add_typer(jobs_app, name="jobs")


class _RunByDefault(typer.core.TyperGroup):
    """``raylm tune ARGS`` means ``raylm tune run ARGS`` unless ARGS starts with a subcommand."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


tune_app = typer.Typer(cls=_RunByDefault, help="Scaling sweeps with Ray Tune (raylm tune --config FILE), "
                                                "and compute-optimal recommendations from them.")
app.add_typer(tune_app, name="tune")

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file")


@app.callback()
def main_options(verbose: bool = typer.Option(
        False, "--verbose", "-v", help="also show other libraries' INFO lines (Ray, MLflow), and raylm's DEBUG")) -> None:
    """Train, tune and serve language models on Ray."""
    global _verbose
    _verbose = verbose
    configure_logging(verbose)


_verbose = False

OverridesArgument = typer.Argument(None, help="dotted overrides, e.g. train.lr=1e-3")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {redact_text(message)}", err=True)
    raise typer.Exit(code)


def _load(config: Optional[Path], overrides: Optional[List[str]]) -> JobConfig:
    from raylm.checks import load_job  # the checks import eval (numpy): deferred for a fast --help

    try:
        return load_job(config, overrides or [])
    except ConfigError as err:
        _fail(str(err), 2)
        raise  # unreachable; keeps type checkers quiet


def _user_errors():
    """Map the error types users can cause to one-line messages."""
    from raylm.data.errors import DataError
    from raylm.inference.task_model import ModelLoadError
    from raylm.common.tracking import RegistryError
    from raylm.train.checkpoint import CorruptCheckpointError

    return (ConfigError, DataError, FileNotFoundError, CorruptCheckpointError, RegistryError, ModelLoadError)


def _check_model_reference(job: JobConfig, model: Optional[str]) -> None:
    """One line for a model that cannot resolve, before the heavy layers load (and MLflow opens a store)."""
    from raylm.common.tracking import check_model_reference

    if model is not None:
        _run(lambda: check_model_reference(model, job.resolved_tracking_uri()))


def _check_inputs(job: JobConfig, resume: Optional[str] = None) -> None:
    """Config, local inputs and ``--resume`` checked before Ray and torch are imported: a mistake costs a second."""
    from raylm.checks import check_inputs
    from raylm.lifecycle.runs import check_resume

    _run(check_inputs, job)
    if resume is not None:
        _run(check_resume, job, resume)


def _run(fn, *args):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Again, now that the command's layers are imported: Ray Data sets its loggers' levels on import.
    configure_logging(_verbose)
    try:
        return fn(*args)
    except ConfigError as err:
        _fail(str(err), 2)
    except _user_errors() as err:
        _fail(str(err))
    except KeyboardInterrupt as err:
        if interrupts.was_terminated(err):
            _fail(interrupts.MESSAGE, interrupts.EXIT_CODE)
        _fail("interrupted", 130)


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Print the resolved config (defaults + YAML + overrides) as YAML."""
    typer.echo(_load(config, overrides).to_yaml(), nl=False)


@prepare_app.command("tokenizer")
def prepare_tokenizer(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Train a byte-level BPE tokenizer on a sample of data.sources (cached); prints its description as JSON."""
    job = _load(config, overrides)
    _check_inputs(job)
    from raylm.lifecycle import workflow

    info = _run(workflow.prepare_tokenizer, job)
    typer.echo(json.dumps(info, indent=2, default=str))


@prepare_app.command("data")
def prepare_data(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Tokenize and pack data.sources into Parquet with a manifest; prints the manifest as JSON."""
    job = _load(config, overrides)
    _check_inputs(job)
    from raylm.lifecycle import workflow

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
    _check_inputs(job, resume)
    from raylm.lifecycle import workflow

    summary = _run(workflow.train, job, resume)
    typer.echo(json.dumps(redact_values(summary), indent=2, default=str))


@app.command()
def finetune(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
    resume: Optional[str] = typer.Option(
        None, "--resume", help="continue this run (its id, or its folder) instead of starting a new one"),
) -> None:
    """Train starting from a trained model folder (model.init_from): the same stages as `raylm train`."""
    job = _load(config, overrides)
    if not job.model.init_from:
        _fail("config error: model.init_from: fine-tuning starts from a trained model folder; "
              "give model.init_from=<folder>", 2)
    _check_inputs(job, resume)
    from raylm.lifecycle import workflow

    summary = _run(workflow.train, job, resume)
    typer.echo(json.dumps(redact_values(summary), indent=2, default=str))


@app.command()
def deploy(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or models:/name/version"),
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
) -> None:
    """Deploy a model on a running cluster's Ray Serve ($RAY_ADDRESS) and exit; it keeps serving there."""
    job = _load(config, overrides)
    model_path = model or job.serve.model_path
    if not model_path:
        _fail("give --model or serve.model_path", 2)
    _run(job.serve.check_exposure, job.serve.host)  # fail closed before Ray starts (the key file is read too)
    from raylm.lifecycle import workflow

    url = _run(workflow.deploy, job, model_path)
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
    job = _load(config, overrides)
    if (model is None) == (baseline is None):
        _fail("give --model or --baseline (one of them)", 2)
    from raylm.eval.baselines import BASELINES

    if baseline is not None and baseline not in BASELINES:
        _fail(f"--baseline must be one of {', '.join(BASELINES)}, not {baseline!r}", 2)
    _check_model_reference(job, model)
    from raylm.lifecycle.evaluate import evaluate_reference

    report = _run(evaluate_reference, job, model, split, output, baseline)
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
    job = _load(config, overrides)
    if force and not (reason or "").strip():
        _fail("--force needs --reason '...' (it is recorded with the promotion)", 2)
    _check_model_reference(job, model)
    from raylm.lifecycle.promotion import PromotionRefused, promote as run_gate

    def run():
        try:
            return run_gate(job.resolved_tracking_uri(), model, alias, job.eval, force=force, reason=reason)
        except PromotionRefused as refused:
            return refused.decision

    decision = _run(run)
    typer.echo(decision.table())
    if not decision.moved:
        raise typer.Exit(1)


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or models:/name/version"),
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
) -> None:
    """Serve a model on Ray Serve until SIGTERM or Ctrl-C, then drain in-flight requests and exit 0."""
    job = _load(config, overrides)
    model_path = model or job.serve.model_path
    if not model_path and not job.serve.models:
        _fail("give --model, serve.model_path or serve.models", 2)
    for reference in filter(None, [model_path, *job.serve.models.values()]):
        if not reference.startswith("models:/") and not Path(reference).is_dir():
            _fail(f"model folder not found: {reference}")
    _run(job.serve.check_exposure, job.serve.host)  # fail closed before Ray starts (the key file is read too)
    from raylm.lifecycle import workflow

    _run(workflow.serve_model, job, model_path)


@app.command()
def demo(config: Optional[Path] = ConfigOption, overrides: Optional[List[str]] = OverridesArgument) -> None:
    """Run the whole pipeline on the built-in demo corpus and print the summary path last."""
    job = _load(config, overrides)
    _check_inputs(job)
    from raylm.lifecycle import workflow

    path = _run(workflow.demo, job)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    typer.echo(str(path))


AddressOption = typer.Option(
    None, "--address", help="Ray Jobs API, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS, an http "
                            "$RAY_ADDRESS, else http://127.0.0.1:8265, where `ray dashboard cluster.yaml` forwards)")


def _submission(fn, *args, **kwargs):
    """Run a jobs-client call; cluster, address and token problems print one line and exit 1."""
    from raylm.submission import SubmissionError

    try:
        return fn(*args, **kwargs)
    except SubmissionError as err:
        _fail(str(err))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    entrypoint: Optional[List[str]] = typer.Argument(None, help="the job's command, after --"),
    address: Optional[str] = AddressOption,
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="folder uploaded as the job's working dir"),
    no_wait: bool = typer.Option(False, "--no-wait", help="print the submission id and return"),
    env: Optional[List[str]] = typer.Option(None, "--env", help="KEY=value for the job's environment (repeatable)"),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="more paths to leave out of the upload"),
    include: Optional[List[str]] = typer.Option(
        None, "--include", help="upload this path although it may hold secrets (.env, *.pem, *.key) or is over "
                                "--max-file-mib (repeatable)"),
    max_file_mib: float = typer.Option(50.0, "--max-file-mib", min=0.0,
                                       help="leave out files bigger than this (MiB), unless --include names them"),
    submission_id: Optional[str] = typer.Option(None, "--submission-id", help="default: chosen by Ray"),
) -> None:
    """Submit a job with this folder's raylm: `raylm submit -- python jobs/train.py --config jobs/configs/demo.yaml`.

    Prints the submission id, streams the logs and exits 0 if the job SUCCEEDED, 1 otherwise.
    """
    from raylm import submission

    def run() -> int:
        return submission.submit(list(entrypoint or []), address, working_dir, submission.parse_env(env or []),
                                 list(exclude or []), submission_id, wait=not no_wait, include=list(include or []),
                                 max_file_mib=max_file_mib)

    raise typer.Exit(_submission(run))


@jobs_app.command("list")
def jobs_list(address: Optional[str] = AddressOption,
              as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """The cluster's jobs, newest first: submission id, status, entrypoint."""
    from raylm import submission

    rows = _submission(submission.list_jobs, address)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        typer.echo(f"{row['submission_id']:<32} {row['status']:<10} {row['entrypoint']}")


@jobs_app.command("logs")
def jobs_logs(submission_id: str = typer.Argument(..., help="the job's submission id"),
              address: Optional[str] = AddressOption,
              follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends")) -> None:
    """Print a job's logs; exits 1 if the job FAILED or was STOPPED."""
    from raylm import submission

    raise typer.Exit(_submission(submission.job_logs, submission_id, address, follow))


@jobs_app.command("stop")
def jobs_stop(submission_id: str = typer.Argument(..., help="the job's submission id"),
              address: Optional[str] = AddressOption) -> None:
    """Stop a job and wait until it has stopped."""
    from raylm import submission

    status = _submission(submission.stop_job, submission_id, address)
    typer.echo(f"job {submission_id} {status}")


@tune_app.command("run")
def tune_run(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
    resume: Optional[str] = typer.Option(
        None, "--resume", help="continue the interrupted sweep in this folder (finished trials are not rerun)"),
) -> None:
    """Run the sweep in tune.*: Ray Train trials under Ray Tune (ASHA), a scaling-law fit, tables and plots."""
    from raylm.tune.records import locate_sweep
    from raylm.tune.space import validate_sweep

    job = None
    if resume is not None:
        if config is not None or overrides:
            _fail("--resume continues a sweep with its own config; give no --config or overrides", 2)
        try:
            locate_sweep(resume)
        except ConfigError as err:
            _fail(str(err), 2)
    else:
        job = _load(config, overrides)
        try:
            validate_sweep(job)
        except ConfigError as err:
            _fail(str(err), 2)
    from raylm.tune.sweep import run_sweep  # Ray Tune and torch: only once the sweep's config is known to be good

    results = _run(run_sweep, job, resume)
    keys = ("sweep_id", "sweep_dir", "status", "num_trials", "num_finished", "num_stopped", "num_errors",
            "total_steps", "best_trial", "best_eval_loss", "best_model_dir", "registry_uri", "parent_run_id")
    compact = {key: results.get(key) for key in keys}
    if results.get("fit"):
        compact["fit"] = {key: results["fit"][key] for key in ("E", "A", "alpha", "B", "beta", "r2", "intervals")}
    else:
        compact["fit_problem"] = results.get("fit_problem")
    typer.echo(json.dumps(compact, indent=2, default=str))


@tune_app.command("recommend")
def tune_recommend(
    sweep: str = typer.Option(..., "--sweep", help="a sweep folder, or the MLflow run id of a sweep"),
    flops: float = typer.Option(..., "--flops", help="the compute budget in FLOPs, e.g. 1e18"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="where to write the train config "
                                                                  "(default: in the sweep folder)"),
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
) -> None:
    """Compute-optimal N and D for a budget from a sweep's fit, and a config file for raylm train."""
    from raylm.tune.recommend import format_recommendation, load_results, recommend

    job = _load(config, overrides)
    results = _run(load_results, sweep, job.resolved_tracking_uri())
    recommendation = _run(recommend, results, flops, out)
    for line in format_recommendation(recommendation):
        typer.echo(line)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
