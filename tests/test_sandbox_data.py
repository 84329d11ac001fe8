"""What a run gets besides its workspace, against the real engine: a private writable home with
read-only data mounted inside it, and a writable cache directory of its own, seeded and collected.
Fixtures come from test_sandbox (each test's own instance; nothing may be left behind)."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import docker
import pytest
import test_sandbox
from test_sandbox import Sbx, report

from sandbox import CACHE_DIR, HOME_DIR, Limits, Mount, SandboxError, SpecError
from sandbox.archive import cache_seed_tar, read_cache_tar
from sandbox.mounts import mount_problem

pytestmark = pytest.mark.docker
# test_sandbox's fixtures: each test's own instance, checked for leftovers; both runtimes
sbx, rsbx, runtime, engine_runtimes = (
    test_sandbox.sbx,
    test_sandbox.rsbx,
    test_sandbox.runtime,
    test_sandbox.engine_runtimes,
)


def tar_of(entries: dict[str, bytes | None], **extra: tarfile.TarInfo) -> bytes:
    """A tar of files (None: a directory), plus raw members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        for info in extra.values():
            tar.addfile(info)
    return buf.getvalue()


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


# -- pure: what a cache may hold -------------------------------------------------------------------


def test_a_seed_is_owned_by_the_run_and_holds_nothing_dangerous():
    setuid = tarfile.TarInfo("bin/su")
    setuid.size, setuid.mode = 0, 0o4755
    device = tarfile.TarInfo("dev0")
    device.type = tarfile.CHRTYPE
    link = tarfile.TarInfo("ws")
    link.type, link.linkname = tarfile.SYMTYPE, "/sandbox/workspace"
    through = tarfile.TarInfo("ws/prepare.py")  # would land in the workspace through the link
    hard = tarfile.TarInfo("hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "kernels/a.so"
    seed = tar_of(
        {"kernels": None, "kernels/a.so": b"elf", "../escape": b"x", "/abs": b"y", "./ok.txt": b"ok"},
        setuid=setuid,
        device=device,
        link=link,
        through=through,
        hard=hard,
    )
    got = members(cache_seed_tar(seed, uid=1234))
    assert sorted(got) == ["bin/su", "kernels", "kernels/a.so", "ok.txt", "ws"]
    assert {(m.uid, m.gid) for m in got.values()} == {(1234, 1234)}
    assert got["bin/su"].mode == 0o755  # set-id bits dropped
    assert got["ws"].issym() and got["ws"].linkname == "/sandbox/workspace"


def test_a_collected_cache_over_its_cap_is_refused():
    stream = tar_of({"cache": None, "cache/a": b"x" * 600, "cache/b": b"y" * 600})
    data, why = read_cache_tar(iter([stream]), cap=1000, read_limit=10_000)
    assert data is None and why == "the cache holds more than 1000 bytes"
    data, why = read_cache_tar(iter([stream]), cap=2000, read_limit=10_000)
    assert why == "" and sorted(members(data or b"")) == ["a", "b"]


# -- real containers -------------------------------------------------------------------------------

HOME_PROBE = r"""
import errno, json, os
out = {"home": os.path.expanduser("~"), "uid": os.getuid()}
def t(name, fn):
    try:
        fn()
        out[name] = "OK"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
out["data"] = open(os.path.expanduser("~/.cache/ds/a.txt")).read().strip()
out["before"] = sorted(os.listdir(os.path.expanduser("~")))
t("write_data", lambda: open(os.path.expanduser("~/.cache/ds/new"), "w").write("x"))
t("change_data", lambda: open(os.path.expanduser("~/.cache/ds/a.txt"), "a").write("x"))
t("remove_data", lambda: os.unlink(os.path.expanduser("~/.cache/ds/a.txt")))
t("move_mount", lambda: os.rename(os.path.expanduser("~/.cache/ds"), os.path.expanduser("~/moved")))
t("cache_sibling", lambda: os.makedirs(os.path.expanduser("~/.cache/torch/hub")))
t("home_file", lambda: open(os.path.expanduser("~/.netrc"), "w").write("x"))
t("etc", lambda: open("/etc/x", "w"))
print(json.dumps(out), flush=True)
"""


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    d = tmp_path / "ds"
    d.mkdir()
    (d / "a.txt").write_text("hello\n")
    for p in (tmp_path, d):
        p.chmod(0o755)
    (d / "a.txt").chmod(0o644)
    return d


def test_home_is_private_and_writable_around_read_only_data(rsbx: Sbx, dataset: Path) -> None:
    mounts = [Mount(source=str(dataset), target=f"{HOME_DIR}/.cache/ds")]
    first = report(rsbx.py(HOME_PROBE, mounts=mounts))
    readonly = ("EROFS", "EACCES")  # gVisor answers EACCES for a read-only bind
    assert first["home"] == HOME_DIR and first["uid"] == 1000
    assert first["data"] == "hello"
    assert first["before"] == [".cache"]  # the image's dotfiles are not there: a fresh home
    assert first["write_data"] in readonly and first["change_data"] in readonly
    assert first["remove_data"] in readonly
    assert first["move_mount"] in ("EBUSY", "EXDEV", "EACCES", "EPERM"), first
    assert first["cache_sibling"] == "OK" and first["home_file"] == "OK"
    assert first["etc"] in readonly
    assert (dataset / "a.txt").read_text() == "hello\n" and sorted(p.name for p in dataset.iterdir()) == [
        "a.txt"
    ]
    second = report(rsbx.py(HOME_PROBE, mounts=mounts))
    assert second["before"] == [".cache"]  # nothing of the first run's home is left


def test_a_named_volume_is_mounted_read_only_and_a_missing_one_refused(
    sbx: Sbx, docker_client: docker.DockerClient
) -> None:
    name = f"ratchet-test-ds-{uuid.uuid4().hex[:8]}"
    volume = docker_client.volumes.create(name, labels={"ratchet.test": sbx.test_id})
    try:
        docker_client.containers.run(
            "ratchet/sandbox:latest", ["sh", "-c", "echo in-volume > /v/a.txt"], user="0",
            volumes={name: {"bind": "/v", "mode": "rw"}}, network_mode="none", remove=True,
        )  # fmt: skip
        code = (
            "import os; print(open('/data/a.txt').read().strip())\n"
            "try:\n    open('/data/b', 'w')\nexcept OSError as e:\n    print('write', e.errno)\n"
        )
        result = sbx.py(code, mounts=[Mount(source=name, target="/data")])
        assert result.exit_code == 0, result.log
        assert result.log.split() == ["in-volume", "write", "30"]
        missing = f"ratchet-test-missing-{uuid.uuid4().hex[:8]}"
        with pytest.raises(SpecError, match=f"volume '{missing}' .* does not exist"):
            sbx.run(["true"], mounts=[Mount(source=missing, target="/data")])
        assert missing not in {v.name for v in docker_client.volumes.list()}  # never made, empty
    finally:
        volume.remove(force=True)


def test_a_missing_host_path_is_an_engine_refusal_not_an_empty_directory(sbx: Sbx, tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    with pytest.raises(SandboxError, match="nothing-here"):
        sbx.run(["true"], mounts=[Mount(source=str(missing), target="/data")])
    assert not missing.exists()


def test_an_engine_says_which_sources_it_can_mount(
    sbx: Sbx, docker_client: docker.DockerClient, dataset: Path, tmp_path: Path
) -> None:
    """What a cluster node is asked about each dataset: a path is tried as a run's mount is made
    (a container that never starts, removed at once), a volume looked up; nothing else is made."""
    labels = {"ratchet.sandbox": sbx.instance, "ratchet.test": sbx.test_id}
    client, image = sbx.sandbox.client, "ratchet/sandbox:latest"
    name = f"ratchet-test-ds-{uuid.uuid4().hex[:8]}"
    volume = docker_client.volumes.create(name, labels={"ratchet.test": sbx.test_id})
    try:
        assert mount_problem(client, str(dataset), image, labels) is None
        assert mount_problem(client, name, image, labels) is None
        gone = mount_problem(client, str(tmp_path / "nothing-here"), image, labels)
        assert gone is not None and "bind source path does not exist" in gone, gone
        missing = f"{name}-missing"
        assert mount_problem(client, missing, image, labels) == f"volume '{missing}' does not exist"
        assert not (tmp_path / "nothing-here").exists()
        with pytest.raises(SandboxError):  # no image to try a path with: it cannot tell
            mount_problem(client, str(dataset), "ratchet-test/never-built:0", labels)
        assert docker_client.api.containers(all=True, filters={"label": f"ratchet.test={sbx.test_id}"}) == []
    finally:
        volume.remove(force=True)


CACHE_PROBE = r"""
import json, os, shutil, subprocess
c = os.environ["RATCHET_CACHE_DIR"]
out = {"dir": c, "seen": open(c + "/k/a.txt").read(), "owner": os.stat(c + "/k/a.txt").st_uid}
open(c + "/k/a.txt", "w").write("changed")
os.makedirs(c + "/new")
shutil.copy("/bin/true", c + "/new/true")
out["exec"] = subprocess.run([c + "/new/true"]).returncode  # the cache is not noexec
print(json.dumps(out), flush=True)
"""


def test_the_cache_is_a_private_writable_exec_copy_and_comes_back(rsbx: Sbx) -> None:
    seed = tar_of({"k": None, "k/a.txt": b"seeded"})
    result = rsbx.py(CACHE_PROBE, cache=seed, collect_cache=True, limits=Limits(cache_mb=8))
    assert result.exit_code == 0, result.log
    assert report(result) == {"dir": CACHE_DIR, "seen": "seeded", "owner": 1000, "exec": 0}
    back = members(result.cache or b"")
    assert sorted(back) == ["k", "k/a.txt", "new", "new/true"]
    with tarfile.open(fileobj=io.BytesIO(result.cache or b"")) as tar:
        assert tar.extractfile("k/a.txt").read() == b"changed"  # type: ignore[union-attr]
    assert members(seed)["k/a.txt"].size == len(b"seeded")  # the seed itself is bytes: untouched


def test_the_cache_cannot_outgrow_its_volume(sbx: Sbx) -> None:
    code = (
        "import os, errno\n"
        "try:\n    open(os.environ['RATCHET_CACHE_DIR'] + '/big', 'wb').write(b'x' * (3 << 20))\n"
        "except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    )
    result = sbx.py(code, collect_cache=True, limits=Limits(cache_mb=2))
    assert result.log.strip() == "ENOSPC"
    assert sum(m.size for m in members(result.cache or b"").values()) <= 2 << 20


def test_no_cache_directory_unless_asked(sbx: Sbx) -> None:
    code = "import json, os; print(json.dumps([os.environ.get('RATCHET_CACHE_DIR'), os.path.exists('{}')]))"
    code = code.format(CACHE_DIR)
    result = sbx.py(code)
    assert json.loads(result.log.strip()) == [None, False] and result.cache is None
