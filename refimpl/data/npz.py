"""Reading one array out of a ``.npz`` file, lazily where the format allows.

A member stored without compression (``numpy.savez``, :func:`write_npz`) is opened in
place as a :class:`FileRows`: indexing it reads just the requested rows from disk
(``os.pread``), so the process holds only the batch. (A ``numpy.memmap`` would do the
same job, but the kernel maps whole large page-cache folios into the process, so its
resident size grows towards the file's size even though only a batch is read.)
A compressed member (``numpy.savez_compressed``, e.g. the official dSprites file)
cannot be read in place, so it is decompressed once into memory, in its own dtype
(uint8 images stay uint8). Headers are read first, so a wrong shape or dtype is
reported before any large read.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy

from .errors import DatasetError


@dataclass(frozen=True)
class MemberInfo:
    """One npz member's array header and where its data starts."""

    shape: tuple
    dtype: numpy.dtype
    fortran_order: bool
    compressed: bool
    data_offset: int | None  # byte offset of the array data in the .npz, if stored uncompressed


def _read_header(fp):
    version = numpy.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = numpy.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = numpy.lib.format.read_array_header_2_0(fp)
    else:  # (3, 0): utf-8 field names; numpy has no public reader for it
        shape, fortran, dtype = numpy.lib.format._read_array_header(fp, version)
    return shape, fortran, dtype


