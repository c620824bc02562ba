import subprocess
import sys

import pytest
import yaml

from raylm.checks import load_job
from raylm.config import ConfigError, JobConfig, ServeConfig, apply_overrides, load_config
from tests.conftest import REPO_ROOT


def test_defaults_validate():
    job = load_config()
    assert isinstance(job, JobConfig)
    assert job.serve.host == "127.0.0.1"
    assert job.train.effective_global_batch_size == job.train.micro_batch_size * job.train.num_workers


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  lr: 0.01\n  max_steps: 50\nmodel:\n  size: debug\n")
    job = load_config(path, ["train.lr=1e-3", "data.tasks=[sentiment, qa]", "serve.port=9001"])
    assert job.train.lr == pytest.approx(1e-3)
    assert job.train.max_steps == 50
    assert job.model.size == "debug"
    assert job.data.tasks == ["sentiment", "qa"]
    assert job.serve.port == 9001


def test_overrides_do_not_mutate_input():
    raw = {"train": {"lr": 0.1}}
    merged = apply_overrides(raw, ["train.lr=0.2"])
    assert raw["train"]["lr"] == 0.1 and merged["train"]["lr"] == 0.2


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.lrr=1"], "config error: train.lrr: unknown key"),
        (["bogus=1"], "config error: bogus: unknown key"),
        (["train.lr=-1"], "config error: train.lr: Input should be greater than 0"),
        (["train.lr=fast"], "config error: train.lr: Input should be a valid number"),
        (["train.parallel=tp"], "config error: train.parallel: Input should be 'ddp' or 'fsdp'"),
        (["train.precision=fp8"], "config error: train.precision"),
        (["model.size=huge"], "config error: model: unknown size 'huge' for gpt2"),
        (["model.hidden_size=100", "model.num_heads=3"], "config error: model: hidden_size (100) must be a multiple"),
        (["model.arch=llama", "model.size=debug", "model.num_kv_heads=3"],
         "config error: model: num_heads (2) must be a multiple of num_kv_heads (3)"),
        (["eval.promotion_metrics=[accuracy]"], "config error: eval.promotion_metrics: unknown metric 'accuracy'"),
        (["eval.promotion_min_delta={bleu: 1}"], "config error: eval.promotion_min_delta: unknown metric 'bleu'"),
        (["eval.promotion_min_delta={translation_bleu: -1}"],
         "config error: eval.promotion_min_delta: translation_bleu: the margin must be >= 0"),
        (["train.global_batch_size=7"], "config error: train: global_batch_size=7 does not equal"),
        (["train.warmup_steps=500", "train.max_steps=100"], "config error: train: warmup_steps (500) must be < max_steps"),
        (["data.tasks=[poetry]"], "config error: data.tasks.0"),
        (["serve.port=70000"], "config error: serve.port"),
        (["noequals"], "must look like key.sub=value"),
        (["train.lr.x=1"], "config error: train.lr: Input should be a valid number"),
        (["train.lr=1", "train.lr.x=1"], "config error: train.lr.x: lr is not a section"),
    ],
)
def test_config_errors_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_job(None, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_schema_loading_leaves_cross_component_checks_to_raylm_checks():
    """raylm.config knows no model sizes or metrics (it imports no other raylm package); raylm.checks does."""
    job = load_config(None, ["model.size=huge"])
    with pytest.raises(ConfigError, match="unknown size 'huge'"):
        load_job(None, ["model.size=huge"])
    assert job.model.size == "huge"


def test_config_imports_no_other_raylm_package():
    code = "import sys, raylm.config; print(sorted(m for m in sys.modules if m.startswith('raylm.') " \
           "and not m.startswith('raylm.config')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT / "platform")})
    assert result.stdout.strip() == "[]"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def _cli(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, "-m", "raylm.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT / "platform")}, timeout=120)


def test_cli_config_show_resolves_overrides():
    result = _cli("config", "show", "--config", "jobs/configs/demo.yaml", "train.lr=0.001")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["lr"] == 0.001
    assert JobConfig.model_validate(shown).train.lr == 0.001


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "error: config error: train.lrr: unknown key"),
    ("model.size=huge", "error: config error: model: unknown size 'huge' for gpt2; known: debug, tiny, small, medium"),
])
def test_cli_bad_config_exits_2_with_one_line_before_ray(override, expected):
    result = _cli("train", "--config", "jobs/configs/demo.yaml", override)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [expected]
    assert "Traceback" not in result.stderr


def test_cli_refuses_a_secret_override_and_serving_beyond_loopback_without_a_key(tmp_path):
    env_without_key = {key: value for key, value in __import__("os").environ.items()
                       if key not in ("RAYLM_API_KEY", "RAYLM_API_KEY_FILE")}
    refused = subprocess.run([sys.executable, "-m", "raylm.cli", "train", "--config", "jobs/configs/demo.yaml",
                              "serve.api_key=sk-on-the-command-line"], capture_output=True, text=True, cwd=REPO_ROOT,
                             env={**env_without_key, "PYTHONPATH": str(REPO_ROOT / "platform")}, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (
        "error: config error: serve.api_key is not taken on the command line (shell history, process lists and job "
        "records keep it): set $RAYLM_API_KEY in the environment, or name a file that holds the key in "
        "serve.api_key_file")
    open_to_all = subprocess.run([sys.executable, "-m", "raylm.cli", "serve", "--model", str(tmp_path),
                                  "serve.host=0.0.0.0", "serve.port=7190"], capture_output=True, text=True,
                                 cwd=tmp_path, env={**env_without_key, "PYTHONPATH": str(REPO_ROOT / "platform")},
                                 timeout=120)
    assert open_to_all.returncode == 2 and "Traceback" not in open_to_all.stderr
    assert open_to_all.stderr.strip() == (
        "error: config error: Serve listens on 0.0.0.0, not a loopback address, and serve has no API key: name a "
        "file that holds one in serve.api_key_file (or set $RAYLM_API_KEY where the app is built), or set "
        "serve.allow_unauthenticated: true to serve without one")
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # refused before Ray started: no runs/, no logs


def test_cli_missing_config_file():
    result = _cli("train", "--config", "no/such.yaml")
    assert result.returncode == 2
    assert "file not found" in result.stderr and "Traceback" not in result.stderr


def _repo_yaml_files():
    files = sorted(REPO_ROOT.glob("jobs/configs/*.yaml")) + sorted(REPO_ROOT.glob("serve/*.yaml"))
    files.append(REPO_ROOT / "cluster.yaml")
    return files


@pytest.mark.parametrize("path", _repo_yaml_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_repo_yaml_parses(path):
    assert path.is_file(), path
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    if path.parent.name == "configs":
        load_job(path)
    if path.parent.name == "serve":
        for application in loaded["applications"]:
            args = dict(application["args"])
            args.pop("tracking_uri", None)
            ServeConfig.model_validate(args)
