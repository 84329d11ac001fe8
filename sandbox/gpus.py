"""How a container gets its GPUs on a given engine — the pure half of the GPU probe.

Docker offers two routes, and which one works depends on the engine and on what is installed:

- **nvidia**: the engine's `nvidia` device driver. dockerd registers it at start-up when NVIDIA's
  `nvidia-container-runtime-hook` (NVIDIA container toolkit) is on its PATH. A request names host
  device ids; the engine puts them into NVIDIA_VISIBLE_DEVICES and adds the hook, which mounts
  those devices (and the driver's libraries) into the container before it starts.
- **cdi**: Container Device Interface names such as `nvidia.com/gpu=0`, from Docker 25 with CDI
  switched on (the default from 28.2) and a spec file written by `nvidia-ctk cdi generate`. The
  engine edits the container's spec from that file itself.

`decide_route` turns what the engine said — its version, `/info`, and whether it accepted a request
for the `nvidia` driver — into an `EngineProbe`; `device_requests` and `gpu_env` build a container's
options for the chosen route. Nothing here does I/O (the probe itself is `sandbox.probe`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from .spec import SpecError

__all__ = [
    "NVIDIA_CDI_KIND",
    "EngineProbe",
    "GpuRoute",
    "GpuUnavailable",
    "decide_route",
    "device_requests",
    "gpu_env",
    "gpu_refusal",
    "strip_toolkit_env",
]

GpuRoute = Literal["nvidia", "cdi", "none"]
NVIDIA_CDI_KIND = "nvidia.com/gpu"
CDI_MIN_ENGINE = 25
TOOLKIT = "NVIDIA's container toolkit (package nvidia-container-toolkit from NVIDIA's own repository)"
# Variables NVIDIA's hook reads on the host, as root, to decide what to mount (devices, MIG
# control, capabilities, requirement checks). They are the operator's to set, never the workload's.
# Library knobs that share the prefix (cuBLAS reads NVIDIA_TF32_OVERRIDE) stay the workload's.
_WORKLOAD_NVIDIA_VARS = frozenset({"NVIDIA_TF32_OVERRIDE"})


class GpuUnavailable(SpecError):
    """A run asks for GPUs (or for GPUs under a runtime) that this engine cannot give it. Raised
    after the engine was asked (`sandbox.probe`) but before any container of the run is made."""


class EngineProbe(msgspec.Struct, kw_only=True, frozen=True):
    """What the engine says about itself, and the GPU route that follows from it."""

    engine_version: str = ""  # e.g. "20.10.24+dfsg1"
    api_version: str = ""
    runtimes: dict[str, list[str]] = {}  # runtime name -> its runtimeArgs
    default_runtime: str = ""
    cdi_spec_dirs: list[str] = []  # empty: CDI is off (or the engine predates it)
    cdi_devices: list[str] | None = None  # CDI device names; None: the engine cannot list them
    # A container asking for the `nvidia` device driver was accepted; None: not tried.
    nvidia_driver: bool | None = None
    route: GpuRoute = "none"
    reason: str = ""  # why this route; for "none", what to install

    @property
    def engine_major(self) -> int:
        return _major(self.engine_version)


def decide_route(
    version: Mapping[str, Any], info: Mapping[str, Any], nvidia_driver: bool | None
) -> EngineProbe:
    """The route from the engine's `/version` and `/info` answers and the driver check.

    CDI wins when the engine lists nvidia.com/gpu devices (nothing left to guess); next the
    `nvidia` driver when the engine accepted it; next CDI when it is on but the engine is too old
    to list its devices (the spec file is then assumed). Otherwise there is no route, and the
    reason names what to install."""
    engine = str(version.get("Version") or info.get("ServerVersion") or "")
    facts = {
        "engine_version": engine,
        "api_version": str(version.get("ApiVersion") or ""),
        "runtimes": _runtimes(info),
        "default_runtime": str(info.get("DefaultRuntime") or ""),
        "cdi_spec_dirs": [str(d) for d in info.get("CDISpecDirs") or []],
        "cdi_devices": _cdi_devices(info),
        "nvidia_driver": nvidia_driver,
    }
    major = _major(engine)
    cdi_on = major >= CDI_MIN_ENGINE and bool(facts["cdi_spec_dirs"])
    listed: list[str] | None = facts["cdi_devices"]
    nvidia_listed = [d for d in listed or [] if d.startswith(NVIDIA_CDI_KIND + "=")]
    route: GpuRoute
    if cdi_on and nvidia_listed:
        route, reason = "cdi", f"CDI: the engine lists {len(nvidia_listed)} {NVIDIA_CDI_KIND} device name(s)"
    elif nvidia_driver:
        route, reason = "nvidia", "the engine's nvidia device driver (NVIDIA container toolkit hook)"
    elif cdi_on and listed is None:
        dirs = ", ".join(facts["cdi_spec_dirs"])
        reason = (
            f"CDI is on (specs in {dirs}); this engine cannot list its devices, so the"
            f" {NVIDIA_CDI_KIND} names are assumed to exist (`nvidia-ctk cdi list` shows them)"
        )
        route = "cdi"
    else:
        route, reason = "none", _missing(major, cdi_on, nvidia_driver)
    return EngineProbe(**facts, route=route, reason=reason)


def _missing(major: int, cdi_on: bool, nvidia_driver: bool | None) -> str:
    generate = "`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`"
    hook = (
        f"install {TOOLKIT} so that nvidia-container-runtime-hook is on dockerd's PATH, then"
        " restart dockerd (it registers its nvidia device driver only at start-up)"
    )
    tried = "" if nvidia_driver is not None else " (the nvidia device driver was not tried: no image given)"
    if major < CDI_MIN_ENGINE:
        return f"no nvidia device driver on this engine{tried}: {hook}"
    if cdi_on:
        return (
            f"CDI is on but lists no {NVIDIA_CDI_KIND} device and there is no nvidia device driver{tried}:"
            f" run {generate} (part of {TOOLKIT}), or {hook}"
        )
    return (
        f"CDI is off and there is no nvidia device driver{tried}: switch CDI on"
        ' (daemon.json "features": {"cdi": true}; the default from Docker 28.2) and run'
        f" {generate}, or {hook}"
    )


def gpu_refusal(probe: EngineProbe, runtime: str) -> str | None:
    """Why a run that asks for GPUs under `runtime` cannot have them here; None when it can."""
    if probe.route == "none":
        return f"this container engine cannot give containers GPUs: {probe.reason}"
    if runtime == "runsc" and not _has_nvproxy(probe.runtimes.get("runsc", [])):
        return (
            "GPUs under gVisor need runsc's --nvproxy: add it to the runsc runtime's runtimeArgs"
            " in /etc/docker/daemon.json (a gVisor release from 2023 or later) and reload dockerd"
        )
    return None


def device_requests(route: GpuRoute, ids: list[str]) -> list[dict[str, Any]]:
    """The engine's DeviceRequests for exactly `ids` (never a count, never "all")."""
    if not ids:
        return []
    if route == "nvidia":
        return [{"Driver": "nvidia", "DeviceIDs": list(ids), "Capabilities": [["gpu"]]}]
    if route == "cdi":
        # The engine's CDI driver takes fully qualified names and neither a count nor capabilities.
        return [{"Driver": "cdi", "DeviceIDs": [cdi_name(i) for i in ids]}]
    raise GpuUnavailable(f"no GPU route on this engine for GPUs {','.join(ids)}")


