"""Unit tests of `service.rules.patches`: every refusal, every supported diff shape, and a round trip
against the real GNU `diff -u` and `git diff` output."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from service.rules.patches import (
    CandidateError,
    apply_files,
    apply_patch,
    check_path,
    check_text,
    is_editable,
    parse_patch,
)

EDITABLE = ["train.py", "src/*.py", "notes/*"]
PARENT = {
    "train.py": b"import os\n\nlr = 0.01\nsteps = 100\nprint(lr, steps)\n",
    "prepare.py": b"def evaluate():\n    return 1.0\n",
    "src/model.py": b"class Model:\n    pass\n",
}
REGENERATE = "regenerate the diff against the parent snapshot"


def patch_of(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


def refused(parent, patch, editable=EDITABLE) -> str:
    with pytest.raises(CandidateError) as info:
        apply_patch(parent, patch, editable)
    return str(info.value)


# -- paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["train.py", "src/model.py", "a-b_c.d+e@f=g,h", "deep/er/path.txt"])
def test_check_path_accepts_plain_relative_paths(path):
    assert check_path(path) == path


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "empty file path"),
        ("/etc/passwd", "'/etc/passwd': absolute paths are refused"),
        ("../outside.py", "'../outside.py': '.', '..' and empty path segments are refused"),
        ("src/../../x.py", "'src/../../x.py': '.', '..' and empty path segments are refused"),
        ("./train.py", "'./train.py': '.', '..' and empty path segments are refused"),
        ("src//model.py", "'src//model.py': '.', '..' and empty path segments are refused"),
        ("src/", "'src/': '.', '..' and empty path segments are refused"),
        (".git/config", "'.git/config': paths inside .git are refused"),
        ("sub/.git/hooks/pre-commit", "paths inside .git are refused"),
        ("src/.GIT/config", "paths inside .git are refused"),  # .git on case-insensitive file systems
        (".Git/hooks/post-checkout", "paths inside .git are refused"),
        ("with space.py", "use only letters, digits"),
        ("tab\there.py", "use only letters, digits"),
        ("new\nline.py", "use only letters, digits"),
        ("back\\slash.py", "use only letters, digits"),
    ],
)
def test_check_path_refusals(path, message):
    with pytest.raises(CandidateError) as info:
        check_path(path)
    assert message in str(info.value)


def test_git_like_names_that_are_not_git_dirs_are_fine():
    assert check_path(".gitignore") == ".gitignore"
    assert check_path("src/.github/x.yml") == "src/.github/x.yml"


def test_is_editable_globs():
    assert is_editable("train.py", EDITABLE)
    assert is_editable("src/model.py", EDITABLE)
    assert is_editable("notes/a.md", EDITABLE)
    assert not is_editable("prepare.py", EDITABLE)
    assert not is_editable("Train.py", EDITABLE)  # case-sensitive on every platform
    assert not is_editable("train.py", [])
    assert not is_editable("src", EDITABLE)


def test_check_text():
    check_text("ok.py", "héllo → wörld\n".encode())
    with pytest.raises(CandidateError, match=r"^x\.py: binary content \(NUL bytes\) is refused"):
        check_text("x.py", b"a\x00b")
    with pytest.raises(CandidateError, match=r"^x\.py: not valid UTF-8 at byte 2$"):
        check_text("x.py", b"ab\xffcd")


# -- apply_files ------------------------------------------------------------------------------------


def test_apply_files_replaces_and_adds_editable_files():
    tree = apply_files(PARENT, {"train.py": "lr = 0.02\n", "src/new.py": "x = 1\n"}, EDITABLE)
    assert tree["train.py"] == b"lr = 0.02\n"
    assert tree["src/new.py"] == b"x = 1\n"
    assert tree["prepare.py"] == PARENT["prepare.py"]
    assert set(tree) == {*PARENT, "src/new.py"}
    assert PARENT["train.py"].startswith(b"import os")  # the parent is not modified


def test_apply_files_empty_string_keeps_an_empty_file():
    tree = apply_files(PARENT, {"train.py": ""}, EDITABLE)
    assert tree["train.py"] == b""
    assert "train.py" in tree


def test_apply_files_refusals():
    with pytest.raises(CandidateError, match="'files' is empty"):
        apply_files(PARENT, {}, EDITABLE)
    with pytest.raises(CandidateError, match=r"'prepare\.py' is read-only in this loop"):
        apply_files(PARENT, {"prepare.py": "x"}, EDITABLE)
    with pytest.raises(CandidateError, match="absolute paths are refused"):
        apply_files(PARENT, {"/train.py": "x"}, ["*"])
    with pytest.raises(CandidateError, match=r"paths inside \.git are refused"):
        apply_files(PARENT, {".git/config": "x"}, ["*"])
    with pytest.raises(CandidateError, match=r"train\.py: binary content \(NUL bytes\)"):
        apply_files(PARENT, {"train.py": "a\x00b"}, EDITABLE)
    with pytest.raises(CandidateError, match=r"train\.py: not valid UTF-8 at byte 1"):
        apply_files(PARENT, {"train.py": "a\udcff"}, EDITABLE)


def test_apply_files_read_only_message_lists_patterns():
    with pytest.raises(CandidateError) as info:
        apply_files(PARENT, {"prepare.py": "x"}, ["train.py"])
    assert (
        str(info.value)
        == "'prepare.py' is read-only in this loop; only paths matching ['train.py'] may be changed"
    )


# -- apply_patch: supported shapes --------------------------------------------------------------------


def test_simple_git_style_patch():
    patch = patch_of(
        "diff --git a/train.py b/train.py",
        "index 1111111..2222222 100644",
        "--- a/train.py",
        "+++ b/train.py",
        "@@ -2,3 +2,3 @@",
        " ",
        "-lr = 0.01",
        "+lr = 0.02",
        " steps = 100",
    )
    tree = apply_patch(PARENT, patch, EDITABLE)
    assert tree["train.py"] == b"import os\n\nlr = 0.02\nsteps = 100\nprint(lr, steps)\n"
    assert {k: v for k, v in tree.items() if k != "train.py"} == {
        k: v for k, v in PARENT.items() if k != "train.py"
    }


def test_plain_patch_without_prefixes_and_with_timestamps():
    patch = patch_of(
        "--- train.py\t2024-01-01 00:00:00.000000000 +0000",
        "+++ train.py\t2024-01-02 00:00:00.000000000 +0000",
        "@@ -4 +4 @@",
        "-steps = 100",
        "+steps = 200",
    )
    tree = apply_patch(PARENT, patch, EDITABLE)
    assert tree["train.py"] == b"import os\n\nlr = 0.01\nsteps = 200\nprint(lr, steps)\n"


def test_multiple_hunks_in_one_file():
    parent = {"train.py": "".join(f"line {i}\n" for i in range(1, 21)).encode()}
    patch = patch_of(
        "--- a/train.py",
        "+++ b/train.py",
        "@@ -1,3 +1,3 @@",
        "-line 1",
        "+LINE 1",
        " line 2",
        " line 3",
        "@@ -10,3 +10,4 @@",
        " line 10",
        "+inserted",
        " line 11",
        " line 12",
        "@@ -18,3 +19,2 @@",
        " line 18",
        "-line 19",
        " line 20",
    )
    tree = apply_patch(parent, patch, EDITABLE)
    expected = [f"line {i}" for i in range(1, 21)]
    expected[0] = "LINE 1"
    expected.insert(10, "inserted")
    expected.remove("line 19")
    assert tree["train.py"] == ("\n".join(expected) + "\n").encode()


def test_multiple_files_in_one_patch():
    patch = patch_of(
        "diff --git a/train.py b/train.py",
        "--- a/train.py",
        "+++ b/train.py",
        "@@ -3 +3 @@",
        "-lr = 0.01",
        "+lr = 0.5",
        "diff --git a/src/model.py b/src/model.py",
        "index abc..def 100644",
        "--- a/src/model.py",
        "+++ b/src/model.py",
        "@@ -1,2 +1,2 @@",
        " class Model:",
        "-    pass",
        "+    depth = 4",
    )
    tree = apply_patch(PARENT, patch, EDITABLE)
    assert tree["train.py"] == b"import os\n\nlr = 0.5\nsteps = 100\nprint(lr, steps)\n"
    assert tree["src/model.py"] == b"class Model:\n    depth = 4\n"
    assert tree["prepare.py"] == PARENT["prepare.py"]


def test_new_file_patch():
    patch = patch_of(
        "diff --git a/src/extra.py b/src/extra.py",
        "new file mode 100644",
        "index 0000000..1234567",
        "--- /dev/null",
        "+++ b/src/extra.py",
        "@@ -0,0 +1,2 @@",
        "+A = 1",
        "+B = 2",
    )
    tree = apply_patch(PARENT, patch, EDITABLE)
    assert tree["src/extra.py"] == b"A = 1\nB = 2\n"
    assert set(tree) == {*PARENT, "src/extra.py"}


def test_new_file_without_trailing_newline():
    patch = patch_of(
        "--- /dev/null",
        "+++ b/notes/n.txt",
        "@@ -0,0 +1 @@",
        "+no newline",
        "\\ No newline at end of file",
    )
    assert apply_patch(PARENT, patch, EDITABLE)["notes/n.txt"] == b"no newline"


def test_new_file_that_already_exists_is_refused():
    patch = patch_of("--- /dev/null", "+++ b/train.py", "@@ -0,0 +1 @@", "+x")
    assert refused(PARENT, patch) == "train.py: patch creates a file that already exists in the parent"


def test_delete_file_patch():
    patch = patch_of(
        "diff --git a/src/model.py b/src/model.py",
        "deleted file mode 100644",
        "index 1234567..0000000",
        "--- a/src/model.py",
        "+++ /dev/null",
        "@@ -1,2 +0,0 @@",
        "-class Model:",
        "-    pass",
    )
    tree = apply_patch(PARENT, patch, EDITABLE)
    assert "src/model.py" not in tree
    assert set(tree) == {"train.py", "prepare.py"}


def test_delete_file_patch_that_leaves_content_is_refused():
    patch = patch_of("--- a/src/model.py", "+++ /dev/null", "@@ -1 +0,0 @@", "-class Model:")
    assert refused(PARENT, patch) == "src/model.py: deletion patch leaves content behind"


def test_delete_of_read_only_file_is_refused():
    patch = patch_of(
        "--- a/prepare.py", "+++ /dev/null", "@@ -1,2 +0,0 @@", "-def evaluate():", "-    return 1.0"
    )
    assert "'prepare.py' is read-only in this loop" in refused(PARENT, patch)


def test_patch_of_missing_file_is_refused():
    patch = patch_of("--- a/src/nope.py", "+++ b/src/nope.py", "@@ -1 +1 @@", "-a", "+b")
    assert refused(PARENT, patch) == "src/nope.py: no such file in the parent snapshot"


def test_removing_the_trailing_newline():
    parent = {"train.py": b"a\nb\n"}
    patch = patch_of(
        "--- a/train.py",
        "+++ b/train.py",
        "@@ -1,2 +1,2 @@",
        " a",
        "-b",
        "+b",
        "\\ No newline at end of file",
    )
    assert apply_patch(parent, patch, EDITABLE)["train.py"] == b"a\nb"


def test_adding_the_trailing_newline():
    parent = {"train.py": b"a\nb"}
    patch = patch_of(
        "--- a/train.py",
        "+++ b/train.py",
        "@@ -1,2 +1,2 @@",
        " a",
        "-b",
        "\\ No newline at end of file",
        "+b",
    )
    assert apply_patch(parent, patch, EDITABLE)["train.py"] == b"a\nb\n"


def test_context_line_without_trailing_newline_on_both_sides():
    parent = {"train.py": b"a\nb\nc"}
    patch = patch_of(
        "--- a/train.py",
        "+++ b/train.py",
        "@@ -1,3 +1,3 @@",
        "-a",
        "+A",
        " b",
        " c",
        "\\ No newline at end of file",
    )
    assert apply_patch(parent, patch, EDITABLE)["train.py"] == b"A\nb\nc"


def test_no_newline_marker_must_match_the_parent():
    # The parent ends with a newline, the patch claims it does not: the hunk does not match.
    parent = {"train.py": b"a\nb\n"}
    patch = patch_of(
        "--- a/train.py", "+++ b/train.py", "@@ -2 +2 @@", "-b", "\\ No newline at end of file", "+c"
    )
    assert "hunk at line 2 does not apply" in refused(parent, patch)


def test_hunk_with_offset_is_found_nearby():
    body = "".join(f"row {i}\n" for i in range(30)).encode()
    parent = {"train.py": b"header 1\nheader 2\nheader 3\n" + body}
    # Line numbers as if the three header lines did not exist.
    patch = patch_of(
        "--- a/train.py", "+++ b/train.py", "@@ -10,3 +10,3 @@", " row 9", "-row 10", "+ROW 10", " row 11"
    )
    tree = apply_patch(parent, patch, EDITABLE)
    assert tree["train.py"] == parent["train.py"].replace(b"row 10\n", b"ROW 10\n")


def test_hunk_with_negative_offset():
    parent = {"train.py": "".join(f"row {i}\n" for i in range(30)).encode()}
    patch = patch_of("--- a/train.py", "+++ b/train.py", "@@ -25,2 +25,2 @@", "-row 5", "+ROW 5", " row 6")
    tree = apply_patch(parent, patch, EDITABLE)
    assert tree["train.py"] == parent["train.py"].replace(b"row 5\n", b"ROW 5\n")


def test_offset_picks_the_nearest_match():
    parent = {"train.py": b"x\ny\nx\ny\nx\ny\nx\ny\n"}
    patch = patch_of("--- a/train.py", "+++ b/train.py", "@@ -6 +6 @@", "-y", "+Y")
    assert apply_patch(parent, patch, EDITABLE)["train.py"] == b"x\ny\nx\ny\nx\nY\nx\ny\n"


def test_later_hunk_never_applies_before_an_earlier_one():
    parent = {"train.py": b"a\nb\na\nb\n"}
    patch = patch_of("--- a/train.py", "+++ b/train.py", "@@ -3 +3 @@", "-a", "+A", "@@ -2 +2 @@", "-b", "+B")
    # The second hunk's own position is before the first; it must land after it.
    assert apply_patch(parent, patch, EDITABLE)["train.py"] == b"a\nb\nA\nB\n"


def test_crlf_patch_against_crlf_file_applies():
    parent = {"train.py": b"one\r\ntwo\r\nthree\r\n"}
    patch = "--- a/train.py\r\n+++ b/train.py\r\n@@ -1,3 +1,3 @@\r\n one\r\n-two\r\n+2\r\n three\r\n"
    assert apply_patch(parent, patch, EDITABLE)["train.py"] == b"one\r\n2\r\nthree\r\n"


def test_crlf_patch_against_lf_file_is_refused():
    parent = {"train.py": b"one\ntwo\nthree\n"}
    patch = "--- a/train.py\r\n+++ b/train.py\r\n@@ -1,3 +1,3 @@\r\n one\r\n-two\r\n+2\r\n three\r\n"
    assert refused(parent, patch) == ("train.py: hunk at line 1 does not apply to the parent; " + REGENERATE)


def test_lf_patch_against_crlf_file_is_refused():
    parent = {"train.py": b"one\r\ntwo\r\nthree\r\n"}
    patch = patch_of("--- a/train.py", "+++ b/train.py", "@@ -1,3 +1,3 @@", " one", "-two", "+2", " three")
    assert "hunk at line 1 does not apply" in refused(parent, patch)


def test_carriage_return_inside_a_line_is_content():
    parent = {"train.py": b"a\rb\nc\n"}
    patch = patch_of("--- a/train.py", "+++ b/train.py", "@@ -1,2 +1,2 @@", " a\rb", "-c", "+d")
    assert apply_patch(parent, patch, EDITABLE)["train.py"] == b"a\rb\nd\n"


def test_removing_a_line_that_starts_with_two_dashes():
    # `-- note` removed is the diff line `--- note`; it is hunk content, not a file header.
    parent = {"notes/q.sql": b"-- note\nSELECT 1;\n"}
    patch = patch_of("--- a/notes/q.sql", "+++ b/notes/q.sql", "@@ -1,2 +1 @@", "--- note", " SELECT 1;")
    assert apply_patch(parent, patch, EDITABLE)["notes/q.sql"] == b"SELECT 1;\n"


def test_replacing_a_dashed_line_with_a_plussed_line():
    # `-- a/x` -> `++ b/x` looks exactly like a pair of file headers inside the hunk.
    parent = {"notes/q.txt": b"keep\n-- a/x\nkeep\n"}
    patch = patch_of(
        "--- a/notes/q.txt", "+++ b/notes/q.txt", "@@ -1,3 +1,3 @@", " keep", "--- a/x", "+++ b/x", " keep"
    )
    assert apply_patch(parent, patch, EDITABLE)["notes/q.txt"] == b"keep\n++ b/x\nkeep\n"


def test_empty_context_line_with_stripped_space():
    # Some tools strip the single space of an empty context line.
    parent = {"train.py": b"a\n\nb\n"}
    patch = "--- a/train.py\n+++ b/train.py\n@@ -1,3 +1,3 @@\n a\n\n-b\n+c\n"
    assert apply_patch(parent, patch, EDITABLE)["train.py"] == b"a\n\nc\n"


def test_unicode_content():
    parent = {"train.py": "\u03b1 = 1\n\u03b2 = 2\n".encode()}
    patch = patch_of(
        "--- a/train.py", "+++ b/train.py", "@@ -2 +2 @@", "-\u03b2 = 2", "+\u03b2 = 3 \u2192 ok"
    )
    assert apply_patch(parent, patch, EDITABLE)["train.py"] == "\u03b1 = 1\n\u03b2 = 3 \u2192 ok\n".encode()


# -- apply_patch / parse_patch: refusals ---------------------------------------------------------------


def test_empty_patch_is_refused():
    msg = "patch has no '--- a/<file>' / '+++ b/<file>' header: send a unified diff (diff -u or git diff)"
    assert refused(PARENT, "") == msg
    assert refused(PARENT, "just some words\n") == msg


def test_patch_without_hunks_is_refused():
    assert (
        refused(PARENT, patch_of("--- a/train.py", "+++ b/train.py"))
        == "patch changes nothing: it has no hunks"
    )


def test_patch_that_changes_nothing_is_refused():
    patch = patch_of("--- a/train.py", "+++ b/train.py", "@@ -3 +3 @@", "-lr = 0.01", "+lr = 0.01")
    assert refused(PARENT, patch) == "patch applies but changes nothing"


def test_patch_outside_editable_is_refused():
    patch = patch_of(
        "--- a/prepare.py", "+++ b/prepare.py", "@@ -2 +2 @@", "-    return 1.0", "+    return 0.0"
    )
    assert refused(PARENT, patch) == (
        "'prepare.py' is read-only in this loop; only paths matching "
        "['train.py', 'src/*.py', 'notes/*'] may be changed"
    )


def test_one_read_only_file_refuses_the_whole_patch():
    patch = patch_of(
        "--- a/train.py",
        "+++ b/train.py",
        "@@ -3 +3 @@",
        "-lr = 0.01",
        "+lr = 0.5",
        "--- a/prepare.py",
        "+++ b/prepare.py",
        "@@ -2 +2 @@",
        "-    return 1.0",
        "+    return 0.0",
    )
    assert "'prepare.py' is read-only" in refused(PARENT, patch)


def test_new_file_outside_editable_is_refused():
    patch = patch_of("--- /dev/null", "+++ b/evil.py", "@@ -0,0 +1 @@", "+x")
    assert "'evil.py' is read-only in this loop" in refused(PARENT, patch)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("/etc/passwd", "/etc/passwd", "'/etc/passwd': absolute paths are refused"),
        (
            "a/../prepare.py",
            "b/../prepare.py",
            "'../prepare.py': '.', '..' and empty path segments are refused",
        ),
        ("a/src/../prepare.py", "b/src/../prepare.py", "'src/../prepare.py': '.', '..'"),
        ("a/.git/config", "b/.git/config", "'.git/config': paths inside .git are refused"),
        ("a/.git/hooks/pre-commit", "b/.git/hooks/pre-commit", "paths inside .git are refused"),
        ('"a/sp ace.py"', '"b/sp ace.py"', "quoted path"),
    ],
)
def test_unsafe_paths_in_headers_are_refused(old, new, message):
    patch = patch_of(f"--- {old}", f"+++ {new}", "@@ -1 +1 @@", "-a", "+b")
    assert message in refused(PARENT, patch, ["*"])


def test_unsafe_path_on_the_new_side_only_is_refused():
    patch = patch_of("--- /dev/null", "+++ b/../../etc/cron.d/x", "@@ -0,0 +1 @@", "+x")
    assert "'.', '..' and empty path segments are refused" in refused(PARENT, patch, ["*"])


def test_symlink_new_file_is_refused():
    patch = patch_of(
        "diff --git a/link b/link",
        "new file mode 120000",
        "index 0000000..e69de29",
        "--- /dev/null",
        "+++ b/link",
        "@@ -0,0 +1 @@",
        "+/etc/passwd",
        "\\ No newline at end of file",
    )
    assert refused(PARENT, patch, ["*"]) == "symbolic links are refused"


def test_symlink_deletion_is_refused():
    patch = patch_of(
        "diff --git a/link b/link",
        "deleted file mode 120000",
        "--- a/link",
        "+++ /dev/null",
        "@@ -1 +0,0 @@",
        "-target",
    )
    assert refused({"link": b"target\n"}, patch, ["*"]) == "symbolic links are refused"


def test_symlink_in_index_line_is_refused():
    patch = patch_of(
        "diff --git a/train.py b/train.py",
        "index 1234567..89abcde 120000",
        "--- a/train.py",
        "+++ b/train.py",
        "@@ -3 +3 @@",
        "-lr = 0.01",
        "+lr = 0.5",
    )
    assert refused(PARENT, patch) == "symbolic links are refused"


def test_git_binary_patch_is_refused():
    patch = patch_of(
        "diff --git a/train.py b/train.py",
        "index 1234567..89abcde 100644",
        "GIT binary patch",
        "literal 5",
        "McmZ?wcbxV0",
        "--- a/train.py",
        "+++ b/train.py",
        "@@ -3 +3 @@",
        "-lr = 0.01",
        "+lr = 0.5",
    )
    assert refused(PARENT, patch) == "binary patches are refused; only text files can be edited"


def test_binary_files_differ_is_refused():
    patch = patch_of(
        "diff --git a/train.py b/train.py",
        "Binary files a/train.py and b/train.py differ",
        "--- a/src/model.py",
        "+++ b/src/model.py",
        "@@ -2 +2 @@",
        "-    pass",
        "+    x = 1",
    )
    assert refused(PARENT, patch) == "binary patches are refused; only text files can be edited"


def test_rename_by_headers_is_refused():
    patch = patch_of("--- a/train.py", "+++ b/src/train.py", "@@ -3 +3 @@", "-lr = 0.01", "+lr = 0.5")
    assert (
        refused(PARENT, patch, ["*"]) == "renames are refused (train.py -> src/train.py); edit files in place"
    )


@pytest.mark.parametrize(
    "line",
    [
        "rename from train.py",
        "rename to src/t.py",
        "copy from train.py",
        "copy to x.py",
        "old mode 100644",
        "new mode 100755",
    ],
)
def test_git_extended_headers_are_refused(line):
    patch = patch_of(
        "diff --git a/train.py b/train.py",
        line,
        "--- a/train.py",
        "+++ b/train.py",
        "@@ -3 +3 @@",
        "-lr = 0.01",
        "+lr = 0.5",
    )
    assert refused(PARENT, patch, ["*"]) == f"unsupported patch operation {line!r}: send content changes only"


def test_nul_bytes_in_patch_are_refused():
    patch = patch_of("--- a/train.py", "+++ b/train.py", "@@ -3 +3 @@", "-lr = 0.01", "+lr = \x000.5")
    assert refused(PARENT, patch) == "patch contains NUL bytes: binary patches are refused"


def test_nul_bytes_already_in_parent_are_refused_in_the_result():
    parent = {"train.py": b"a\x00\nb\n"}
    patch = patch_of("--- a/train.py", "+++ b/train.py", "@@ -2 +2 @@", "-b", "+c")
    assert (
        refused(parent, patch)
        == "train.py: binary content (NUL bytes) is refused; only text files can be edited"
    )


def test_lone_surrogate_in_patch_is_refused_as_invalid_utf8():
    patch = patch_of("--- a/train.py", "+++ b/train.py", "@@ -3 +3 @@", "-lr = 0.01", "+lr = \udcff")
    assert "not valid UTF-8" in refused(PARENT, patch)


def test_parent_that_is_not_utf8_is_refused():
    # An archive workspace may hold any bytes; patching such a file must be a refusal, not a crash.
    parent = {"notes/data.txt": b"caf\xe9\nline\n"}
    patch = patch_of("--- a/notes/data.txt", "+++ b/notes/data.txt", "@@ -2 +2 @@", "-line", "+LINE")
    assert "not valid UTF-8" in refused(parent, patch)


def test_header_without_plus_header_is_refused():
    patch = patch_of("--- a/train.py", "@@ -3 +3 @@", "-lr = 0.01", "+lr = 0.5")
    assert refused(PARENT, patch) == "line 1: '---' header not followed by a '+++' header"


def test_both_sides_dev_null_is_refused():
    patch = patch_of("--- /dev/null", "+++ /dev/null", "@@ -0,0 +1 @@", "+x")
    assert refused(PARENT, patch) == "line 1: both sides are /dev/null"


def test_hunk_that_does_not_apply_is_refused():
    patch = patch_of("--- a/train.py", "+++ b/train.py", "@@ -3 +3 @@", "-lr = 0.99", "+lr = 0.5")
    assert refused(PARENT, patch) == ("train.py: hunk at line 3 does not apply to the parent; " + REGENERATE)


def test_hunk_counts_too_large_are_refused():
    patch = patch_of("--- a/train.py", "+++ b/train.py", "@@ -3,5 +3,5 @@", "-lr = 0.01", "+lr = 0.5")
    assert refused(PARENT, patch) == "hunk at old line 3: counts in its @@ header do not match its lines"


def test_garbage_inside_hunk_is_refused():
    patch = patch_of(
        "--- a/train.py", "+++ b/train.py", "@@ -3,2 +3,2 @@", "-lr = 0.01", "*junk", "+lr = 0.5"
    )
    assert refused(PARENT, patch) == "line 5: hunk ends early (counts in its @@ header do not match)"


def test_line_that_is_not_a_hunk_header_is_refused():
    patch = patch_of("--- a/train.py", "+++ b/train.py", "lr = 0.5")
    assert refused(PARENT, patch) == "line 3: expected a hunk header '@@ -a,b +c,d @@', got 'lr = 0.5'"


def test_parse_patch_returns_file_patches():
    patch = patch_of(
        "--- a/train.py",
        "+++ b/train.py",
        "@@ -3,2 +3,2 @@",
        "-lr = 0.01",
        "+lr = 0.5",
        " steps = 100",
        "--- /dev/null",
        "+++ b/new.py",
        "@@ -0,0 +1 @@",
        "+x",
    )
    fps = parse_patch(patch)
    assert [(fp.old, fp.new, fp.path) for fp in fps] == [
        ("train.py", "train.py", "train.py"),
        (None, "new.py", "new.py"),
    ]
    assert fps[0].hunks == [(3, ["lr = 0.01\n", "steps = 100\n"], ["lr = 0.5\n", "steps = 100\n"])]
    assert fps[1].hunks == [(1, [], ["x\n"])]


def test_refused_patch_leaves_parent_untouched():
    parent = dict(PARENT)
    patch = patch_of(
        "--- a/train.py", "+++ b/train.py", "@@ -3 +3 @@", "-lr = 0.01", "+lr = 0.5",
        "--- a/src/model.py", "+++ b/src/model.py", "@@ -1 +1 @@", "-nope", "+x",
    )  # fmt: skip
    refused(parent, patch)
    assert parent == PARENT


# -- property test against real diff tools -----------------------------------------------------------

DIFF = shutil.which("diff")
GIT = shutil.which("git")

# Lines that look like patch syntax are the interesting ones; plain random text fills the rest.
TRICKY_LINES = [
    "",
    " ",
    "\t",
    "-- sql comment",
    "++ plus",
    "--- a/train.py",
    "+++ b/train.py",
    "@@ -1 +1 @@",
    "\\ No newline at end of file",
    "diff --git a/x b/x",
    "index 1234567..89abcde 100644",
    "trailing cr\r",
    "\r",
    "mid\rcr",
    "---",
    "+",
    "-",
    "\u03b1 \u2192 \u03b2",
]
line_text = st.text(
    alphabet=st.sampled_from([*"abcxyz019 \t-+@\\:=()\r#", "\u00e9", "\u2192", "\u2028", "\x0c"]), max_size=8
)
lines_st = st.lists(st.one_of(st.sampled_from(TRICKY_LINES), line_text), max_size=10)
edit_st = st.tuples(
    st.sampled_from(["insert", "delete", "replace"]),
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=1, max_value=3),
    lines_st,
)


def _join(lines: list[str], newline_at_end: bool) -> bytes:
    text = "\n".join(lines)
    if lines and newline_at_end:
        text += "\n"
    return text.encode("utf-8")


def _edit(lines: list[str], edits) -> list[str]:
    out = list(lines)
    for kind, pos, count, new in edits:
        at = pos % (len(out) + 1)
        if kind == "insert":
            out[at:at] = new or ["inserted"]
        elif kind == "delete":
            del out[at : at + count]
        else:
            out[at : at + count] = new
    return out


def _git(*args: str, cwd: str) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "HOME": cwd,
        "LC_ALL": "C",
    }
    return subprocess.run(
        [GIT, "-c", "core.quotepath=false", "-c", "diff.noprefix=false", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        check=False,
    )


def _make_diff(tool: str, root: Path, name: str, before: bytes, after: bytes) -> str:
    for side, data in (("a", before), ("b", after)):
        path = root / side / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if tool == "diff":
        proc = subprocess.run(
            [DIFF, "-u", f"a/{name}", f"b/{name}"], cwd=root, capture_output=True, check=False
        )
    else:
        proc = _git(
            "diff", "--no-index", "--no-color", "--no-ext-diff", "--text", "--no-prefix",
            f"a/{name}", f"b/{name}", cwd=str(root),
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr.decode(errors="replace")
    return proc.stdout.decode("utf-8")


@pytest.fixture(scope="module")
def diff_root(tmp_path_factory) -> Iterator[Path]:
    # Many small files are written per example: prefer memory-backed storage when there is some.
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm) as tmp:
            yield Path(tmp)
    else:
        yield tmp_path_factory.mktemp("diffs")


@pytest.mark.skipif(DIFF is None or GIT is None, reason="needs GNU diff and git on PATH")
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["train.py", "src/model.py", "notes/a-b_c.txt"]),
    original=lines_st,
    newline_before=st.booleans(),
    edits=st.lists(edit_st, min_size=1, max_size=3),
    newline_after=st.booleans(),
)
@example(
    name="notes/a-b_c.txt",
    original=["-- note", "SELECT 1;"],
    newline_before=True,
    edits=[("replace", 0, 1, ["++ added"])],
    newline_after=True,
)
def test_round_trip_with_real_diff(diff_root, name, original, newline_before, edits, newline_after):
    """`diff -u` and `git diff` output of a random edit applies back to exactly the edited bytes."""
    before = _join(original, newline_before)
    after = _join(_edit(original, edits), newline_after)
    assume(before != after)
    parent = {name: before, "prepare.py": b"read only\n"}
    for tool in ("diff", "git"):
        patch = _make_diff(tool, diff_root, name, before, after)
        tree = apply_patch(parent, patch, ["train.py", "src/*", "notes/*"])
        assert tree[name] == after, tool
        assert tree["prepare.py"] == b"read only\n"
        assert set(tree) == {name, "prepare.py"}


@pytest.mark.skipif(GIT is None, reason="needs git on PATH")
def test_git_new_and_deleted_file_patches_apply():
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "notes").mkdir()
        Path(tmp, "notes/new.txt").write_bytes(b"first\nsecond")
        created = _git("diff", "--no-index", "--no-color", "/dev/null", "notes/new.txt", cwd=tmp)
        Path(tmp, "src").mkdir()
        Path(tmp, "src/model.py").write_bytes(PARENT["src/model.py"])
        deleted = _git("diff", "--no-index", "--no-color", "src/model.py", "/dev/null", cwd=tmp)
    assert created.returncode == 1 and deleted.returncode == 1
    tree = apply_patch(PARENT, created.stdout.decode() + deleted.stdout.decode(), EDITABLE)
    assert tree["notes/new.txt"] == b"first\nsecond"
    assert "src/model.py" not in tree
    assert set(tree) == {"train.py", "prepare.py", "notes/new.txt"}
