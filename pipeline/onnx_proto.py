"""The few top-level fields of an ONNX model file that pipe reads and writes, straight from
protobuf's wire format (https://protobuf.dev/programming-guides/encoding/), so that
``pipe export --format onnx`` does without the onnx package: importing it costs about 0.6 s
(its ml_dtypes extension), a fifth of the whole export of efficientnet_lite0.

A serialized ``ModelProto`` is a sequence of fields, each a varint tag ``number << 3 | wire type``
followed by its value; a parser accepts them in any order, and a repeated field's entries are
the fields with its number in the order they come. So a model's metadata is rewritten by copying
every other top-level field's bytes unchanged and appending the new values; nothing below the top
level (the graph, its weights) is decoded.
"""

from __future__ import annotations

from collections.abc import Iterator

PRODUCER_NAME, PRODUCER_VERSION, OPSET_IMPORT, METADATA_PROPS = 2, 3, 8, 14  # ModelProto field numbers
DEFAULT_DOMAINS = ("", "ai.onnx")  # the standard operators' domain, as OperatorSetIdProto spells it
VARINT, I64, LEN, I32 = 0, 1, 2, 5  # the wire types ONNX uses (3 and 4, groups, are long deprecated)
FIXED_BYTES = {I64: 8, I32: 4}


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The unsigned varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def fields(message) -> Iterator[tuple[int, int | memoryview, memoryview]]:
    """``(number, value, raw)`` for each field of a serialized message: the value is an int
    (varint and fixed-size fields, unsigned) or the payload of a length-delimited one; ``raw`` is
    the whole field, tag included. ValueError when the bytes are not a protobuf message."""
    data = memoryview(message)
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == LEN:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire in FIXED_BYTES:
            value, pos = int.from_bytes(data[pos:pos + FIXED_BYTES[wire]], "little"), pos + FIXED_BYTES[wire]
        else:
            raise ValueError(f"wire type {wire} at byte {start}")
        if number == 0 or pos > len(data):
            raise ValueError(f"field {number} at byte {start} is malformed or runs past the end")
        yield number, value, data[start:pos]


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | LEN) + _varint(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    return _length_delimited(number, text.encode("utf-8"))


def _entries(model, number: int) -> Iterator[dict[int, int | memoryview]]:
    """Field number -> value of each ``number`` submessage of ``model`` (the last value wins, as
    for protobuf's singular fields)."""
    for n, entry, _ in fields(model):
        if n == number:
            if not isinstance(entry, memoryview):
                raise ValueError(f"field {number} is not a message")
            yield {n: v for n, v, _ in fields(entry)}


def _text(entry: dict, number: int) -> str:
    value = entry.get(number, b"")
    if isinstance(value, int):
        raise ValueError(f"field {number} is not a string")
    return str(value, "utf-8")  # UnicodeDecodeError is a ValueError


def opsets(model) -> dict[str, int]:
    """Domain -> opset version of a serialized ModelProto's ``opset_import`` (OperatorSetIdProto:
    domain = 1, version = 2); the default domain is ``""``."""
    found = {}
    for entry in _entries(model, OPSET_IMPORT):
        domain, version = _text(entry, 1), entry.get(2, 0)
        if not isinstance(version, int):
            raise ValueError("an opset version is not a number")
        found["" if domain in DEFAULT_DOMAINS else domain] = version
    return found


def metadata(model) -> dict[str, str]:
    """A serialized ModelProto's ``metadata_props`` (StringStringEntryProto: key = 1, value = 2)."""
    return {_text(entry, 1): _text(entry, 2) for entry in _entries(model, METADATA_PROPS)}


def with_metadata(model, producer: str, version: str, props: dict[str, str]) -> bytes:
    """The serialized ModelProto with its producer name and version and its ``metadata_props``
    replaced: every other top-level field is kept byte for byte."""
    replaced = (PRODUCER_NAME, PRODUCER_VERSION, METADATA_PROPS)
    out = bytearray()
    for number, _, raw in fields(model):
        if number not in replaced:
            out += raw
    out += _string(PRODUCER_NAME, producer) + _string(PRODUCER_VERSION, version)
    for key, value in props.items():
        out += _length_delimited(METADATA_PROPS, _string(1, key) + _string(2, value))
    return bytes(out)
