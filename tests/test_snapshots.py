"""Unit tests of `service.snapshots`: content addressing, deduplication, integrity and archives."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from pathlib import Path

import pytest

from service.snapshots import Manifest, SnapshotStore, decode_manifest

TREE = {
    "train.py": b"print('train')\n",
    "prepare.py": b"def evaluate():\n    return 1.0\n",
    "data/tokens.bin": bytes(range(256)) * 4,
    "empty.txt": b"",
}


def blobs(root: Path) -> set[str]:
    return {p.parent.name + p.name for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "blobs")


def test_round_trip(store):
    manifest = store.put_tree(TREE)
    assert store.load_tree(manifest) == TREE


def test_manifest_is_sorted_and_describes_each_file(store):
    manifest = store.put_tree(TREE, frozenset({"train.py"}))
    assert [e.path for e in manifest.files] == sorted(TREE)
    for e in manifest.files:
        assert e.blob == hashlib.sha256(TREE[e.path]).hexdigest()
        assert e.size == len(TREE[e.path])
        assert e.executable is (e.path == "train.py")


def test_snapshot_id_is_the_hash_of_the_manifest(store):
    manifest = store.put_tree(TREE)
    assert manifest.id == hashlib.sha256(manifest.encode()).hexdigest()
    assert len(manifest.id) == 64


def test_manifest_encode_decode(store):
    manifest = store.put_tree(TREE, frozenset({"prepare.py"}))
    again = decode_manifest(manifest.encode())
    assert again == manifest
    assert again.id == manifest.id
    assert decode_manifest(manifest.encode().decode()).id == manifest.id


def test_identical_trees_give_identical_ids(tmp_path):
    a = SnapshotStore(tmp_path / "a").put_tree(dict(TREE))
    b = SnapshotStore(tmp_path / "b").put_tree(dict(reversed(list(TREE.items()))))
    assert a.id == b.id
    assert a.encode() == b.encode()


def test_executable_bit_changes_the_id(store):
    assert store.put_tree(TREE).id != store.put_tree(TREE, frozenset({"train.py"})).id


def test_one_changed_file_changes_the_id_and_adds_one_blob(store):
    first = store.put_tree(TREE)
    before = blobs(store.root)
    assert len(before) == len(TREE)
    changed = {**TREE, "train.py": b"print('train harder')\n"}
    second = store.put_tree(changed)
    after = blobs(store.root)
    assert second.id != first.id
    assert after - before == {hashlib.sha256(changed["train.py"]).hexdigest()}
    assert before <= after
    assert store.load_tree(first) == TREE
    assert store.load_tree(second) == changed


def test_blobs_are_deduplicated(store):
    same = b"same content\n"
    manifest = store.put_tree({"a.txt": same, "b/c.txt": same, "d.txt": same})
    assert len({e.blob for e in manifest.files}) == 1
    assert blobs(store.root) == {hashlib.sha256(same).hexdigest()}
    store.put_tree({"again.txt": same})
    assert len(blobs(store.root)) == 1


def test_put_blob_layout_and_no_temporaries(store):
    data = b"hello blob"
    blob = store.put_blob(data)
    assert blob == hashlib.sha256(data).hexdigest()
    path = store.root / blob[:2] / blob[2:]
    assert zlib.decompress(path.read_bytes()) == data
    assert [p.name for p in path.parent.iterdir()] == [blob[2:]]
    assert store.get_blob(blob) == data


def test_corrupt_blob_is_detected_on_read(store):
    manifest = store.put_tree(TREE)
    entry = next(e for e in manifest.files if e.path == "train.py")
    path = store.root / entry.blob[:2] / entry.blob[2:]
    path.write_bytes(zlib.compress(b"print('tampered')\n"))
    with pytest.raises(OSError, match=f"blob {entry.blob} is corrupt"):
        store.get_blob(entry.blob)
    with pytest.raises(OSError, match="is corrupt"):
        store.load_tree(manifest)
    with pytest.raises(OSError, match="is corrupt"):
        store.archive(manifest)


def test_garbled_blob_file_is_detected_on_read(store):
    blob = store.put_blob(b"some data that will be garbled\n" * 10)
    path = store.root / blob[:2] / blob[2:]
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises((OSError, zlib.error)):
        store.get_blob(blob)


def test_missing_blob_is_an_os_error(store):
    manifest = store.put_tree({"a.txt": b"a"})
    blob = manifest.files[0].blob
    (store.root / blob[:2] / blob[2:]).unlink()
    with pytest.raises(OSError):
        store.load_tree(manifest)


def read_archive(data: bytes) -> dict[str, tuple[bytes, int, int]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            assert m.isfile(), m.name
            fh = tar.extractfile(m)
            assert fh is not None
            out[m.name] = (fh.read(), m.mode, m.mtime)
    return out


def test_archive_holds_exactly_the_tree(store):
    manifest = store.put_tree(TREE, frozenset({"train.py"}))
    data = store.archive(manifest)
    assert data[:2] == b"\x1f\x8b"
    members = read_archive(data)
    assert {name: content for name, (content, _, _) in members.items()} == TREE
    assert members["train.py"][1] == 0o755
    assert members["prepare.py"][1] == 0o644
    assert all(mtime == 0 for _, _, mtime in members.values())


def test_archive_prefix(store):
    manifest = store.put_tree({"a.py": b"a"})
    assert set(read_archive(store.archive(manifest, prefix="snap/"))) == {"snap/a.py"}


def test_archive_is_deterministic(store):
    manifest = store.put_tree(TREE)
    first = read_archive(store.archive(manifest))
    second = read_archive(store.archive(manifest))
    assert first == second


def test_empty_tree(store):
    manifest = store.put_tree({})
    assert manifest == Manifest([])
    assert store.load_tree(manifest) == {}
    assert read_archive(store.archive(manifest)) == {}


def test_size_on_disk_counts_blob_files(store):
    assert store.size_on_disk() == 0
    store.put_blob(b"x" * 1000)
    size = store.size_on_disk()
    assert 0 < size < 1000  # compressed
    store.put_blob(b"x" * 1000)
    assert store.size_on_disk() == size
