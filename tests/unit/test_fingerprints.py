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
