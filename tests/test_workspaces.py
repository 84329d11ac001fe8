"""Unit tests of `service.rules.workspaces.decode_workspace`: files or base64 .tar.gz, every limit checked."""

from __future__ import annotations

import base64
import io
import tarfile

import pytest

from service.models import Workspace
from service.rules.patches import CandidateError
from service.rules.workspaces import WorkspaceError, decode_workspace

MAX_BYTES = 10_000
MAX_FILES = 10


def tar_b64(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return base64.b64encode(buf.getvalue()).decode()


def reg(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def decode(ws: Workspace, max_bytes: int = MAX_BYTES, max_files: int = MAX_FILES):
    return decode_workspace(ws, max_bytes, max_files)


def refused(ws: Workspace, max_bytes: int = MAX_BYTES, max_files: int = MAX_FILES) -> str:
    with pytest.raises(CandidateError) as info:
        decode(ws, max_bytes, max_files)
    return str(info.value)


# -- files ---------------------------------------------------------------------------------------------


def test_files_become_utf8_bytes():
    tree, execs = decode(Workspace(files={"train.py": "print('\u00e9')\n", "data/x.txt": ""}))
    assert tree == {"train.py": "print('\u00e9')\n".encode(), "data/x.txt": b""}
    assert execs == frozenset()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../x.py", "'../x.py': '.', '..' and empty path segments are refused"),
        ("/etc/passwd", "'/etc/passwd': absolute paths are refused"),
        (".git/config", "'.git/config': paths inside .git are refused"),
        ("a b.py", "use only letters, digits"),
    ],
)
def test_files_with_unsafe_paths_are_refused(path, message):
    assert message in refused(Workspace(files={path: "x"}))


def test_files_limits():
    files = {f"f{i}.py": "x" for i in range(MAX_FILES + 1)}
    message = refused(Workspace(files=files))
    assert message.startswith(f"workspace has {MAX_FILES + 1} files; the limit is {MAX_FILES}: ")
    assert message.endswith("RATCHET_MAX_WORKSPACE_FILES")
    message = refused(Workspace(files={"big.py": "x" * (MAX_BYTES + 1)}))
    assert message.startswith(f"workspace holds {MAX_BYTES + 1} bytes; the limit is {MAX_BYTES}: ")
    assert message.endswith("RATCHET_MAX_WORKSPACE_BYTES")
    tree, _ = decode(Workspace(files={"big.py": "x" * MAX_BYTES}))
    assert len(tree["big.py"]) == MAX_BYTES


def test_byte_limit_counts_encoded_bytes():
    # 5000 two-byte characters are 10000 bytes: at the limit; one more is over it.
    decode(Workspace(files={"u.txt": "\u00e9" * 5000}))
    assert "workspace holds 10002 bytes" in refused(Workspace(files={"u.txt": "\u00e9" * 5001}))


def test_empty_files_is_refused():
    assert refused(Workspace(files={})) == "workspace is empty: give at least one file"


def test_both_or_neither_is_refused():
    msg = "workspace needs exactly one of 'files' ({path: text}) or 'archive' (base64 .tar.gz)"
    assert refused(Workspace()) == msg
    assert refused(Workspace(files={"a.py": "x"}, archive=tar_b64([reg("a.py", b"x")]))) == msg


def test_errors_are_workspace_errors():
    with pytest.raises(WorkspaceError):
        decode(Workspace())
    assert issubclass(WorkspaceError, CandidateError)


# -- archive --------------------------------------------------------------------------------------------


def test_archive_round_trip_with_executable_bits():
    archive = tar_b64(
        [
            reg("train.py", b"print(1)\n"),
            reg("run.sh", b"#!/bin/sh\n", mode=0o755),
            reg("data/blob.bin", bytes(range(256))),
        ]
    )
    tree, execs = decode(Workspace(archive=archive))
    assert tree == {"train.py": b"print(1)\n", "run.sh": b"#!/bin/sh\n", "data/blob.bin": bytes(range(256))}
    assert execs == frozenset({"run.sh"})


