"""Unit tests of `service.state.snapshots`: content addressing, deduplication, integrity and archives."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from pathlib import Path

import pytest

from service.state.snapshots import Entry, Manifest, SnapshotStore, apply_delta, decode_manifest, make_delta

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


# -- deltas against the parent's version ---------------------------------------------------------

BIG = b"".join(f"line {i}: {'x' * (i % 40)} = {i * 7 % 13}\n".encode() for i in range(1000))


def edit(data: bytes, n: int) -> bytes:
    lines = data.splitlines(keepends=True)
    lines[(n * 37) % len(lines)] = f"lr = {n}e-4  # edit {n}\n".encode()
    return b"".join(lines)


def chain(store: SnapshotStore, versions: int) -> list[tuple[Manifest, bytes]]:
    out, data, parent = [], BIG, None
    for n in range(versions):
        data = edit(data, n) if n else data
        parent = store.put_tree({"train.py": data, "prepare.py": b"fixed\n"}, parent=parent)
        out.append((parent, data))
    return out


def blob_file(store: SnapshotStore, manifest: Manifest, path: str = "train.py") -> Path:
    blob = next(e.blob for e in manifest.files if e.path == path)
    return store.root / blob[:2] / blob[2:]


def test_make_and_apply_delta_round_trip():
    cases = [(b"", b""), (b"", b"new\n"), (b"old\n", b""), (b"a\nb\nc", b"a\nB\nc"), (BIG, edit(BIG, 3))]
    cases += [(b"no newline at all", b"no newline either"), (bytes(range(256)), bytes(range(255, -1, -1)))]
    for base, data in cases:
        assert apply_delta(base, make_delta(base, data)) == data


def test_edits_are_stored_as_small_deltas_and_read_back(tmp_path):
    store = SnapshotStore(tmp_path / "blobs")
    versions = chain(store, 20)
    first = blob_file(store, versions[0][0]).stat().st_size
    for n, (manifest, data) in enumerate(versions):
        assert blob_file(store, manifest).read_bytes().startswith(b"RTD1") == (n > 0)
        if n:
            assert blob_file(store, manifest).stat().st_size < min(200, first // 20)
        assert hashlib.sha256(data).hexdigest() == manifest.files[1].blob  # ids stay content hashes
    fresh = SnapshotStore(tmp_path / "blobs")  # no cache: every read follows the chain on disk
    for manifest, data in versions:
        assert fresh.load_tree(manifest) == {"train.py": data, "prepare.py": b"fixed\n"}


def test_chain_is_cut_by_a_full_copy(tmp_path):
    store = SnapshotStore(tmp_path / "blobs", max_chain=4)
    versions = chain(store, 12)
    depths = [store.depth(m.files[1].blob) for m, _ in versions]
    assert depths == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    fresh = SnapshotStore(tmp_path / "blobs", max_chain=4)
    assert [fresh.load_tree(m)["train.py"] for m, _ in versions] == [d for _, d in versions]


def test_whole_copy_when_a_delta_would_not_be_smaller(tmp_path):
    store = SnapshotStore(tmp_path / "blobs")
    parent = store.put_tree({"a.bin": bytes(range(256)) * 8})
    child = store.put_tree({"a.bin": hashlib.sha512(b"unrelated").digest() * 4}, parent=parent)
    assert not blob_file(store, child, "a.bin").read_bytes().startswith(b"RTD1")


def test_corrupt_delta_is_detected(tmp_path):
    store = SnapshotStore(tmp_path / "blobs")
    versions = chain(store, 3)
    path = blob_file(store, versions[2][0])
    raw = path.read_bytes()
    for garbled in (raw[:-3], raw[:20], raw[:40] + b"\x00" * (len(raw) - 40)):
        path.write_bytes(garbled)
        with pytest.raises(OSError, match="is corrupt"):
            SnapshotStore(tmp_path / "blobs").load_tree(versions[2][0])


def test_delta_with_a_tampered_base_is_detected(tmp_path):
    store = SnapshotStore(tmp_path / "blobs")
    versions = chain(store, 3)
    blob_file(store, versions[0][0]).write_bytes(zlib.compress(BIG.replace(b"line 5", b"line 6")))
    fresh = SnapshotStore(tmp_path / "blobs")
    with pytest.raises(OSError, match=f"blob {versions[2][0].files[1].blob} is corrupt"):
        fresh.load_tree(versions[2][0])


def test_delta_with_a_missing_base_is_detected(tmp_path):
    store = SnapshotStore(tmp_path / "blobs")
    versions = chain(store, 2)
    blob_file(store, versions[0][0]).unlink()
    with pytest.raises(OSError, match=r"delta base \w+ is missing"):
        SnapshotStore(tmp_path / "blobs").load_tree(versions[1][0])


def test_blobs_written_whole_by_older_versions_stay_readable(tmp_path):
    """Data dirs from before deltas hold plain zlib files; they read, and serve as delta bases."""
    root = tmp_path / "blobs"
    blob = hashlib.sha256(BIG).hexdigest()
    (root / blob[:2]).mkdir(parents=True)
    (root / blob[:2] / blob[2:]).write_bytes(zlib.compress(BIG, 6))
    store = SnapshotStore(root)
    old = Manifest([Entry("train.py", blob, len(BIG))])
    assert store.load_tree(old) == {"train.py": BIG}
    new = store.put_tree({"train.py": edit(BIG, 1)}, parent=old)
    assert blob_file(store, new).read_bytes().startswith(b"RTD1")
    assert SnapshotStore(root).load_tree(new) == {"train.py": edit(BIG, 1)}
