"""Which generative factor does each latent dimension hold? Mutual information and MIG.

Section 4.3 says the 3 dimensions kept at tau = 35 on dSprites "probably" encode scale,
x and y. Where a dataset's generative factors are known, this module measures it:

1. Encode ``count`` images of the run's held-out split (``sample="heldout"``, the
   default) or of its training split (``"training"``: more images than a small
   held-out split has; which factor a dimension holds is a property of the code, not
   of generalisation): all of them if there are fewer, else a uniform random subset
   drawn from the ``factors`` stream of the split's seed (the split's indices are sorted, and
   dataset order follows the factors, so its first ``count`` would be one shape),
   in inference mode, as :mod:`refimpl.evaluate` does: BatchNorm
   running statistics, z = mu. Gates are 1[gamma > 0] (``GatedVAE.inference_gates``).
   codes: (N, n) on the host.
2. Factors: the dataset's discrete factor classes (``latents_classes``: dSprites and
   synthetic dSprites (shape, scale, orientation, posX, posY), Cars3D (car, azimuth,
   elevation); Shapes3D's ``labels`` values mapped to classes), dropping factors
   constant over the sample (dSprites' color). factors: (N, K) int.
3. Each latent code is discretised into ``bins`` equal-width histogram bins over its
   range in the sample (default 20, as Locatello et al. 2019 do), and the mutual
   information I(z_j; v_k) between bins and factor classes is the discrete plug-in
   estimate (in nats) from the joint histogram. Normalised by the factor's entropy
   H(v_k): a value in [0, 1].
4. MIG (Chen et al. 2018): for each factor, the largest normalised MI over the *open*
   dimensions minus the second largest (0 if only one dimension is open; the gap is 0
   if none is); MIG is the mean over factors.
5. The open dimensions *together* (:func:`joint_scores`): steps 3-4 score one dimension
   at a time, so a code that holds x and y in two rotated axes (z_0 = x + y,
   z_1 = x - y) scores low on both although together they hold both exactly. For
   each factor, a k-nearest-neighbour classifier (k = 10, Euclidean on the open codes
   scaled to unit variance, majority vote, ties to the nearer neighbours) is trained
   on one half of the sample (alternate positions) and predicts the other, and vice
   versa; reported are its accuracy and I(v_k; prediction) / H(v_k). By the data
   processing inequality the latter is a lower bound (up to its plug-in bias, listed
   as ``chance``) on I(open codes; v_k) / H(v_k), which no single-dimension number is.

Reading the numbers:

- Bins limit what can be measured: I(z_j; v_k) <= log(bins), so a factor with more
  values than bins cannot reach 1 (posX, 32 values, 20 bins: at most log 20 / log 32
  = 0.86); the JSON lists this bound per factor.
- The plug-in estimate is biased upwards by about (bins - 1)(values - 1) / (2 N) nats
  (N = 5000, 20 bins, posX: 0.06 nats, 0.02 after normalising): "near 0" means ~0.02.
  The JSON lists this, normalised, per factor as ``chance``: what a code independent
  of the factor scores on average; and ``chance_band`` (:func:`chance_band`): chance
  plus 3 standard deviations, the most such a code scores but on rare draws. The
  printout marks scores up to it with ``~`` (indistinguishable from chance), and its
  *reading* block sets the open dimensions together against the best one alone.
- Closed dimensions are reported too, marked closed, but are not in MIG. Their
  number is the MI of the encoder's mu_j, which the decoder never sees (it gets
  mu_j * 0); so what reaches the decoder through a closed dimension is nothing.
- Orientation cannot be recovered completely from images: the square looks the same
  every 90 degrees, the ellipse every 180, and classes 0 and 39 are the same angle.

Functions on arrays: :func:`entropy`, :func:`mutual_information`, :func:`discretize`,
:func:`mig_gaps`, :func:`mig`, :func:`factor_scores`, :func:`knn_predict`,
:func:`joint_scores`. On a run: :func:`run_factors`
(a JSON-able dict), :func:`format_table`, :func:`write_factors` (``RUN/factors.json``
atomically, and the heatmap ``RUN/factors.png`` when matplotlib is installed).

Command line (``refimpl factors RUN``): see :func:`add_arguments`.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy

from .atomic import atomic_write
from .backend import to_host
from .data import DatasetError, eval_batches
from .figures import no_plot_note, pyplot, save_figure
from .optionspec import OptionError
from .runfolder import NoRun, existing_run_path

JSON_FILE = "factors.json"
PNG_FILE = "factors.png"
DEFAULT_COUNT, DEFAULT_BINS, DEFAULT_BATCH = 5000, 20, 250
JOINT_K = 10  # neighbours of the joint k-NN classifier (step 5)
CHANCE_Z = 3.0  # a score within plug-in bias + 3 standard deviations cannot be told from chance
SPREAD = 1.5  # together / best one alone at or above this: the code spreads the factor over dimensions
SAMPLES = ("heldout", "training")  # which split of the run the images come from
SAMPLE_WORDS = {"heldout": "held-out", "training": "training"}


def _check_int(name: str, value, low: int) -> int:
    """``value`` as an int, or an :class:`OptionError` (a ValueError; exit 2 on the command line) naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < low:
        raise OptionError(f"{name}={value!r}: expected an integer >= {low}")
    return int(value)


