"""Unit tests of `sandbox.options` and `RunSpec.validate`: the hardening of every container, without an
engine."""

from __future__ import annotations

import pytest

from sandbox.gpus import GpuRoute, GpuUnavailable
from sandbox.options import (
    CACHE_DIR,
    GATE_SCRIPT,
    HOME_DIR,
    MOUNT_POINT,
    RUNSC_HOST_PIDS_PER_TASK,
    WORKSPACE_DIR,
    cache_volume_options,
    container_options,
    volume_options,
)
from sandbox.spec import FileEntry, Limits, Mount, RunSpec, SpecError

LABELS = {"ratchet.sandbox": "inst-1", "ratchet.run": "r1"}


def spec(**kw) -> RunSpec:
    base = {"image": "ratchet/sandbox:latest", "argv": ["python3", "train.py"]}
    return RunSpec(**{**base, **kw})


def opts(s: RunSpec, env: dict[str, str] | None = None, route: GpuRoute = "nvidia") -> dict:
    return container_options(s, "vol-1", LABELS, env or {"A": "1"}, route)


SPECS = [
    spec(),
    spec(gpus=["3"]),
    spec(gpus=["1", "5", "7"], runtime="runsc"),
    spec(limits=Limits(cpus=0.5, memory_mb=64, pids=16, nofile=64, disk_mb=8, tmp_mb=4)),
    spec(mounts=[Mount(source="datasets", target="/data")], user="65534:65534"),
]


@pytest.mark.parametrize("s", SPECS)
def test_hardening_set_is_always_present(s):
    o = opts(s)
    lim = s.limits
    assert o["network_mode"] == "none"
    assert o["read_only"] is True
    assert o["cap_drop"] == ["ALL"]
    assert "cap_add" not in o
    assert "no-new-privileges" in o["security_opt"]
    assert o.get("privileged", False) is False
    assert o["user"] == s.user
    assert o["user"].split(":")[0] not in ("0", "root", "")
    assert o["ipc_mode"] == "private"
    if s.runtime == "runc":
        assert o["pids_limit"] == lim.pids
    assert o["mem_limit"] == f"{lim.memory_mb}m"
    assert o["memswap_limit"] == o["mem_limit"]  # no swap on top of the memory limit
    assert o["nano_cpus"] == int(lim.cpus * 1e9)
    assert o["ulimits"][0] == {"Name": "nofile", "Soft": lim.nofile, "Hard": lim.nofile}
    assert o["tmpfs"]["/tmp"] == f"size={lim.tmp_mb}m,mode=1777,nosuid,nodev"
    uid, gid = s.user.split(":")
    assert o["tmpfs"][HOME_DIR] == f"size={lim.tmp_mb}m,mode=0700,uid={uid},gid={gid},nosuid,nodev"
    assert o["runtime"] == s.runtime
    assert o["labels"] == LABELS
    assert o["image"] == s.image
    assert o["command"] == s.argv
    assert o["working_dir"] == WORKSPACE_DIR
    assert o["volumes"]["vol-1"] == {"bind": MOUNT_POINT, "mode": "rw"}
    assert o["log_config"]["type"] == "json-file"
    assert o["log_config"]["config"]["max-size"] == "10m"
    for key in ("network_disabled", "pid_mode", "userns_mode", "devices", "volumes_from"):
        assert key not in o


def test_exact_values_for_a_known_spec():
    s = spec(limits=Limits(cpus=2.5, memory_mb=3000, pids=100, nofile=512, disk_mb=700, tmp_mb=128))
    o = opts(s)
    assert o["nano_cpus"] == 2_500_000_000
    assert o["mem_limit"] == "3000m"
    assert o["memswap_limit"] == "3000m"
    assert o["pids_limit"] == 100
    assert o["ulimits"] == [{"Name": "nofile", "Soft": 512, "Hard": 512}]
    assert o["tmpfs"] == {
        "/tmp": "size=128m,mode=1777,nosuid,nodev",
        "/home/sandbox": "size=128m,mode=0700,uid=1000,gid=1000,nosuid,nodev",
    }
    assert o["shm_size"] == "64m"


