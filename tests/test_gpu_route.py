"""Unit tests of `sandbox.gpus`: which GPU route an engine offers, decided from what it said, and
the device requests and environment each route gives a container. No engine: the answers are
shaped like real `/version` and `/info` bodies (Docker 20.10 as installed here; newer ones as the
Engine API documents them)."""

from __future__ import annotations

import msgspec
import pytest

from sandbox.gpus import (
    EngineProbe,
    cdi_name,
    decide_route,
    device_requests,
    gpu_env,
    gpu_refusal,
)

RUNTIMES = {
    "io.containerd.runc.v2": {"path": "runc"},
    "runc": {"path": "runc"},
    "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none"]},
}


def version(v: str, api: str = "1.41") -> dict:
    return {"Version": v, "ApiVersion": api, "Os": "linux"}


def info(v: str, **extra) -> dict:
    return {"ServerVersion": v, "Runtimes": RUNTIMES, "DefaultRuntime": "runc", **extra}


NVIDIA_CDI = [{"Source": "cdi", "ID": f"nvidia.com/gpu={i}"} for i in range(4)]
CDI_DIRS = ["/etc/cdi", "/var/run/cdi"]


def test_engine_20_with_the_toolkit_hook_uses_the_nvidia_driver():
    p = decide_route(version("20.10.24+dfsg1"), info("20.10.24+dfsg1"), nvidia_driver=True)
    assert p.route == "nvidia"
    assert p.engine_version == "20.10.24+dfsg1" and p.engine_major == 20 and p.api_version == "1.41"
    assert p.runtimes["runsc"] == ["--network=none"] and p.runtimes["runc"] == []
    assert p.default_runtime == "runc"
    assert p.cdi_spec_dirs == [] and p.cdi_devices is None
    assert "nvidia device driver" in p.reason
    assert gpu_refusal(p, "runc") is None


def test_engine_20_without_the_hook_has_no_route_and_says_what_to_install():
    p = decide_route(version("20.10.24"), info("20.10.24"), nvidia_driver=False)
    assert p.route == "none"
    assert "nvidia-container-toolkit" in p.reason and "nvidia-container-runtime-hook" in p.reason
    assert "restart dockerd" in p.reason
    assert "cdi" not in p.reason.lower()  # CDI needs Docker 25: no use suggesting it here
    refusal = gpu_refusal(p, "runc")
    assert refusal is not None and p.reason in refusal


def test_engine_20_is_never_cdi_even_with_spec_dirs():
    p = decide_route(version("20.10.24"), info("20.10.24", CDISpecDirs=CDI_DIRS), nvidia_driver=False)
    assert p.route == "none"


def test_listed_nvidia_cdi_devices_win():
    i = info("28.3.0", CDISpecDirs=CDI_DIRS, DiscoveredDevices=NVIDIA_CDI)
    for driver in (None, True, False):
        p = decide_route(version("28.3.0", "1.51"), i, nvidia_driver=driver)
        assert p.route == "cdi", driver
        assert p.cdi_devices == [f"nvidia.com/gpu={n}" for n in range(4)]
        assert "4 nvidia.com/gpu" in p.reason


def test_cdi_on_without_nvidia_devices_asks_for_nvidia_ctk_cdi_generate():
    other = [{"Source": "cdi", "ID": "vendor.example/fpga=0"}]
    i = info("28.3.0", CDISpecDirs=CDI_DIRS, DiscoveredDevices=other)
    p = decide_route(version("28.3.0", "1.51"), i, nvidia_driver=False)
    assert p.route == "none"
    assert "nvidia-ctk cdi generate" in p.reason and "lists no nvidia.com/gpu" in p.reason
    # ... and the toolkit's hook, when it is there, still works
    assert decide_route(version("28.3.0", "1.51"), i, nvidia_driver=True).route == "nvidia"


def test_cdi_on_but_unlisted_prefers_a_proven_driver_then_assumes_cdi():
    """Engines 25 to 28.1 have CDI but cannot list devices (no DiscoveredDevices)."""
    i = info("26.1.4", CDISpecDirs=CDI_DIRS)
    assert decide_route(version("26.1.4", "1.45"), i, nvidia_driver=True).route == "nvidia"
    p = decide_route(version("26.1.4", "1.45"), i, nvidia_driver=False)
    assert p.route == "cdi" and p.cdi_devices is None
    assert "assumed" in p.reason and "/etc/cdi" in p.reason


def test_engine_25_plus_with_cdi_off_names_both_ways():
    p = decide_route(version("27.5.1"), info("27.5.1", CDISpecDirs=[]), nvidia_driver=False)
    assert p.route == "none"
    assert '"cdi": true' in p.reason and "nvidia-ctk cdi generate" in p.reason
    assert "nvidia-container-runtime-hook" in p.reason


def test_driver_not_tried_is_said():
    p = decide_route(version("20.10.24"), info("20.10.24"), nvidia_driver=None)
    assert p.route == "none" and "not tried" in p.reason


def test_unparsable_version_is_treated_as_old():
    p = decide_route({}, {"CDISpecDirs": CDI_DIRS}, nvidia_driver=False)
    assert p.route == "none" and p.engine_major == 0


@pytest.mark.parametrize(
    ("args", "ok"),
    [
        (["--network=none"], False),
        (["--network=none", "--nvproxy"], True),
        (["--nvproxy=true", "--nvproxy-docker"], True),
        (["-nvproxy"], True),
        (["--nvproxy=false"], False),
        (["--nvproxy-docker"], False),
    ],
)
def test_gpus_under_gvisor_need_nvproxy(args, ok):
    runtimes = {**RUNTIMES, "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": args}}
    p = decide_route(version("20.10.24"), {**info("20.10.24"), "Runtimes": runtimes}, nvidia_driver=True)
    refusal = gpu_refusal(p, "runsc")
    assert (refusal is None) == ok
    if not ok:
        assert "--nvproxy" in refusal and "daemon.json" in refusal
    assert gpu_refusal(p, "runc") is None


def test_device_requests_per_route():
    assert device_requests("nvidia", ["1", "3"]) == [
        {"Driver": "nvidia", "DeviceIDs": ["1", "3"], "Capabilities": [["gpu"]]}
    ]
    assert device_requests("cdi", ["1", "3"]) == [
        {"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=1", "nvidia.com/gpu=3"]}
    ]
    assert device_requests("none", []) == [] and device_requests("cdi", []) == []


def test_cdi_names():
    assert cdi_name("0") == "nvidia.com/gpu=0"
    assert cdi_name("GPU-6f1a0c1e") == "nvidia.com/gpu=GPU-6f1a0c1e"
    assert cdi_name("nvidia.com/mig=0:1") == "nvidia.com/mig=0:1"  # already qualified


def test_gpu_env_renumbers_for_cuda():
    assert gpu_env("nvidia", ["2", "3"]) == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "RATCHET_GPU_IDS": "2,3",
        "NVIDIA_VISIBLE_DEVICES": "2,3",
    }
    assert gpu_env("cdi", ["2", "3"])["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert gpu_env("nvidia", [])["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_probe_is_plain_data_for_doctor():
    p = decide_route(
        version("28.3.0", "1.51"), info("28.3.0", CDISpecDirs=CDI_DIRS, DiscoveredDevices=NVIDIA_CDI), None
    )
    again = msgspec.json.decode(msgspec.json.encode(p), type=EngineProbe)
    assert again == p
