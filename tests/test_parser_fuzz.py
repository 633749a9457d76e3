"""Property tests: no input can make a parser misbehave, or the two disagree.

For arbitrary bytes and for valid messages with a few bytes mutated:
- only a head, None or HTTPError ever comes out (any other exception fails);
- the result is the same twice, and the same whether the input arrives whole
  or one byte at a time (a server sees both);
- the pure and the compiled parsers give the same result (when compiled).
Examples are derandomized so a run is reproducible; the case tables of
test_parser.py are the seeds the mutations start from.
"""
from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parser_cases import (
    PARSER_IDS,
    VALID_CHUNKED,
    VALID_REQUESTS,
    VALID_RESPONSES,
    decode_chunked,
    load_parser,
    outcome,
    outcome_bytewise,
)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Bytes and pieces that matter to an HTTP/1.1 parser, to mutate with.
SPECIAL_BYTES = b"\r\n\t :,;\"\x00\x01\x0b\x7f\x80\xff/?#*@[]0123456789aAfFgG+-_."
PIECES = [b"\r\n", b"\r", b"\n", b" ", b"\t", b"\r\n\r\n", b"\r\n ", b"HTTP/1.0",
          b"HTTP/1.1", b"Host: a\r\n", b"Content-Length: 5\r\n", b"Content-Length: 5, 6",
          b"Transfer-Encoding: chunked\r\n", b"chunked", b"gzip,", b"Connection: close\r\n",
          b"Expect: 100-continue\r\n", b"Upgrade: x\r\n", b"http://", b"OPTIONS", b"CONNECT",
          b"0\r\n\r\n", b"ffffffffffffffff", b";ext", b"HEAD", b"204", b"304", b"101"]

REQUEST_SEEDS = [raw for raw, _ in VALID_REQUESTS.values() if len(raw) < 300]
RESPONSE_SEEDS = [raw for raw, _ in VALID_RESPONSES.values()]
CHUNKED_SEEDS = [encoded for encoded, _, _ in VALID_CHUNKED.values()]
REQUEST_LIMITS = [{}, {"max_line": 24}, {"max_head": 64}, {"max_fields": 2}]
RESPONSE_LIMITS = [{}, {"max_head": 48}, {"max_fields": 1}, {"method": b"HEAD"}]
CHUNKED_LIMITS = [{}, {"max_line": 6}, {"max_trailer": 12}]


@st.composite
def mutated(draw, seeds):
    """A seed message with 1-4 bytes or pieces inserted, replaced or deleted."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "replace", "delete", "piece", "cut"]))
        if action == "piece":
            data[pos:pos] = draw(st.sampled_from(PIECES))
        elif action == "cut":
            del data[pos:]
        elif action == "delete":
            del data[pos:pos + draw(st.integers(1, 3))]
        else:
            byte = draw(st.sampled_from(SPECIAL_BYTES) | st.integers(0, 255))
            data[pos:pos + (action == "replace")] = bytes([byte])
    return bytes(data)


def soup():
    """Messages glued from HTTP-looking pieces and random bytes."""
    pieces = st.sampled_from(PIECES + [b"GET", b"/", b"a", b":", b"5", b",", b"-"])
    return st.lists(pieces | st.binary(max_size=3), max_size=30).map(b"".join)


def inputs(seeds):
    return st.binary(max_size=200) | mutated(seeds) | soup()


@pytest.fixture(scope="module", params=PARSER_IDS)
def parser(request):
    return load_parser(request.param)


@pytest.fixture(scope="module")
def both():
    return load_parser("py-parser"), load_parser("c-parser")


def check_head_parser(parse, data: bytes, kwargs: dict):
    whole = outcome(parse, data, **kwargs)
    assert outcome(parse, data, **kwargs) == whole, "not deterministic"
    assert outcome_bytewise(parse, data, **kwargs) == whole, "whole and byte-by-byte differ"
    return whole


def chunked_results(parser, data: bytes, cuts: list[int], kwargs: dict):
    """Decoding data whole, byte by byte and cut at the given places."""
    bounds = [0] + sorted(set(cuts)) + [len(data)]
    return (decode_chunked(parser, [data], **kwargs),
            decode_chunked(parser, [data[i:i + 1] for i in range(len(data))], **kwargs),
            decode_chunked(parser, [data[a:b] for a, b in pairwise(bounds)], **kwargs))


# --- each parser on its own -----------------------------------------------

@FUZZ
@given(data=inputs(REQUEST_SEEDS), kwargs=st.sampled_from(REQUEST_LIMITS))
def test_request_parser_is_total_and_consistent(parser, data, kwargs):
    check_head_parser(parser.parse_request, data, kwargs)


@FUZZ
@given(data=inputs(RESPONSE_SEEDS), kwargs=st.sampled_from(RESPONSE_LIMITS))
def test_response_parser_is_total_and_consistent(parser, data, kwargs):
    result = check_head_parser(parser.parse_response, data, kwargs)
    assert result[0] != "error" or result[1] == 502


@FUZZ
@given(data=inputs(CHUNKED_SEEDS), kwargs=st.sampled_from(CHUNKED_LIMITS),
       cuts=st.lists(st.integers(0, 200), max_size=4))
def test_chunked_decoder_is_total_and_consistent(parser, data, kwargs, cuts):
    whole, bytewise, split = chunked_results(parser, data, cuts, kwargs)
    assert bytewise == whole and split == whole
    if whole[0] != "error":
        body, consumed, done = whole
        assert consumed == len(data) or done


# --- the two parsers against each other -----------------------------------

@FUZZ
@given(data=inputs(REQUEST_SEEDS), kwargs=st.sampled_from(REQUEST_LIMITS))
def test_request_parsers_agree(both, data, kwargs):
    py, c = both
    assert outcome(c.parse_request, data, **kwargs) == outcome(py.parse_request, data, **kwargs)


@FUZZ
@given(data=inputs(RESPONSE_SEEDS), kwargs=st.sampled_from(RESPONSE_LIMITS))
def test_response_parsers_agree(both, data, kwargs):
    py, c = both
    assert outcome(c.parse_response, data, **kwargs) == outcome(py.parse_response, data, **kwargs)


@FUZZ
@given(data=inputs(CHUNKED_SEEDS), kwargs=st.sampled_from(CHUNKED_LIMITS))
def test_chunked_decoders_agree(both, data, kwargs):
    py, c = both
    assert decode_chunked(c, [data], **kwargs) == decode_chunked(py, [data], **kwargs)
