"""`ratchet doctor [--image IMG]`: whether this machine can run experiments, and what to fix.

Everything is asked of the executor the settings name (this machine's engine, or every node of a
Ray cluster), as the service would: its nodes (`nodes_report`: engine, runtimes, GPU route, GPUs,
slots, missing images), then a few short runs on each node that answers, through the same path as
an experiment's (`prepare`, `start`): the smallest run under each runtime, `nvidia-smi -L` pinned
to each GPU slot, each declared dataset read as the sandbox user, and with `--image` a run that
checks the image works as a sandbox. Each line is `ok`, `--`
(nothing to check, or for information) or `!!` (a problem, with what to do); the exit code is 1
when there is any problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Literal

import msgspec

from .runs import checks
from .runs.executor import Executor, Node, NodeReport, RunResult, RunSpec, SandboxError, SpecError
from .runs.executors import open_executor
from .settings import Settings

__all__ = ["TORCH_IMAGE", "Line", "diagnose", "render", "run_doctor"]

TORCH_IMAGE = "ratchet/torch:latest"
RUNTIMES = ("runc", "runsc")  # the ones Ratchet runs under
Mark = Literal["ok", "--", "!!"]


class Line(msgspec.Struct, kw_only=True):
    mark: Mark
    topic: str
    text: str
    details: list[str] = []


async def _run(executor: Executor, spec: RunSpec, node: str) -> RunResult:
    """One short run through the executor, as an experiment's would go; removed afterwards."""
    handle = await executor.prepare(spec, node)
    try:
        return await handle.start(on_output=lambda _: None, on_exit=lambda _: None)
    finally:
        await handle.cleanup()


async def _try(executor: Executor, spec: RunSpec, node: str) -> RunResult | str:
    """The run's result, or why it could not start."""
    try:
        return await _run(executor, spec, node)
    except (SpecError, SandboxError) as exc:
        return str(exc)


def _named(node: str, many: bool) -> str:
    return f"{node}: " if many else ""


async def _runtimes(executor: Executor, settings: Settings, reports: list[NodeReport]) -> Line:
    details, bad = [], False
    many = len(reports) > 1
    for r in reports:
        for rt in RUNTIMES:
            if rt not in r.runtimes:
                note = "not registered" + (" (the default for loops!)" if rt == settings.runtime else "")
                bad |= rt == settings.runtime
                details.append(f"{_named(r.name, many)}{rt}: {note}")
                continue
            args = r.runtimes[rt]
            if rt == "runsc" and "--network=none" not in args:
                bad = True
                details.append(
                    f"{_named(r.name, many)}runsc: registered without --network=none: its runs fail"
                )
                continue
            got = await _try(executor, checks.runtime_spec(settings.default_image, rt), r.name)
            if isinstance(got, str) or got.exit_code != 0:
                bad = True
                why = got if isinstance(got, str) else f"exited {got.exit_code}: {got.log.strip()[-200:]}"
                details.append(f"{_named(r.name, many)}{rt}: a sandbox did not run: {why}")
            else:
                extra = f" ({' '.join(args)})" if args else ""
                details.append(f"{_named(r.name, many)}{rt}{extra}: a sandbox ran{_took(got)}")
    text = f"loops run under {settings.runtime} unless they name another"
    return Line(mark="!!" if bad else "ok", topic="runtimes", text=text, details=details)


def _took(result: RunResult) -> str:
    """From the container made to it removed (on a cluster's node, removed only after the result
    came back: to the workload's end)."""
    t = result.timings
    end = t.released or t.finished
    return f" ({end - t.created:.1f} s)" if t.created and end else ""


