"""One proposal from its start to its candidate (or its failure): the parent workspace loaded, the
proposer run (a command in its sandbox, the built-in search, or the llm agent), the candidate
checked and stored, then the one guarded write that queues it (`state.proposals.propose`).

A proposer is as untrusted as a candidate: whatever it does is data. Its failures (a non-zero exit,
a timeout, an edit of a harness file, no change) end it as `failed` with a reason; a broken engine
ends it as `error`. Its output streams into the same live logs as an experiment's and is stored
under its id when it ends, before its final status is written."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Protocol

from .. import faults
from .. import proposer_metrics as pm
from ..models import LoopView
from ..proposal_models import CommandProposer, LlmProposer, ProposalStatus, SearchProposer
from ..rules import search
from ..rules.proposals import ProposalRefused, candidate_from_workspace, context_files, description_from
from ..settings import Settings
from ..state import proposals
from ..state.candidates import unified_diff
from ..state.proposal_reads import ledger_text, recent_experiments
from ..state.snapshots import SnapshotStore, decode_manifest
from ..state.store import Store
from . import runspec
from .executor import Executor, Handle, RunResult, SandboxError, SpecError
from .llm_agent import LlmAgent
from .logs import RunLogs

__all__ = ["ProposalRun", "ProposerHost"]

log = logging.getLogger("ratchet.proposers")


class ProposerHost(Protocol):
    settings: Settings
    store: Store
    snapshots: SnapshotStore
    executor: Executor
    logs: RunLogs
    llm: LlmAgent
    stopping: bool

    def node(self) -> str: ...  # where command proposers run
    def candidate_queued(self) -> None: ...  # the scheduler has work
    def proposal_over(self, run: ProposalRun) -> None: ...


class ProposalRun:
    def __init__(
        self, host: ProposerHost, pid: str, number: int, attempt: int, loop: LoopView, parent: str
    ) -> None:
        self.host = host
        self.pid = pid
        self.number = number
        self.attempt = attempt
        self.loop = loop
        self.parent = parent
        self.handle: Handle | None = None
        self.cancelled = False
        self.task: asyncio.Task[None] | None = None
        self._text: list[str] = []  # the log of a proposal run in the service (search, llm)
        self._output: str | None = None  # a command proposer's log (its output, the egress log)

    def __repr__(self) -> str:
        return f"<ProposalRun {self.pid} #{self.number} loop={self.loop.name}>"

    def begin(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"proposal-{self.pid}")

    async def kill(self) -> None:
        """Its run stops; what it would still write is refused by the state machine."""
        self.cancelled = True
        if self.handle is not None:
            await self.handle.cancel()
        elif self.task is not None and not self.task.done():
            self.task.cancel()

    # -- the run -------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A line of the proposal's log (proposers run by the service itself)."""
        self._text.append(text)
        live = self.host.logs.live(self.pid)
        if live is not None:
            live.write(text.encode())

    async def _run(self) -> None:
        host, kind = self.host, _kind(self.loop)
        host.logs.open(self.pid)
        started = time.monotonic()
        info = proposals.Finished()
        status: str = ProposalStatus.error.value
        try:
            faults.point("propose.running")
            tree, manifest = await self._parent()
            child, description, info = await self._propose(tree, manifest)
            if info.log_tail is None:  # run in the service: its log is what it said
                info = proposals.Finished(exit_code=info.exit_code, log_tail="".join(self._text)[-4096:])
            candidate = await self._candidate(tree, manifest, child, description)
            await host.logs.save(self.pid, self._log_text(info))
            with faults.scope("propose"):
                moved, ref = await proposals.propose(host.store, self.pid, candidate, info)
            faults.point("propose.after")
            status = moved.value
            if moved is ProposalStatus.proposed:
                host.candidate_queued()
            elif moved is ProposalStatus.duplicate:
                pm.DUPLICATES.labels(loop=self.loop.name, source="proposer").inc()
                pm.PROPOSER_FAILURES.labels(loop=self.loop.name, reason="duplicate").inc()
            log.info("proposal %s (%s #%d): %s %s", self.pid, self.loop.name, self.number, status, ref or "")
        except ProposalRefused as refused:
            status = await self._refused(refused, getattr(refused, "info", info))
        except (SandboxError, SpecError, OSError) as exc:
            status = await self._broken(
                f"{'container engine' if isinstance(exc, SandboxError) else 'setup'}: {exc}", info, "engine"
            )
        except asyncio.CancelledError:
            status = ProposalStatus.cancelled.value  # killed: its status was written by whoever killed it
        except Exception as exc:
            log.exception("proposal %s: unexpected failure", self.pid)
            status = await self._broken(f"internal error: {type(exc).__name__}: {exc}", info, "internal")
        finally:
            host.logs.close(self.pid)
            if not host.stopping:  # else it went back to the queue
                pm.PROPOSALS.labels(loop=self.loop.name, kind=kind, status=status).inc()
            pm.PROPOSAL_DURATION.labels(loop=self.loop.name).observe(time.monotonic() - started)
            host.proposal_over(self)

    async def _refused(self, refused: ProposalRefused, info: proposals.Finished) -> str:
        self.say(f"proposal refused ({refused.code}): {refused}\n")
        if info.log_tail is None:
            info = proposals.Finished(exit_code=info.exit_code, log_tail="".join(self._text)[-4096:])
        await self.host.logs.save(self.pid, self._log_text(info))
        moved, paused = await proposals.fail(
            self.host.store, self.pid, refused.code, str(refused), info, pause=refused.code == "budget"
        )
        if moved:
            pm.PROPOSER_FAILURES.labels(loop=self.loop.name, reason=refused.code).inc()
        log.info("proposal %s (%s #%d): failed: %s", self.pid, self.loop.name, self.number, refused)
        if paused:
            log.warning("loop %s paused: %s", self.loop.name, paused)
        return ProposalStatus.failed.value if moved else ProposalStatus.cancelled.value

    async def _broken(self, reason: str, info: proposals.Finished, cause: str) -> str:
        if self.host.stopping or self.cancelled:
            return ProposalStatus.cancelled.value  # the stop put it back in the queue
        log.warning("proposal %s: %s", self.pid, reason)
        self.say(f"{reason}\n")
        await self.host.logs.save(self.pid, self._log_text(info))
        moved = await proposals.error(self.host.store, self.pid, reason, info)
        if moved:
            pm.PROPOSER_FAILURES.labels(loop=self.loop.name, reason=cause).inc()
        return ProposalStatus.error.value

    def _log_text(self, info: proposals.Finished) -> str:
        return self._output if self._output is not None else "".join(self._text)

    async def _parent(self) -> tuple[dict[str, bytes], object]:
        raw = await self.host.store.get_manifest(self.parent)
        if raw is None:
            raise OSError(f"snapshot {self.parent} is missing from the database")
        manifest = decode_manifest(raw)
        tree = await asyncio.to_thread(self.host.snapshots.load_tree, manifest)
        return tree, manifest

    async def _propose(
        self, tree: dict[str, bytes], manifest: object
    ) -> tuple[dict[str, bytes], str, proposals.Finished]:
        proposer = self.loop.config.proposer
        match proposer:
            case SearchProposer():
                text = tree[proposer.file].decode("utf-8")
                new, description = search.propose(proposer, text, self.number)
                self.say(f"search #{self.number} from {self.parent[:7]}: {description}\n")
                return {**tree, proposer.file: new.encode()}, description, proposals.Finished()
            case LlmProposer():
                child, description = await self.host.llm.propose(
                    self.pid, self.loop, proposer, tree, self.say
                )
                return child, description, proposals.Finished()
            case CommandProposer():
                return await self._command(proposer, tree, manifest)
        raise SpecError(f"loop {self.loop.name} has no proposer")

    async def _command(
        self, proposer: CommandProposer, tree: dict[str, bytes], manifest: object
    ) -> tuple[dict[str, bytes], str, proposals.Finished]:
        host, loop = self.host, self.loop
        recent = await recent_experiments(host.store, loop.id, proposer.context_experiments)
        ledger = await ledger_text(host.store, loop)
        context = context_files(loop, tree.get("program.md"), ledger, recent, secrets.token_hex(8))
        executable = {e.path for e in manifest.files if e.executable}  # type: ignore[attr-defined]
        spec = runspec.proposer_spec(
            self.pid,
            self.number,
            self.parent,
            loop,
            proposer,
            tree,
            executable,
            context,
            attempt=self.attempt,
            instance=host.executor.instance,
            settings=host.settings,
        )
        self.handle = await host.executor.prepare(spec, host.node())
        faults.point("propose.prepared")
        try:
            if self.cancelled:
                await self.handle.cancel()
            live = host.logs.live(self.pid)
            result = await self.handle.start(on_output=live.write if live else _drop, on_exit=_ignore)
        finally:
            handle, self.handle = self.handle, None
            await handle.cleanup()
        self._output = _output_text(result)
        return _judge(result, tree, loop, self.number, self._output)

    async def _candidate(
        self, tree: dict[str, bytes], manifest: object, child: dict[str, bytes], description: str
    ) -> proposals.Candidate:
        settings = self.host.settings
        total = sum(len(d) for d in child.values())
        if total > settings.max_workspace_bytes or len(child) > settings.max_workspace_files:
            raise ProposalRefused(
                "bad_output",
                f"the edited workspace holds {total} bytes in {len(child)} files; the limits are"
                f" {settings.max_workspace_bytes} bytes and {settings.max_workspace_files} files",
            )
        execs = frozenset(e.path for e in manifest.files if e.executable)  # type: ignore[attr-defined]
        stored = await asyncio.to_thread(self.host.snapshots.put_tree, child, execs, manifest)
        return proposals.Candidate(
            description=description,
            parent=self.parent,
            snapshot=stored.id,
            manifest=stored.encode(),
            diff=unified_diff(tree, child),
        )