# ----------------------------------------------------------------------------------------
# Estimators (host arrays)


def _discrete(a) -> tuple:
    """(labels 0..R-1 (N,), R) of a discrete variable a: (N,)."""
    values, inverse = numpy.unique(numpy.asarray(a).reshape(-1), return_inverse=True)
    return inverse.reshape(-1), values.size


def entropy(a) -> float:
    """H(a) in nats of the empirical distribution of a discrete variable a: (N,)."""
    a = numpy.asarray(a).reshape(-1)
    if a.size == 0:
        raise ValueError("entropy: empty sample")
    _, counts = numpy.unique(a, return_counts=True)
    p = counts / a.size
    return float(-(p * numpy.log(p)).sum())


def mutual_information(a, b) -> float:
    """Plug-in I(a; b) in nats of two discrete variables a, b: (N,), from their joint histogram."""
    (a, ra), (b, rb) = _discrete(a), _discrete(b)
    if a.size != b.size or a.size == 0:
        raise ValueError(f"mutual_information: samples of sizes {a.size} and {b.size}; expected equal and > 0")
    joint = numpy.bincount(a * rb + b, minlength=ra * rb).reshape(ra, rb) / a.size
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = (joint[nz] * numpy.log(joint[nz] / numpy.outer(pa, pb)[nz])).sum()
    return max(float(mi), 0.0)  # >= 0 exactly; rounding can give -1e-17


def plugin_bias(levels_a, levels_b, samples):
    """The plug-in MI's upward bias in nats, (R_a - 1)(R_b - 1) / (2 N), for R_a and R_b levels."""
    return (levels_a - 1) * (levels_b - 1) / (2 * samples)


def chance_band(levels_a, levels_b, samples, z: float = CHANCE_Z):
    """The top of what independent variables score, in nats: :func:`plugin_bias` plus ``z`` of its
    standard deviations. For independent variables 2 N I is about chi-squared with df = (R_a - 1)(R_b - 1)
    degrees of freedom (the G-test), so I has mean df / (2 N) and standard deviation sqrt(2 df) / (2 N).
    Where N is not much larger than R_a * R_b the mean overstates the bias, so the band errs wide."""
    df = numpy.maximum((numpy.asarray(levels_a) - 1) * (numpy.asarray(levels_b) - 1), 1)
    return plugin_bias(levels_a, levels_b, samples) * (1 + z * numpy.sqrt(2.0 / df))


