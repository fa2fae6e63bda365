"""Our name-value decoder reads exactly what flup6's encoder writes, and refuses lies."""

from __future__ import annotations

import pytest
from flup.server.fcgi_base import encode_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from fcgidaemon.fastcgi import ProtocolError, decode_params

names = st.binary(min_size=0, max_size=300)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(names, st.binary(max_size=70000), max_size=8))
def test_round_trip_with_flups_encoder(pairs):
    data = b"".join(encode_pair(k, v) for k, v in pairs.items())
    decoded = decode_params(data)
    assert decoded == {k.decode("latin-1"): v.decode("latin-1") for k, v in pairs.items()}


@pytest.mark.parametrize("data", [
    b"\x05",  # name length only
    b"\x05\x05abc",  # pair longer than the stream
    b"\x80\x00",  # a 4-byte length cut short
    b"\x01\x80\x00\x00",  # a 4-byte value length cut short
    b"\x01\x01ab\x03",  # a second pair cut short
])
def test_truncated_or_lying_lengths_are_protocol_errors(data):
    with pytest.raises(ProtocolError):
        decode_params(data)
