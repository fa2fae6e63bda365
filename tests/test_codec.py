"""Our name-value decoder reads exactly what flup6's encoder writes, and refuses lies.

Every test runs on both decoders: the C one (fcgidaemon/_speedups.c, what the daemon uses when
it was built) and the pure-Python fallback, which is also the reference the C one is held to.
"""

from __future__ import annotations

import pytest
from flup.server.fcgi_base import encode_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from fcgidaemon import fastcgi
from fcgidaemon.fastcgi import ProtocolError

names = st.binary(min_size=0, max_size=300)


def _c_decoder(data: bytes) -> dict[str, str]:
    return fastcgi.decode_params(data)


DECODERS = {"c": _c_decoder, "python": fastcgi.decode_params_py}


def test_the_c_decoder_is_built_and_used():
    """`make test` installs with a C compiler (gcc, python3-dev): the extension must be there,
    or every figure of bench/ would measure the fallback without anyone noticing."""
    from fcgidaemon import _speedups

    assert fastcgi._c_decode_params is _speedups.decode_params
    assert _speedups.decode_params(bytearray(b"\x01\x02ABC")) == {"A": "BC"}


@pytest.mark.parametrize("decoder", DECODERS)
@settings(max_examples=300, deadline=None)
@given(pairs=st.dictionaries(names, st.binary(max_size=70000), max_size=8))
def test_round_trip_with_flups_encoder(decoder, pairs):
    data = b"".join(encode_pair(k, v) for k, v in pairs.items())
    decoded = DECODERS[decoder](data)
    assert decoded == {k.decode("latin-1"): v.decode("latin-1") for k, v in pairs.items()}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("data", [
    b"\x05",  # name length only
    b"\x05\x05abc",  # pair longer than the stream
    b"\x80\x00",  # a 4-byte length cut short
    b"\x01\x80\x00\x00",  # a 4-byte value length cut short
    b"\x01\x01ab\x03",  # a second pair cut short
    b"\xff\xff\xff\xff\x00",  # the largest length, on a 5-byte stream
    b"\x00\xff\xff\xff\xff",  # the largest value length
    b"\x7f\x7f" + b"x" * 253,  # one byte short
])
def test_truncated_or_lying_lengths_are_protocol_errors(decoder, data):
    with pytest.raises(ProtocolError):
        DECODERS[decoder](data)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_c_and_python_agree_on_any_bytes(data):
    """Whatever arrives (the web server passes its clients' headers through), the C decoder
    gives what the Python one gives, the same error included."""
    try:
        expected = fastcgi.decode_params_py(data)
    except ProtocolError as exc:
        with pytest.raises(ProtocolError, match=str(exc)):
            _c_decoder(data)
    else:
        assert _c_decoder(data) == expected


@pytest.mark.parametrize("decoder", DECODERS)
def test_repeated_names_are_merged(decoder):
    data = b"".join(encode_pair(k, v) for k, v in [
        (b"HTTP_COOKIE", b"a=1"), (b"HTTP_ACCEPT", b"x"), (b"HTTP_COOKIE", b"b=2"),
        (b"HTTP_ACCEPT", b"y"), (b"SCRIPT_NAME", b"/one"), (b"SCRIPT_NAME", b"/two")])
    assert DECODERS[decoder](data) == {"HTTP_COOKIE": "a=1; b=2", "HTTP_ACCEPT": "x, y",
                                       "SCRIPT_NAME": "/two"}


def test_the_c_decoder_reads_a_bytearray_in_place():
    """The daemon hands it the PARAMS buffer itself (a bytearray), not a copy."""
    data = bytearray(b"".join(encode_pair(b"N%d" % i, b"v" * i) for i in range(200)))
    assert fastcgi.decode_params(data) == {f"N{i}": "v" * i for i in range(200)}


def test_without_the_extension_the_python_decoder_answers(monkeypatch):
    """An install without a C compiler (setup.py builds the extension as optional)."""
    monkeypatch.setattr(fastcgi, "_c_decode_params", None)
    data = bytearray(encode_pair(b"A", b"1") + encode_pair(b"HTTP_X", b"2") + encode_pair(b"HTTP_X", b"3"))
    assert fastcgi.decode_params(data) == {"A": "1", "HTTP_X": "2, 3"}
    with pytest.raises(ProtocolError, match="truncated"):
        fastcgi.decode_params(b"\x05")
