"""The local side of a loop: a directory read into a `POST /v1/loops` body, and a snapshot archive
written back into a directory. No HTTP here, so it is tested on plain temporary directories.

The loop definition is `DIR/ratchet.toml` (or `DIR/ratchet.json`) with the keys of the loop body
(`name`, `editable`, `command`, `metric`, `time_budget_s`, `resources`, ...) plus `exclude`, a list of
path prefixes left out of the workspace. `command` may be a string; it is split like a shell would.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import re
import shlex
import tarfile
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "DEFAULT_EXCLUDE",
    "SPEC_FILES",
    "LoopDirError",
    "extract_archive",
    "loop_body",
    "read_spec",
    "workspace_body",
    "workspace_files",
]

SPEC_FILES = ("ratchet.toml", "ratchet.json")
# Never part of a workspace sent from a directory: the loop definition and local clutter
# (dotfiles such as .git or .venv included, at any depth).
DEFAULT_EXCLUDE = (*SPEC_FILES, "README.md", "candidates/", "__pycache__/", ".")


class LoopDirError(ValueError):
    """A local directory or archive that cannot be used; the message says what to fix."""


def read_spec(root: Path) -> dict[str, Any]:
    """The loop definition in ROOT (TOML or JSON), or {} when there is none."""
    found = [root / name for name in SPEC_FILES if (root / name).is_file()]
    if len(found) > 1:
        raise LoopDirError(f"{root} has both {SPEC_FILES[0]} and {SPEC_FILES[1]}; keep one")
    if not found:
        return {}
    path = found[0]
    try:
        text = path.read_text(encoding="utf-8")
        spec = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise LoopDirError(f"{path}: {exc}") from exc
    if not isinstance(spec, dict):
        raise LoopDirError(f"{path}: expected a table/object of loop settings at the top level")
    return spec


def _excluded(rel: str, exclude: tuple[str, ...]) -> bool:
    return any(rel.startswith(p) or f"/{p}" in f"/{rel}" for p in exclude)


def workspace_files(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every regular file under ROOT that is not excluded, as {posix path: bytes}."""
    patterns = tuple(exclude) + DEFAULT_EXCLUDE
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.is_symlink() and not _excluded(rel, patterns):
            files[rel] = path.read_bytes()
    return files


def workspace_body(files: Mapping[str, bytes]) -> dict[str, Any]:
    """`{"files": ...}` when every file is UTF-8 text (readable in the request), else a tar.gz archive,
    which is the only way to send binary data files."""
    try:
        return {"files": {path: data.decode("utf-8") for path, data in files.items()}}
    except UnicodeDecodeError:
        pass
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return {"archive": base64.b64encode(buf.getvalue()).decode("ascii")}


def _default_name(root: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", root.resolve().name).lstrip("._-")[:64]
    return name or "loop"


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides win; nested tables (metric, resources, env) are merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _plain(value: Any) -> Any:
    """TOML's dates and times as the RFC 3339 text the API reads (e.g. `deadline`)."""
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def loop_body(root: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `POST /v1/loops` body for directory ROOT: its definition file, then OVERRIDES, then its
    files (minus the definition, `exclude` and clutter) as the workspace."""
    root = Path(root)
    if not root.is_dir():
        raise LoopDirError(f"{root} is not a directory")
    spec = _plain(_merge(read_spec(root), overrides or {}))
    exclude = spec.pop("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise LoopDirError("'exclude' must be a list of path prefixes")
    if isinstance(spec.get("command"), str):
        spec["command"] = shlex.split(spec["command"])
    spec.setdefault("name", _default_name(root))
    files = workspace_files(root, tuple(exclude))
    if not files:
        left_out = ", ".join(DEFAULT_EXCLUDE)
        raise LoopDirError(f"{root} holds no workspace files (after leaving out {left_out})")
    return {**spec, "workspace": workspace_body(files)}


def _member_path(member: tarfile.TarInfo) -> PurePosixPath | None:
    """The safe relative path of an archive member; None for directories. Raises for anything else
    than a regular file under the destination."""
    name = member.name.removeprefix("./")
    if member.isdir():
        return None
    if not member.isreg():
        raise LoopDirError(f"archive member {member.name!r} is not a regular file; refusing to write it")
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise LoopDirError(f"archive member {member.name!r} has an unsafe path; refusing to write it")
    return path


def extract_archive(data: bytes, dest: Path, force: bool = False) -> list[str]:
    """Writes the regular files of a .tar.gz into DEST (created if missing); returns their paths.

    Every member is checked before anything is written. A non-empty DEST is refused unless FORCE,
    which writes over same-named files and leaves the others."""
    if dest.exists() and not dest.is_dir():
        raise LoopDirError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise LoopDirError(f"{dest} is not empty; pick an empty directory or pass --force to write over it")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = [(m, p) for m in tar.getmembers() if (p := _member_path(m)) is not None]
            contents = [(p, m.mode, tar.extractfile(m).read()) for m, p in members]  # type: ignore[union-attr]
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise LoopDirError(f"the snapshot archive is not a readable .tar.gz: {exc}") from exc
    dest.mkdir(parents=True, exist_ok=True)
    top = dest.resolve()
    written = []
    for path, mode, content in contents:
        target = dest.joinpath(*path.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A symlink already in DEST (under --force) must not carry the write outside it.
        if target.is_symlink():
            target.unlink()
        if not target.parent.resolve().is_relative_to(top):
            raise LoopDirError(f"{target} would be written outside {dest} (through a symlink); refusing")
        target.write_bytes(content)
        os.chmod(target, 0o755 if mode & 0o111 else 0o644)
        written.append(path.as_posix())
    return written
