"""Turning a request's workspace (files or a base64 .tar.gz) into a tree, with every limit checked
before anything is stored. Pure apart from decompression."""

from __future__ import annotations

import base64
import binascii
import io
import tarfile

from ..models import Workspace
from .patches import CandidateError, check_path

__all__ = ["WorkspaceError", "decode_workspace"]

SMALLER = "leave out data and generated files (mount data for the evaluation instead) or raise"

Tree = dict[str, bytes]


class WorkspaceError(CandidateError):
    pass


def decode_workspace(ws: Workspace, max_bytes: int, max_files: int) -> tuple[Tree, frozenset[str]]:
    """Returns (tree, executable paths)."""
    if (ws.files is None) == (ws.archive is None):
        raise WorkspaceError(
            "workspace needs exactly one of 'files' ({path: text}) or 'archive' (base64 .tar.gz)"
        )
    if ws.files is not None:
        tree = {check_path(p): t.encode("utf-8", errors="surrogatepass") for p, t in ws.files.items()}
        execs: frozenset[str] = frozenset()
    else:
        tree, execs = _from_archive(ws.archive or "", max_bytes, max_files)
    if not tree:
        raise WorkspaceError("workspace is empty: give at least one file")
    if len(tree) > max_files:
        raise WorkspaceError(
            f"workspace has {len(tree)} files; the limit is {max_files}:"
            f" {SMALLER} RATCHET_MAX_WORKSPACE_FILES"
        )
    total = sum(len(d) for d in tree.values())
    if total > max_bytes:
        raise WorkspaceError(
            f"workspace holds {total} bytes; the limit is {max_bytes}: {SMALLER} RATCHET_MAX_WORKSPACE_BYTES"
        )
    return tree, execs


def _from_archive(b64: str, max_bytes: int, max_files: int) -> tuple[Tree, frozenset[str]]:
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WorkspaceError(f"workspace.archive is not valid base64: {exc}") from exc
    tree: Tree = {}
    execs: set[str] = set()
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./").rstrip("/")
                if member.isdir() or not name:
                    continue
                if not member.isfile():
                    raise WorkspaceError(
                        f"archive member {member.name!r}: only regular files are allowed"
                        " (no links or devices)"
                    )
                check_path(name)
                total += member.size
                if total > max_bytes or len(tree) >= max_files:
                    raise WorkspaceError(
                        f"archive exceeds the workspace limits ({max_bytes} bytes, {max_files} files):"
                        f" {SMALLER} RATCHET_MAX_WORKSPACE_BYTES / RATCHET_MAX_WORKSPACE_FILES"
                    )
                fh = tar.extractfile(member)
                tree[name] = fh.read() if fh else b""
                if member.mode & 0o111:
                    execs.add(name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise WorkspaceError(f"workspace.archive is not a readable .tar.gz: {exc}") from exc
    return tree, frozenset(execs)
