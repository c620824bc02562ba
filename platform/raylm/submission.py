"""``raylm submit`` and ``raylm jobs list | logs | stop``: Ray Jobs on a cluster.

A submission packs the working folder (with :data:`raylm.common.cluster.UPLOAD_EXCLUDES`
left out: ``.git``, ``.venv``, ``runs``, ``mlruns``, caches, weights; and, unless
``--include`` names them, files that may hold secrets (:data:`SENSITIVE_PATTERNS`)
and files over ``--max-file-mib``, each named in the output), adds the
folder's ``platform/raylm`` as a ``py_modules`` entry so that the driver and
every worker import the submitted code rather than an installed copy, prints
the submission id, streams the logs and exits with the job's status.

A job's command and environment are part of its metadata, which the Jobs API,
the dashboard and ``raylm jobs list`` show to anyone who can reach them: a
submission whose command or ``--env`` holds a secret (a credential in a URI, a
``serve.api_key=...``-like pair) is refused, and what ``jobs list`` prints is
redacted for jobs submitted some other way.

The authentication token is found the way Ray finds it: ``$RAY_AUTH_TOKEN``,
then the file ``$RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``. A cluster
that wants a token nobody gave gets one line that says where to put it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from raylm.common.cluster import UPLOAD_EXCLUDES
from raylm.common.logging import WORKER_SETUP_HOOK
from raylm.common.ray_session import worker_env_vars
from raylm.config import API_KEY_ENV, ConfigError, refuse_secret_overrides
from raylm.config.redaction import MASK, is_secret_name, redact_text

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
# Files that may hold secrets; left out of an upload unless --include names them.
SENSITIVE_PATTERNS = (".env", ".env.*", "*.pem", "*.key")
DEFAULT_MAX_FILE_MIB = 50
SECRET_HELP = ("put secrets on the cluster's nodes instead: an environment variable set there or a file they "
               "mount (cluster.yaml), e.g. MLFLOW_TRACKING_URI for a tracking URI with credentials")
TOKEN_HELP = ("set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding the token, or put it in "
              "~/.ray/auth_token (on the cluster, `ray get-auth-token` prints it)")


class SubmissionError(RuntimeError):
    """A user-facing problem with the cluster, its address or its token; the message is one line."""


@dataclass
class AuthToken:
    value: Optional[str]
    source: str  # where it came from, or every place that was searched


def find_auth_token(environ: dict[str, str] | None = None, home: Path | None = None) -> AuthToken:
    """The Ray authentication token: ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``.

    A ``RAY_AUTH_TOKEN_PATH`` that names a missing or empty file is an error
    rather than a silent fallback: the user meant that file.
    """
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return AuthToken(environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN")
    named = environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise SubmissionError(f"RAY_AUTH_TOKEN_PATH={named} does not exist; {TOKEN_HELP}")
        token = path.read_text().strip()
        if not token:
            raise SubmissionError(f"RAY_AUTH_TOKEN_PATH={named} is empty; {TOKEN_HELP}")
        return AuthToken(token, f"$RAY_AUTH_TOKEN_PATH ({named})")
    default = (home or Path.home()) / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return AuthToken(default.read_text().strip(), str(default))
    return AuthToken(None, f"$RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, {default}")


def resolve_address(address: str | None = None, environ: dict[str, str] | None = None) -> str:
    """The Jobs API address: ``--address``, else ``$RAY_API_SERVER_ADDRESS``, else an http ``$RAY_ADDRESS``,
    else the local dashboard (``ray dashboard cluster.yaml`` forwards a cluster's there)."""
    environ = os.environ if environ is None else environ
    chosen = address or environ.get("RAY_API_SERVER_ADDRESS")
    if not chosen and environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        chosen = environ["RAY_ADDRESS"]
    chosen = (chosen or DEFAULT_ADDRESS).rstrip("/")
    return chosen if "://" in chosen else f"http://{chosen}"


def connect(address: str | None = None):
    """A ``JobSubmissionClient`` for the cluster, with the token in its headers; one-line errors."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = find_auth_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token.value else {}
    # Ray would log its own multi-line warning about a missing token; the error below says it in one line.
    logging.getLogger("ray._private.authentication.http_token_authentication").setLevel(logging.ERROR)
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as err:
        raise SubmissionError(_auth_message(url, token, err)) from None
    except ConnectionError:
        raise SubmissionError(f"cannot reach the Ray Jobs API at {url}: is the cluster up (`ray up cluster.yaml`) and "
                              "its dashboard forwarded (`ray dashboard cluster.yaml`)? Or pass --address") from None


def _auth_message(url: str, token: AuthToken, err: Exception) -> str:
    if token.value is None:
        if "Authentication required" not in str(err):  # refused here, before asking the cluster
            return f"RAY_AUTH_MODE=token is set but no authentication token was found (looked in " \
                   f"{token.source}); {TOKEN_HELP}"
        return f"the Ray cluster at {url} requires an authentication token and none was found " \
               f"(looked in {token.source}); {TOKEN_HELP}"
    if "403" in str(err) or "invalid" in str(err).lower() or "Forbidden" in str(err):
        return f"the Ray cluster at {url} rejected the authentication token from {token.source}; " \
               "use the cluster's token (`ray get-auth-token` on its head node)"
    return f"authentication with the Ray cluster at {url} failed: {str(err).splitlines()[0]}"


def _call(client_action: Callable[[], Any], url: str) -> Any:
    """Run a client call, turning authentication and HTTP failures into one-line SubmissionErrors."""
    from ray.exceptions import AuthenticationError

    try:
        return client_action()
    except AuthenticationError as err:
        raise SubmissionError(_auth_message(url, find_auth_token(), err)) from None
    except RuntimeError as err:
        raise SubmissionError(str(err).splitlines()[0] if str(err) else repr(err)) from None


def _matches(relative: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Whether ``relative`` (a POSIX path under the working folder) or a folder above it matches a pattern.

    Gitignore-like: a pattern without ``/`` matches a name at any depth, one with ``/`` (or a leading
    ``/``) a path from the top. Ray applies the real excludes; this finds what they will leave out.
    """
    parts = relative.split("/")
    for depth in range(1, len(parts) + 1):
        path, name = "/".join(parts[:depth]), parts[depth - 1]
        for pattern in patterns:
            stripped = pattern.strip("/")
            if not stripped:
                continue
            anchored = pattern.startswith("/") or "/" in stripped
            if fnmatch.fnmatchcase(path if anchored else name, stripped):
                return True
    return False


def _anchored(relative: str) -> str:
    """An exclude pattern naming exactly the file ``relative`` from the top of the working folder."""
    return "/" + re.sub(r"([\\*?\[\]])", r"\\\1", relative)


@dataclass
class UploadPlan:
    """What a submission uploads: Ray's ``excludes`` and the files left out beyond the usual ones, with why."""

    excludes: list[str]
    left_out: list[str]


def plan_upload(folder: str | Path, excludes: list[str] | None = None, include: list[str] | None = None,
                max_file_mib: float = DEFAULT_MAX_FILE_MIB) -> UploadPlan:
    """The excludes of the working folder's upload; names the files that may hold secrets or are too big.

    Files matching :data:`SENSITIVE_PATTERNS` (``.env``, keys, certificates) and files
    over ``max_file_mib`` are left out unless a pattern in ``include`` names them (or a
    folder above them); what :data:`UPLOAD_EXCLUDES` and ``excludes`` leave out anyway
    is not searched.
    """
    root = Path(folder)
    skipped = [*UPLOAD_EXCLUDES, *(excludes or [])]
    include = list(include or [])
    limit = max_file_mib * 2**20
    negations, too_big, left_out = [], [], []
    for directory, subfolders, files in os.walk(root):
        here = Path(directory).relative_to(root).as_posix()
        prefix = "" if here == "." else here + "/"
        subfolders[:] = sorted(name for name in subfolders if not _matches(prefix + name, skipped))
        for name in sorted(files):
            relative = prefix + name
            if _matches(relative, skipped):
                continue
            sensitive = _matches(relative, SENSITIVE_PATTERNS)
            if _matches(relative, include):
                if sensitive:
                    negations.append("!" + _anchored(relative))
                continue
            if sensitive:
                left_out.append(f"{relative} (may hold secrets)")
                continue
            try:
                size = os.path.getsize(Path(directory) / name)
            except OSError:
                continue
            if size > limit:
                too_big.append(_anchored(relative))
                left_out.append(f"{relative} ({size / 2**20:.0f} MiB > {max_file_mib:g} MiB)")
    return UploadPlan([*UPLOAD_EXCLUDES, *SENSITIVE_PATTERNS, *negations, *(excludes or []), *too_big], left_out)


def build_runtime_env(working_dir: str | Path, env_vars: dict[str, str] | None = None,
                      excludes: list[str] | None = None, plan: UploadPlan | None = None) -> dict[str, Any]:
    """The runtime env of a submission: the working folder (with excludes) and its raylm as a py_module.

    ``py_modules`` puts the submitted ``platform/raylm`` ahead of any installed
    raylm on the driver and on every worker. ``plan`` (:func:`plan_upload`) gives
    the excludes; without one, the folder is planned with the defaults.
    """
    folder = Path(working_dir).resolve()
    if not folder.is_dir():
        raise SubmissionError(f"working folder not found: {folder}")
    plan = plan or plan_upload(folder, excludes)
    runtime_env: dict[str, Any] = {"working_dir": str(folder), "excludes": plan.excludes}
    package = folder / "platform" / "raylm"
    if (package / "__init__.py").is_file():
        runtime_env["py_modules"] = [str(package)]
    # Everything the driver would otherwise add when it joins, so that its runtime env is the
    # submitted one and Ray sets up nothing again.
    runtime_env["env_vars"] = {**worker_env_vars(), "PYTHONUNBUFFERED": "1", **(env_vars or {})}
    runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    return runtime_env


def check_no_secrets(entrypoint: list[str], env_vars: dict[str, str] | None = None) -> None:
    """Refuse, before anything is sent, a job whose command or environment holds a secret: Ray keeps both in
    the job's metadata and shows them to whoever lists jobs. raylm's own secret keys (``serve.api_key=``,
    ``$RAYLM_API_KEY``) get their specific hint; any other secret the generic one."""
    try:
        refuse_secret_overrides(entrypoint)
    except ConfigError as err:
        raise SubmissionError(str(err)) from None
    if API_KEY_ENV in (env_vars or {}):
        raise SubmissionError(f"--env {API_KEY_ENV}=... would be stored with the job and shown by `ray job list`: "
                              "put the key in a file on the nodes (cluster.yaml mounts ~/.raylm/api_key) and name "
                              "it in serve.api_key_file")
    for index, argument in enumerate(entrypoint):
        two_words = (argument.startswith("--") and "=" not in argument and is_secret_name(argument)
                     and index + 1 < len(entrypoint))
        if redact_text(argument) != argument or two_words:
            shown = f"{argument} {MASK}" if two_words else redact_text(argument)
            raise SubmissionError(f"the job's command holds a secret ({shown}); Ray keeps a job's command in its "
                                  f"metadata, which `raylm jobs list` and the dashboard show; {SECRET_HELP}")
    for key, value in (env_vars or {}).items():
        if is_secret_name(key) or redact_text(value) != value:
            raise SubmissionError(f"--env {key}={MASK} is a secret; Ray keeps a job's environment in its metadata, "
                                  f"which the dashboard and the Jobs API show; {SECRET_HELP}")


def describe_left_out(plan: UploadPlan, shown: int = 8) -> str | None:
    """One line naming the files the upload leaves out beyond the usual ones, or None."""
    if not plan.left_out:
        return None
    more = f" and {len(plan.left_out) - shown} more" if len(plan.left_out) > shown else ""
    return (f"left out of the upload: {', '.join(plan.left_out[:shown])}{more} "
            "(--include PATH sends one anyway)")


def parse_env(pairs: list[str]) -> dict[str, str]:
    """``["KEY=value", ...]`` -> dict, with a one-line error for a pair without ``=``."""
    env: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[0]:
            raise SubmissionError(f"--env {pair!r} must look like KEY=value")
        key, value = pair.split("=", 1)
        env[key] = value
    return env


def submit(entrypoint: list[str], address: str | None = None, working_dir: str | Path = ".",
           env_vars: dict[str, str] | None = None, excludes: list[str] | None = None,
           submission_id: str | None = None, wait: bool = True, out=None, include: list[str] | None = None,
           max_file_mib: float = DEFAULT_MAX_FILE_MIB) -> int:
    """Submit ``entrypoint`` as a Ray job; stream its logs and return its exit code (0 when it SUCCEEDED).

    Without ``wait`` it returns 0 once the job is accepted. The submission id is
    printed first, on a line of its own, after a line naming the files left out
    of the upload (:func:`plan_upload`; ``include`` and ``max_file_mib`` change that).
    """
    out = out or sys.stdout
    if not entrypoint:
        raise SubmissionError("give the job's command after --, e.g. raylm submit -- python jobs/train.py "
                              "--config jobs/configs/smoke.yaml")
    check_no_secrets(entrypoint, env_vars)
    if not Path(working_dir).is_dir():
        raise SubmissionError(f"working folder not found: {Path(working_dir).resolve()}")
    plan = plan_upload(Path(working_dir).resolve(), excludes, include, max_file_mib)
    client = connect(address)
    url = resolve_address(address)
    runtime_env = build_runtime_env(working_dir, env_vars, excludes, plan)
    note = describe_left_out(plan)
    if note:
        print(note, file=out, flush=True)
    job_id = _call(lambda: client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env,
                                             submission_id=submission_id), url)
    print(f"submitted {job_id}", file=out, flush=True)
    if not wait:
        print(f"follow it with: raylm jobs logs {job_id} --follow --address {url}", file=out, flush=True)
        return 0
    try:
        follow_logs(client, job_id, out)
        status = wait_for_job(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (raylm jobs stop {job_id} --address {url})",
              file=out, flush=True)
        return 130
    info = client.get_job_info(job_id)
    message = f": {info.message}" if status != "SUCCEEDED" and info.message else ""
    print(f"job {job_id} {status}{message}", file=out, flush=True)
    return 0 if status == "SUCCEEDED" else 1