def discretize(codes, bins: int = DEFAULT_BINS) -> numpy.ndarray:
    """Each column of codes: (N, n) into ``bins`` equal-width bins over its range: (N, n) int64 in 0..bins-1."""
    codes = numpy.asarray(codes, dtype=numpy.float64)
    bins = _check_int("bins", bins, 2)
    if codes.ndim != 2:
        raise ValueError(f"codes of shape {codes.shape}: expected (N, n)")
    bad = numpy.nonzero(~numpy.isfinite(codes).all(axis=0))[0]
    if bad.size:
        raise ValueError(f"codes: non-finite values in dimensions {bad.tolist()}")
    out = numpy.empty(codes.shape, dtype=numpy.int64)
    for j in range(codes.shape[1]):
        edges = numpy.histogram_bin_edges(codes[:, j], bins)
        out[:, j] = numpy.digitize(codes[:, j], edges[1:-1])  # the maximum goes into the last bin
    return out


def mig_gaps(normalized, open_dims=None) -> tuple:
    """Per factor, largest minus second largest normalised MI over the open dimensions.

    normalized: (n, K); open_dims: (n,) bool (default all open). Returns (gaps (K,),
    top (K, 2) int: the dimensions holding the largest and second largest, -1 where none).
    """
    normalized = numpy.asarray(normalized, dtype=numpy.float64)
    n, k = normalized.shape
    open_dims = numpy.ones(n, bool) if open_dims is None else numpy.asarray(open_dims, bool).reshape(-1)
    if open_dims.size != n:
        raise ValueError(f"open_dims has {open_dims.size} entries, expected {n}")
    dims = numpy.nonzero(open_dims)[0]
    gaps, top = numpy.zeros(k), numpy.full((k, 2), -1, dtype=numpy.int64)
    for f in range(k):
        order = dims[numpy.argsort(-normalized[dims, f], kind="stable")]
        if order.size:
            second = normalized[order[1], f] if order.size > 1 else 0.0
            gaps[f] = normalized[order[0], f] - second
            top[f, :min(order.size, 2)] = order[:2]
    return gaps, top


def mig(normalized, open_dims=None) -> float:
    """Mutual information gap (Chen et al. 2018): the mean over factors of :func:`mig_gaps`."""
    return float(mig_gaps(normalized, open_dims)[0].mean())


def factor_entropies(factors) -> numpy.ndarray:
    """H(v_k) in nats of each column of factors: (N, K); a ValueError if one is constant (entropy 0)."""
    h = numpy.array([entropy(factors[:, f]) for f in range(factors.shape[1])])
    if (h == 0).any():
        raise ValueError(f"factor columns {numpy.nonzero(h == 0)[0].tolist()} are constant over the sample "
                         f"(entropy 0): normalised MI is undefined; drop them")
    return h


def factor_scores(codes, factors, bins: int = DEFAULT_BINS, open_dims=None) -> dict:
    """MI of every latent code with every factor, normalised MI and MIG.

    codes: (N, n) float; factors: (N, K) int classes, none constant; open_dims: (n,) bool
    (default all open; MIG uses only these). Returns host arrays: ``mutual_information``
    (n, K) nats, ``entropy`` (K,) nats, ``normalized`` (n, K) = MI / H(v_k) in [0, 1],
    ``bound`` (K,) = min(1, log(bins) / H(v_k)), ``chance`` (K,) = (bins - 1)(R_k - 1)
    / (2 N H(v_k)), at most ``bound`` (the plug-in bias: about what an independent code
    scores, for N much larger than bins * R_k; R_k the factor's number of values),
    ``chance_band`` (K,) (:func:`chance_band` / H(v_k), at most ``bound``: a score at or
    below it cannot be told from chance), ``open`` (n,), ``gaps`` (K,), ``top`` (K, 2), and
    ``mig`` (float), ``bins``, ``sample_size``.
    """
    binned = discretize(codes, bins)
    factors = numpy.asarray(factors)
    if factors.ndim != 2 or factors.shape[0] != binned.shape[0]:
        raise ValueError(f"factors of shape {factors.shape}: expected ({binned.shape[0]}, K)")
    if not numpy.issubdtype(factors.dtype, numpy.integer):
        raise ValueError(f"factors have dtype {factors.dtype}: expected integer classes")
    n, k = binned.shape[1], factors.shape[1]
    h = factor_entropies(factors)
    mi = numpy.array([[mutual_information(binned[:, j], factors[:, f]) for f in range(k)] for j in range(n)])
    normalized = numpy.clip(mi / h, 0.0, 1.0)
    values = numpy.array([_discrete(factors[:, f])[1] for f in range(k)])
    bound = numpy.minimum(1.0, math.log(bins) / h)
    chance = numpy.minimum(bound, plugin_bias(bins, values, binned.shape[0]) / h)  # N >> bins * values
    band = numpy.minimum(bound, chance_band(bins, values, binned.shape[0]) / h)
    open_dims = numpy.ones(n, bool) if open_dims is None else numpy.asarray(open_dims, bool).reshape(-1)
    gaps, top = mig_gaps(normalized, open_dims)
    return {"mutual_information": mi, "entropy": h, "normalized": normalized,
            "bound": bound, "chance": chance, "chance_band": band, "open": open_dims,
            "gaps": gaps, "top": top, "mig": float(gaps.mean()), "bins": int(bins),
            "sample_size": int(binned.shape[0])}


