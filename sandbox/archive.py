"""Tar streams in and out of a container: the workspace going in, the output directory coming out."""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterable, Iterator

from .spec import FileEntry

SANDBOX_UID = 1000


def _dir(name: str, mode: int, uid: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, mode, uid, uid, mtime
    return info


def _guarded_dirs(files: list[FileEntry]) -> set[str]:
    """Directories holding a read-only file at any depth ("" is the workspace itself)."""
    guarded: set[str] = set()
    for f in files:
        if not f.writable:
            parts = f.path.split("/")
            guarded.update("/".join(parts[:i]) for i in range(len(parts)))
    return guarded


def workspace_tar(
    files: Iterable[FileEntry], uid: int = SANDBOX_UID, inputs: Iterable[FileEntry] = ()
) -> bytes:
    """The per-run volume's content: `workspace/`, an empty `output/` and, with `inputs`, `input/`
    (root's, read-only files in read-only directories).

    All directories belong to root. One that holds a read-only file (at any depth) is not writable
    by the workload, so the file cannot be replaced by renaming another over it or its directory
    (the sticky bit alone does not stop that under gVisor); other directories are sticky and
    world-writable, like /tmp. Read-only files belong to root, mode 0444; writable ones to the
    sandbox user, who can edit them in place.
    """
    files = sorted(files, key=lambda f: f.path)
    guarded = _guarded_dirs(files)
    now = time.time()
    buf = io.BytesIO()

    def mode(d: str) -> int:
        return 0o755 if d in guarded else 0o1777

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir("workspace", mode(""), 0, now))
        tar.addfile(_dir("output", 0o755, uid, now))
        made: set[str] = set()
        for f in files:
            parts = f.path.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in made:
                    made.add(d)
                    tar.addfile(_dir(f"workspace/{d}", mode(d), 0, now))
            info = tarfile.TarInfo(f"workspace/{f.path}")
            info.size, info.mtime = len(f.data), now
            info.uid = info.gid = uid if f.writable else 0
            info.mode = (0o644 if f.writable else 0o444) | (0o111 if f.executable else 0)
            tar.addfile(info, io.BytesIO(f.data))
        _add_inputs(tar, list(inputs), now)
    return buf.getvalue()


def _add_inputs(tar: tarfile.TarFile, inputs: list[FileEntry], now: float) -> None:
    if not inputs:
        return
    tar.addfile(_dir("input", 0o755, 0, now))
    made: set[str] = set()
    for f in sorted(inputs, key=lambda f: f.path):
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                made.add(d)
                tar.addfile(_dir(f"input/{d}", 0o755, 0, now))
        info = tarfile.TarInfo(f"input/{f.path}")
        info.size, info.mtime, info.uid, info.gid = len(f.data), now, 0, 0
        info.mode = 0o444 | (0o111 if f.executable else 0)
        tar.addfile(info, io.BytesIO(f.data))


class _ChunkReader(io.RawIOBase):
    """A file over an iterator of chunks that refuses to read past `cap` bytes."""

    def __init__(self, chunks: Iterator[bytes], cap: int) -> None:
        self._chunks, self._buf, self._left = chunks, b"", cap
        self.capped = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buf = chunk
        if self._left <= 0:
            self.capped = True
            return 0
        n = min(len(b), len(self._buf), self._left)
        b[:n] = self._buf[:n]
        self._buf, self._left = self._buf[n:], self._left - n
        return n


def read_output_tar(
    chunks: Iterator[bytes], cap: int, read_limit: int, prefix: str = "output/"
) -> tuple[dict[str, bytes], list[str]]:
    """Regular files under `prefix` from a tar stream, at most `cap` bytes of content kept, at
    most `read_limit` bytes of stream read.

    Returns (files, skipped): links, devices and files past the cap are listed, never followed.
    """
    files: dict[str, bytes] = {}
    skipped: list[str] = []
    reader = _ChunkReader(chunks, read_limit)
    used = 0
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader), mode="r|") as tar:
            for member in tar:
                name = member.name[len(prefix) :] if member.name.startswith(prefix) else None
                if not name or member.isdir():
                    continue
                if not member.isfile() or used + member.size > cap:
                    skipped.append(name)
                    continue
                data = tar.extractfile(member)
                files[name] = data.read() if data else b""
                used += member.size
    except tarfile.TarError:
        skipped.append("(output archive cut short at the size cap)")
    return files, skipped


