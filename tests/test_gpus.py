"""Unit tests of `service.runs.gpus.GpuPool`: no device id is ever held twice."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.runs.gpus import GpuPool, detect_gpus


def test_allocate_and_release():
    pool = GpuPool(["0", "1", "2", "3"])
    assert pool.free == 4
    a = pool.allocate(2)
    assert a == ["0", "1"]
    assert pool.free == 2
    b = pool.allocate(2)
    assert b == ["2", "3"]
    assert pool.free == 0
    assert pool.allocate(1) is None
    pool.release(a)
    assert pool.free == 2
    assert pool.allocate(2) == ["0", "1"]


def test_allocate_zero_is_empty_and_always_possible():
    pool = GpuPool([])
    assert pool.allocate(0) == []
    assert pool.free == 0
    pool = GpuPool(["0"])
    pool.allocate(1)
    assert pool.allocate(0) == []


def test_too_many_returns_none_and_takes_nothing():
    pool = GpuPool(["0", "1"])
    assert pool.allocate(3) is None
    assert pool.free == 2


def test_duplicate_ids_refused():
    with pytest.raises(ValueError, match="duplicate GPU ids"):
        GpuPool(["0", "1", "0"])


def test_release_of_unheld_id_raises():
    pool = GpuPool(["0", "1"])
    with pytest.raises(ValueError, match="GPU 0 was not allocated"):
        pool.release(["0"])
    with pytest.raises(ValueError, match="GPU 9 was not allocated"):
        pool.release(["9"])
    assert pool.free == 2


def test_double_release_raises():
    pool = GpuPool(["0", "1"])
    got = pool.allocate(1)
    pool.release(got)
    with pytest.raises(ValueError, match="was not allocated"):
        pool.release(got)
    assert pool.free == 2


def test_released_ids_return_in_inventory_order():
    pool = GpuPool(["a", "b", "c", "d"])
    first, second = pool.allocate(2), pool.allocate(2)
    pool.release(second)
    pool.release(first)
    assert pool.allocate(4) == ["a", "b", "c", "d"]


def test_take_gives_exactly_the_ids_or_nothing():
    pool = GpuPool(["0", "1", "2"])
    held = pool.allocate(1)
    assert pool.take(["0"]) is None and pool.free == 2  # held by someone else
    assert pool.take(["2", "1"]) == ["2", "1"] and pool.free == 0
    pool.release(held)
    assert pool.take(["0", "0"]) is None and pool.take(["9"]) is None and pool.free == 1


def test_detect_gpus_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr("service.runs.gpus.shutil.which", lambda name: None)
    assert detect_gpus() == []


# One step: ("alloc", n) or ("release", index into the current holders).
steps = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(min_value=0, max_value=5)),
        st.tuples(st.just("release"), st.integers(min_value=0, max_value=50)),
        st.tuples(st.just("bogus"), st.integers(min_value=0, max_value=10)),
        st.tuples(st.just("take"), st.integers(min_value=0, max_value=255)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, database=None)
@given(size=st.integers(min_value=0, max_value=8), script=steps)
def test_no_id_is_ever_held_twice(size, script):
    inventory = [f"gpu{i}" for i in range(size)]
    pool = GpuPool(inventory)
    holders: list[list[str]] = []
    for op, arg in script:
        held = [g for h in holders for g in h]
        if op == "alloc":
            got = pool.allocate(arg)
            if arg > size - len(held):
                assert got is None
            else:
                assert got is not None
                assert len(got) == arg
                assert len(set(got)) == arg
                assert set(got) <= set(inventory)
                assert not set(got) & set(held), f"{got} overlaps held {held}"
                holders.append(got)
        elif op == "release" and holders:
            pool.release(holders.pop(arg % len(holders)))
        elif op == "take":
            # exactly the ids a prepared run was made for (a subset picked by the bits of arg)
            wanted = [g for i, g in enumerate(inventory) if arg >> i & 1]
            got = pool.take(wanted)
            if set(wanted) & set(held):
                assert got is None
            else:
                assert got == wanted
                if got:
                    holders.append(got)
        elif op == "bogus":
            # An id nobody holds: free in the pool, or not in the inventory at all.
            unheld = [g for g in inventory if g not in held] + ["nope"]
            victim = unheld[arg % len(unheld)]
            before = pool.free
            with pytest.raises(ValueError):
                pool.release([victim])
            assert pool.free == before
        held = [g for h in holders for g in h]
        assert len(held) == len(set(held))
        assert pool.free == size - len(held)
    for h in holders:
        pool.release(h)
    assert pool.free == size
    assert pool.allocate(size) == inventory