def cdi_name(device_id: str) -> str:
    """`0` -> `nvidia.com/gpu=0`; a name that is already qualified (a MIG device, say) is kept."""
    return device_id if "=" in device_id else f"{NVIDIA_CDI_KIND}={device_id}"


def gpu_env(route: GpuRoute, ids: list[str]) -> dict[str, str]:
    """What the workload sees of its GPUs. The engine exposes only the requested devices,
    renumbered from 0, so CUDA must count the same way. NVIDIA_VISIBLE_DEVICES is always set, so
    an image's own value (CUDA base images say "all") never reaches NVIDIA's tooling: the ids
    on the nvidia route (the engine adds the same), else "void", which that tooling reads as no
    GPU (CDI specs set it so too)."""
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(len(ids))),
        "RATCHET_GPU_IDS": ",".join(ids),
        "NVIDIA_VISIBLE_DEVICES": ",".join(ids) if ids and route == "nvidia" else "void",
    }


def strip_toolkit_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the variables that steer NVIDIA's hook (see `_WORKLOAD_NVIDIA_VARS`)."""
    return {k: v for k, v in env.items() if not k.startswith("NVIDIA_") or k in _WORKLOAD_NVIDIA_VARS}


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def _runtimes(info: Mapping[str, Any]) -> dict[str, list[str]]:
    runtimes = info.get("Runtimes") or {}
    return {
        str(name): [str(a) for a in (conf or {}).get("runtimeArgs") or []]
        for name, conf in sorted(runtimes.items())
    }


def _cdi_devices(info: Mapping[str, Any]) -> list[str] | None:
    """Device names from `DiscoveredDevices` (engine API 1.50+); None when the field is absent."""
    found = info.get("DiscoveredDevices")
    if found is None:
        return None
    return sorted(str(d["ID"]) for d in found if isinstance(d, Mapping) and d.get("ID"))


def _is_nvproxy_flag(arg: str) -> bool:
    name, _, value = arg.lstrip("-").partition("=")
    return name == "nvproxy" and value.lower() in ("", "true", "1", "t")


def _has_nvproxy(args: list[str]) -> bool:
    return any(_is_nvproxy_flag(a) for a in args)
