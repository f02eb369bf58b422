"""Built-in synthetic dSprites against the geometry in shared/notes/datasets.md."""

import numpy
import pytest

from refimpl.data import dsprites as real
from refimpl.data import synthetic_dsprites as syn
from refimpl.data.synthetic_dsprites import SyntheticDSprites, render

P = numpy.linspace(0.0, 1.0, 32)

HEART_MASK = """
...#####....#####...
..#######..#######..
.########..########.
.##################.
####################
####################
.##################.
.##################.
..################..
..################..
...##############...
....############....
.....##########.....
......########......
.......######.......
........####........
.........##.........
"""
HEART = numpy.array([[c == "#" for c in row] for row in HEART_MASK.split()], dtype=numpy.uint8)


def one(shape, scale, t, px, py):
    return render([shape], [scale], [t], [px], [py])[0]


def bbox(img):
    rows = numpy.flatnonzero(img.any(axis=1))
    cols = numpy.flatnonzero(img.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def crop(img):
    r0, r1, c0, c1 = bbox(img)
    return img[r0:r1, c0:c1]


def centroid(img):
    rows, cols = numpy.nonzero(img)
    return rows.mean() + 0.5, cols.mean() + 0.5  # pixel centres


def test_notes_heart_mask_is_what_the_notes_say():
    assert HEART.shape == (17, 20) and HEART.sum() == 222


def test_index_and_classes_match_the_official_order():
    idx = numpy.array([0, 1, 31, 32, 1023, 1024, 40959, 40960, 245759, 245760, 737279])
    cls = real.index_to_classes(idx)
    assert cls[-1].tolist() == [0, 2, 5, 39, 31, 31]
    assert cls[1].tolist() == [0, 0, 0, 0, 0, 1]  # posY fastest
    assert cls[3].tolist() == [0, 0, 0, 0, 1, 0]
    assert cls[5].tolist() == [0, 0, 0, 1, 0, 0]
    assert cls[7].tolist() == [0, 0, 1, 0, 0, 0]
    assert cls[9].tolist() == [0, 1, 0, 0, 0, 0]
    numpy.testing.assert_array_equal(real.classes_to_index(cls), idx)
    every = numpy.arange(0, 737280, 997)
    numpy.testing.assert_array_equal(real.classes_to_index(real.index_to_classes(every)), every)
    with pytest.raises(ValueError):
        real.classes_to_index([[0, 3, 0, 0, 0, 0]])


def test_latents_values_are_the_official_grid():
    ds = SyntheticDSprites()
    v = ds.latents_values([737279, 0, real.classes_to_index([0, 1, 2, 10, 5, 7])])
    numpy.testing.assert_allclose(v[0], [1, 3, 1.0, 2 * numpy.pi, 1, 1])
    numpy.testing.assert_allclose(v[1], [1, 1, 0.5, 0, 0, 0])
    numpy.testing.assert_allclose(v[2], [1, 2, 0.7, 10 * 2 * numpy.pi / 39, 5 / 31, 7 / 31])
    assert ds.latents_classes([737279]).tolist() == [[0, 2, 5, 39, 31, 31]]


def test_get_is_binary_float_nchw_and_deterministic():
    ds = SyntheticDSprites()
    idx = numpy.random.default_rng(3).integers(0, len(ds), 50)
    x = ds.get(idx)
    assert x.shape == (50, 1, 64, 64) and x.dtype == numpy.float32
    assert set(numpy.unique(x)) <= {0.0, 1.0}
    assert (x.reshape(50, -1).sum(axis=1) > 0).all()
    numpy.testing.assert_array_equal(ds.get(idx, numpy.float64), x)
    numpy.testing.assert_array_equal(ds.get(idx), x)
    # a mixed batch renders exactly as its images one by one
    for k in range(0, 50, 7):
        numpy.testing.assert_array_equal(ds.get(idx[k:k + 1])[0], x[k])
    with pytest.raises(IndexError):
        ds.get([737280])
    with pytest.raises(IndexError):
        ds.get([-1])


def test_sample_is_deterministic_for_a_seed():
    ds = SyntheticDSprites()
    x1, i1 = ds.sample(numpy.random.default_rng(7), 16)
    x2, i2 = ds.sample(numpy.random.default_rng(7), 16)
    numpy.testing.assert_array_equal(i1, i2)
    numpy.testing.assert_array_equal(x1, x2)
    numpy.testing.assert_array_equal(x1, ds.get(i1))


def test_orientation_0_and_39_draw_the_same_image():
    ds = SyntheticDSprites()
    rng = numpy.random.default_rng(0)
    cls = numpy.stack([numpy.zeros(30, int), rng.integers(0, 3, 30), rng.integers(0, 6, 30),
                       numpy.zeros(30, int), rng.integers(0, 32, 30), rng.integers(0, 32, 30)], axis=1)
    last = cls.copy()
    last[:, 3] = 39
    numpy.testing.assert_array_equal(ds.get(real.classes_to_index(cls)), ds.get(real.classes_to_index(last)))


@pytest.mark.parametrize("s", list(numpy.linspace(0.5, 1.0, 6)))
def test_square_area_and_side(s):
    side = 19.2 * s
    areas = []
    for px in P[::3]:
        img = one(0, s, 0.0, px, P[31 - 3 * int(px * 10)])
        r0, r1, c0, c1 = bbox(img)
        assert abs((r1 - r0) - side) <= 1 and abs((c1 - c0) - side) <= 1
        areas.append(int(img.sum()))
    assert abs(numpy.mean(areas) - side ** 2) <= 0.03 * side ** 2
    # turned by 45 degrees the area is unchanged (up to pixelation)
    turned = [one(0, s, numpy.pi / 4, px, px).sum() for px in P[::4]]
    assert abs(numpy.mean(turned) - side ** 2) <= 0.05 * side ** 2


@pytest.mark.parametrize("s", [0.5, 0.8, 1.0])
def test_ellipse_area_and_axes(s):
    exact = numpy.pi * 12.76 * 7.22 * s * s
    areas = [one(1, s, t, px, py).sum() for t in (0.0, 0.7, 2.0) for px in P[::5] for py in P[2::6]]
    assert abs(numpy.mean(areas) - exact) <= 0.03 * exact
    r0, r1, c0, c1 = bbox(one(1, s, 0.0, 0.5, 0.5))
    assert abs((c1 - c0) - 2 * 12.76 * s) <= 1.5  # long axis horizontal at t = 0
    assert abs((r1 - r0) - 2 * 7.22 * s) <= 1.5


def test_heart_at_scale_1_matches_the_notes():
    shapes, areas, mismatches = [], [], []
    for px in P:
        for py in P[::2]:
            img = one(2, 1.0, 0.0, px, py)
            c = crop(img)
            shapes.append(c.shape)
            areas.append(int(img.sum()))
            if c.shape == HEART.shape:
                mismatches.append(int((c != HEART).sum()))
    values, counts = numpy.unique(numpy.array(shapes), axis=0, return_counts=True)
    assert tuple(values[counts.argmax()]) == (17, 20)  # bounding box 20 wide, 17 tall
    assert abs(numpy.mean(areas) - 222) <= 5 and max(abs(a - 222) for a in areas) <= 9
    assert numpy.median(mismatches) <= 10
    # centred on a pixel corner (posX = posY = 0: centre (16, 16)) the mask is symmetric like the notes'
    c = crop(one(2, 1.0, 0.0, 0.0, 0.0))
    assert c.shape == HEART.shape
    numpy.testing.assert_array_equal(c, c[:, ::-1])
    assert int((c != HEART).sum()) <= 6


def test_heart_at_scale_half_matches_the_notes():
    shapes, areas = [], []
    for px in P:
        img = one(2, 0.5, 0.0, px, P[(7 * int(px * 31)) % 32])
        shapes.append(crop(img).shape)
        areas.append(int(img.sum()))
    values, counts = numpy.unique(numpy.array(shapes), axis=0, return_counts=True)
    assert tuple(values[counts.argmax()]) == (9, 10)
    assert abs(numpy.mean(areas) - 58) <= 3 and max(abs(a - 58) for a in areas) <= 8


def test_heart_lobes_point_up():
    c = crop(one(2, 1.0, 0.0, 0.5, 0.5))
    top_runs = numpy.count_nonzero(numpy.diff(numpy.concatenate([[0], c[0], [0]])) == 1)
    assert top_runs == 2  # two lobes, a notch between them
    assert c[-1].sum() <= 2 and c[-1].sum() >= 1  # a single tip at the bottom
    # turned half a turn about a pixel corner, it is the same mask upside down
    up, down = one(2, 1.0, 0.0, 0.0, 0.0), one(2, 1.0, numpy.pi, 0.0, 0.0)
    assert int((down[:32, :32] != up[:32, :32][::-1, ::-1]).sum()) <= 2


@pytest.mark.parametrize("shape", [0, 1])
def test_position_sets_the_centroid(shape):
    rng = numpy.random.default_rng(1)
    for _ in range(12):
        ix, iy = rng.integers(0, 32, 2)
        t = rng.uniform(0, 2 * numpy.pi)
        row, col = centroid(one(shape, 0.75, t, P[ix], P[iy]))
        assert abs(col - (16 + 32 * P[ix])) <= 0.5  # posX moves right
        assert abs(row - (16 + 32 * P[iy])) <= 0.5  # posY moves down


def test_rotation_is_counter_clockwise_on_screen():
    # t = pi/2: the ellipse stands upright
    r0, r1, c0, c1 = bbox(one(1, 1.0, numpy.pi / 2, 0.5, 0.5))
    assert (r1 - r0) > 20 and (c1 - c0) < 17
    # small positive t: the right end moves up (smaller row), the left end down
    for k in (1, 2, 3):
        t = real.ORIENTATIONS[k]
        img = one(1, 1.0, t, P[15], P[15])
        rows, cols = numpy.nonzero(img)
        centre_row = 16 + 32 * P[15] - 0.5
        right = rows[cols >= cols.max() - 1].mean()
        left = rows[cols <= cols.min() + 1].mean()
        assert right < centre_row - 1 and left > centre_row + 1
    # through the dataset: orientation index 10 (t = 92 degrees) is near-vertical
    ds = SyntheticDSprites()
    img = ds.get([real.classes_to_index([0, 1, 5, 10, 16, 16])])[0, 0]
    r0, r1, c0, c1 = bbox(img)
    assert (r1 - r0) > (c1 - c0) + 8


def test_cache_holds_the_same_images(monkeypatch):
    monkeypatch.setattr(syn, "N_IMAGES", 3000)
    cached = SyntheticDSprites(cache=True, chunk=1024)
    assert len(cached) == 3000 and cached.images.shape == (3000, 64, 64) and cached.images.dtype == numpy.uint8
    idx = numpy.array([2999, 0, 1500, 1024, 1023])
    numpy.testing.assert_array_equal(cached.get(idx), SyntheticDSprites().get(idx))
