"""Registry references: ``models:/name/version`` and ``models:/name@alias`` against a real MLflow store.

Each registered version carries its model folder's content hash; a version
whose files changed after registration is refused with one line by the
resolver (eval, Serve replicas) and by ``raylm serve`` before Ray starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from raylm.common import tracking
from raylm.common.fingerprints import content_hash


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


@pytest.fixture(scope="module")
def weights(store, tmp_path_factory):
    """Model ``w`` in the same store: version 1 as registered, version 2 with one byte of its stored
    weights file changed afterwards (in the tensor data: still a loadable safetensors file)."""
    uri, _ = store
    folder = tmp_path_factory.mktemp("weights") / "model"
    folder.mkdir()
    save_file({"weight": np.arange(64, dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "raylm.json").write_text(json.dumps({"run_id": "w"}))
    for index in (1, 2):
        run_id = tracking.start_run(uri, "registry-test", f"weights{index}", {})
        tracking.finish_run(uri, run_id, folder, {}, "w")
    stored = Path(urlparse(tracking.get_model_version(uri, "models:/w/2").source).path) / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-5] ^= 0x40
    stored.write_bytes(bytes(data))
    return uri, folder


def test_registration_records_the_folder_hash_on_the_version_and_its_run(weights):
    uri, folder = weights
    version = tracking.get_model_version(uri, "models:/w/1")
    recorded = version.tags[tracking.CONTENT_HASH_TAG]
    assert recorded == content_hash(folder)
    assert tracking.mlflow_client(uri).get_run(version.run_id).data.tags[tracking.CONTENT_HASH_TAG] == recorded


def test_an_unchanged_version_loads(weights, tmp_path):
    uri, folder = weights
    local = tracking.resolve_model_path("models:/w/1", uri, str(tmp_path))
    np.testing.assert_array_equal(load_file(str(local / "model.safetensors"))["weight"], np.arange(64))


def test_weights_changed_after_registration_are_refused_with_one_line(weights, tmp_path):
    uri, folder = weights
    with pytest.raises(tracking.ModelIntegrityError) as refused:
        tracking.resolve_model_path("models:/w/2", uri, str(tmp_path))
    found = content_hash(tmp_path / "model")  # what was downloaded: still a safetensors file, other values
    assert found != content_hash(folder) and load_file(str(tmp_path / "model" / "model.safetensors"))
    assert str(refused.value) == (
        f"models:/w/2: refusing to load version 2 of 'w': its files hash to {found}, not {content_hash(folder)} "
        "as recorded at registration (the weights changed after registration)")


def test_raylm_serve_refuses_changed_weights_with_one_line_before_ray(weights, tmp_path, monkeypatch):
    from raylm.cli import app

    uri, _ = weights
    # Were Ray started before the check, ray.init would fail at once on this address, with another message.
    monkeypatch.setenv("RAY_ADDRESS", "not a ray address")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["serve", "--model", "models:/w/2", f"tracking.tracking_uri={uri}"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: models:/w/2: refusing to load version 2 of 'w'"), lines
    assert lines[0].endswith("(the weights changed after registration)")
    assert list(tmp_path.iterdir()) == []  # no download or run folder left behind


def test_a_version_registered_without_a_hash_loads_with_a_warning(weights, tmp_path, caplog):
    uri, _ = weights
    source = tracking.get_model_version(uri, "models:/w/1").source
    old = tracking.mlflow_client(uri).create_model_version("w", source=source)  # no tag, as before hashes
    with caplog.at_level(logging.WARNING, logger="raylm"):
        local = tracking.resolve_model_path(f"models:/w/{old.version}", uri, str(tmp_path))
    assert (local / "model.safetensors").is_file()
    assert [record.getMessage() for record in caplog.records if "content hash" in record.getMessage()] == [
        f"models:/w/{old.version}: version {old.version} of 'w' was registered without a content hash; "
        "loading its files unverified"]
