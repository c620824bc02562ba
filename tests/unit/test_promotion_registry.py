"""Registry references: ``models:/name/version`` and ``models:/name@alias`` against a real MLflow store."""

from __future__ import annotations

import json

import pytest

from raylm.common import tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store with two registered versions of one model (different weights files)."""
    tmp_path = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    versions = []
    for index in (1, 2):
        folder = tmp_path / f"model{index}"
        folder.mkdir()
        (folder / "raylm.json").write_text(json.dumps({"which": index}))
        run_id = tracking.start_run(uri, "registry-test", f"run{index}", {"index": index})
        versions.append(tracking.finish_run(uri, run_id, folder, {"score": float(index)}, "m"))
    return uri, versions


def test_parse_registry_uri_forms():
    assert tracking.parse_registry_uri("models:/m/3") == ("m", "3", None)
    assert tracking.parse_registry_uri("models:/my-model@production") == ("my-model", None, "production")
    for bad in ("models:/m", "models:/m/x", "models:/@a", "models:/m@", "runs:/abc/model", "models:/a@b/3"):
        with pytest.raises(tracking.RegistryError, match="models:/"):
            tracking.parse_registry_uri(bad)


def test_alias_resolves_to_the_version_holding_it_now(store, tmp_path):
    uri, versions = store
    assert versions == ["models:/m/1", "models:/m/2"]
    client = tracking.mlflow_client(uri)
    client.set_registered_model_alias("m", "production", "1")
    first = tracking.resolve_model_path("models:/m@production", uri, str(tmp_path / "a"))
    assert json.loads((first / "raylm.json").read_text()) == {"which": 1}
    client.set_registered_model_alias("m", "production", "2")
    second = tracking.resolve_model_path("models:/m@production", uri, str(tmp_path / "b"))
    assert json.loads((second / "raylm.json").read_text()) == {"which": 2}
    by_version = tracking.resolve_model_path("models:/m/1", uri, str(tmp_path / "c"))
    assert json.loads((by_version / "raylm.json").read_text()) == {"which": 1}


@pytest.mark.parametrize("reference, fragment", [
    ("models:/m@staging", "no alias 'staging'"),
    ("models:/m/9", "no version 9"),
    ("models:/other@production", "'other'"),
])
def test_unknown_references_fail_with_one_clear_line(store, reference, fragment):
    uri, _ = store
    with pytest.raises(tracking.RegistryError, match=fragment) as caught:
        tracking.resolve_model_path(reference, uri)
    assert "\n" not in str(caught.value)


def test_a_store_that_is_not_there_is_not_created_to_look_in(store, tmp_path):
    uri, _ = store
    assert tracking.store_exists(uri)
    for missing in (f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", f"file://{tmp_path / 'mlruns'}",
                    str(tmp_path / "mlruns")):
        assert not tracking.store_exists(missing)
        with pytest.raises(tracking.RegistryError, match="no MLflow tracking store at") as caught:
            tracking.resolve_model_path("models:/m/1", missing)
        assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    assert tracking.local_store_path("sqlite:///runs/mlflow.db").as_posix() == "runs/mlflow.db"
    for server in ("http://127.0.0.1:5000", "postgresql://u:p@db/mlflow", "databricks", "sqlite:///:memory:"):
        assert tracking.local_store_path(server) is None and tracking.store_exists(server)
