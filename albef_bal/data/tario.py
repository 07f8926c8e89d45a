"""Reading and writing WebDataset tar shards.

Reading is a small streaming parser of the tar format rather than ``tarfile`` in stream
mode, because the skip accounting needs to tell a complete shard from a truncated one:
``tarfile`` ends iteration silently when a stream stops at a member boundary or inside a
header, so a shard cut short by a failed upload or a dropped connection would look
complete. Here a stream that ends before the end-of-archive block, or inside a member,
raises :class:`TruncatedTar`.

Samples follow the WebDataset convention: consecutive members whose names share the part
before the first dot of the file name (``dir/0001.jpg``, ``dir/0001.txt`` ->
key ``dir/0001``) form one sample, keyed by their lower-cased extensions (``jpg``, ``txt``).
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import BinaryIO, Iterator, Optional

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")


class TruncatedTar(IOError):
    """The tar stream ended early (no end-of-archive block, or a member cut short).
    ``member`` is the name of the member that was cut, when its header was read."""

    def __init__(self, message: str, member: Optional[str] = None):
        super().__init__(message)
        self.member = member


class CorruptTar(IOError):
    """A header block whose checksum does not match (garbage in the stream)."""


def read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at the end of the stream (pipes may return short reads)."""
    data = stream.read(n)
    if data is None:
        data = b""
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 encoding of large numbers
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else value
    field = field.rstrip(b"\0 ").lstrip(b" ")
    return int(field, 8) if field else 0


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == unsigned


def _pax_path(data: bytes) -> Optional[str]:
    """The ``path`` record of a pax extended header (records are ``"LEN key=value\\n"``)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        record = data[space + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        pos += length
    return None


def iter_tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of each regular file, in archive order.

    Raises :class:`TruncatedTar` if the stream ends before the end-of-archive marker and
    :class:`CorruptTar` on a header with a bad checksum; everything yielded before that is
    complete.
    """
    long_name: Optional[str] = None
    while True:
        header = read_exact(stream, BLOCK)
        if len(header) < BLOCK:
            raise TruncatedTar("stream ended without the end-of-archive block" if not header
                               else "stream ended inside a header")
        if header == _ZERO_BLOCK:
            return  # end of archive (the second zero block and the padding do not matter)
        try:
            ok = _checksum_ok(header)
            size = _octal(header[124:136])
        except ValueError:  # number fields that are not octal: not a tar header
            ok = False
        if not ok:
            raise CorruptTar("tar header checksum mismatch")
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345]:
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}"
        kind = header[156:157]
        padded = -(-size // BLOCK) * BLOCK
        data = read_exact(stream, padded)
        if len(data) < padded:
            raise TruncatedTar(f"stream ended inside member {name!r} ({len(data)} of {size} bytes)",
                               member=long_name or name)
        data = data[:size] if padded != size else data
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if kind == b"x":  # pax header for the next member
            long_name = _pax_path(data) or long_name
            continue
        if long_name is not None:
            name, long_name = long_name, None
        if kind in _REGULAR:
            yield name, data


def split_key(name: str) -> tuple[Optional[str], str]:
    """``"a/b/0001.seg.jpg"`` -> ``("a/b/0001", "seg.jpg")``; no dot in the file name -> (None, "")."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return None, ""
    return name[:dot], name[dot + 1:].lower()


def iter_samples(stream: BinaryIO, url: str = "") -> Iterator[dict]:
    """Samples (``{"__key__", "__url__", ext: bytes, ...}``) of one tar stream.

    A sample in progress when the stream turns out to be truncated is dropped, since
    nothing says whether more of its files were to come, unless the member that was cut
    already belongs to the next sample. The exception is then re-raised.
    """
    current: Optional[dict] = None
    try:
        for name, data in iter_tar_members(stream):
            key, ext = split_key(name)
            if key is None or name.startswith("__") and key.endswith("__"):
                continue  # directories' stray files and WebDataset's __meta__ members
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current.setdefault(ext, data)  # a duplicated extension keeps its first file
    except TruncatedTar as e:
        if current is not None and e.member is not None and split_key(e.member)[0] != current["__key__"]:
            yield current
        raise
    if current is not None:
        yield current


# -------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes samples to one tar file with fixed metadata, so equal input gives equal bytes.

    The file appears under its final name only when :meth:`close` succeeds (it is written
    to ``path + ".tmp"`` first), so a killed writer never leaves a shard that looks whole.
    """

    def __init__(self, path: str):
        self.path = path
        self._tmp = path + ".tmp"
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w")
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
