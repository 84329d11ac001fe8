"""A loop's accepted history as a git bundle: the baseline as the root commit, then one commit per
kept experiment in finishing order. Built with the git CLI in a temporary directory; the same
ledger always gives the same bytes (fixed identity, dates from the ledger, no user configuration)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import msgspec

from .snapshots import SnapshotStore, decode_manifest

__all__ = ["GitMissing", "HistoryCommit", "NoHistory", "build_bundle", "commit_message"]

IDENTITY = ("Ratchet", "ratchet@localhost")


class GitMissing(Exception):
    """The git CLI is not installed on the service's host (HTTP 503)."""


class NoHistory(Exception):
    """The loop has no successful baseline yet, so no root commit (HTTP 409)."""


class HistoryCommit(msgspec.Struct, kw_only=True, frozen=True):
    experiment: str
    description: str
    snapshot: str
    manifest: str
    metrics: dict[str, float]
    finished_at: float


def _fmt(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else str(value)


def commit_message(c: HistoryCommit, metric_name: str) -> str:
    """Description first, then a blank line and `name: value` lines (the loop's metric first)."""
    names = sorted(c.metrics, key=lambda n: (n != metric_name, n))
    lines = [f"{n}: {_fmt(c.metrics[n])}" for n in names]
    lines += [f"experiment: {c.experiment}", f"snapshot: {c.snapshot}"]
    return f"{c.description.strip() or '(no description)'}\n\n" + "\n".join(lines) + "\n"


def _git_env(home: Path, date: str | None = None) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": IDENTITY[0],
        "GIT_AUTHOR_EMAIL": IDENTITY[1],
        "GIT_COMMITTER_NAME": IDENTITY[0],
        "GIT_COMMITTER_EMAIL": IDENTITY[1],
        "LC_ALL": "C",
        "TZ": "UTC",
    }
    if date is not None:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = date
    return env


def build_bundle(
    commits: Sequence[HistoryCommit], branch: str, metric_name: str, snapshots: SnapshotStore
) -> bytes:
    """Blocking: run it in a thread. Returns the bundle's bytes with the single ref `branch`."""
    if not commits:
        raise NoHistory("no successful baseline yet")
    git = shutil.which("git")
    if git is None:
        raise GitMissing("the git CLI is not installed on the service host; history bundles need it")
    with tempfile.TemporaryDirectory(prefix="ratchet-history-") as tmp:
        root = Path(tmp)
        gitdir, work = root / "repo.git", root / "work"

        def run(*args: str, date: str | None = None, stdin: bytes | None = None) -> str:
            env = {**_git_env(root, date), "GIT_DIR": str(gitdir), "GIT_WORK_TREE": str(work)}
            done = subprocess.run(
                [git, "-c", "core.fileMode=true", "-c", "pack.threads=1", *args],
                cwd=work,
                env=env,
                input=stdin,
                capture_output=True,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"git {args[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")
            return done.stdout.decode()

        work.mkdir()
        run("init", "-q")
        parent: str | None = None
        for c in commits:
            shutil.rmtree(work)
            work.mkdir()
            manifest = decode_manifest(c.manifest)
            tree = snapshots.load_tree(manifest)
            for entry in manifest.files:
                path = work / entry.path
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tree[entry.path])
                path.chmod(0o755 if entry.executable else 0o644)
            run("read-tree", "--empty")
            paths = b"".join(e.path.encode() + b"\0" for e in manifest.files)
            run("update-index", "--add", "-z", "--stdin", stdin=paths)
            tree_id = run("write-tree").strip()
            date = f"{int(c.finished_at)} +0000"
            message = commit_message(c, metric_name).encode()
            args = ["commit-tree", tree_id, *(["-p", parent] if parent else [])]
            parent = run(*args, date=date, stdin=message).strip()
        run("update-ref", f"refs/heads/{branch}", parent or "")
        run("symbolic-ref", "HEAD", f"refs/heads/{branch}")
        out = root / "out.bundle"
        run("bundle", "create", "-q", str(out), f"refs/heads/{branch}")
        return out.read_bytes()
