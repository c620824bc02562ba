"""raylm submit's pieces without a cluster: token discovery, addresses, the runtime env, code shipping, and the
checks a driver runs before workers start. The real cluster is in tests/integration/test_cluster.py."""

import json
from pathlib import Path

import pytest

from raylm.common import cluster
from raylm import submission
from raylm.config import ConfigError, load_config
from tests.conftest import REPO_ROOT


def test_token_is_found_where_ray_looks_for_it(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    named = tmp_path / "token"
    named.write_text("  from-path \n")
    assert submission.find_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(named)},
                                      home).value == "from-env"
    found = submission.find_auth_token({"RAY_AUTH_TOKEN_PATH": str(named)}, home)
    assert found.value == "from-path" and str(named) in found.source
    assert submission.find_auth_token({}, home).value == "from-home"
    missing = submission.find_auth_token({}, tmp_path / "nobody")
    assert missing.value is None
    assert "$RAY_AUTH_TOKEN" in missing.source and str(tmp_path / "nobody" / ".ray" / "auth_token") in missing.source
    # A named file that is not there is the user's mistake, not a reason to fall back silently.
    with pytest.raises(submission.SubmissionError, match="RAY_AUTH_TOKEN_PATH=.*does not exist"):
        submission.find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "gone")}, home)


def test_jobs_api_address():
    assert submission.resolve_address(None, {}) == "http://127.0.0.1:8265"
    assert submission.resolve_address("10.0.0.5:8265", {}) == "http://10.0.0.5:8265"
    assert submission.resolve_address(None, {"RAY_API_SERVER_ADDRESS": "http://h:1/"}) == "http://h:1"
    # A GCS address in RAY_ADDRESS is not the Jobs API.
    assert submission.resolve_address(None, {"RAY_ADDRESS": "10.0.0.5:6379"}) == "http://127.0.0.1:8265"
    assert submission.resolve_address(None, {"RAY_ADDRESS": "http://h:8265"}) == "http://h:8265"


def test_submission_runtime_env_ships_the_working_trees_raylm(tmp_path):
    env = submission.build_runtime_env(REPO_ROOT, {"HF_HOME": "/cache"}, ["data/"])
    assert env["working_dir"] == str(REPO_ROOT)
    assert env["py_modules"] == [str(REPO_ROOT / "platform" / "raylm")]
    assert {".git", ".venv", "runs", "mlruns", "__pycache__", "data/"} <= set(env["excludes"])
    assert env["env_vars"]["HF_HOME"] == "/cache" and env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["worker_process_setup_hook"] == "raylm.common.logging.configure_worker_logging"
    plain = tmp_path / "scripts"
    plain.mkdir()
    assert "py_modules" not in submission.build_runtime_env(plain)  # no raylm in it: nothing to ship
    with pytest.raises(submission.SubmissionError, match="working folder not found"):
        submission.build_runtime_env(tmp_path / "missing")
    assert submission.parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(submission.SubmissionError, match="KEY=value"):
        submission.parse_env(["novalue"])


def _packed(folder: Path, excludes: list[str], zips: Path) -> set[str]:
    """The files Ray's own packer (what `ray job submit` and `raylm submit` upload) puts in the zip."""
    import tempfile
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    zips.mkdir(exist_ok=True)
    target = Path(tempfile.mkdtemp(dir=zips)) / "package.zip"
    create_package(str(folder), target, include_gitignore=True, excludes=excludes)
    with zipfile.ZipFile(target) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


