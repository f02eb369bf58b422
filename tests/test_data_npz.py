"""npz reading in place (FileRows) and the streaming, atomic npz writer."""

import os
import pickle

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.data import DatasetError
from refimpl.data.npz import FileRows, load_member, read_members, write_npz

ARRAY = numpy.arange(50 * 3 * 2, dtype=numpy.int16).reshape(50, 3, 2)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("npz") / "a.npz"
    numpy.savez(path, a=ARRAY, b=numpy.ones(3))
    info = read_members(path, "test")["a"]
    assert not info.compressed and info.data_offset is not None
    r = load_member(path, "a", info, "test")
    assert isinstance(r, FileRows) and r.shape == ARRAY.shape and r.dtype == ARRAY.dtype and len(r) == 50
    return r


@given(idx=st.lists(st.integers(-50, 49), max_size=40))
def test_file_rows_index_like_numpy(rows, idx):
    idx = numpy.array(idx, dtype=numpy.int64)
    numpy.testing.assert_array_equal(rows[idx], ARRAY[idx])


def test_file_rows_ints_slices_errors_and_pickling(rows):
    numpy.testing.assert_array_equal(rows[7], ARRAY[7])
    numpy.testing.assert_array_equal(rows[-1], ARRAY[-1])
    numpy.testing.assert_array_equal(rows[10:20], ARRAY[10:20])
    numpy.testing.assert_array_equal(rows[45:], ARRAY[45:])
    assert rows[30:10].shape == (0, 3, 2)
    for bad in (50, -51, numpy.array([0, 50]), slice(0, 10, 2), numpy.array([[1]]), numpy.array([0.5])):
        with pytest.raises(IndexError):
            rows[bad]
    numpy.testing.assert_array_equal(pickle.loads(pickle.dumps(rows))[[3, 1]], ARRAY[[3, 1]])


def test_compressed_members_load_into_memory_and_truncation_is_caught(tmp_path):
    numpy.savez_compressed(tmp_path / "c.npz", a=ARRAY)
    info = read_members(tmp_path / "c.npz", "test")["a"]
    assert info.compressed and info.data_offset is None
    loaded = load_member(tmp_path / "c.npz", "a", info, "test")
    assert isinstance(loaded, numpy.ndarray)
    numpy.testing.assert_array_equal(loaded, ARRAY)
    numpy.savez(tmp_path / "s.npz", a=ARRAY)
    info = read_members(tmp_path / "s.npz", "test")["a"]
    with open(tmp_path / "s.npz", "r+b") as f:
        f.truncate(info.data_offset + 100)
    with pytest.raises(DatasetError, match="s.npz: member 'a' is truncated or corrupt"):
        load_member(tmp_path / "s.npz", "a", info, "test")


def test_write_npz_streams_chunks_and_is_atomic(tmp_path):
    chunks = (ARRAY[i:i + 16] for i in range(0, 50, 16))
    write_npz(tmp_path / "w.npz", {"a": (ARRAY.shape, ARRAY.dtype, chunks), "b": numpy.arange(4.0)})
    with numpy.load(tmp_path / "w.npz") as z:
        numpy.testing.assert_array_equal(z["a"], ARRAY)
        numpy.testing.assert_array_equal(z["b"], numpy.arange(4.0))
    with pytest.raises(ValueError, match="chunks gave 16 rows, expected 50"):
        write_npz(tmp_path / "x.npz", {"a": (ARRAY.shape, ARRAY.dtype, iter([ARRAY[:16]]))})
    with pytest.raises(ValueError, match="does not fit"):
        write_npz(tmp_path / "x.npz", {"a": (ARRAY.shape, ARRAY.dtype, iter([ARRAY[:, :2]]))})
    assert sorted(os.listdir(tmp_path)) == ["w.npz"]
