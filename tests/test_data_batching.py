"""Seeded splits and the checkpointable batch iterator."""

import json

import numpy
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl.data import BatchIterator, eval_batches, open_dataset, split_indices
from refimpl.rng import generator


@given(n=st.integers(1, 3000), frac=st.floats(0.0, 0.9), seed=st.integers(0, 2**32))
def test_split_is_disjoint_complete_and_seeded(n, frac, seed):
    assume(int(round(frac * n)) < n)  # at least one training item: split_indices refuses the rest (tested below)
    train, held = split_indices(n, frac, generator(seed))
    assert train.size + held.size == n and held.size == int(round(frac * n))
    assert numpy.intersect1d(train, held).size == 0
    numpy.testing.assert_array_equal(numpy.sort(numpy.concatenate([train, held])), numpy.arange(n))
    assert (numpy.diff(train) > 0).all() and (numpy.diff(held) > 0).all()
    train2, held2 = split_indices(n, frac, generator(seed))
    numpy.testing.assert_array_equal(train, train2)
    numpy.testing.assert_array_equal(held, held2)


def test_split_depends_on_the_seed_and_checks_arguments():
    a = split_indices(1000, 100, generator(0))[1]
    b = split_indices(1000, 100, generator(1))[1]
    assert a.size == b.size == 100 and not numpy.array_equal(a, b)
    for bad in (1000, -1, 1.0, -0.1):
        with pytest.raises(ValueError):
            split_indices(1000, bad, generator(0))


@given(n=st.integers(1, 200), batch=st.integers(1, 64), seed=st.integers(0, 2**32))
def test_each_epoch_visits_every_index_once(n, batch, seed):
    it = BatchIterator(n, batch, generator(seed), drop_last=False)
    for epoch in range(3):
        seen = [next(it) for _ in range(it.batches_per_epoch)]
        assert it.epoch == epoch  # the next epoch begins with the next batch
        assert all(b.dtype == numpy.int64 for b in seen)
        assert all(b.size == batch for b in seen[:-1]) and 1 <= seen[-1].size <= batch
        numpy.testing.assert_array_equal(numpy.sort(numpy.concatenate(seen)), numpy.arange(n))


@given(n=st.integers(2, 300), batch=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_drop_last_gives_full_batches_without_repeats_in_an_epoch(n, batch, seed):
    batch = min(batch, n)
    idx = numpy.arange(n) * 3 + 7  # arbitrary index set
    it = BatchIterator(idx, batch, generator(seed))
    per_epoch = n // batch
    assert it.batches_per_epoch == per_epoch
    for epoch in range(2):
        got = numpy.concatenate([next(it) for _ in range(per_epoch)])
        assert got.size == per_epoch * batch and numpy.unique(got).size == got.size
        assert numpy.isin(got, idx).all()
    next(it)
    assert it.epoch == 2


@given(n=st.integers(1, 150), batch=st.integers(1, 50), before=st.integers(0, 30), after=st.integers(1, 30),
       drop_last=st.booleans(), shuffle=st.booleans(), seed=st.integers(0, 2**32))
def test_resume_continues_bit_for_bit(n, batch, before, after, drop_last, shuffle, seed):
    batch = min(batch, n)
    idx = numpy.arange(n) * 2
    it = BatchIterator(idx, batch, generator(seed), shuffle=shuffle, drop_last=drop_last)
    for _ in range(before):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))  # a checkpoint survives a JSON round trip
    expected = [next(it) for _ in range(after)]
    resumed = BatchIterator(idx, batch, generator(seed + 1), shuffle=shuffle, drop_last=drop_last)
    next(resumed)  # its own position is overwritten
    resumed.load_state_dict(state)
    assert resumed.epoch == state["epoch"] and resumed.position == state["position"]
    for want in expected:
        numpy.testing.assert_array_equal(next(resumed), want)
    if shuffle:  # and the generator is back in step too
        assert resumed.rng.bit_generator.state == it.rng.bit_generator.state


def test_same_seed_same_stream_and_different_seed_different_stream():
    a = [next(it) for it in [BatchIterator(1000, 64, generator(5))] for _ in range(40)]
    b = [next(it) for it in [BatchIterator(1000, 64, generator(5))] for _ in range(40)]
    c = [next(it) for it in [BatchIterator(1000, 64, generator(6))] for _ in range(40)]
    assert all(numpy.array_equal(x, y) for x, y in zip(a, b))
    assert not numpy.array_equal(numpy.concatenate(a), numpy.concatenate(c))
    # epochs are reshuffled: epoch 2 is not epoch 1 again (15 batches of 64 per epoch)
    assert not numpy.array_equal(numpy.concatenate(a[:15]), numpy.concatenate(a[15:30]))


def test_global_numpy_random_state_is_untouched():
    before = numpy.random.get_state()[1].copy()
    it = BatchIterator(500, 32, generator(0))
    for _ in range(30):
        next(it)
    split_indices(500, 0.1, generator(0))
    numpy.testing.assert_array_equal(numpy.random.get_state()[1], before)


def test_no_shuffle_is_sequential():
    it = BatchIterator(numpy.arange(10, 20), 4, None, shuffle=False, drop_last=False)
    got = [next(it).tolist() for _ in range(4)]
    assert got == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19], [10, 11, 12, 13]]


def test_state_from_another_index_set_is_refused():
    state = BatchIterator(100, 10, generator(0)).state_dict()
    with pytest.raises(ValueError, match="indices_crc32"):
        BatchIterator(numpy.arange(1, 101), 10, generator(0)).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(100, 20, generator(0)).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        BatchIterator(100, 10, generator(0)).load_state_dict({**state, "position": 101})


def test_bad_arguments():
    with pytest.raises(ValueError, match="no full batch"):
        BatchIterator(10, 11, generator(0))
    with pytest.raises(TypeError, match="Generator"):
        BatchIterator(10, 2, numpy.random.RandomState(0))
    with pytest.raises(ValueError):
        BatchIterator(numpy.array([], dtype=int), 1, generator(0))
    with pytest.raises(ValueError):
        BatchIterator(10, 0, generator(0))


@given(n=st.integers(0, 100), batch=st.integers(1, 30))
def test_eval_batches_cover_the_indices_in_order(n, batch):
    idx = numpy.arange(n) + 5
    got = list(eval_batches(idx, batch))
    assert len(got) == -(-n // batch)
    assert all(b.size == batch for b in got[:-1])
    numpy.testing.assert_array_equal(numpy.concatenate(got) if got else numpy.array([], int), idx)


def test_training_loop_sketch_on_synthetic_dsprites():
    ds = open_dataset("synthetic-dsprites")
    train, held = split_indices(len(ds), 10000, generator(1))
    it = BatchIterator(train, 64, generator(2))
    x = ds.get(next(it))
    assert x.shape == (64, 1, 64, 64) and x.dtype == numpy.float32
    assert numpy.intersect1d(next(it), held).size == 0
    last = list(eval_batches(held, 4096))[-1]
    assert last.size == 10000 - 2 * 4096
