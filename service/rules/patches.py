"""Turning a candidate (unified diff or whole files) into a new workspace tree. Pure: no I/O.

Every refusal is a `CandidateError` whose message says what to fix; the caller maps it to 422.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

__all__ = [
    "CandidateError",
    "apply_files",
    "apply_patch",
    "check_path",
    "check_text",
    "is_editable",
    "parse_patch",
]

Tree = dict[str, bytes]

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_LINE = re.compile(r"[^\n]*\n|[^\n]+$")
_PATH_OK = re.compile(r"^[A-Za-z0-9._+@=,-]+(/[A-Za-z0-9._+@=,-]+)*$")


class CandidateError(ValueError):
    """The candidate is refused; the message names the problem and the fix."""


def check_path(path: str) -> str:
    """A workspace path must be relative, normalised, plain and outside any `.git` directory."""
    if not path:
        raise CandidateError("empty file path")
    if path.startswith("/"):
        raise CandidateError(f"{path!r}: absolute paths are refused; give a path relative to the workspace")
    parts = path.split("/")
    if ".." in parts or "." in parts or "" in parts:
        raise CandidateError(f"{path!r}: '.', '..' and empty path segments are refused")
    # Any case: a ".GIT" directory is ".git" on case-insensitive file systems (a history clone there)
    if any(p.lower() == ".git" for p in parts):
        raise CandidateError(f"{path!r}: paths inside .git are refused")
    if not _PATH_OK.match(path):
        raise CandidateError(
            f"{path!r}: use only letters, digits and . _ + @ = , - in paths (no spaces or control characters)"
        )
    return path


def check_text(path: str, data: bytes) -> None:
    if b"\x00" in data:
        raise CandidateError(f"{path}: binary content (NUL bytes) is refused; only text files can be edited")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CandidateError(f"{path}: not valid UTF-8 at byte {exc.start}") from exc


def is_editable(path: str, editable: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in editable)


def _check_editable(path: str, editable: Iterable[str]) -> None:
    patterns = list(editable)
    if not is_editable(path, patterns):
        raise CandidateError(
            f"{path!r} is read-only in this loop; only paths matching {patterns} may be changed"
        )


def apply_files(parent: Mapping[str, bytes], files: Mapping[str, str], editable: Iterable[str]) -> Tree:
    """Whole-file replacements. A value of "" keeps an empty file; deletion needs a patch."""
    if not files:
        raise CandidateError("'files' is empty: give at least one file to replace")
    tree = dict(parent)
    for path, text in files.items():
        check_path(path)
        _check_editable(path, editable)
        data = text.encode("utf-8", errors="surrogatepass")
        check_text(path, data)
        tree[path] = data
    return tree


class FilePatch:
    def __init__(self, old: str | None, new: str | None) -> None:
        self.old, self.new = old, new
        self.hunks: list[tuple[int, list[str], list[str]]] = []  # (old_start, old, new)

    @property
    def path(self) -> str:
        return self.new or self.old or ""


def _name(raw: str) -> str:
    return raw.split("\t", 1)[0].strip()


def _strip(name: str, strip_prefix: bool) -> str | None:
    if name == "/dev/null":
        return None
    if name.startswith('"'):
        raise CandidateError(f"quoted path {name} in patch: rename the file to a plain name")
    if strip_prefix:
        name = name.split("/", 1)[1] if "/" in name else name
    return check_path(name)


_REFUSED_HEADERS = {
    ("GIT binary patch", "Binary files "): "binary patches are refused; only text files can be edited",
    ("new file mode 12", "deleted file mode 12", "old mode 12", "new mode 12"): "symbolic links are refused",
    (
        "rename from",
        "rename to",
        "copy from",
        "copy to",
        "old mode",
        "new mode",
    ): "unsupported patch operation",
}


def _check_header(line: str) -> None:
    if line.startswith("index ") and line.endswith(" 120000"):
        raise CandidateError("symbolic links are refused")
    for prefixes, why in _REFUSED_HEADERS.items():
        if line.startswith(prefixes):
            detail = f" {line.strip()!r}: send content changes only" if why.startswith("unsupported") else ""
            raise CandidateError(why + detail)


def parse_patch(text: str) -> list[FilePatch]:
    """Parses a unified diff (plain or git style). Refuses binary, rename, mode and link changes.

    The walk is sequential and hunks are consumed by the counts in their `@@` headers, so a
    removed line that reads `--- x` is content, never taken for the next file's header.
    """
    if "\x00" in text:
        raise CandidateError("patch contains NUL bytes: binary patches are refused")
    # Split on LF only: a CR stays part of its line, so CRLF content matches only CRLF content.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    raw: list[tuple[int, str, str, FilePatch]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- "):
            if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
                raise CandidateError(f"line {i + 1}: '---' header not followed by a '+++' header")
            fp = FilePatch(None, None)
            raw.append((i + 1, _name(line[4:]), _name(lines[i + 1][4:]), fp))
            i = _parse_hunks(fp, lines, i + 2)
            if not fp.hunks and i < len(lines) and not lines[i].startswith(("--- ", "diff ")):
                raise CandidateError(
                    f"line {i + 1}: expected a hunk header '@@ -a,b +c,d @@', got {lines[i][:60]!r}"
                )
            continue
        if line.startswith("@@"):
            raise CandidateError(f"line {i + 1}: hunk before any '--- a/<file>' / '+++ b/<file>' header")
        _check_header(line)
        i += 1
    if not raw:
        raise CandidateError(
            "patch has no '--- a/<file>' / '+++ b/<file>' header: send a unified diff (diff -u or git diff)"
        )
    names = [n for _, old, new, _ in raw for n in (old, new) if n != "/dev/null"]
    strip_prefix = bool(names) and all(n.startswith(("a/", "b/")) for n in names)
    for lineno, old, new, fp in raw:
        fp.old, fp.new = _strip(old, strip_prefix), _strip(new, strip_prefix)
        if fp.old is None and fp.new is None:
            raise CandidateError(f"line {lineno}: both sides are /dev/null")
        if fp.old and fp.new and fp.old != fp.new:
            raise CandidateError(f"renames are refused ({fp.old} -> {fp.new}); edit files in place")
    patches = [fp for *_, fp in raw]
    if not any(fp.hunks for fp in patches):
        raise CandidateError("patch changes nothing: it has no hunks")
    return patches


def _parse_hunks(fp: FilePatch, lines: list[str], i: int) -> int:
    """Consumes the hunks that follow a file header; returns the index of the first line after them."""
    while i < len(lines) and lines[i].startswith("@@"):
        m = _HUNK.match(lines[i])
        if not m:
            raise CandidateError(f"line {i + 1}: malformed hunk header {lines[i][:60]!r}")
        old_start, old_len = int(m.group(1)), int(m.group(2) or "1")
        new_len = int(m.group(4) or "1")
        old: list[str] = []
        new: list[str] = []
        i += 1
        last: list[list[str]] = []
        while i < len(lines) and (len(old) < old_len or len(new) < new_len or lines[i].startswith("\\")):
            line = lines[i]
            tag, content = (line[:1] or " "), line[1:] + "\n"
            if tag == "\\":
                for side in last:  # "\ No newline at end of file" applies to the line before
                    side[-1] = side[-1][:-1]
            elif tag == " ":
                old.append(content)
                new.append(content)
                last = [old, new]
            elif tag == "-" and len(old) < old_len:
                old.append(content)
                last = [old]
            elif tag == "+" and len(new) < new_len:
                new.append(content)
                last = [new]
            else:
                raise CandidateError(f"line {i + 1}: hunk ends early (counts in its @@ header do not match)")
            i += 1
        if len(old) != old_len or len(new) != new_len:
            raise CandidateError(
                f"hunk at old line {old_start}: counts in its @@ header do not match its lines"
            )
        fp.hunks.append((old_start if old_len else old_start + 1, old, new))
    return i


def _lines(data: bytes) -> list[str]:
    # str.splitlines would also split on \r, \f and other separators that diff does not know
    try:
        return _LINE.findall(data.decode("utf-8")) if data else []
    except UnicodeDecodeError as exc:
        raise CandidateError(
            f"the parent's file is not valid UTF-8 at byte {exc.start}; it cannot be patched"
        ) from exc


def _apply_one(fp: FilePatch, data: bytes | None) -> bytes | None:
    src = _lines(data) if data is not None else []
    out: list[str] = []
    pos = 0
    for old_start, old, new in fp.hunks:
        at = _locate(src, old, old_start - 1, pos)
        if at is None:
            raise CandidateError(
                f"{fp.path}: hunk at line {old_start} does not apply to the parent; "
                "regenerate the diff against the parent snapshot"
            )
        out.extend(src[pos:at])
        out.extend(new)
        pos = at + len(old)
    out.extend(src[pos:])
    if fp.new is None:
        if out:
            raise CandidateError(f"{fp.path}: deletion patch leaves content behind")
        return None
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CandidateError(f"{fp.path}: the patch is not valid UTF-8 text") from exc


def _locate(lines: list[str], want: list[str], hint: int, floor: int) -> int | None:
    """Where `want` matches exactly: at the hint, else the nearest offset (no fuzz), never before `floor`."""
    hint = max(hint, floor)
    for delta in range(len(lines) + 1):
        for at in (hint - delta, hint + delta) if delta else (hint,):
            if floor <= at <= len(lines) - len(want) and lines[at : at + len(want)] == want:
                return at
    return None


def apply_patch(parent: Mapping[str, bytes], patch: str, editable: Iterable[str]) -> Tree:
    """Applies a unified diff to `parent`; every touched path must be editable."""
    editable = list(editable)
    tree = dict(parent)
    for fp in parse_patch(patch):
        _check_editable(fp.path, editable)
        if fp.old is None and fp.path in tree:
            raise CandidateError(f"{fp.path}: patch creates a file that already exists in the parent")
        if fp.old is not None and fp.old not in tree:
            raise CandidateError(f"{fp.old}: no such file in the parent snapshot")
        new = _apply_one(fp, tree.get(fp.path))
        if new is None:
            tree.pop(fp.path, None)
        else:
            check_text(fp.path, new)
            tree[fp.path] = new
    if tree == dict(parent):
        raise CandidateError("patch applies but changes nothing")
    return tree
