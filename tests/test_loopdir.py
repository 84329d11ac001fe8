"""Reading a loop directory and writing a snapshot archive back (local files only), and decoding the
server-sent events of a followed log."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest

from client import RatchetClient, parse_sse
from client.loopdir import LoopDirError, extract_archive, loop_body


def _tar(members: list[tuple[str, bytes | None, str]]) -> bytes:
    """(name, content, kind) with kind file | dir | symlink | fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(content or b"")
                tar.addfile(info, io.BytesIO(content or b""))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = "/etc/passwd" if kind == "symlink" else ""
            tar.addfile(info)
    return buf.getvalue()


def test_toml_settings_flags_and_workspace(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "train.py").write_text("print(1)\n")
    (tmp_path / "sub" / "data.txt").write_text("abc\r\n")
    (tmp_path / "skip").mkdir()
    (tmp_path / "skip" / "x.py").write_text("x\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref\n")
    (tmp_path / "ratchet.toml").write_text(
        'name = "t"\ncommand = "python3 -u train.py --flag \'a b\'"\nexclude = ["skip/"]\n'
        '[metric]\nname = "loss"\ndirection = "minimize"\n[resources]\ncpus = 2.0\nmemory_mb = 512\n'
    )
    body = loop_body(tmp_path, {"metric": {"direction": "maximize"}, "resources": {"cpus": 1.0}})
    assert body["command"] == ["python3", "-u", "train.py", "--flag", "a b"]
    assert body["metric"] == {"name": "loss", "direction": "maximize"}  # merged key by key
    assert body["resources"] == {"cpus": 1.0, "memory_mb": 512}
    assert "exclude" not in body
    assert body["workspace"] == {"files": {"sub/data.txt": "abc\r\n", "train.py": "print(1)\n"}}


def test_json_definition_default_name_and_binary_workspace(tmp_path):
    root = tmp_path / "my loop!"
    root.mkdir()
    (root / "train.py").write_text("print(1)\n")
    (root / "weights.bin").write_bytes(b"\xff\x00\xfe")
    (root / "ratchet.json").write_text(json.dumps({"editable": ["train.py"]}))
    body = loop_body(root)
    assert body["name"] == "my-loop-"
    assert body["editable"] == ["train.py"]
    # a binary file cannot travel as text: the whole workspace goes as an archive
    raw = base64.b64decode(body["workspace"]["archive"])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar}
    assert got == {"train.py": b"print(1)\n", "weights.bin": b"\xff\x00\xfe"}


def test_bad_definitions_name_the_problem(tmp_path):
    (tmp_path / "train.py").write_text("x\n")
    (tmp_path / "ratchet.toml").write_text("name = \n")
    with pytest.raises(LoopDirError, match=r"ratchet\.toml"):
        loop_body(tmp_path)
    (tmp_path / "ratchet.json").write_text("{}")
    with pytest.raises(LoopDirError, match="both"):
        loop_body(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "ratchet.json").write_text("{}")
    with pytest.raises(LoopDirError, match="no workspace files"):
        loop_body(empty)


def test_extract_writes_regular_files_and_refuses_the_rest(tmp_path):
    good = _tar([("a", None, "dir"), ("a/b.py", b"B\n", "file"), ("./c.txt", b"C", "file")])
    dest = tmp_path / "out"
    assert sorted(extract_archive(good, dest)) == ["a/b.py", "c.txt"]
    assert (dest / "a" / "b.py").read_text() == "B\n"
    with pytest.raises(LoopDirError, match="not empty"):
        extract_archive(good, dest)
    (dest / "c.txt").write_text("local edit")
    (dest / "other").write_text("kept")
    extract_archive(good, dest, force=True)
    assert (dest / "c.txt").read_text() == "C" and (dest / "other").read_text() == "kept"

    cases = [
        (_tar([("ok", b"1", "file"), ("../evil", b"x", "file")]), "unsafe path"),
        (_tar([("/etc/evil", b"x", "file")]), "unsafe path"),
        (_tar([("ok", b"1", "file"), ("link", None, "symlink")]), "not a regular file"),
        (_tar([("pipe", None, "fifo")]), "not a regular file"),
    ]
    for i, (bad, why) in enumerate(cases):
        target = tmp_path / f"bad{i}"
        with pytest.raises(LoopDirError, match=why):
            extract_archive(bad, target)
        assert not target.exists()  # checked before anything is written
    with pytest.raises(LoopDirError, match="readable"):
        extract_archive(b"not a tarball", tmp_path / "junk")


def test_extract_does_not_follow_a_symlinked_directory_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a").symlink_to(outside)
    with pytest.raises(LoopDirError, match="outside"):
        extract_archive(_tar([("a/x", b"x", "file")]), dest, force=True)
    assert not (outside / "x").exists()


def test_sse_decoding_round_trips_chunks():
    # as Litestar encodes ServerSentEvent data: one `data:` line per line of the chunk
    stream = [
        ": keep-alive",
        "data: line one",
        "data: line two",
        "data: ",
        "",
        "data: partial",
        "",
        "event: end",
        "data: keep",
        "",
    ]
    assert list(parse_sse(stream)) == [
        ("message", "line one\nline two\n"),
        ("message", "partial"),
        ("end", "keep"),
    ]


def test_token_is_sent_as_bearer():
    client = RatchetClient("http://127.0.0.1:1", token="s3cret")
    assert client.http.headers["authorization"] == "Bearer s3cret"
    assert "authorization" not in RatchetClient("http://127.0.0.1:1").http.headers


def test_symlinked_workspace_files_are_left_out(tmp_path: Path):
    (tmp_path / "train.py").write_text("x\n")
    (tmp_path / "leak").symlink_to("/etc/hostname")
    assert set(loop_body(tmp_path)["workspace"]["files"]) == {"train.py"}