def _kind(loop: LoopView) -> str:
    proposer = loop.config.proposer
    return str(proposer.__struct_config__.tag) if proposer is not None else "none"


def _drop(_: bytes) -> None:
    pass


def _ignore(_: object) -> None:
    pass


def _output_text(result: RunResult) -> str:
    """A command proposer's log: its output, then the proxy's decisions when it had a network."""
    text = result.log
    if result.egress_log:
        sep = "" if not text or text.endswith("\n") else "\n"
        text = f"{text}{sep}===== egress =====\n{result.egress_log}"
    return text


def _judge(
    result: RunResult, tree: dict[str, bytes], loop: LoopView, number: int, text: str
) -> tuple[dict[str, bytes], str, proposals.Finished]:
    """A command proposer's run: its edited workspace as the candidate, or why not."""
    info = proposals.Finished(exit_code=result.exit_code, log_tail=text[-4096:])
    if result.cancelled:
        raise asyncio.CancelledError
    if result.timed_out:
        raise _Refused("timeout", f"killed at its hard timeout of {result.timeout_s:g} s", info)
    if result.oom_killed:
        raise _Refused("oom", "ran out of memory (proposer.resources.memory_mb)", info)
    if result.exit_code != 0 or not result.exit_reported or result.report_forged:
        raise _Refused("exit_nonzero", f"exited with code {result.exit_code}", info)
    try:
        child = candidate_from_workspace(
            tree, result.workspace_files, result.workspace_skipped, loop.config.editable
        )
    except ProposalRefused as refused:
        raise _Refused(refused.code, str(refused), info) from None
    return child, description_from(result.output_files, f"proposal #{number}"), info


class _Refused(ProposalRefused):
    """A refusal that carries what the run recorded (its log, its exit code)."""

    def __init__(self, code: str, message: str, info: proposals.Finished) -> None:
        super().__init__(code, message)
        self.info = info
