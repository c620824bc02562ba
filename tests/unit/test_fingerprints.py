"""raylm.common.fingerprints: stable, order- and content-sensitive hashes."""

from raylm.common import fingerprints


def test_fingerprint_ignores_key_order_but_not_values():
    assert fingerprints.fingerprint({"a": 1, "b": [1, 2]}) == fingerprints.fingerprint({"b": [1, 2], "a": 1})
    assert fingerprints.fingerprint({"a": 1, "b": [1, 2]}) != fingerprints.fingerprint({"a": 1, "b": [2, 1]})
    assert len(fingerprints.fingerprint("x", length=20)) == 20


def test_records_fingerprint_depends_on_order_and_header():
    rows = [{"text": "a"}, {"text": "b"}]
    base = fingerprints.fingerprint_records("lm", rows)
    assert base == fingerprints.fingerprint_records("lm", iter(rows))
    assert base != fingerprints.fingerprint_records("lm", rows[::-1])
    assert base != fingerprints.fingerprint_records("qa", rows)


def test_folder_fingerprint_sees_names_and_contents(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    first = fingerprints.fingerprint_folder(tmp_path)
    (tmp_path / "a.py").write_text("x = 2\n")
    second = fingerprints.fingerprint_folder(tmp_path)
    (tmp_path / "a.py").rename(tmp_path / "b.py")
    third = fingerprints.fingerprint_folder(tmp_path)
    assert len({first, second, third}) == 3
    assert fingerprints.file_digest(tmp_path / "b.py") == fingerprints.file_digest(tmp_path / "b.py")


def test_content_hash_sees_names_bytes_and_subfolders(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01")
    first = fingerprints.content_hash(tmp_path)
    assert first == fingerprints.content_hash(tmp_path) and len(first) == len("sha256:") + 64
    (tmp_path / "a.bin").write_bytes(b"\x00\x02")
    second = fingerprints.content_hash(tmp_path)
    (tmp_path / "a.bin").rename(tmp_path / "b.bin")
    third = fingerprints.content_hash(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text("{}")
    assert len({first, second, third, fingerprints.content_hash(tmp_path)}) == 4
