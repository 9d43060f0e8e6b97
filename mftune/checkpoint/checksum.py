"""Checksums of tensor bytes: hashed as mftune writes a .safetensors file, checked as blocks are read.

Every tensor mftune writes to a .safetensors file carries one xxh3_64 hash per ``CHUNK`` (1 MiB) of
its bytes, chunks counted from the tensor's own first byte (so the dim-0 shards of power-of-two
sizes that FSDP reads start on a chunk). They sit in the header metadata under ``KEY``:
``{"algorithm": "xxh3_64", "chunk": 1048576, "tensors": {name: "<16 hex digits per chunk>..."}}``.
The width is fixed, so the header's length is known before any byte is hashed: the streaming writer
writes a placeholder of the final length first and rewrites it in place at the end.

A read checks every chunk it touches (``RangeCheck``: the bytes of a range as they arrive, the
partial chunks at its ends completed with small reads of the missing bytes). The one exception is a
column block of a matrix (a row-parallel weight under tensor parallelism): there each chunk is
checked by the one reader whose columns hold the chunk's ``owner_column``, so a job whose ranks read
all the columns checks every chunk once instead of every rank reading every row whole
(docs/performance.md, "Checksums", has both costs). Likewise a tensor that several ranks hold whole
(a replicated embedding under tensor parallelism) is checked by one of them (``skipped``). Files
without checksums (foreign ones) read as before. ``MFTUNE_VERIFY_CHECKSUMS=0`` turns the checks off;
files are still written with checksums.
MindSpore ``.ckpt`` files have no place for them.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import xxhash

from mftune.errors import CheckpointError

KEY = "mftune_checksums"  # the header metadata key (not one of read_metadata's mftune_* entries)
ALGORITHM = "xxh3_64"
CHUNK = 2**20  # bytes per hash
HEX = 16  # hex digits per hash
ENV = "MFTUNE_VERIFY_CHECKSUMS"
_MIX = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads chunk numbers over the columns
_MASK = 2**64 - 1


_SKIPPED: contextvars.ContextVar[bool] = contextvars.ContextVar("mftune_checks_skipped", default=False)


def verify_enabled() -> bool:
    """False when the user set MFTUNE_VERIFY_CHECKSUMS=0 (read at each call), or inside ``skipped()``."""
    return not _SKIPPED.get() and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def skipped(skip: bool = True) -> Iterator[None]:
    """Reads inside are not checked when ``skip``: another rank reads and checks the same bytes (a tensor
    every rank holds whole, ``mftune.checkpoint.load``), as for column blocks (``check_column_block``)."""
    token = _SKIPPED.set(skip)
    try:
        yield
    finally:
        _SKIPPED.reset(token)


def chunk_count(nbytes: int, chunk: int = CHUNK) -> int:
    return -(-nbytes // chunk)


def hash_chunks(data: memoryview) -> str:
    """The hex hashes of ``data``'s chunks, concatenated (16 digits each)."""
    return "".join(xxhash.xxh3_64_hexdigest(data[i:i + CHUNK]) for i in range(0, len(data), CHUNK))


def encode(sums: dict[str, str]) -> str:
    """The metadata value of ``KEY`` for ``{tensor name: hash_chunks(its bytes)}``."""
    return json.dumps({"algorithm": ALGORITHM, "chunk": CHUNK, "tensors": sums}, separators=(",", ":"))


def placeholder(sizes: Iterable[tuple[str, int]]) -> dict[str, str]:
    """``{name: zeros}`` of the final length for tensors of ``(name, nbytes)``: ``encode`` of it is as long
    as ``encode`` of the real hashes."""
    return {name: "0" * HEX * chunk_count(nbytes) for name, nbytes in sizes}


def decode(value: str, sizes: dict[str, int], path: str) -> tuple[int, dict[str, str]]:
    """(chunk size, ``{name: hex hashes}``) from the ``KEY`` value of ``path``, whose tensors have ``sizes``
    (bytes); a record that does not fit the tensors is an error (the header is damaged)."""
    try:
        record = json.loads(value)
        chunk, tensors = record["chunk"], record["tensors"]
        if record["algorithm"] != ALGORITHM or not isinstance(chunk, int) or chunk <= 0:
            raise ValueError(f"algorithm {record['algorithm']!r}, chunk {chunk!r}: not {ALGORITHM} over whole chunks")
        for name, hexes in tensors.items():
            if not isinstance(hexes, str) or len(hexes) != HEX * chunk_count(sizes[name], chunk):
                raise ValueError(f"tensor {name}: {len(hexes)} hex digits for {sizes[name]} bytes")
            int(hexes or "0", 16)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path}: its header's checksum record ({KEY}) does not describe its "
                              f"tensors ({type(exc).__name__}: {str(exc)[:200]}): the header is damaged. Re-copy "
                              f"the file (or set {ENV}=0 to read it unchecked).") from None
    return chunk, tensors


