"""A worker's two scoreboard writes per request, in C (board_started and board_finished in
fcgidaemon/_speedups.c), change nothing but speed: the record they leave is the one
Scoreboard.request_started and request_finished leave with the C functions switched off (the
Python writes, the reference). The C side hard-codes the record's layout and the histogram's
buckets, so these tests also fail when scoreboard.RECORD or BUCKETS changes without it.
"""

from __future__ import annotations

import bisect
import time

import pytest

from fcgidaemon import scoreboard
from fcgidaemon.scoreboard import BUCKETS, RECORD, Scoreboard, SlotState

TEXTS = ["GET", "", "/hello", "/café/ü", "/\u20ac/\U0001f600", "x" * 200, "PROPFIND-LONG",
         "/a\x00b\nc", "\u0100" * 10, "/\u00ff\u0100\u00fe", "/" + "é" * 95 + "z"]


@pytest.fixture(params=["c", "python"])
def writes(request, monkeypatch):
    """Run a test with the C writes, then with the Python ones."""
    if request.param == "python":
        monkeypatch.setattr(scoreboard, "_c_started", None)
        monkeypatch.setattr(scoreboard, "_c_finished", None)
    return request.param


def record_bytes(board: Scoreboard, index: int) -> bytes:
    base = board._base(index)
    return bytes(board.mem[base:base + RECORD.size])


def speedups():
    """The C module; the tests of the C functions alone are skipped without it (the one below
    fails then: the build is meant to have it)."""
    return pytest.importorskip("fcgidaemon._speedups")


def test_the_c_writes_are_the_ones_used():
    from fcgidaemon import _speedups
    assert scoreboard._c_started is _speedups.board_started
    assert scoreboard._c_finished is _speedups.board_finished


@pytest.mark.parametrize("uri", TEXTS)
@pytest.mark.parametrize("method", ["GET", "", "M\u00e9THOD-TOO-LONG", "\u4e2d"])
def test_a_request_start_writes_what_python_writes(method, uri, monkeypatch):
    """Method and path as latin-1 with "?" for anything else, cut at 8 and 96 bytes and
    NUL-padded; the state BUSY; the start time on time.monotonic()'s clock."""
    boards = {}
    for kind in ("c", "python"):
        if kind == "python":
            monkeypatch.setattr(scoreboard, "_c_started", None)
        board = Scoreboard(4)
        board.allocate(1234, 7)
        before = time.monotonic()
        since = board.request_started(0, method, uri)
        after = time.monotonic()
        assert before <= since <= after
        slot = board.read(0)
        assert slot.state is SlotState.BUSY and slot.busy_since == since
        raw = bytearray(record_bytes(board, 0))
        raw[32:40] = bytes(8)  # the start time differs between the two runs, only it
        boards[kind] = bytes(raw)
    assert boards["c"] == boards["python"]
    method_field = boards["c"][40:48]
    assert method_field == method.encode("latin-1", "replace")[:8].ljust(8, b"\0")


def test_a_request_end_updates_the_record_as_python_does(writes):
    """Durations just under and over every bucket's bound: each is counted in the bucket
    bisect_left gives for the duration the record shows; requests, state, last duration and
    their sum as request_finished writes them. Each kind is checked against its own record,
    so the C buckets are checked against scoreboard.BUCKETS."""
    board = Scoreboard(4)
    index = board.allocate(99, 1)
    expected = [0] * len(board.read(index).histogram)
    total = 0.0
    durations = [b * f for b in BUCKETS for f in (0.9, 1.1)] + [0.0, 20.0]
    for n, took in enumerate(durations, 1):
        board.request_started(index, "GET", "/x")
        since = time.monotonic() - took
        state = SlotState.RETIRING if n == len(durations) else SlotState.IDLE
        board.request_finished(index, n, since, state)
        slot = board.read(index)
        assert took <= slot.last_duration < took + 1.0, (writes, took, slot.last_duration)
        expected[bisect.bisect_left(BUCKETS, slot.last_duration)] += 1
        total += slot.last_duration
        assert slot.requests == n and slot.state is state
        assert list(slot.histogram) == expected, (writes, took)
        assert slot.duration_sum == pytest.approx(total, rel=1e-12)
    # every bucket, the +Inf one included, was hit
    assert all(count >= 1 for count in expected), expected


def test_a_shorter_text_leaves_nothing_of_the_longer_one_before_it(writes):
    """The status page shows what the record holds: the rest of the previous request's path
    after a shorter one would be read as part of it."""
    board = Scoreboard(2)
    index = board.allocate(5, 1)
    board.request_started(index, "OPTIONS", "/" + "x" * 200)
    board.request_started(index, "GET", "/a")
    slot = board.read(index)
    assert (slot.method, slot.uri) == ("GET", "/a")
    base = board._base(index)
    assert bytes(board.mem[base + 40:base + 144]) == b"GET".ljust(8, b"\0") + b"/a".ljust(96, b"\0")


def test_the_last_record_is_written(writes):
    board = Scoreboard(3)
    for _ in range(3):
        last = board.allocate(7, 1)
    assert board._base(last) + RECORD.size == len(board.mem)
    since = board.request_started(last, "GET", "/end")
    board.request_finished(last, 1, since, SlotState.IDLE)
    slot = board.read(last)
    assert (slot.uri, slot.requests, slot.state) == ("/end", 1, SlotState.IDLE)


def test_other_records_are_left_alone(writes):
    board = Scoreboard(4)
    for i in range(4):
        board.allocate(100 + i, 1)
    untouched = {i: record_bytes(board, i) for i in (0, 2, 3)}
    since = board.request_started(1, "POST", "/y")
    board.request_finished(1, 5, since, SlotState.IDLE)
    assert {i: record_bytes(board, i) for i in (0, 2, 3)} == untouched


def test_bad_arguments_raise_instead_of_writing_out_of_bounds():
    _speedups = speedups()
    board = Scoreboard(2)
    size = len(board.mem)
    for base in (-8, size, size - RECORD.size + 8, 12):  # before, after, overlapping the end, unaligned
        with pytest.raises(ValueError):
            _speedups.board_started(board.mem, base, "GET", "/")
        with pytest.raises(ValueError):
            _speedups.board_finished(board.mem, base, 1, 0.0, 2)
    with pytest.raises(TypeError):
        _speedups.board_started(board.mem, board._base(0), b"GET", "/")
    with pytest.raises(TypeError):
        _speedups.board_started(board.mem, board._base(0), "GET")
    with pytest.raises(ValueError):
        _speedups.board_finished(board.mem, board._base(0), 1, 0.0, 256)
    with pytest.raises(BufferError):
        _speedups.board_finished(bytes(size), board._base(0), 1, 0.0, 2)  # read-only
