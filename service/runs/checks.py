"""The short runs `ratchet doctor` makes, as pure functions: each check's `RunSpec` and what its
result means. They run through an executor like any experiment (the gate, the hardening, the GPU
route), so a check that passes says a run of that kind works, not only that a file exists."""

from __future__ import annotations

import re

import msgspec

from sandbox import HOME_DIR, OUTPUT_DIR, RUNSC_MIN_PIDS, WORKSPACE_DIR, FileEntry, Limits, Mount

from .executor import RunResult, RunSpec

__all__ = [
    "DATASET_TARGET",
    "ImageCheck",
    "dataset_spec",
    "dataset_state",
    "gpu_listing",
    "gpu_spec",
    "image_check",
    "image_spec",
    "runtime_spec",
]

DATASET_TARGET = "/ratchet-dataset"
_LIMITS = Limits(cpus=0.5, memory_mb=256, pids=RUNSC_MIN_PIDS, disk_mb=16, tmp_mb=16, output_bytes=0)
_LABELS = {"ratchet.phase": "doctor"}
# The dataset as the sandbox user sees it: a readable directory (and how full) or file.
_DATASET = f"""d={DATASET_TARGET}
if [ -d "$d" ]; then
  [ -r "$d" ] && [ -x "$d" ] || {{ echo "state=a directory uid $(id -u) cannot read"; exit 3; }}
  n=0; for f in "$d"/* "$d"/.[!.]*; do [ -e "$f" ] && n=$((n+1)); done
  echo "state=readable by uid $(id -u): a directory of $n entries"
elif [ -r "$d" ]; then echo "state=readable by uid $(id -u): a file"
else echo "state=a file uid $(id -u) cannot read"; exit 3
fi"""
# What a run of the image finds; every line `key=value`. The gate itself is /bin/sh: if this runs
# at all, the shell works.
_IMAGE = """echo "uid=$(id -u):$(id -g)"
while IFS=: read -r name _ uid gid _ home _; do
  [ "$uid" = "$(id -u)" ] && echo "passwd=$name:$gid:$home"
done < /etc/passwd
echo "cwd=$(pwd)"
[ -r ratchet-check.txt ] && echo "workspace=ok"
( : > "$RATCHET_OUTPUT_DIR/x" ) 2>/dev/null && echo "output=ok"
( : > /tmp/x ) 2>/dev/null && echo "tmp=ok"
( : > "$HOME/x" ) 2>/dev/null && echo "home=$HOME"
( : > /x ) 2>/dev/null && echo "root=writable"
if command -v python3 >/dev/null 2>&1; then
  python3 - <<'PY'
import importlib, sys
print("python3=" + sys.version.split()[0])
found = []
for name in ("numpy", "torch"):
    try:
        found.append(name + " " + importlib.import_module(name).__version__)
    except Exception:
        pass
print("modules=" + ", ".join(found))
PY
else echo "python3=missing"
fi"""


def _spec(image: str, script: str, **kw: object) -> RunSpec:
    return RunSpec(
        image=image,
        argv=["/bin/sh", "-c", script],
        limits=_LIMITS,
        timeout_s=60.0,
        labels=dict(_LABELS),
        **kw,  # type: ignore[arg-type]
    )


def runtime_spec(image: str, runtime: str) -> RunSpec:
    """The smallest run under `runtime`: it starts, runs `true` behind the gate, and ends."""
    return _spec(image, "true", runtime=runtime)


def dataset_spec(image: str, source: str) -> RunSpec:
    return _spec(image, _DATASET, mounts=[Mount(source=source, target=DATASET_TARGET)])


def _values(log: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in log.splitlines() if "=" in line)


def dataset_state(result: RunResult) -> tuple[bool, str]:
    """(readable, what the run saw)."""
    state = _values(result.log).get("state")
    if result.exit_code == 0 and state:
        return True, state
    return False, state or f"the check did not run (exit {result.exit_code}): {result.log.strip()[-200:]}"


def gpu_spec(image: str, gpus: list[str], runtime: str) -> RunSpec:
    """`nvidia-smi -L` pinned to `gpus`, as an experiment asking for them would be."""
    return msgspec.structs.replace(_spec(image, "nvidia-smi -L", runtime=runtime), gpus=list(gpus))


_GPU_LINE = re.compile(r"^GPU \d+: .*$", re.MULTILINE)
_UUID = re.compile(r"\(UUID: ([^)]+)\)")


def gpu_listing(result: RunResult) -> tuple[list[str], list[str]]:
    """The GPU lines `nvidia-smi -L` printed, and their UUIDs."""
    lines = _GPU_LINE.findall(result.log)
    return lines, [m.group(1) for line in lines if (m := _UUID.search(line))]


def image_spec(image: str) -> RunSpec:
    return _spec(image, _IMAGE, files=[FileEntry(path="ratchet-check.txt", data=b"ok\n")])


class ImageCheck(msgspec.Struct, kw_only=True):
    problems: list[str]
    found: list[str]  # what is right, for the report


def image_check(result: RunResult) -> ImageCheck:
    """What a run of the image says about it as a sandbox; `problems` say what to fix."""
    v = _values(result.log)
    problems: list[str] = []
    found = ["/bin/sh"]
    passwd = v.get("passwd", "").split(":")
    if v.get("uid") != "1000:1000":
        problems.append(f"runs as {v.get('uid', '?')}, not 1000:1000")
    if len(passwd) != 3:
        problems.append("no user with uid 1000 in /etc/passwd (add `sandbox`, uid and gid 1000)")
    elif passwd[2] != HOME_DIR:
        problems.append(f"uid 1000 ({passwd[0]}) has the home {passwd[2]}, not {HOME_DIR}")
    else:
        found.append(f"uid 1000 ({passwd[0]}, home {passwd[2]})")
    layout = [
        (v.get("cwd") == WORKSPACE_DIR and v.get("workspace") == "ok", f"the workspace at {WORKSPACE_DIR}"),
        (v.get("output") == "ok", f"a writable {OUTPUT_DIR}"),
        (v.get("tmp") == "ok", "a writable /tmp"),
        (v.get("home") == HOME_DIR, f"a writable home {HOME_DIR}"),
    ]
    missing = [what for ok, what in layout if not ok]
    if missing:
        problems.append("missing from a run: " + ", ".join(missing) + " (is /sandbox in the image root's?)")
    else:
        found.append("the /sandbox layout")
    if v.get("root") == "writable":
        problems.append("the root file system was writable in a run")
    python = v.get("python3", "missing")
    if python == "missing":
        problems.append("no python3 on PATH")
    else:
        mods = v.get("modules", "")
        found.append(f"python3 {python}" + (f" ({mods})" if mods else ""))
    if result.exit_code != 0 and not problems:
        problems.append(f"the check exited {result.exit_code}: {result.log.strip()[-300:]}")
    return ImageCheck(problems=problems, found=found)
