"""The parser contract (docs/parser-contract.md), run on both parsers.

Every valid input is parsed whole, one byte at a time and with trailing
data; every rule is a row of malformed inputs with the status it must give.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from parser_cases import (
    BAD_CHUNKED,
    BAD_REQUESTS,
    BAD_RESPONSES,
    CHUNKED_TRAILING,
    HEAD_RESPONSE,
    PARSER_IDS,
    REQUEST_ATTRS,
    REQUEST_LIMITS,
    RESPONSE_ATTRS,
    VALID_CHUNKED,
    VALID_REQUESTS,
    VALID_RESPONSES,
    attrs,
    decode_chunked,
    load_parser,
    outcome,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=PARSER_IDS)
def parser(request):
    return load_parser(request.param)


def prefix_ends(length: int) -> range | list[int]:
    """Where to cut data when feeding it piece by piece: every byte for
    small inputs, a sparse but deterministic set for the big limit cases."""
    if length <= 2048:
        return range(1, length + 1)
    return sorted(set(range(1, length, 509)) | {length - 1, length})


def bytewise(parse, data: bytes, **kwargs):
    """outcome_bytewise, over prefix_ends only (the limit cases are big)."""
    for end in prefix_ends(len(data)):
        result = outcome(parse, data[:end], **kwargs)
        if result[0] != "none":
            return result
    return ("none",)


# --- the API itself -------------------------------------------------------

def test_exported_names(parser):
    assert (parser.BODY_NONE, parser.BODY_LENGTH, parser.BODY_CHUNKED,
            parser.BODY_CLOSE) == (0, 1, 2, 3)
    assert issubclass(parser.ParseError, parser.HTTPError)
    assert issubclass(parser.HTTPError, Exception)
    with pytest.raises(parser.ParseError) as info:
        parser.parse_request(b"GET / HTTP/1.1\r\n\r\n")
    assert info.value.status == 400
    assert isinstance(info.value.message, str) and "host" in info.value.message.lower()


@pytest.mark.parametrize("environment, expected", [
    ({"EDGEPROXY_NO_EXTENSIONS": "1"}, "py"),
    ({}, None),
])
def test_implementation_choice(environment, expected):
    env = {k: v for k, v in os.environ.items() if k != "EDGEPROXY_NO_EXTENSIONS"}
    env.update(environment, PYTHONPATH=ROOT)
    code = ("import edgeproxy.http as h, edgeproxy.http._pure as p;"
            "print(h.IMPLEMENTATION, h.parse_request is p.parse_request,"
            " h.implementations()['c-parser'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    implementation, is_pure, has_ext = out[0], out[1] == "True", out[2] == "True"
    assert implementation == (expected or ("c" if has_ext else "py"))
    assert is_pure == (implementation == "py")


# --- requests -------------------------------------------------------------

@pytest.mark.parametrize("case", VALID_REQUESTS.values(), ids=VALID_REQUESTS.keys())
def test_valid_request(parser, case):
    raw, expected = case
    assert attrs(parser.parse_request(raw), REQUEST_ATTRS) == expected


@pytest.mark.parametrize("case", VALID_REQUESTS.values(), ids=VALID_REQUESTS.keys())
def test_valid_request_byte_by_byte(parser, case):
    raw, expected = case
    for end in range(len(raw)):
        assert parser.parse_request(raw[:end]) is None, raw[:end]
    assert attrs(parser.parse_request(raw), REQUEST_ATTRS) == expected


@pytest.mark.parametrize("trailing", [
    b"hello", b"GET /next HTTP/1.1\r\nHost: example.com\r\n\r\n", b"\r\n", b"\x00\xff junk",
], ids=["body", "pipelined", "crlf", "junk"])
@pytest.mark.parametrize("case", VALID_REQUESTS.values(), ids=VALID_REQUESTS.keys())
def test_valid_request_trailing_data(parser, case, trailing):
    raw, expected = case
    assert attrs(parser.parse_request(raw + trailing), REQUEST_ATTRS) == expected


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request(parser, case):
    raw, status = case
    with pytest.raises(parser.ParseError) as info:
        parser.parse_request(raw)
    assert info.value.status == status, info.value.message


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_byte_by_byte(parser, case):
    raw, status = case
    assert bytewise(parser.parse_request, raw) == ("error", status)


@pytest.mark.parametrize("case", REQUEST_LIMITS.values(), ids=REQUEST_LIMITS.keys())
def test_request_limit_boundaries(parser, case):
    raw, limits, status = case
    result = outcome(parser.parse_request, raw, **limits)
    if status is None:
        assert result[0] == "head" and parser.parse_request(raw, **limits).head_length == len(raw)
    else:
        assert result == ("error", status)
    assert bytewise(parser.parse_request, raw, **limits) == result


def test_default_max_fields_is_100(parser):
    head = b"GET / HTTP/1.1\r\nHost: example.com\r\n" + b"X-A: 1\r\n" * 99
    assert len(parser.parse_request(head + b"\r\n").headers) == 100
    with pytest.raises(parser.ParseError) as info:
        parser.parse_request(head + b"X-A: 1\r\n\r\n")
    assert info.value.status == 431


def test_default_max_line_is_8192(parser):
    line = b"GET /" + b"a" * (8192 - 16) + b" HTTP/1.1\r\n"
    assert len(line) == 8192
    rest = b"Host: example.com\r\n\r\n"
    assert parser.parse_request(line + rest).target == line[4:-11]
    with pytest.raises(parser.ParseError) as info:
        parser.parse_request(line[:5] + b"a" + line[5:] + rest)
    assert info.value.status == 414


def test_incomplete_is_none_not_error(parser):
    for partial in (b"", b"\r", b"\r\n", b"\r\n\r", b"G", b"GET", b"GET ", b"GET /",
                    b"GET / HTTP/1.", b"GET / HTTP/1.1\r", b"GET / HTTP/1.1\r\nHost",
                    b"GET / HTTP/1.1\r\nHost: a\r\n\r"):
        assert parser.parse_request(partial) is None, partial


# --- responses ------------------------------------------------------------

@pytest.mark.parametrize("case", VALID_RESPONSES.values(), ids=VALID_RESPONSES.keys())
def test_valid_response(parser, case):
    raw, expected = case
    assert attrs(parser.parse_response(raw), RESPONSE_ATTRS) == expected


@pytest.mark.parametrize("case", VALID_RESPONSES.values(), ids=VALID_RESPONSES.keys())
def test_valid_response_byte_by_byte_and_trailing(parser, case):
    raw, expected = case
    for end in range(len(raw)):
        assert parser.parse_response(raw[:end]) is None, raw[:end]
    for trailing in (b"", b"body bytes", b"HTTP/1.1 200 OK\r\n\r\n", b"\r\n"):
        assert attrs(parser.parse_response(raw + trailing), RESPONSE_ATTRS) == expected


def test_response_to_head_has_no_body(parser):
    raw, expected = HEAD_RESPONSE
    assert attrs(parser.parse_response(raw, method=b"HEAD"), RESPONSE_ATTRS) == expected
    assert parser.parse_response(raw, method=b"GET").body == parser.BODY_LENGTH


@pytest.mark.parametrize("status", [100, 101, 103, 199, 204, 304])
def test_no_body_statuses(parser, status):
    raw = b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status
    response = parser.parse_response(raw)
    assert (response.status, response.body) == (status, parser.BODY_NONE)
    assert response.upgrade == (status == 101)


@pytest.mark.parametrize("case", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
def test_bad_response(parser, case):
    raw, kwargs = case
    with pytest.raises(parser.ParseError) as info:
        parser.parse_response(raw, **kwargs)
    assert info.value.status == 502, info.value.message
    assert bytewise(parser.parse_response, raw, **kwargs) == ("error", 502)


# --- chunked bodies -------------------------------------------------------

@pytest.mark.parametrize("case", VALID_CHUNKED.values(), ids=VALID_CHUNKED.keys())
def test_chunked_whole_and_byte_by_byte(parser, case):
    encoded, body, kwargs = case
    assert decode_chunked(parser, [encoded], **kwargs) == (body, len(encoded), True)
    single_bytes = [encoded[i:i + 1] for i in range(len(encoded))]
    assert decode_chunked(parser, single_bytes, **kwargs) == (body, len(encoded), True)


@pytest.mark.parametrize("case", VALID_CHUNKED.values(), ids=VALID_CHUNKED.keys())
def test_chunked_split_everywhere(parser, case):
    encoded, body, kwargs = case
    for cut in range(len(encoded) + 1):
        pieces = [encoded[:cut], encoded[cut:]]
        assert decode_chunked(parser, pieces, **kwargs) == (body, len(encoded), True), cut


@pytest.mark.parametrize("case", VALID_CHUNKED.values(), ids=VALID_CHUNKED.keys())
def test_chunked_pipelined_bytes_are_not_consumed(parser, case):
    encoded, body, kwargs = case
    decoder = parser.ChunkedDecoder(**kwargs)
    pieces, consumed = decoder.feed(encoded + CHUNKED_TRAILING)
    assert (b"".join(pieces), consumed, decoder.done) == (body, len(encoded), True)
    assert decoder.feed(CHUNKED_TRAILING) == ([], 0)
    # the same with the end of the message and the next one in one piece
    decoder = parser.ChunkedDecoder(**kwargs)
    pieces, consumed = decoder.feed(encoded[:-1])
    assert consumed == len(encoded) - 1 and not decoder.done
    assert decoder.feed(encoded[-1:] + CHUNKED_TRAILING) == ([], 1)
    assert decoder.done


def test_chunked_pieces_are_the_data(parser):
    decoder = parser.ChunkedDecoder()
    assert decoder.feed(b"3\r\nabc\r\n4\r\nde") == ([b"abc", b"de"], 13)
    assert decoder.feed(b"fg\r\n0\r\n") == ([b"fg"], 7)
    assert not decoder.done
    assert decoder.feed(b"\r\n") == ([], 2)
    assert decoder.done


def test_chunked_largest_size_accepted(parser):
    decoder = parser.ChunkedDecoder()
    assert decoder.feed(b"7fffffffffffffff\r\nabc") == ([b"abc"], 21)
    assert not decoder.done


@pytest.mark.parametrize("case", BAD_CHUNKED.values(), ids=BAD_CHUNKED.keys())
def test_bad_chunked(parser, case):
    encoded, kwargs = case
    assert decode_chunked(parser, [encoded], **kwargs) == ("error", 400)
    single_bytes = [encoded[i:i + 1] for i in range(len(encoded))]
    assert decode_chunked(parser, single_bytes, **kwargs) == ("error", 400)
