"""The cluster commands: submit, jobs list/logs/stop (Ray Jobs API), and tune run/recommend (scaling sweeps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from raylm.cli.base import ConfigOption, OverridesArgument, app, call, fail, jobs_app, load, tune_app
from raylm.config import ConfigError

AddressOption = typer.Option(
    None, "--address", help="Ray Jobs API, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS, an http "
                            "$RAY_ADDRESS, else http://127.0.0.1:8265, where `ray dashboard cluster.yaml` forwards)")


def _submission(fn, *args, **kwargs):
    """Run a jobs-client call; cluster, address and token problems print one line and exit 1."""
    from raylm.submission import SubmissionError

    try:
        return fn(*args, **kwargs)
    except SubmissionError as err:
        fail(str(err))


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
            fail("--resume continues a sweep with its own config; give no --config or overrides", 2)
        try:
            locate_sweep(resume)
        except ConfigError as err:
            fail(str(err), 2)
    else:
        job = load(config, overrides)
        try:
            validate_sweep(job)
        except ConfigError as err:
            fail(str(err), 2)
    from raylm.tune.sweep import run_sweep  # Ray Tune and torch: only once the sweep's config is known to be good

    results = call(run_sweep, job, resume)
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

    job = load(config, overrides)
    results = call(load_results, sweep, job.resolved_tracking_uri())
    recommendation = call(recommend, results, flops, out)
    for line in format_recommendation(recommendation):
        typer.echo(line)