def test_upload_leaves_out_secrets_and_big_files_unless_included(tmp_path):
    folder = tmp_path / "repo"
    files = {"jobs/train.py": 10, ".env": 10, "conf/.env.local": 10, "certs/ca.pem": 10, "certs/server.key": 10,
             "keep/client.pem": 10, "data/big.bin": 3 * 2**20, "data/wanted.bin": 3 * 2**20, "data/small.bin": 10,
             ".git/config.pem": 10, "notes/big.bin": 3 * 2**20, "platform/raylm/__init__.py": 10,
             "platform/raylm/leaked.pem": 10, "odd [name]*.bin": 3 * 2**20}
    for name, size in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x" * size)
    plan = submission.plan_upload(folder, excludes=["notes/"], include=["keep/client.pem", "data/wanted.bin"],
                                  max_file_mib=1)
    # What is left out beyond the usual excludes (.git, notes/ as asked) is named, with why.
    assert plan.left_out == [".env (may hold secrets)", "odd [name]*.bin (3 MiB > 1 MiB)",
                             "certs/ca.pem (may hold secrets)", "certs/server.key (may hold secrets)",
                             "conf/.env.local (may hold secrets)", "data/big.bin (3 MiB > 1 MiB)",
                             "platform/raylm/leaked.pem (may hold secrets)"]
    env = submission.build_runtime_env(folder, plan=plan)
    zips = tmp_path / "zips"
    assert _packed(folder, env["excludes"], zips) == {"jobs/train.py", "keep/client.pem", "data/wanted.bin",
                                                      "data/small.bin", "platform/raylm/__init__.py"}
    # The same excludes apply to the raylm package shipped as a py_module.
    assert _packed(folder / "platform" / "raylm", env["excludes"], zips) == {"__init__.py"}
    line = submission.describe_left_out(plan, shown=2)
    assert line == ("left out of the upload: .env (may hold secrets), odd [name]*.bin (3 MiB > 1 MiB) and 5 more "
                    "(--include PATH sends one anyway)")
    assert submission.describe_left_out(submission.plan_upload(folder / "jobs")) is None
    # Without a plan, the defaults: secrets out, nothing here is over 50 MiB.
    default = submission.build_runtime_env(folder)
    assert _packed(folder, default["excludes"], zips) == {"jobs/train.py", "data/big.bin", "data/wanted.bin",
                                                          "data/small.bin", "notes/big.bin", "odd [name]*.bin",
                                                          "platform/raylm/__init__.py"}


def test_secrets_on_the_job_command_line_or_in_its_environment_are_refused():
    refused = [
        ["python", "jobs/train.py", "tracking.tracking_uri=postgresql://u:pg-secret@db/mlflow"],
        ["python", "jobs/x.py", "--api-key", "pg-secret"],
        ["python", "jobs/x.py", "--token=pg-secret"],
    ]
    for entrypoint in refused:
        with pytest.raises(submission.SubmissionError, match="the job's command holds a secret") as err:
            submission.check_no_secrets(entrypoint)
        assert "pg-secret" not in str(err.value) and "\n" not in str(err.value)
    # raylm's own secret keys: the hint that says where the key goes instead.
    with pytest.raises(submission.SubmissionError, match="serve.api_key is not taken on the command line") as err:
        submission.check_no_secrets(["python", "jobs/deploy.py", "serve.api_key=pg-secret"])
    assert "pg-secret" not in str(err.value) and "serve.api_key_file" in str(err.value)
    with pytest.raises(submission.SubmissionError, match="RAYLM_API_KEY=... would be stored with the job") as err:
        submission.check_no_secrets(["python", "jobs/deploy.py"], {"RAYLM_API_KEY": "pg-secret"})
    assert "pg-secret" not in str(err.value)
    for env in ({"HF_TOKEN": "pg-secret"}, {"MLFLOW_TRACKING_URI": "https://u:pg-secret@mlflow:5000"}):
        with pytest.raises(submission.SubmissionError, match=r"--env \w+=\*\*\* is a secret") as err:
            submission.check_no_secrets(["python", "jobs/train.py"], env)
        assert "pg-secret" not in str(err.value)
    submission.check_no_secrets(["python", "jobs/train.py", "--config", "jobs/configs/smoke.yaml", "train.lr=1e-3",
                                 "tracking.tracking_uri=http://head:5000", "eval.max_new_tokens=8"],
                                {"MLFLOW_TRACKING_URI": "http://head:5000", "TOKENIZERS_PARALLELISM": "false",
                                 "RAY_AUTH_TOKEN_PATH": "/etc/ray/token"})