def test_archive_directories_and_dot_prefix():
    d = tarfile.TarInfo("./src")
    d.type = tarfile.DIRTYPE
    archive = tar_b64([(d, None), reg("./src/m.py", b"m\n"), reg("./top.py", b"t\n")])
    tree, _ = decode(Workspace(archive=archive))
    assert tree == {"src/m.py": b"m\n", "top.py": b"t\n"}


def test_uncompressed_tar_is_accepted():
    tree, _ = decode(Workspace(archive=tar_b64([reg("a.py", b"x")], mode="w")))
    assert tree == {"a.py": b"x"}


@pytest.mark.parametrize(
    ("member", "what"),
    [
        (special("link.py", tarfile.SYMTYPE, "/etc/passwd"), "link.py"),
        (special("hard.py", tarfile.LNKTYPE, "train.py"), "hard.py"),
        (special("dev", tarfile.CHRTYPE), "dev"),
        (special("blk", tarfile.BLKTYPE), "blk"),
        (special("fifo", tarfile.FIFOTYPE), "fifo"),
    ],
)
def test_archive_links_and_devices_are_refused(member, what):
    archive = tar_b64([reg("train.py", b"x"), member])
    assert refused(Workspace(archive=archive)) == (
        f"archive member {what!r}: only regular files are allowed (no links or devices)"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil.py", "'../evil.py': '.', '..' and empty path segments are refused"),
        ("a/../../evil.py", "'.', '..' and empty path segments are refused"),
        ("/etc/cron.d/x", "'/etc/cron.d/x': absolute paths are refused"),
        (".git/hooks/post-checkout", "paths inside .git are refused"),
        ("sp ace.py", "use only letters, digits"),
    ],
)
def test_archive_unsafe_member_names_are_refused(name, message):
    assert message in refused(Workspace(archive=tar_b64([reg(name, b"x")])))


def test_archive_byte_limit():
    ok = tar_b64([reg("a.bin", b"x" * 6000), reg("b.bin", b"y" * 4000)])
    assert sum(len(v) for v in decode(Workspace(archive=ok))[0].values()) == MAX_BYTES
    over = tar_b64([reg("a.bin", b"x" * 6000), reg("b.bin", b"y" * 4001)])
    assert refused(Workspace(archive=over)).startswith(
        f"archive exceeds the workspace limits ({MAX_BYTES} bytes, {MAX_FILES} files): "
    )


def test_archive_file_limit():
    ok = tar_b64([reg(f"f{i}.txt", b"x") for i in range(MAX_FILES)])
    assert len(decode(Workspace(archive=ok))[0]) == MAX_FILES
    over = tar_b64([reg(f"f{i}.txt", b"x") for i in range(MAX_FILES + 1)])
    assert refused(Workspace(archive=over)).startswith(
        f"archive exceeds the workspace limits ({MAX_BYTES} bytes, {MAX_FILES} files): "
    )


def test_archive_bomb_is_stopped_by_the_byte_limit():
    # 5 MB of zeros compress to a few KB: the declared size is what counts.
    archive = tar_b64([reg("zeros.bin", bytes(5_000_000))])
    assert len(archive) < 50_000
    assert "archive exceeds the workspace limits" in refused(Workspace(archive=archive))


@pytest.mark.parametrize("bad", ["not base64!!", "YWJ", "YW Jj"])
def test_invalid_base64_is_refused(bad):
    assert refused(Workspace(archive=bad)).startswith("workspace.archive is not valid base64: ")


def test_base64_of_something_else_is_refused():
    msg = refused(Workspace(archive=base64.b64encode(b"hello, not a tarball").decode()))
    assert msg.startswith("workspace.archive is not a readable .tar.gz: ")


def test_truncated_archive_is_refused():
    raw = base64.b64decode(tar_b64([reg("a.py", b"x" * 5000)]))
    msg = refused(Workspace(archive=base64.b64encode(raw[: len(raw) // 2]).decode()))
    assert msg.startswith("workspace.archive is not a readable .tar.gz: ")


def test_archive_with_only_directories_is_empty():
    d = tarfile.TarInfo("src")
    d.type = tarfile.DIRTYPE
    assert refused(Workspace(archive=tar_b64([(d, None)]))) == "workspace is empty: give at least one file"