def _slot_groups(node: Node) -> list[list[str]]:
    if not node.gpus:
        return []
    per = max(1, len(node.gpus) // max(1, node.slots))
    return [list(node.gpus[i * per : (i + 1) * per]) for i in range(min(node.slots, len(node.gpus) // per))]


async def _gpus(executor: Executor, settings: Settings, reports: list[NodeReport]) -> list[Line]:
    many = len(reports) > 1
    if not any(r.gpus for r in reports):
        slots = sum(r.slots for r in reports)
        first = reports[0]
        return [
            Line(
                mark="--",
                topic="GPU route",
                text=f"{first.gpu_route} (matters only with GPUs): {first.gpu_reason}",
            ),
            Line(
                mark="--", topic="GPUs", text=f"none found (nvidia-smi, --gpus): {slots} slot(s) for CPU runs"
            ),
        ]
    route_details, gpu_details, route_bad, gpu_bad = [], [], False, False
    for r in reports:
        groups = _slot_groups(Node(name=r.name, slots=r.slots, gpus=tuple(r.gpus)))
        if r.gpus and r.gpu_route == "none":
            route_bad = True
        if not r.gpus:  # a CPU node of a cluster that has GPU nodes too
            route_details.append(f"{_named(r.name, many)}{r.gpu_route} (no GPUs there)")
            gpu_details.append(f"{_named(r.name, many)}no GPUs: {r.slots} slot(s) for CPU runs")
            continue
        route_details.append(f"{_named(r.name, many)}{r.gpu_route}: {r.gpu_reason}")
        per = len(groups[0]) if groups else 0
        gpu_details.append(
            f"{_named(r.name, many)}{len(r.gpus)} GPU(s) {', '.join(r.gpus)}: {r.slots} slot(s) of {per}"
        )
        if r.gpu_route == "none":
            continue
        for i, ids in enumerate(groups):
            got = await _try(executor, checks.gpu_spec(settings.default_image, ids, settings.runtime), r.name)
            if isinstance(got, str) or got.exit_code != 0:
                gpu_bad = True
                why = got if isinstance(got, str) else f"exited {got.exit_code}: {got.log.strip()[-200:]}"
                gpu_details.append(f"  slot {i} (GPUs {','.join(ids)}): nvidia-smi -L failed: {why}")
                continue
            lines, uuids = checks.gpu_listing(got)
            want = [r.gpu_uuids[g] for g in ids if g in r.gpu_uuids]
            wrong = len(lines) != len(ids) or (len(want) == len(ids) and sorted(uuids) != sorted(want))
            gpu_bad |= wrong
            note = f"; expected {', '.join(want) or len(ids)}" if wrong else ""
            gpu_details.append(
                f"  slot {i} (GPUs {','.join(ids)}) saw: {' | '.join(lines) or 'nothing'}{note}"
            )
    return [
        Line(
            mark="!!" if route_bad else "ok",
            topic="GPU route",
            text="how containers get their GPUs",
            details=route_details,
        ),
        Line(
            mark="!!" if gpu_bad else "ok",
            topic="GPUs",
            text="nvidia-smi -L in a sandbox pinned to each slot",
            details=gpu_details,
        ),
    ]


def _images(settings: Settings, reports: list[NodeReport], image: str | None) -> Line:
    missing = {i for r in reports for i in r.missing_images}
    details = [
        f"{settings.default_image} (the default): "
        + ("MISSING: build it (images/build.sh)" if settings.default_image in missing else "present"),
        f"{TORCH_IMAGE}: "
        + ("not built (optional: images/build.sh torch)" if TORCH_IMAGE in missing else "present"),
    ]
    if image and image not in (settings.default_image, TORCH_IMAGE):
        details.append(f"{image}: " + ("MISSING" if image in missing else "present"))
    bad = settings.default_image in missing or (image is not None and image in missing)
    return Line(
        mark="!!" if bad else "ok",
        topic="images",
        text="on every node" if len(reports) > 1 else "on the engine",
        details=details,
    )


class _Seen(msgspec.Struct):
    """What the dataset checks found on one node: name -> what a run saw, for readable ones and
    for the rest."""

    readable: dict[str, str]
    missing: dict[str, str]


async def _read_datasets(
    executor: Executor, settings: Settings, reports: list[NodeReport]
) -> dict[str, _Seen]:
    """Each declared dataset read by a run on each node (as the sandbox user), by node name."""
    found: dict[str, _Seen] = {}
    for r in reports:
        seen = found[r.name] = _Seen(readable={}, missing={})
        for name, source in sorted(settings.datasets.items()):
            if settings.default_image in r.missing_images:
                seen.missing[name] = f"not checked: the default image {settings.default_image} is missing"
                continue
            spec = checks.dataset_spec(settings.default_image, source.removeprefix("volume:"))
            got = await _try(executor, spec, r.name)
            readable, what = (False, got) if isinstance(got, str) else checks.dataset_state(got)
            (seen.readable if readable else seen.missing)[name] = what
    return found


def _datasets(settings: Settings, reports: list[NodeReport], seen: dict[str, _Seen]) -> Line:
    if not settings.datasets:
        return Line(mark="--", topic="datasets", text="none declared (ratchet serve --dataset NAME=PATH)")
    many, details, bad = len(reports) > 1, [], False
    for r in reports:
        for name in sorted(settings.datasets):
            what = seen[r.name].readable.get(name)
            if what is None:
                bad = True
                what = seen[r.name].missing[name]
            details.append(f"{_named(r.name, many)}{name} ({settings.datasets[name]}): {what}")
    text = "read-only, as runs see them"
    if many:
        text += "; a loop's runs go only to the nodes that have all it names"
    return Line(mark="!!" if bad else "ok", topic="datasets", text=text, details=details)


def _runtime_names(r: NodeReport) -> list[str]:
    """The runtimes a loop could name (not the engine's own internal ones)."""
    return sorted(n for n in r.runtimes if not n.startswith("io.containerd."))


def _engine(r: NodeReport) -> str:
    api = f" (API {r.api_version})" if r.api_version else ""
    return f"Docker {r.engine_version}{api}"


def _nodes(reports: list[NodeReport], required: set[str], seen: dict[str, _Seen]) -> Line:
    """`required`: the images whose absence is a problem (the torch image is optional)."""
    details = []
    for r in reports:
        if r.problem:
            details.append(f"{r.name}: cannot be asked: {r.problem}")
            continue
        lacks = [*r.missing_images, *(seen[r.name].missing if r.name in seen else {})]
        runtimes = ", ".join(_runtime_names(r)) or "-"
        details.append(
            f"{r.name}: {_engine(r)}; runtimes {runtimes}; GPU route {r.gpu_route};"
            f" GPUs {', '.join(r.gpus) or '-'}; {r.slots} slot(s); missing: {', '.join(lacks) or 'nothing'}"
        )
    bad = any(
        r.problem or required & set(r.missing_images) or (r.name in seen and seen[r.name].missing)
        for r in reports
    )
    return Line(mark="!!" if bad else "ok", topic="nodes", text=f"{len(reports)} node(s)", details=details)


async def _image(executor: Executor, reports: list[NodeReport], image: str) -> Line:
    details, bad = [], False
    for r in reports:
        got = await _try(executor, checks.image_spec(image), r.name)
        where = _named(r.name, len(reports) > 1)
        if isinstance(got, str):
            bad = True
            hint = " (no POSIX /bin/sh? every run starts behind a shell gate)" if "/bin/sh" in got else ""
            details.append(f"{where}cannot run as a sandbox: {got}{hint}")
            continue
        found = checks.image_check(got)
        bad |= bool(found.problems)
        details += [f"{where}!! {p}" for p in found.problems] + [f"{where}has {', '.join(found.found)}"]
    return Line(mark="!!" if bad else "ok", topic="image", text=f"{image} as a sandbox", details=details)


async def diagnose(settings: Settings, executor: Executor, image: str | None = None) -> list[Line]:
    """Every node the executor has is reported; the checks run on those that answer (a node that
    cannot be asked is a problem of its own)."""
    try:
        images = [settings.default_image, TORCH_IMAGE, *([image] if image else [])]
        reports = await executor.nodes_report(images)
    except (SandboxError, OSError) as exc:
        return [Line(mark="!!", topic="engine", text=f"cannot be asked: {exc}")]
    if not reports:
        why = "no node runs experiments (a Ray node takes part once it offers CPUs and its engine answers)"
        return [Line(mark="!!", topic="nodes", text=why)]
    up = [r for r in reports if not r.problem]
    engine = Line(
        mark="!!" if len(up) < len(reports) else "ok",
        topic="engine",
        text="; ".join(f"{_named(r.name, len(reports) > 1)}{r.problem or _engine(r)}" for r in reports),
    )
    if not up:
        return [engine, _nodes(reports, set(), {})]
    lines = [engine, await _runtimes(executor, settings, up)]
    lines += await _gpus(executor, settings, up)
    required = {settings.default_image, *([image] if image else [])}
    seen = await _read_datasets(executor, settings, up)
    lines += [_images(settings, up, image), _datasets(settings, up, seen)]
    lines.append(_nodes(reports, required, seen))
    if image:
        lines.append(await _image(executor, up, image))
    return lines


def render(lines: list[Line]) -> str:
    out = []
    for line in lines:
        out.append(f"{line.mark:<3} {line.topic:<10} {line.text}")
        out += [f"{'':14} {d}" for d in line.details]
    problems = [line.topic for line in lines if line.mark == "!!"]
    out.append("")
    out.append(f"{len(problems)} problem(s): {', '.join(problems)}" if problems else "all checks passed")
    return "\n".join(out)


def run_doctor(settings: Settings, image: str | None = None) -> tuple[str, int]:
    """The report and the exit code (1 when there is a problem)."""

    async def main() -> list[Line]:
        try:
            executor = await open_executor(settings, f"doctor-{secrets.token_hex(4)}")
        except SandboxError as exc:
            return [Line(mark="!!", topic="engine", text=f"cannot be reached: {exc}")]
        try:
            return await diagnose(settings, executor, image)
        finally:
            with contextlib.suppress(SandboxError):
                await executor.cleanup()
            await executor.close()

    lines = asyncio.run(main())
    return render(lines), int(any(line.mark == "!!" for line in lines))
