"""Protocol Buffers' wire format, the small part MindSpore's files need (no protobuf package).

A message is a sequence of fields, each a key (``field_number << 3 | wire_type``, a varint)
followed by its value: a varint (wire type 0), 8 bytes (1), a length-delimited run of bytes (2:
strings, bytes, embedded messages, packed repeated numbers) or 4 bytes (5). Fields may come in any
order and a repeated field may appear many times; unknown fields are skipped.

``Region`` reads the fields of a message lying in a file without loading it: the value of a
length-delimited field is returned as its (offset, length) in the file, so a tensor's bytes are
never read while its message is indexed. Malformed or truncated input raises ``WireError``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

VARINT, I64, LEN, I32 = 0, 1, 2, 5
_FIXED = {I64: 8, I32: 4}
WINDOW = 1 << 16  # bytes read at a time while walking keys and lengths


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message (or end too early)."""


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``buf[pos]``."""
    return _varint(buf.__getitem__, pos, len(buf))


def _varint(byte_at: Callable[[int], int], pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos`` of a message ending at ``end``."""
    value = shift = 0
    while True:
        if pos >= end:
            raise WireError(f"a varint at byte {pos} runs past the end of its message")
        byte = byte_at(pos)
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError(f"a varint at byte {pos} is longer than 10 bytes")


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of an in-memory message; value: int for varints, the
    bytes for the other wire types."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, kind = key >> 3, key & 7
        if kind == VARINT:
            value, pos = read_varint(buf, pos)
        elif kind == LEN or kind in _FIXED:
            if kind == LEN:
                size, pos = read_varint(buf, pos)
            else:
                size = _FIXED[kind]
            if pos + size > len(buf):
                raise WireError(f"field {number} runs past the end of its message")
            value, pos = bytes(buf[pos:pos + size]), pos + size
        else:
            raise WireError(f"field {number} has wire type {kind}, which no MindSpore message uses")
        if number == 0:
            raise WireError("a field number is 0")
        yield number, kind, value


def packed_varints(value: int | bytes) -> list[int]:
    """A repeated integer field's values at one occurrence: one varint, or a packed run of them."""
    if isinstance(value, int):
        return [value]
    out, pos = [], 0
    while pos < len(value):
        item, pos = read_varint(value, pos)
        out.append(item)
    return out


def signed(value: int) -> int:
    """A varint read as a signed int32 / int64 (negative values are sign-extended to 64 bits)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


class Reader:
    """A file read through a small window, for walking the keys and lengths of its messages."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self._base, self._buf = 0, b""

    def byte(self, pos: int) -> int:
        if not self._base <= pos < self._base + len(self._buf):
            self._base, self._buf = pos, os.pread(self.fd, min(WINDOW, max(self.size - pos, 1)), pos)
            if not self._buf:
                raise WireError(f"the file ends at byte {pos}, inside a message")
        return self._buf[pos - self._base]

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (a short field's value: a name, a dtype string)."""
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise WireError(f"the file ends inside the {size} bytes at byte {offset}")
        return data

    def region(self, start: int, size: int) -> Region:
        return Region(self, start, start + size)


class Region:
    """The fields of a message stored in a file at ``[start, end)``."""

    def __init__(self, reader: Reader, start: int, end: int):
        self.reader, self.start, self.end = reader, start, end

    def _varint(self, pos: int) -> tuple[int, int]:
        return _varint(self.reader.byte, pos, self.end)

    def fields(self) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
        """``(field number, wire type, value)``: value an int for varints, ``(offset, length)`` in
        the file for the other wire types (nothing of it read)."""
        pos = self.start
        while pos < self.end:
            key, pos = self._varint(pos)
            number, kind = key >> 3, key & 7
            if number == 0:
                raise WireError(f"byte {pos}: a field number is 0")
            if kind == VARINT:
                value, pos = self._varint(pos)
                yield number, kind, value
                continue
            if kind == LEN:
                size, pos = self._varint(pos)
            elif kind in _FIXED:
                size = _FIXED[kind]
            else:
                raise WireError(f"byte {pos}: field {number} has wire type {kind}, which no MindSpore message uses")
            if pos + size > self.end:
                raise WireError(f"byte {pos}: field {number} of {size} bytes runs past the end of its message "
                                f"(byte {self.end})")
            yield number, kind, (pos, size)
            pos += size


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------

def varint(value: int) -> bytes:
    """The varint of a non-negative integer (negative ones as int64: ten bytes)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(number: int, kind: int) -> bytes:
    return varint(number << 3 | kind)


def len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field holding ``payload``."""
    return key(number, LEN) + varint(len(payload)) + payload


def len_prefix(number: int, size: int) -> bytes:
    """The key and length of a length-delimited field whose ``size`` bytes follow separately."""
    return key(number, LEN) + varint(size)


def varint_field(number: int, value: int) -> bytes:
    return key(number, VARINT) + varint(value)