def test_small_tmp_limits_shm():
    assert opts(spec(limits=Limits(tmp_mb=16)))["shm_size"] == "16m"


def test_gate_is_pid_one():
    o = opts(spec(argv=["python3", "-c", "print(1)"]))
    assert o["entrypoint"] == ["/bin/sh", "-c", GATE_SCRIPT, "ratchet-gate"]
    assert o["command"] == ["python3", "-c", "print(1)"]
    assert o["stdin_open"] is True
    assert o["detach"] is True


def test_argv_is_copied_not_shared():
    s = spec()
    o = opts(s)
    o["command"].append("--evil")
    assert s.argv == ["python3", "train.py"]


def test_volume_is_a_tmpfs_sized_by_the_disk_limit():
    v = volume_options(spec(limits=Limits(disk_mb=321)), "vol-1", LABELS)
    assert v == {
        "name": "vol-1",
        "driver": "local",
        "driver_opts": {"type": "tmpfs", "device": "tmpfs", "o": "size=321m,mode=0755,uid=0,gid=0"},
        "labels": LABELS,
    }


def test_pids_limit_under_each_runtime():
    """runc: the host's pids limit is the workload's. runsc: gVisor enforces RLIMIT_NPROC inside
    the sandbox, and the host's limit leaves its kernel room for its own threads."""
    lim = Limits(pids=200)
    runc, runsc = opts(spec(limits=lim)), opts(spec(limits=lim, runtime="runsc"))
    assert runc["pids_limit"] == 200
    assert [u["Name"] for u in runc["ulimits"]] == ["nofile"]  # RLIMIT_NPROC is host-wide under runc
    assert runsc["pids_limit"] == 200 * RUNSC_HOST_PIDS_PER_TASK
    assert {"Name": "nproc", "Soft": 200, "Hard": 200} in runsc["ulimits"]


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_runtime_passed_through(runtime):
    assert opts(spec(runtime=runtime))["runtime"] == runtime