def read_members(path: str | os.PathLike, title: str) -> dict[str, MemberInfo]:
    """Headers of every ``.npy`` member of the npz at ``path``, without reading array data.

    Raises DatasetError (naming ``title`` and ``path``) if the file is not a readable npz.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {}
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fp:
                    shape, fortran, dtype = _read_header(fp)
                    header_len = fp.tell()
                offset = None
                if info.compress_type == zipfile.ZIP_STORED:
                    with open(path, "rb") as raw:
                        raw.seek(info.header_offset)
                        local = raw.read(30)
                    if len(local) != 30 or local[:4] != b"PK\x03\x04":
                        raise zipfile.BadZipFile("bad local file header")
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    offset = info.header_offset + 30 + name_len + extra_len + header_len
                infos[info.filename[:-4]] = MemberInfo(
                    tuple(shape), numpy.dtype(dtype), bool(fortran), info.compress_type != zipfile.ZIP_STORED, offset
                )
            return infos
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, struct.error) as exc:
        raise DatasetError(f"{title} file {path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from None


class FileRows:
    """A C-ordered array stored raw in a file, read row by row on indexing (read-only).

    ``rows[i]``, ``rows[a:b]`` and ``rows[index_array]`` (1-d integers) return new
    ndarrays; consecutive rows are read with one ``os.pread``.
    """

    def __init__(self, path: str | os.PathLike, offset: int, shape: tuple, dtype):
        self.path = os.fspath(path)
        self.offset = int(offset)
        self.shape = tuple(shape)
        self.dtype = numpy.dtype(dtype)
        self.ndim = len(self.shape)
        self.row_bytes = int(numpy.prod(self.shape[1:], dtype=numpy.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None

    def __getstate__(self):  # a file descriptor does not pickle: reopen on unpickling
        return {"path": self.path, "offset": self.offset, "shape": self.shape, "dtype": self.dtype}

    def __setstate__(self, state):
        self.__init__(state["path"], state["offset"], state["shape"], state["dtype"])

    def _read(self, start: int, stop: int, out: numpy.ndarray) -> None:
        want = (stop - start) * self.row_bytes
        data = os.pread(self._fd, want, self.offset + start * self.row_bytes)
        if len(data) != want:
            raise EOFError(f"{self.path}: rows {start}..{stop} lie past the end of the file")
        out[...] = numpy.frombuffer(data, self.dtype).reshape(out.shape)

    def __getitem__(self, key) -> numpy.ndarray:
        n = self.shape[0]
        if isinstance(key, (int, numpy.integer)):
            k = int(key) + n if key < 0 else int(key)
            if not 0 <= k < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            out = numpy.empty((1,) + self.shape[1:], self.dtype)
            self._read(k, k + 1, out)
            return out[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("FileRows slices must have step 1")
            out = numpy.empty((max(stop - start, 0),) + self.shape[1:], self.dtype)
            if stop > start:
                self._read(start, stop, out)
            return out
        idx = numpy.asarray(key)
        if idx.ndim != 1 or not (idx.size == 0 or numpy.issubdtype(idx.dtype, numpy.integer)):
            raise IndexError("FileRows takes an int, a slice or a 1-d integer array")
        idx = numpy.where(idx < 0, idx + n, idx).astype(numpy.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        out = numpy.empty((idx.size,) + self.shape[1:], self.dtype)
        order = numpy.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        # runs of consecutive rows (in sorted order) are read with one call each
        breaks = numpy.flatnonzero(numpy.diff(sorted_idx) != 1) + 1
        rows = numpy.empty_like(out)
        for run in numpy.split(numpy.arange(idx.size), breaks) if idx.size else []:
            lo, hi = int(sorted_idx[run[0]]), int(sorted_idx[run[-1]]) + 1
            if hi - lo == run.size:
                self._read(lo, hi, rows[run[0]:run[-1] + 1])
            else:  # repeated indices: read the row once, copy it
                block = numpy.empty((hi - lo,) + self.shape[1:], self.dtype)
                self._read(lo, hi, block)
                rows[run[0]:run[-1] + 1] = block[sorted_idx[run] - lo]
        out[order] = rows
        return out


def load_member(path: str | os.PathLike, key: str, info: MemberInfo, title: str, lazy: bool = True):
    """The array ``key`` of the npz at ``path`` (header ``info`` from :func:`read_members`).

    A :class:`FileRows` reading rows on demand when stored uncompressed (C order) and
    ``lazy``; otherwise a numpy array read into memory.
    """
    if info.dtype.hasobject:
        raise DatasetError(f"{title} file {path}: member {key!r} holds Python objects, expected a numeric array")
    try:
        if lazy and info.data_offset is not None and not info.fortran_order and len(info.shape) >= 1:
            nbytes = int(numpy.prod(info.shape, dtype=numpy.int64)) * info.dtype.itemsize
            if info.data_offset + nbytes > os.path.getsize(path):
                raise EOFError(f"member {key!r} needs {nbytes} bytes but the file ends first")
            return FileRows(path, info.data_offset, info.shape, info.dtype)
        with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as fp:
            return numpy.lib.format.read_array(fp, allow_pickle=False)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise DatasetError(
            f"{title} file {path}: member {key!r} is truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from None


def write_npz(path: str | os.PathLike, members: dict) -> None:
    """Write an uncompressed (lazily readable) npz at ``path``, atomically.

    ``members`` maps a key to an array, or to ``(shape, dtype, chunks)`` where
    ``chunks`` yields C-ordered arrays that together fill ``shape`` along axis 0, so
    a member larger than memory can be streamed in. The file appears at ``path``
    only once complete (temporary file in the same folder, then ``os.replace``).
    """
    from ..atomic import atomic_write

    def write(raw):
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, value in members.items():
                with zf.open(key + ".npy", "w", force_zip64=True) as f:
                    if isinstance(value, numpy.ndarray):
                        numpy.lib.format.write_array(f, value, allow_pickle=False)
                        continue
                    shape, dtype, chunks = value
                    dtype = numpy.dtype(dtype)
                    numpy.lib.format.write_array_header_1_0(
                        f, {"descr": numpy.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                            "shape": tuple(shape)})
                    rows = 0
                    for chunk in chunks:
                        chunk = numpy.ascontiguousarray(chunk, dtype=dtype)
                        if chunk.shape[1:] != tuple(shape[1:]):
                            raise ValueError(f"{key}: chunk of shape {chunk.shape} does not fit {tuple(shape)}")
                        f.write(chunk.tobytes())
                        rows += chunk.shape[0]
                    if rows != shape[0]:
                        raise ValueError(f"{key}: chunks gave {rows} rows, expected {shape[0]}")

    atomic_write(path, write)