def knn_predict(train_x, train_y, test_x, k: int = JOINT_K, chunk: int = 512) -> numpy.ndarray:
    """Majority vote of the k nearest (Euclidean) training points for each test point.

    train_x: (N, d) float; train_y: (N,) int labels; test_x: (M, d). Returns (M,) labels.
    Ties go to the label whose votes come from the nearer neighbours (each vote weighs
    1 + 1e-3 (k - rank) / k, rank 0 the nearest).
    """
    train_x, test_x = numpy.asarray(train_x, numpy.float64), numpy.asarray(test_x, numpy.float64)
    values, labels = numpy.unique(numpy.asarray(train_y).reshape(-1), return_inverse=True)
    k = min(_check_int("k", k, 1), train_x.shape[0])
    weight = 1.0 + 1e-3 * (k - numpy.arange(k)) / k
    out = numpy.empty(test_x.shape[0], dtype=values.dtype)
    sq_train = (train_x ** 2).sum(axis=1)
    for start in range(0, test_x.shape[0], chunk):
        t = test_x[start:start + chunk]
        d2 = sq_train[None, :] - 2.0 * t @ train_x.T  # + |t|^2, the same for every training point
        near = numpy.argpartition(d2, k - 1, axis=1)[:, :k]
        near = numpy.take_along_axis(near, numpy.argsort(numpy.take_along_axis(d2, near, 1), 1, kind="stable"), 1)
        votes = numpy.zeros((t.shape[0], values.size))
        numpy.add.at(votes, (numpy.arange(t.shape[0])[:, None], labels[near]), weight[None, :])
        out[start:start + chunk] = values[votes.argmax(axis=1)]
    return out