class ChecksumMismatch(CheckpointError):
    """Bytes of ``path`` that differ from what was written; ``detail`` names the tensor, bytes and chunk."""

    def __init__(self, path: str, detail: str):
        self.path, self.detail = path, detail
        super().__init__(f"checkpoint {path}: {detail}: the file is damaged (disk, copy or transfer). Re-copy it "
                         f"or resume from an earlier checkpoint.")


@dataclass(frozen=True)
class TensorSums:
    """The hashes of one tensor of one file, and how to read its bytes to check them."""
    path: str
    name: str
    hexes: str
    nbytes: int  # the tensor's size
    offset: int  # file offset of its first byte
    chunk: int = CHUNK

    def span(self, i: int) -> tuple[int, int]:
        """Chunk ``i``'s bytes [a, b) within the tensor."""
        return i * self.chunk, min((i + 1) * self.chunk, self.nbytes)

    def check(self, i: int, digest: int) -> None:
        if digest != int(self.hexes[i * HEX:(i + 1) * HEX], 16):
            a, b = self.span(i)
            raise ChecksumMismatch(self.path, f"tensor {self.name} bytes [{a}, {b}) (chunk {i}, file offset "
                                              f"{self.offset + a}) do not match the checksum written with it")

    def read(self, a: int, b: int) -> bytes:
        """The tensor's bytes [a, b), read from the file."""
        with open(self.path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), b - a, self.offset + a)
        if len(data) != b - a:
            raise CheckpointError(f"checkpoint {self.path} ends before the data of {self.name}: it is truncated.")
        return data

    def check_chunks(self, chunks: Iterable[int]) -> None:
        """Read and check whole chunks (into one buffer, reused)."""
        buf = memoryview(bytearray(self.chunk))
        with open(self.path, "rb", buffering=0) as f:
            for i in chunks:
                a, b = self.span(i)
                if os.preadv(f.fileno(), [buf[:b - a]], self.offset + a) != b - a:
                    raise CheckpointError(f"checkpoint {self.path} ends before the data of {self.name}: it is "
                                          f"truncated.")
                self.check(i, xxhash.xxh3_64_intdigest(buf[:b - a]))


class RangeCheck:
    """Checks the chunks that the tensor bytes [a, b) touch, fed in order as they are read (``feed``, then
    ``finish``): whole chunks are hashed in place; a chunk cut by ``a`` or ``b`` is hashed as its missing
    bytes (read here, at most a chunk each) + the bytes fed, so the caller's buffer holds just [a, b)."""

    def __init__(self, sums: TensorSums, a: int):
        self.sums, self.pos, self.state = sums, a, xxhash.xxh3_64()
        if a % sums.chunk:
            self.state.update(sums.read(a - a % sums.chunk, a))

    def feed(self, data: memoryview) -> None:
        done, chunk = 0, self.sums.chunk
        while done < len(data):
            i = self.pos // chunk
            end = self.sums.span(i)[1]
            take = min(end - self.pos, len(data) - done)
            if self.pos == i * chunk and take == end - self.pos:  # a whole chunk: hashed in place
                self.sums.check(i, xxhash.xxh3_64_intdigest(data[done:done + take]))
            else:
                self.state.update(data[done:done + take])
                if self.pos + take == end:
                    self.sums.check(i, self.state.intdigest())
                    self.state.reset()
            done += take
            self.pos += take

    def finish(self) -> None:
        if self.pos % self.sums.chunk and self.pos < self.sums.nbytes:
            i = self.pos // self.sums.chunk
            self.state.update(self.sums.read(self.pos, self.sums.span(i)[1]))
            self.sums.check(i, self.state.intdigest())


def owner_column(i: int, ncols: int) -> int:
    """The column whose reader checks chunk ``i`` of a matrix of ``ncols`` columns read in column blocks:
    spread over the columns by Fibonacci hashing, so every chunk has exactly one owner."""
    return ((i + 1) * _MIX & _MASK) % ncols


def check_column_block(sums: TensorSums, rows: tuple[int, int], cols: tuple[int, int], ncols: int,
                       row_bytes: int) -> None:
    """For a read of rows [r0, r1) x columns [c0, c1) of a matrix: check the chunks of those rows that
    this column block owns (``owner_column``); the readers of the other columns check the rest."""
    first, last = rows[0] * row_bytes // sums.chunk, (rows[1] * row_bytes - 1) // sums.chunk
    sums.check_chunks(i for i in range(first, last + 1) if cols[0] <= owner_column(i, ncols) < cols[1])


def content_hash(path: str, read_size: int = 8 * 2**20) -> str:
    """xxh3_128 of a file's bytes (hex), streamed ``read_size`` at a time (the identity of a file that
    carries no checksums, e.g. a Hugging Face download)."""
    digest, buf = xxhash.xxh3_128(), bytearray(read_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()

