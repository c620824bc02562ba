"""Every YAML file in the repository is parsed and validated by the tool that will read it.

Job configs by raylm's config loader, Serve configs by Ray Serve's own deploy
schema, cluster files by Ray's autoscaler validation (tests/unit/test_cluster_config.py).
A new YAML file of another kind fails here until a check for it is added.
"""

import copy
import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO_ROOT


def _repo_yaml_files() -> list[str]:
    """Tracked and untracked-but-not-ignored YAML files, as git sees the working tree."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.yaml", "*.yml"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    return sorted(path for path in listed if (REPO_ROOT / path).is_file())


def _kind(path: str) -> str:
    if path.startswith("jobs/configs/"):
        return "job"
    if path.startswith("serve/"):
        return "serve"
    if path.split("/")[-1].startswith("cluster") and "/" not in path:
        return "cluster"
    if path.startswith("deploy/iam/gcp-") and path.endswith("-role.yaml"):
        return "gcp-role"
    return "unknown"


def test_the_repository_has_each_kind():
    kinds = {_kind(path) for path in _repo_yaml_files()}
    assert {"job", "serve", "cluster"} <= kinds


@pytest.mark.parametrize("path", _repo_yaml_files())
def test_yaml_file_is_valid_for_its_reader(path):
    loaded = yaml.safe_load((REPO_ROOT / path).read_text())
    assert isinstance(loaded, dict), f"{path}: top level must be a mapping"
    kind = _kind(path)
    assert kind != "unknown", f"{path}: no check validates this YAML file; add one to {__name__}"
    if kind == "job":
        from raylm.checks import load_job
        from raylm.tune.space import validate_sweep

        job = load_job(REPO_ROOT / path)
        if job.tune.space:  # raylm tune checks its sweep: every trial must be a valid job config
            validate_sweep(job)
    elif kind == "gcp-role":  # `gcloud iam roles create --file`: a custom role's fields
        assert set(loaded) == {"title", "description", "stage", "includedPermissions"}, path
        assert all(re.fullmatch(r"[a-z]+\.[a-zA-Z]+\.[a-zA-Z]+", item) for item in loaded["includedPermissions"])
    elif kind == "serve":
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(loaded) if hasattr(ServeDeploySchema, "model_validate") \
            else ServeDeploySchema.parse_obj(loaded)
    else:
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(copy.deepcopy(loaded)))
