"""Content-addressed snapshots: files are blobs named by their SHA-256, a snapshot is the hash of
its manifest (sorted paths -> blob ids).

A blob file holds either the whole content, zlib-compressed, or a delta against another blob (in
practice the same path in the parent snapshot): `RTD1`, the base's 32-byte id, the chain depth,
then zlib-compressed copy/insert instructions. A one-line edit of a 30 KB file thus costs tens of
bytes instead of a whole compressed copy. Chains are cut at `MAX_CHAIN` deltas by storing a full
copy, so no read follows more than `MAX_CHAIN` files. Every read, delta or not, checks that the
content hashes to the blob's id.

Blobs are written to a temporary name, fsynced, renamed and the directory fsynced, so a row that
points at a blob is only ever written after the blob is durable (and a delta's base is a blob that
is already durable). `service.state.integrity` checks at start-up that every blob a row points at is there
(and, for the snapshots that matter most, intact).
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import hashlib
import io
import os
import tarfile
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import msgspec

from .. import faults

__all__ = ["MAX_CHAIN", "Manifest", "SnapshotStore", "Tree"]

MAX_CHAIN = 50  # deltas a read may have to apply; the next version after that is stored whole
DELTA_MAGIC = b"RTD1"  # never the first bytes of a zlib stream (those start with 0x78)
_HEADER = len(DELTA_MAGIC) + 32 + 2
CACHE_BYTES = 32 * 1024 * 1024  # decoded blobs kept in memory: a parent is read again by its children

Tree = dict[str, bytes]


class Entry(msgspec.Struct, array_like=True, frozen=True):
    path: str
    blob: str
    size: int
    executable: bool = False


class Manifest(msgspec.Struct, frozen=True):
    files: list[Entry]

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @property
    def id(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A delta is a list of instructions: [start, length] copies that slice of the base, bytes insert.
_Op = list[int] | bytes


def make_delta(base: bytes, data: bytes) -> list[_Op]:
    """Line-wise copy/insert instructions that turn `base` into `data`."""
    a, b = base.splitlines(keepends=True), data.splitlines(keepends=True)
    starts = [0]
    for line in a:
        starts.append(starts[-1] + len(line))
    # Most edits touch a few lines: match the common head and tail first, so the quadratic
    # matcher only sees the middle.
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    ops: list[_Op] = [[0, starts[head]]] if head else []
    matcher = difflib.SequenceMatcher(None, a[head : len(a) - tail], b[head : len(b) - tail], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            ops.append([starts[head + i1], starts[head + i2] - starts[head + i1]])
        elif j2 > j1:
            ops.append(b"".join(b[head + j1 : head + j2]))
    if tail:
        ops.append([starts[len(a) - tail], starts[len(a)] - starts[len(a) - tail]])
    return ops


def apply_delta(base: bytes, ops: list[_Op]) -> bytes:
    return b"".join(op if isinstance(op, bytes) else base[op[0] : op[0] + op[1]] for op in ops)


_ops_decoder = msgspec.msgpack.Decoder(list[list[int] | bytes])


class SnapshotStore:
    """Blob files under `root`; manifests are kept by the caller (the database). Thread-safe."""

    def __init__(self, root: Path, max_chain: int = MAX_CHAIN) -> None:
        self.root = root
        self.max_chain = max_chain
        root.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()

    def _blob_path(self, blob: str) -> Path:
        return self.root / blob[:2] / blob[2:]

    def put_blob(self, data: bytes, base: str | None = None) -> str:
        """Stores `data` durably, as a delta against the blob `base` when that is smaller."""
        blob = hashlib.sha256(data).hexdigest()
        path = self._blob_path(blob)
        if path.exists():
            return blob
        whole = zlib.compress(data, 6)
        delta = self._delta(data, base) if base is not None and base != blob else None
        if not path.parent.exists():
            path.parent.mkdir(exist_ok=True)
            _fsync_dir(self.root)  # the new shard directory's entry must be as durable as the blob
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(delta if delta is not None and len(delta) < len(whole) else whole)
            fh.flush()
            os.fsync(fh.fileno())
        faults.point("snapshot.blob_tmp")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return blob

    def blob_path(self, blob: str) -> Path:
        return self._blob_path(blob)

    def sweep_temporary(self) -> int:
        """Removes the temporary files of blob writes a killed process left (`.<name>.<pid>.<thread>.tmp`,
        never renamed into place, so nothing points at them); how many. Only while nobody writes:
        at start-up, under the data dir's lock."""
        removed = 0
        for tmp in self.root.glob("*/.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
        return removed

    def _delta(self, data: bytes, base: str) -> bytes | None:
        """The delta file's bytes, or None when the chain is full or the base cannot be read."""
        try:
            depth = self.depth(base)
            if depth >= self.max_chain:
                return None
            ops = make_delta(self.get_blob(base), data)
        except OSError:
            return None  # a damaged base: store this version whole rather than build on it
        body = zlib.compress(msgspec.msgpack.encode(ops), 9)
        return DELTA_MAGIC + bytes.fromhex(base) + (depth + 1).to_bytes(2, "big") + body

    def depth(self, blob: str) -> int:
        """How many deltas a read of `blob` applies (0: stored whole)."""
        with open(self._blob_path(blob), "rb") as fh:
            head = fh.read(_HEADER)
        return int.from_bytes(head[-2:], "big") if head.startswith(DELTA_MAGIC) else 0

    def get_blob(self, blob: str) -> bytes:
        with self._lock:
            if (hit := self._cache.get(blob)) is not None:
                self._cache.move_to_end(blob)
                return hit
        data = self._read(blob)
        if hashlib.sha256(data).hexdigest() != blob:
            raise OSError(f"blob {blob} is corrupt")
        self._remember(blob, data)
        return data

    def _read(self, blob: str) -> bytes:
        """Follows the delta chain down to a whole copy (or a cached blob), then applies it upwards."""
        chain: list[list[_Op]] = []
        current = blob
        try:
            while True:
                with self._lock:
                    data = self._cache.get(current)
                if data is not None:
                    break
                raw = self._blob_path(current).read_bytes()
                if not raw.startswith(DELTA_MAGIC):
                    data = zlib.decompress(raw)
                    break
                if len(chain) >= self.max_chain or len(raw) < _HEADER:
                    raise ValueError("delta chain too long, or a delta header cut short")
                chain.append(_ops_decoder.decode(zlib.decompress(raw[_HEADER:])))
                current = raw[len(DELTA_MAGIC) : len(DELTA_MAGIC) + 32].hex()
            for ops in reversed(chain):
                data = apply_delta(data, ops)
        except FileNotFoundError:
            if current == blob:
                raise
            raise OSError(f"blob {blob} is corrupt: its delta base {current} is missing") from None
        except (zlib.error, msgspec.DecodeError, ValueError, IndexError) as exc:
            raise OSError(f"blob {blob} is corrupt: {exc}") from exc
        return data

    def _remember(self, blob: str, data: bytes) -> None:
        if len(data) > CACHE_BYTES // 8:
            return
        with self._lock:
            if blob in self._cache:
                return
            self._cache[blob] = data
            self._cached += len(data)
            while self._cached > CACHE_BYTES:
                self._cached -= len(self._cache.popitem(last=False)[1])

    def put_tree(
        self, tree: Tree, executable: frozenset[str] = frozenset(), parent: Manifest | None = None
    ) -> Manifest:
        """Writes every blob durably; returns the manifest (its `.id` is the snapshot id). A file
        that `parent` also has is stored as a delta against the parent's version when that is smaller."""
        bases = {e.path: e.blob for e in parent.files} if parent is not None else {}
        entries = [
            Entry(path, self.put_blob(data, bases.get(path)), len(data), path in executable)
            for path, data in sorted(tree.items())
        ]
        return Manifest(entries)

    def load_tree(self, manifest: Manifest) -> Tree:
        return {e.path: self.get_blob(e.blob) for e in manifest.files}

    def archive(self, manifest: Manifest, prefix: str = "") -> bytes:
        """The whole tree as a .tar.gz (regular files only, owned by nobody in particular). The same
        snapshot gives the same bytes (no time in the gzip header either), on any copy of the store."""
        buf = io.BytesIO()
        with (
            gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for e in manifest.files:
                data = self.get_blob(e.blob)
                info = tarfile.TarInfo(prefix + e.path)
                info.size, info.mode, info.mtime = len(data), 0o755 if e.executable else 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    def size_on_disk(self) -> int:
        total = 0
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(dirpath, name))
        return total


def decode_manifest(raw: str | bytes) -> Manifest:
    return msgspec.json.decode(raw, type=Manifest)