def follow_logs(client, job_id: str, out) -> None:
    """Stream the job's logs until it ends; falls back to polling when the log stream drops."""

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(stream())
        return
    except Exception:  # a dropped websocket: print what the polling API has instead
        pass
    printed = 0
    while True:
        logs = client.get_job_logs(job_id)
        out.write(logs[printed:])
        out.flush()
        printed = len(logs)
        if str(client.get_job_status(job_id)) in TERMINAL_STATUSES:
            break
        time.sleep(1.0)


def wait_for_job(client, job_id: str, timeout_s: float | None = None) -> str:
    """Poll until the job reaches a terminal status; returns it (SUCCEEDED, FAILED or STOPPED)."""
    started = time.time()
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL_STATUSES:
            return status
        if timeout_s is not None and time.time() - started > timeout_s:
            return status
        time.sleep(0.5)


def job_row(job) -> dict[str, Any]:
    """What ``raylm jobs list`` shows of a job (``JobDetails``), redacted: a job submitted some other way
    (``ray job submit``) may carry a secret in its command or its message."""
    return {"submission_id": job.submission_id or job.job_id, "status": str(job.status.value),
            "entrypoint": redact_text(job.entrypoint or ""), "start_time": job.start_time, "end_time": job.end_time,
            "message": redact_text(job.message) if job.message else job.message}


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    """Every job the cluster knows, newest first, as plain dicts (:func:`job_row`)."""
    client = connect(address)
    url = resolve_address(address)
    rows = [job_row(job) for job in _call(client.list_jobs, url)]
    return sorted(rows, key=lambda row: row["start_time"] or 0, reverse=True)


def job_logs(submission_id: str, address: str | None = None, follow: bool = False, out=None) -> int:
    """Print a job's logs (``follow``: until it ends); returns 0, or 1 when the job FAILED or was STOPPED."""
    out = out or sys.stdout
    client = connect(address)
    url = resolve_address(address)
    _call(lambda: client.get_job_info(submission_id), url)
    if follow:
        follow_logs(client, submission_id, out)
    else:
        out.write(_call(lambda: client.get_job_logs(submission_id), url))
        out.flush()
    status = str(client.get_job_status(submission_id).value)
    return 1 if status in ("FAILED", "STOPPED") else 0


def stop_job(submission_id: str, address: str | None = None, wait_s: float = 60.0) -> str:
    """Ask the cluster to stop a job and wait (up to ``wait_s``) until it has; returns its final status."""
    client = connect(address)
    url = resolve_address(address)
    _call(lambda: client.stop_job(submission_id), url)
    return wait_for_job(client, submission_id, timeout_s=wait_s)