@pytest.mark.parametrize("route", ["nvidia", "cdi", "none"])
def test_no_gpus_means_no_device_request_and_no_visible_devices(route):
    o = opts(spec(), route=route)
    assert "device_requests" not in o
    assert o["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert o["environment"]["RATCHET_GPU_IDS"] == ""
    # "void": NVIDIA's tooling attaches nothing, whatever the image's own ENV says
    assert o["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert o["environment"]["A"] == "1"


def test_gpus_are_explicit_device_ids_renumbered_for_cuda():
    o = opts(spec(gpus=["2", "5", "7"]))
    assert o["device_requests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["2", "5", "7"], "Capabilities": [["gpu"]]}
    ]
    req = o["device_requests"][0]
    assert "Count" not in req  # never "all" (-1)
    assert "all" not in req["DeviceIDs"]
    assert o["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert o["environment"]["RATCHET_GPU_IDS"] == "2,5,7"
    assert o["environment"]["NVIDIA_VISIBLE_DEVICES"] == "2,5,7"  # the same the engine adds


def test_cdi_route_names_devices_and_leaves_visibility_to_the_spec():
    o = opts(spec(gpus=["2", "5"]), route="cdi")
    assert o["device_requests"] == [{"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=2", "nvidia.com/gpu=5"]}]
    assert "Count" not in o["device_requests"][0]  # the engine's CDI driver refuses a count
    assert o["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert o["environment"]["RATCHET_GPU_IDS"] == "2,5"
    assert o["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_gpus_without_a_route_are_refused():
    with pytest.raises(GpuUnavailable, match="no GPU route"):
        opts(spec(gpus=["0"]), route="none")
    with pytest.raises(GpuUnavailable):
        container_options(spec(gpus=["0"]), "vol-1", LABELS, {})  # the default is no route


def test_single_gpu():
    o = opts(spec(gpus=["6"]))
    assert o["device_requests"][0]["DeviceIDs"] == ["6"]
    assert o["environment"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_workload_cannot_override_gpu_visibility():
    o = opts(
        spec(gpus=["4"]), env={"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "NVIDIA_VISIBLE_DEVICES": "all"}
    )
    assert o["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert o["environment"]["NVIDIA_VISIBLE_DEVICES"] == "4"
    o = opts(spec(), env={"CUDA_VISIBLE_DEVICES": "0"})
    assert o["environment"]["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize("route", ["nvidia", "cdi"])
def test_workload_env_cannot_steer_nvidia_hook(route):
    """NVIDIA's hook runs as root on the host and reads these from the container's env."""
    env = {
        "NVIDIA_VISIBLE_DEVICES": "all",
        "NVIDIA_DRIVER_CAPABILITIES": "all",
        "NVIDIA_MIG_CONFIG_DEVICES": "all",
        "NVIDIA_REQUIRE_CUDA": "cuda>=99",
        "NVIDIA_TF32_OVERRIDE": "0",  # a cuBLAS knob, the workload's own
        "B": "2",
    }
    for gpus in ([], ["1"]):
        got = opts(spec(gpus=gpus), env=env, route=route)["environment"]
        steering = {"NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_MIG_CONFIG_DEVICES", "NVIDIA_REQUIRE_CUDA"}
        assert not steering & set(got)
        assert got["NVIDIA_VISIBLE_DEVICES"] != "all"
        assert got["NVIDIA_TF32_OVERRIDE"] == "0" and got["B"] == "2"


def test_device_ids_are_copied_not_shared():
    s = spec(gpus=["1"])
    opts(s)["device_requests"][0]["DeviceIDs"].append("2")
    assert s.gpus == ["1"]


def test_extra_mounts_are_always_read_only():
    s = spec(mounts=[Mount(source="datasets", target="/data"), Mount(source="/host/cache", target="/cache")])
    o = opts(s)
    assert o["volumes"] == {"vol-1": {"bind": "/sandbox", "mode": "rw"}}
    assert o["mounts"] == [
        {
            "Type": "volume",
            "Source": "datasets",
            "Target": "/data",
            "ReadOnly": True,
            "VolumeOptions": {"NoCopy": True},  # never filled from the image
        },
        {
            "Type": "bind",
            "Source": "/host/cache",
            "Target": "/cache",
            "ReadOnly": True,
            "BindOptions": {"Propagation": "rprivate"},
        },
    ]


def test_options_do_not_leak_between_calls():
    first = opts(spec(mounts=[Mount(source="datasets", target="/data")]))
    second = opts(spec())
    assert len(first["mounts"]) == 1
    assert "mounts" not in second and set(second["volumes"]) == {"vol-1"}


def test_mounts_under_the_home_get_writable_parents():
    # The engine makes a missing mount point's parents as root's: each directory between the home
    # and a target gets a tmpfs of the run's user instead, so ~/.cache stays writable.
    s = spec(
        user="1000:1001",
        mounts=[
            Mount(source="/d/gpt", target="/home/sandbox/.cache/gpt"),
            Mount(source="/d/tok", target="/home/sandbox/.cache/tok/v1"),
            Mount(source="/d/top", target="/home/sandbox/data"),
            Mount(source="/d/else", target="/data/x"),
        ],
        limits=Limits(tmp_mb=32),
    )
    owner = "uid=1000,gid=1001,nosuid,nodev"
    assert opts(s)["tmpfs"] == {
        "/tmp": "size=32m,mode=1777,nosuid,nodev",
        "/home/sandbox": f"size=32m,mode=0700,{owner}",
        "/home/sandbox/.cache": f"size=32m,mode=0755,{owner}",
        "/home/sandbox/.cache/tok": f"size=32m,mode=0755,{owner}",
    }


def test_cache_volume_is_mounted_writable_and_sized():
    s = spec(limits=Limits(cache_mb=300), user="1000:1000")
    o = container_options(s, "vol-1", LABELS, {}, "none", cache_volume="cache-1")
    assert o["volumes"]["cache-1"] == {"bind": CACHE_DIR, "mode": "rw"}
    v = cache_volume_options(s, "cache-1", LABELS)
    assert v["driver_opts"] == {
        "type": "tmpfs",
        "device": "tmpfs",
        "o": "size=300m,mode=0755,uid=1000,gid=1000",
    }
    assert v["labels"] == LABELS
    assert "cache-1" not in opts(s)["volumes"]  # only when the runner made one


# -- RunSpec.validate -----------------------------------------------------------------------------------


def test_valid_spec_returns_itself():
    s = spec(
        files=[FileEntry(path="train.py", data=b"x"), FileEntry(path="data/prep.py", data=b"y")],
        mounts=[Mount(source="d", target="/data")],
        labels={"ratchet.loop": "l1"},
        gpus=["0"],
        runtime="runsc",
    )
    assert s.validate() is s


def refuse(s: RunSpec) -> str:
    with pytest.raises(SpecError) as info:
        s.validate()
    return str(info.value)


@pytest.mark.parametrize("user", ["0", "0:0", "root", "root:root", "", ":1000", "0:1000"])
def test_root_user_is_refused(user):
    assert refuse(spec(user=user)) == "the sandbox never runs as root"


def test_bad_runtime_is_refused():
    assert refuse(spec(runtime="kata")) == "runtime must be one of runc, runsc, not 'kata'"
    assert refuse(spec(runtime="")) == "runtime must be one of runc, runsc, not ''"


def test_image_and_argv_required():
    assert refuse(spec(image="")) == "image must not be empty"
    assert refuse(spec(argv=[])) == "argv must be a non-empty list of non-empty strings"
    assert refuse(spec(argv=["python3", ""])) == "argv must be a non-empty list of non-empty strings"


@pytest.mark.parametrize("timeout", [0, -1, 7 * 24 * 3600 + 1])
def test_timeout_out_of_range(timeout):
    assert refuse(spec(timeout_s=timeout)) == "timeout_s must be positive and at most a week"


def test_timeout_bounds_accepted():
    spec(timeout_s=0.001).validate()
    spec(timeout_s=7 * 24 * 3600).validate()


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../x.py", "a/../../x", "./x", "a//b", "a/", "with space", "a\nb", "", "a/./b", "é.py"],
)
def test_unsafe_file_paths_refused(path):
    assert refuse(spec(files=[FileEntry(path=path, data=b"")])) == f"unsafe workspace path {path!r}"


def test_duplicate_file_paths_refused():
    files = [FileEntry(path="a.py", data=b"1"), FileEntry(path="a.py", data=b"2")]
    assert refuse(spec(files=files)) == "duplicate workspace path 'a.py'"


@pytest.mark.parametrize("target", ["/sandbox", "/sandbox/", "/tmp", "/tmp/", "/", "relative/path", ""])
def test_mount_targets_refused(target):
    msg = refuse(spec(mounts=[Mount(source="d", target=target)]))
    assert msg == f"mount target {target!r} must be an absolute path of its own"


@pytest.mark.parametrize("target", ["//sandbox", "/sandbox/.", "/sandbox/../sandbox", "/./tmp", "/x/../tmp"])
def test_mount_targets_that_resolve_to_sandbox_or_tmp_refused(target):
    # The engine cleans the path: each of these would be mounted over /sandbox or /tmp.
    assert refuse(spec(mounts=[Mount(source="d", target=target)])) == (
        f"mount target {target!r} must be an absolute path of its own"
    )


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("/proc/x", "must be an absolute path of its own"),
        ("/dev", "must be an absolute path of its own"),
        ("/sys/fs", "must be an absolute path of its own"),
        ("/home/sandbox", "would hide the home /home/sandbox; mount under it instead"),
        ("/home", "would hide the home /home/sandbox; mount under it instead"),
        ("/home/sandbox/../sandbox", "would hide the home /home/sandbox; mount under it instead"),
        ("/data/a b", "may hold only letters, digits and ._+@=,- between slashes"),
        ("/data:/x", "may hold only letters, digits and ._+@=,- between slashes"),
    ],
)
def test_mount_targets_that_would_hide_the_home_or_the_kernel_refused(target, why):
    assert refuse(spec(mounts=[Mount(source="d", target=target)])) == f"mount target {target!r} {why}"


@pytest.mark.parametrize("source", ["", "rel/path", "/a/../b", "/a/", "-v", "a:b", "a b"])
def test_mount_sources_must_be_absolute_paths_or_volume_names(source):
    assert refuse(spec(mounts=[Mount(source=source, target="/data")])) == (
        f"mount source {source!r} must be an absolute host path or a volume name"
    )


@pytest.mark.parametrize(
    ("a", "b"), [("/data", "/data"), ("/data", "/data/inner"), ("/home/sandbox/x/y", "/home/sandbox/x")]
)
def test_overlapping_mount_targets_refused(a, b):
    msg = refuse(spec(mounts=[Mount(source="d1", target=a), Mount(source="d2", target=b)]))
    assert msg == f"mount targets {a!r} and {b!r} overlap"


def test_a_cache_needs_its_volume_and_must_fit():
    assert refuse(spec(cache=b"x")) == "a cache needs limits.cache_mb > 0 (the size of its volume)"
    assert refuse(spec(collect_cache=True)) == "a cache needs limits.cache_mb > 0 (the size of its volume)"
    big = b"x" * (1024 * 1024 + 1)
    assert refuse(spec(cache=big, limits=Limits(cache_mb=1))) == (
        f"the cache ({len(big)} bytes) does not fit limits.cache_mb"
    )
    spec(cache=b"x" * 1024, collect_cache=True, limits=Limits(cache_mb=1)).validate()


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("cpus", 0.0),
        ("cpus", 0.001),
        ("cpus", 2000.0),
        ("memory_mb", 15),
        ("memory_mb", 4 * 1024 * 1024 + 1),
        ("pids", 7),
        ("pids", 1_000_001),
        ("nofile", 15),
        ("nofile", 1_048_577),
        ("disk_mb", 0),
        ("tmp_mb", 0),
        ("log_bytes", 1023),
        ("log_bytes", 1024**3 + 1),
        ("output_bytes", -1),
        ("cache_mb", -1),
    ],
)
def test_limits_out_of_range(field, bad):
    s = spec(limits=Limits(**{field: bad}))
    assert refuse(s) == f"limit {field}={bad} is out of range"


def test_limit_bounds_accepted():
    spec(
        limits=Limits(cpus=0.01, memory_mb=16, pids=8, nofile=16, disk_mb=1, tmp_mb=1, log_bytes=1024)
    ).validate()
    spec(limits=Limits(cpus=1024, memory_mb=4 * 1024 * 1024, pids=1_000_000, nofile=1_048_576)).validate()


@pytest.mark.parametrize("key", ["Ratchet.loop", "-x", "a b", "", "x/y"])
def test_bad_label_keys_refused(key):
    assert (
        refuse(spec(labels={key: "v"}))
        == f"label key {key!r} must be lowercase letters, digits, '.', '_', '-'"
    )


def test_default_limits_are_safe():
    lim = Limits()
    assert (lim.cpus, lim.memory_mb, lim.pids, lim.nofile, lim.disk_mb, lim.tmp_mb) == (
        1.0,
        1024,
        256,
        1024,
        512,
        256,
    )
    assert RunSpec(image="i", argv=["x"]).user == "1000:1000"
    assert RunSpec(image="i", argv=["x"]).runtime == "runc"
    assert RunSpec(image="i", argv=["x"]).gpus == []