def test_jobs_list_redacts_jobs_submitted_some_other_way():
    from ray.job_submission import JobDetails, JobStatus, JobType

    job = JobDetails(type=JobType.SUBMISSION, job_id="02000000", submission_id="raysubmit_abc", status=JobStatus.FAILED,
                     entrypoint="python jobs/train.py tracking.tracking_uri=https://u:pg-secret@h:5000 "
                                "serve.api_key=pg-secret train.lr=1e-3",
                     message="Job failed: cannot reach https://u:pg-secret@h:5000/api?token=pg-secret&page=2")
    row = submission.job_row(job)
    assert "pg-secret" not in json.dumps(row)
    assert row["entrypoint"] == ("python jobs/train.py tracking.tracking_uri=https://u:***@h:5000 serve.api_key=*** "
                                 "train.lr=1e-3")
    assert row["message"] == "Job failed: cannot reach https://u:***@h:5000/api?token=***&page=2"
    assert row["submission_id"] == "raysubmit_abc" and row["status"] == "FAILED"


def test_driver_adds_only_what_the_submitted_job_lacks(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    hook = "raylm.common.logging.configure_worker_logging"
    variables = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    alone = cluster.runtime_env_for_cluster(variables, hook)
    assert alone["py_modules"] == [str(cluster.package_dir())] and alone["env_vars"] == variables
    # `ray job submit --working-dir .`: the driver adds raylm and what else is missing, never a field the job set
    # (Ray refuses to merge two runtime envs that set the same field or variable).
    submitted = {"working_dir": "gcs://_ray_pkg_1.zip", "env_vars": {"TOKENIZERS_PARALLELISM": "true"}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": submitted}))
    added = cluster.runtime_env_for_cluster(variables, hook)
    assert added["py_modules"] == [str(cluster.package_dir())]
    assert added["env_vars"] == {"RAY_USAGE_STATS_ENABLED": "0"} and added["worker_process_setup_hook"] == hook
    # `raylm submit`: everything is in the submitted env already, so the driver's env is the job's.
    shipped = {"working_dir": "gcs://_ray_pkg_1.zip", "py_modules": ["gcs://_ray_pkg_2.zip"],
               "env_vars": {**variables, cluster.SETUP_HOOK_ENV_VAR: hook}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": shipped}))
    assert cluster.runtime_env_for_cluster(variables, hook) == {}


def test_workers_refuse_code_other_than_the_drivers():
    cluster.check_worker_code(None)  # a local run: nothing to compare
    cluster.check_worker_code(cluster.code_fingerprint())
    with pytest.raises(RuntimeError, match="not the code the driver runs"):
        cluster.check_worker_code("0123456789abcdef")


def test_relative_workdir_in_rays_copy_of_the_working_dir_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    assert cluster.in_ray_working_dir_copy(copy) and not cluster.in_ray_working_dir_copy(tmp_path)
    monkeypatch.chdir(copy)
    with pytest.raises(ConfigError, match="workdir: 'runs' is relative.*Ray deletes") as err:
        cluster.check_workdir(load_config(None, []))
    assert "\n" not in str(err.value)
    for fine in (str(tmp_path / "runs"), "s3://bucket/runs"):
        cluster.check_workdir(load_config(None, [f"workdir={fine}"]))
    monkeypatch.chdir(tmp_path)
    cluster.check_workdir(load_config(None, []))  # relative is fine outside Ray's copy


def test_tracking_checks(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cluster.is_local_tracking_uri("sqlite:////tmp/m.db") and cluster.is_local_tracking_uri("./mlruns")
    assert cluster.is_local_tracking_uri("file:///tmp/mlruns")
    assert not cluster.is_local_tracking_uri("http://mlflow:5000")
    assert not cluster.is_local_tracking_uri("postgresql://db/mlflow")
    local = load_config(None, ["workdir=/shared/runs"])
    cluster.check_tracking(local, spans_nodes=False)
    with pytest.raises(ConfigError, match="local MLflow store, but the training workers run on several nodes"):
        cluster.check_tracking(local, spans_nodes=True)
    cluster.check_tracking(load_config(None, ["workdir=/shared/runs", "tracking.tracking_uri=http://m:5000"]), True)
    cluster.check_tracking(load_config(None, ["workdir=/shared/runs", "tracking.enabled=false"]), True)
    with pytest.raises(ConfigError, match="is remote and an SQLite file cannot live there"):
        cluster.check_tracking(load_config(None, ["workdir=s3://bucket/runs"]), spans_nodes=False)


def _cli(*args, **env_changes):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "platform"), **env_changes}
    env = {key: value for key, value in env.items() if value is not None}
    return subprocess.run([sys.executable, "-m", "raylm.cli", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=300)


def test_finetune_deploy_and_submit_refuse_bad_input_with_one_line(tmp_path):
    finetune = _cli("finetune", "--config", "jobs/configs/finetune_demo.yaml")
    assert finetune.returncode == 2
    assert finetune.stderr.strip() == ("error: config error: model.init_from: fine-tuning starts from a trained "
                                       "model folder; give model.init_from=<folder>")
    deploy = _cli("deploy", "--model", str(tmp_path), RAY_ADDRESS=None)
    assert deploy.returncode == 2 and deploy.stderr.strip().startswith("error: deploy: no cluster to deploy to")
    nothing = _cli("submit", "--address", "http://127.0.0.1:9")
    assert nothing.returncode == 1 and nothing.stderr.strip().startswith("error: give the job's command after --")
    secret = _cli("submit", "--address", "http://127.0.0.1:9", "--", "python", "jobs/train.py",
                  "tracking.tracking_uri=https://raylm:pg-secret@mlflow:5000")
    assert secret.returncode == 1 and "pg-secret" not in secret.stdout + secret.stderr
    assert secret.stderr.strip().splitlines() == [
        "error: the job's command holds a secret (tracking.tracking_uri=https://raylm:***@mlflow:5000); Ray keeps a "
        "job's command in its metadata, which `raylm jobs list` and the dashboard show; put secrets on the cluster's "
        "nodes instead: an environment variable set there or a file they mount (cluster.yaml), e.g. "
        "MLFLOW_TRACKING_URI for a tracking URI with credentials"]
    unreachable = _cli("jobs", "list", "--address", "http://127.0.0.1:9", RAY_AUTH_TOKEN="t")
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    assert unreachable.stderr.strip() == ("error: cannot reach the Ray Jobs API at http://127.0.0.1:9: is the cluster "
                                          "up (`ray up cluster.yaml`) and its dashboard forwarded (`ray dashboard "
                                          "cluster.yaml`)? Or pass --address")


@pytest.mark.parametrize("entrypoint, env_vars, fragment", [
    (["python", "jobs/deploy.py", "--model", "m", "serve.api_key=sk-in-entrypoint"], {},
     "config error: serve.api_key is not taken on the command line"),
    (["bash", "-c", "python jobs/train.py serve.api_key=sk-in-entrypoint"], {},
     "config error: serve.api_key is not taken on the command line"),
    (["python", "jobs/deploy.py", "--model", "m"], {"RAYLM_API_KEY": "sk-in-entrypoint"},
     "--env RAYLM_API_KEY=... would be stored with the job"),
])
def test_submit_refuses_a_secret_the_job_record_would_keep(entrypoint, env_vars, fragment, monkeypatch):
    # Refused before the cluster is contacted (nothing listens on port 9).
    with pytest.raises(submission.SubmissionError) as info:
        submission.submit(entrypoint, address="http://127.0.0.1:9", env_vars=env_vars)
    assert str(info.value).startswith(fragment) and "sk-in-entrypoint" not in str(info.value)
    assert "serve.api_key_file" in str(info.value)
    # Other words that merely contain the name are fine (checked up to the connection, which fails).
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")  # the client's token, from its environment (not the job's)
    with pytest.raises(submission.SubmissionError, match="cannot reach the Ray Jobs API"):
        submission.submit(["python", "x.py", "serve.api_key_file=/k", "--note=my.serve.api_key=x"],
                          address="http://127.0.0.1:9")