def joint_scores(codes, factors, k: int = JOINT_K) -> dict:
    """What the given codes hold *together* about each factor (module docstring, step 5).

    codes: (N, d) float, the open dimensions (d >= 1, N >= 2); factors: (N, K) int classes,
    none constant. Two-fold k-NN: even positions predict odd ones and vice versa (k at most
    N // 2, the size of a half; the ``k`` returned is the one used). Returns
    host arrays (K,): ``normalized`` = I(v_k; prediction) / H(v_k), ``accuracy``,
    ``majority`` (the accuracy of always guessing the commonest class), ``chance``
    = (R_k - 1)^2 / (2 N H(v_k)) (the plug-in bias), ``chance_band`` (:func:`chance_band`
    / H(v_k)), and ``k``.
    """
    codes = numpy.asarray(codes, dtype=numpy.float64)
    factors = numpy.asarray(factors)
    if codes.ndim != 2 or codes.shape[1] == 0 or codes.shape[0] < 2:
        raise ValueError(f"codes of shape {codes.shape}: expected (N, d) with d >= 1 and N >= 2")
    k = min(_check_int("k", k, 1), codes.shape[0] // 2)  # a half holds N // 2 or more
    if factors.ndim != 2 or factors.shape[0] != codes.shape[0]:
        raise ValueError(f"factors of shape {factors.shape}: expected ({codes.shape[0]}, K)")
    if not numpy.isfinite(codes).all():
        raise ValueError("codes: non-finite values")
    scale = codes.std(axis=0)
    x = (codes - codes.mean(axis=0)) / numpy.where(scale > 0, scale, 1.0)
    even = numpy.arange(x.shape[0]) % 2 == 0
    halves = (even, ~even)
    h = factor_entropies(factors)
    normalized, accuracy, majority, chance, band = (numpy.zeros(factors.shape[1]) for _ in range(5))
    for f in range(factors.shape[1]):
        y = factors[:, f]
        predicted = numpy.empty_like(y)
        for train, test in (halves, halves[::-1]):
            predicted[test] = knn_predict(x[train], y[train], x[test], k)
        normalized[f] = min(1.0, mutual_information(y, predicted) / h[f])
        accuracy[f] = float((predicted == y).mean())
        values, counts = numpy.unique(y, return_counts=True)
        majority[f] = counts.max() / y.size
        chance[f] = min(1.0, plugin_bias(values.size, values.size, y.size) / h[f])  # prediction: R_k levels
        band[f] = min(1.0, chance_band(values.size, values.size, y.size) / h[f])
    return {"normalized": normalized, "accuracy": accuracy, "majority": majority, "chance": chance,
            "chance_band": band, "k": int(k)}


# ----------------------------------------------------------------------------------------
# A run


def factor_classes(dataset, indices) -> tuple:
    """(classes (B, K) int64, factor names) of ``dataset`` at ``indices`` (B,).

    Datasets with ``latents_classes`` use them; Shapes3D's ``labels`` (factor values)
    become classes by their distinct values. Others raise a one-line :class:`DatasetError`.
    """
    names = getattr(dataset, "factor_names", None)
    if names is not None and hasattr(dataset, "latents_classes"):
        return numpy.asarray(dataset.latents_classes(indices), dtype=numpy.int64), tuple(names)
    labels = getattr(dataset, "labels", None)
    if names is not None and labels is not None and labels.ndim == 2 and labels.shape[1] == len(names):
        values = numpy.asarray(labels[numpy.asarray(indices, dtype=numpy.int64)])
        classes = numpy.stack([_discrete(values[:, f])[0] for f in range(len(names))], axis=1)
        return classes, tuple(names)
    name = getattr(dataset, "name", type(dataset).__name__)
    raise DatasetError(f"dataset {name!r} has no known generative factors; factors are known for dsprites, "
                     f"synthetic-dsprites, shapes3d and cars3d")


def encode(run, indices, batch_size: int = DEFAULT_BATCH) -> numpy.ndarray:
    """mu (N, n) float64 on the host for dataset ``indices`` (N,), in inference mode (BatchNorm running stats)."""
    model = run.model
    was_training = model.training
    model.eval()
    try:
        parts = [to_host(model.encoder.forward(run.images(idx), cache=False)[:, :model.n_latent])
                 for idx in eval_batches(indices, batch_size)]
    finally:
        model.train(was_training)
    return numpy.concatenate(parts).astype(numpy.float64)


def _pool(run, sample: str) -> numpy.ndarray:
    training, heldout = run.split
    return heldout if sample == "heldout" else training


def sample_indices(run, count: int, sample: str = "heldout") -> numpy.ndarray:
    """Up to ``count`` sorted dataset indices of the run's ``sample`` split: all when fewer, else a uniform
    random subset from the split seed's ``factors`` stream (the same subset every time; a branch's is its
    parent's)."""
    if sample not in SAMPLES:
        raise OptionError(f"sample={sample!r}: expected one of {', '.join(SAMPLES)}")
    pool = _pool(run, sample)
    if count >= pool.size:
        return pool
    from .training import stream

    return numpy.sort(stream(run.config.data_seed(), "factors").choice(pool, count, replace=False))


def run_factors(run, count: int = DEFAULT_COUNT, bins: int = DEFAULT_BINS, batch_size: int = DEFAULT_BATCH,
                sample: str = "heldout") -> dict:
    """Factor scores of a :class:`refimpl.training.Run` on ``count`` images of its ``sample`` split
    (:func:`sample_indices`): a JSON-able dict.

    Keys: run, step, dataset, n_latent, sample, sample_size, pool_size, bins, factors,
    constant_factors (dropped), factor_entropy, bound, chance, chance_band, gates, open_dims,
    mutual_information (n x K, nats), normalized_mi (n x K), mig_gap (factor -> gap),
    mig_dims (factor -> [largest, second] dims, null where none), mig, best_factor
    (per dimension: dim, open, factor, normalized_mi), joint (the open dimensions
    together, :func:`joint_scores`: k, and factor -> value dicts normalized_mi,
    accuracy, majority, chance, chance_band; null when no gate is open).
    """
    count = _check_int("count", count, 1)
    bins = _check_int("bins", bins, 2)
    batch_size = _check_int("batch_size", batch_size, 1)
    held = sample_indices(run, count, sample)
    classes, names = factor_classes(run.dataset, held)  # raises before encoding for datasets without factors
    varying = [f for f in range(classes.shape[1]) if numpy.unique(classes[:, f]).size > 1]
    if not varying:
        raise OptionError(f"count={count}: no factor varies over the {held.size} images sampled")
    gates = to_host(run.model.inference_gates()) > 0
    codes = encode(run, held, batch_size)
    s = factor_scores(codes, classes[:, varying], bins, open_dims=gates)
    kept = [names[f] for f in varying]
    norm = s["normalized"]
    joint = None
    if gates.any():
        j = joint_scores(codes[:, gates], classes[:, varying])
        joint = {"k": j["k"], **{key: dict(zip(kept, j[name].tolist())) for key, name in
                                 (("normalized_mi", "normalized"), ("accuracy", "accuracy"),
                                  ("majority", "majority"), ("chance", "chance"),
                                  ("chance_band", "chance_band"))}}
    return {
        "run": str(run.out), "step": int(run.state.step), "dataset": run.config.dataset,
        "n_latent": int(run.model.n_latent), "sample": sample, "sample_size": int(held.size),
        "pool_size": int(_pool(run, sample).size),
        "bins": bins, "factors": kept, "constant_factors": [n for f, n in enumerate(names) if f not in varying],
        "factor_entropy": s["entropy"].tolist(), "bound": s["bound"].tolist(), "chance": s["chance"].tolist(),
        "chance_band": s["chance_band"].tolist(),
        "gates": gates.astype(int).tolist(), "open_dims": numpy.nonzero(gates)[0].tolist(),
        "mutual_information": s["mutual_information"].tolist(), "normalized_mi": norm.tolist(),
        "mig_gap": dict(zip(kept, s["gaps"].tolist())),
        "mig_dims": {k: [int(d) if d >= 0 else None for d in top] for k, top in zip(kept, s["top"])},
        "mig": s["mig"],
        "best_factor": [{"dim": j, "open": bool(gates[j]), "factor": kept[int(norm[j].argmax())],
                         "normalized_mi": float(norm[j].max())} for j in range(norm.shape[0])],
        "joint": joint,
    }


def format_table(result: dict) -> str:
    """The printed report: how to read it; a row per open latent dimension, then the closed ones
    (index, gate, normalised MI per factor, ``~`` where within chance, best factor); bound, chance;
    MIG; the open dimensions together; and which scores cannot be told from chance."""
    names, norm, band = result["factors"], numpy.asarray(result["normalized_mi"]), result["chance_band"]
    width = max(6, *(len(n) for n in names))
    joint, n_open = result["joint"], len(result["open_dims"])
    dims = f"{n_open} open dimension{'s' if n_open != 1 else ''}"

    def cells(values, bands=None):
        return " ".join(f"{v:>{width}.3f}" + ("~" if bands is not None and v <= b else " ")
                        for v, b in zip(values, bands if bands is not None else values))

    def row(best):
        gate = "open" if best["open"] else "closed"
        return (f"{best['dim']:>4}  {gate:<6} " + cells(norm[best["dim"]], band)
                + f" {best['factor']} ({best['normalized_mi']:.2f})")

    dropped = f" (constant, left out: {', '.join(result['constant_factors'])})" if result["constant_factors"] else ""
    how = ("How to read: the decoder gets only the open dimensions"
           + ("; 'together' and 'reading' at the end say what they hold between them. " if joint is not None
              else ". ")
           + "The table scores one dimension at a time (1: it alone determines the factor); closed dimensions "
             "come last. A score marked ~ cannot be told from chance (what a code unrelated to the factor scores "
             "with this many images).")
    lines = [f"{result['run']} ({result['dataset']}, step {result['step']}): {result['sample_size']} of "
             f"{result['pool_size']} {SAMPLE_WORDS[result['sample']]} images, z = mu, {result['bins']} equal-width bins",
             *textwrap.wrap(how, 100), "",
             "normalised mutual information I(z_j; v_k) / H(v_k), one dimension at a time" + dropped,
             f"{'dim':>4}  {'gate':<6} " + " ".join(f"{n:>{width}} " for n in names) + " best"]
    lines += [row(b) for b in result["best_factor"] if b["open"]]
    closed = [b for b in result["best_factor"] if not b["open"]]
    if closed:
        lines.append("      closed: the encoder's mu_j, which the decoder never gets (it gets 0); not in MIG")
        lines += [row(b) for b in closed]
    lines.append(f"{'':>4}  {'bound':<6} " + cells(result["bound"])
                 + f" (log {result['bins']} / H(v_k): the most {result['bins']} bins can show)")
    lines.append(f"{'':>4}  {'chance':<6} " + cells(result["chance"])
                 + " (plug-in bias: what a code unrelated to the factor scores on average)")
    lines.append(f"{'':>4}  {'~ to':<6} " + cells(band)
                 + f" (chance + {CHANCE_Z:g} standard deviations: scores up to here are marked ~)")
    gaps = ", ".join(f"{k} {g:.3f}" for k, g in result["mig_gap"].items())
    lines.append(f"MIG over the {dims}: {result['mig']:.4f} ({gaps})")
    if joint is not None:
        jband = [joint["chance_band"][n] for n in names]
        lines += ["", f"the {dims} together ({joint['k']}-NN classifier, two-fold; "
                      "a lower bound on I(open z; v_k) / H(v_k)):"]
        for key, label, bands in (("normalized_mi", "I(v;pred)/H", jband), ("chance", "chance", None),
                                  ("accuracy", "accuracy", None), ("majority", "majority", None)):
            lines.append(f"{label:>12} " + cells([joint[key][n] for n in names], bands))
    return "\n".join(lines + [""] + _verdict(result))


def _verdict(result: dict) -> list[str]:
    """format_table's end: per factor, the open dimensions together against the best one alone, and
    what that means (within chance; spread over several dimensions, which MIG does not show)."""
    names, norm, band = result["factors"], numpy.asarray(result["normalized_mi"]), result["chance_band"]
    open_dims, joint = result["open_dims"], result["joint"]
    if joint is None:
        return ["no dimension is open: the decoder gets nothing from the code"]
    width = max(6, *(len(n) for n in names))
    lines = [f"reading (the {len(open_dims)} open dimensions; ~: within chance)",
             f"{'factor':>{width}}  together  best one alone"]
    spread = []
    for f, name in enumerate(names):
        best = open_dims[int(norm[open_dims, f].argmax())]
        alone, together = norm[best, f], joint["normalized_mi"][name]
        lines.append(f"{name:>{width}}  {together:>8.3f}{'~' if together <= joint['chance_band'][name] else ' '} "
                     f"{alone:.3f}{'~' if alone <= band[f] else ''} (z{best})")
        if together > joint["chance_band"][name] and together >= SPREAD * alone:
            spread.append(name)
    if all(norm[open_dims, f].max() <= band[f] for f in range(len(names))):
        lines += textwrap.wrap("every open dimension alone scores within chance on every factor: the table and MIG "
                               "say nothing here; read 'together' (or encode more images: --sample training "
                               "--count 20000)", 100)
    if spread:
        lines += textwrap.wrap(f"{', '.join(spread)}: held by the open dimensions together at least {SPREAD:g} times "
                               "better than by any one of them, so spread over several dimensions; the "
                               "one-dimension scores and MIG understate what the code holds", 100)
    return lines


def draw_heatmap(result: dict, path) -> Path | None:
    """The normalised MI as a heatmap (dims x factors, annotated) written to ``path``; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    norm = numpy.asarray(result["normalized_mi"])
    labels = [f"z{b['dim']}" + ("" if b["open"] else " (closed)") for b in result["best_factor"]]
    if result.get("joint") is not None:  # the open dimensions together, as the last row
        norm = numpy.vstack([norm, [result["joint"]["normalized_mi"][f] for f in result["factors"]]])
        labels.append(f"open together ({result['joint']['k']}-NN)")
    n, k = norm.shape
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 0.45 * n + 1.8))
    image = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for j in range(n):
        for f in range(k):
            ax.text(f, j, f"{norm[j, f]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if norm[j, f] > 0.6 else "white")
    ax.set_xticks(range(k), result["factors"])
    ax.set_yticks(range(n), labels)
    if len(labels) > len(result["best_factor"]):
        ax.axhline(n - 1.5, color="white", linewidth=2)
    ax.set_title(f"{result['dataset']}, step {result['step']}, {result['sample_size']} {SAMPLE_WORDS[result['sample']]} images, "
                 f"{result['bins']} bins: MIG {result['mig']:.3f}", fontsize=10)
    fig.colorbar(image, ax=ax, label="I(z_j; v_k) / H(v_k)")
    return save_figure(fig, path)


def write_factors(result: dict, json_path, png_path=None) -> list:
    """Write ``result`` as JSON (atomically) and, given ``png_path`` and matplotlib, the heatmap; returns the paths."""
    json_path = Path(json_path)
    text = json.dumps(result, indent=2, allow_nan=False)
    atomic_write(json_path, lambda f: f.write(text.encode()))
    written = [json_path]
    if png_path is not None:
        png = draw_heatmap(result, png_path)
        if png is None:
            no_plot_note(png_path, numbers_in=str(json_path))
        else:
            written.append(png)
    return written


# ----------------------------------------------------------------------------------------
# Command line: refimpl factors RUN


def add_arguments(parser) -> None:
    """The options of ``refimpl factors``."""
    from .backend import BACKENDS

    parser.add_argument("run", metavar="RUN", help="run folder (from refimpl train)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, metavar="N",
                        help=f"images to encode (default: {DEFAULT_COUNT}, or all of the split if fewer; "
                             "a seeded random subset if more)")
    parser.add_argument("--sample", choices=SAMPLES, default=SAMPLES[0],
                        help="the run's split the images come from (default: heldout)")
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS, metavar="B",
                        help=f"equal-width bins per latent code (default: {DEFAULT_BINS})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="B",
                        help=f"images per encoder batch (default: {DEFAULT_BATCH})")
    parser.add_argument("--out-json", default=None, metavar="FILE", help=f"default: RUN/{JSON_FILE}")
    parser.add_argument("--out-png", default=None, metavar="FILE", help=f"heatmap (default: RUN/{PNG_FILE})")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="array backend (default: $REFIMPL_BACKEND or numpy)")


def run(args) -> int:
    """``refimpl factors RUN``: print the table and MIG, write the JSON and the heatmap."""
    from .training import Run

    folder = existing_run_path(args.run)
    if not folder.is_dir():
        raise NoRun(f"{folder}: not a run folder (refimpl factors writes its files beside the run's)")
    _check_int("count", args.count, 1)
    _check_int("bins", args.bins, 2)
    _check_int("batch_size", args.batch_size, 1)
    run_ = Run.load(folder, backend=args.backend, for_training=False)
    result = run_factors(run_, args.count, args.bins, args.batch_size, args.sample)
    print(format_table(result))
    written = write_factors(result, args.out_json or folder / JSON_FILE, args.out_png or folder / PNG_FILE)
    print("wrote " + ", ".join(map(str, written)))
    return 0
