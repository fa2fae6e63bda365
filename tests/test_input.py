"""wsgi.input: our InputStream against flup6's, fed in records as a web server sends them.

Each case runs against plain flup6's InputStream too, where it is expected to fail: that is
the flup6 defect our subclass works around (readline's size, readline(-1) losing bytes,
read(None)). The stream is driven in-process: `Feed` plays the connection, handing over one
chunk (one FCGI_STDIN record's content) each time the stream asks for more.
"""

from __future__ import annotations

import io
import random

import pytest
from flup.server import fcgi_base as flup
from hypothesis import given, settings
from hypothesis import strategies as st

from fcgidaemon.fastcgi import InputStream, Server

BODY = b"abcdefghij\nrest\n"


class Feed:
    """A connection stand-in: each process_input() adds the next chunk, then the end."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.server = Server(handler=lambda req: 0)
        self.chunks = list(chunks)
        self.stream: flup.InputStream | None = None

    def process_input(self) -> None:
        assert self.stream is not None
        self.stream.add_data(self.chunks.pop(0) if self.chunks else b"")


def stream_of(kind: type, body: bytes, piece: int) -> flup.InputStream:
    feed = Feed([body[i:i + piece] for i in range(0, len(body), piece)])
    feed.stream = kind(feed)
    return feed.stream


KINDS = [InputStream, pytest.param(flup.InputStream, marks=pytest.mark.xfail(
    strict=True, reason="plain flup6 has this defect; fcgidaemon works around it"), id="flup6")]


@pytest.mark.parametrize("kind", KINDS)
def test_readline_size_limits_the_line(kind):
    stream = stream_of(kind, BODY, len(BODY))
    assert [stream.readline(3), stream.readline(), stream.readline(100), stream.readline()] == \
        [b"abc", b"defghij\n", b"rest\n", b""]


@pytest.mark.parametrize("kind", KINDS)
def test_readline_without_a_limit_loses_nothing(kind):
    """flup6, with -1 and no newline buffered yet, returned b"" and moved the read position back."""
    stream = stream_of(kind, BODY, 6)
    assert stream.readline(-1) == b"abcdefghij\n"
    assert stream.read() == b"rest\n"
    stream = stream_of(kind, BODY, 6)
    assert stream.readline(None) == b"abcdefghij\n"  # flup6's default: right there too


@pytest.mark.parametrize("kind", KINDS)
def test_read_none_reads_everything(kind):
    assert stream_of(kind, BODY, 4).read(None) == BODY


@pytest.mark.parametrize("kind", KINDS)
def test_readlines_none_reads_every_line(kind):
    assert stream_of(kind, BODY, 4).readlines(None) == [b"abcdefghij\n", b"rest\n"]
    assert stream_of(kind, BODY, 4).readlines(3) == [b"abcdefghij\n"]


@settings(max_examples=600, deadline=None)
@given(body=st.binary(max_size=400).map(lambda b: b.replace(b"\x00", b"\n")),
       piece=st.integers(1, 50), sizes=st.lists(st.one_of(st.none(), st.integers(-1, 30)), max_size=40))
def test_any_mix_of_reads_returns_the_body_in_order(body, piece, sizes):
    """Whatever mix of readline(size), read(n) and iteration, pieces come back in order, each
    readline no longer than asked and ending at the first newline, nothing lost or repeated."""
    stream = stream_of(InputStream, body, piece)
    got = []
    for i, size in enumerate(sizes):
        if i % 3 == 2:
            chunk = stream.read(size if size is None or size >= 0 else -1)
            left = len(body) - sum(map(len, got))
            assert len(chunk) == (left if size is None or size < 0 else min(size, left))
        else:
            chunk = stream.readline(size)
            if size is not None and size >= 0:
                assert len(chunk) <= size
            assert b"\n" not in chunk[:-1]
        assert type(chunk) is bytes
        got.append(chunk)
    got.extend(stream)
    assert b"".join(got) == body


def test_reads_match_a_file_of_the_same_bytes():
    """3,000 random bodies, cut into records of random sizes, read by a random mix of read(n),
    read(), readline(n) and readline(): every call returns what io.BytesIO returns for the same
    call on the same bytes (a read waits for its n bytes as a file's does)."""
    rnd = random.Random(6)
    for case in range(3000):
        body = bytes(rnd.choice(b"abc\n") for _ in range(rnd.randint(0, 300)))
        stream = stream_of(InputStream, body, rnd.randint(1, 70))
        model = io.BytesIO(body)
        for step in range(rnd.randint(1, 30)):
            kind, size = rnd.choice(("read", "readline")), rnd.choice((None, -1, *range(0, 100)))
            got, want = getattr(stream, kind)(size), getattr(model, kind)(size)
            assert (got, type(got)) == (want, bytes), (case, step, kind, size)
        assert stream.read() == model.read(), case