def _cache_name(name: str, prefix: str = "") -> str | None:
    """A member's path inside the cache directory, or None when it is unsafe or outside."""
    if prefix:
        if name.rstrip("/") == prefix.rstrip("/"):
            return ""
        if not name.startswith(prefix):
            return None
        name = name[len(prefix) :]
    name = name.removeprefix("./").rstrip("/")
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return None
    return name


def _copy_tree(src: tarfile.TarFile, uid: int, prefix: str, cap: int) -> tuple[bytes, int]:
    """Directories, regular files and symbolic links of `src` (under `prefix`) into a new tar,
    owned by `uid`, without set-id bits; nothing through a link. Returns it and its content bytes
    (-1 past `cap`)."""
    buf = io.BytesIO()
    links: set[str] = set()
    used = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
        for member in src:
            name = _cache_name(member.name, prefix)
            if not name or not (member.isdir() or member.isfile() or member.issym()):
                continue
            parts = name.split("/")
            if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
                continue  # a path through a link could land anywhere
            info = tarfile.TarInfo(name)
            info.type, info.mtime, info.mode = member.type, member.mtime, member.mode & 0o777
            info.uid = info.gid = uid
            if member.issym():
                info.linkname = member.linkname
                links.add(name)
                out.addfile(info)
            elif member.isdir():
                out.addfile(info)
            else:
                used += member.size
                if used > cap:
                    return b"", -1
                info.size = member.size
                out.addfile(info, src.extractfile(member))
    return buf.getvalue(), used


def cache_seed_tar(seed: bytes, uid: int = SANDBOX_UID) -> bytes:
    """A cache's starting content as the run gets it: every entry owned by the run's user."""
    with tarfile.open(fileobj=io.BytesIO(seed), mode="r|*") as src:
        data, _ = _copy_tree(src, uid, "", len(seed))
    return data


def read_cache_tar(
    chunks: Iterator[bytes], cap: int, read_limit: int, prefix: str = "cache/"
) -> tuple[bytes | None, str]:
    """The cache directory from a tar stream of it, as a tar of its own (paths relative to it), or
    None and why: more than `cap` bytes of content, or a stream cut short at `read_limit`."""
    reader = _ChunkReader(chunks, read_limit)
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader), mode="r|") as src:
            data, used = _copy_tree(src, SANDBOX_UID, prefix, cap)
    except tarfile.TarError as exc:
        return None, f"the cache's archive could not be read ({exc})"
    if used < 0:
        return None, f"the cache holds more than {cap} bytes"
    return data, ""


def read_collected_tar(
    chunks: Iterator[bytes], path: str, archived: str, cap: int, read_limit: int
) -> tuple[dict[str, bytes], list[str]]:
    """Regular files of the engine's archive of workspace `path` ("." is the workspace itself),
    keyed by their path in the workspace. The engine names members after the archived
    directory's (or file's) own name, `archived`. Links and devices are listed as skipped."""
    files: dict[str, bytes] = {}
    skipped: list[str] = []
    reader = _ChunkReader(chunks, read_limit)
    used = 0
    base = "" if path == "." else path
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader), mode="r|") as tar:
            for member in tar:
                if member.isdir() or not (member.name == archived or member.name.startswith(archived + "/")):
                    continue
                inner = member.name[len(archived) :].lstrip("/")
                name = "/".join(p for p in (base, inner) if p)
                if not member.isfile() or used + member.size > cap:
                    skipped.append(name)
                    continue
                data = tar.extractfile(member)
                files[name] = data.read() if data else b""
                used += member.size
    except tarfile.TarError:
        skipped.append(f"({path}: archive cut short at the size cap)")
    return files, skipped
