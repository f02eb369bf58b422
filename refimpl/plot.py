"""Figure 1 for any run folder: ``refimpl plot RUN`` -> ``RUN/plot.png``.

One PNG of a run folder (see :mod:`refimpl.training`), drawn from its ``log.csv`` (or
``log.csv.gz``; a branch's whole history, its parents' rows first, with a dotted line at
each branch step: :func:`refimpl.branch.read_history`) and its ``checkpoint.npz`` (the
run's settings and model, via ``Run.load``):

- Figure 1's four panels (Section 4.1), against the batch number: E2 per batch with its
  exponential moving average (0.99) and tau as a red line; ||sigmoid(k gamma)||_1
  (``gates_l1``, a continuous count of open gates); lambda' (``lambda_eff``, log scale);
  the fraction of the batch with e2 <= tau (``hit_fraction``) and its moving average;
- one line per gate: sigmoid(k gamma_j) after each step, from the log's ``gamma_j``
  columns (which gate closed when); the label gives the final state, open when gamma_j > 0
  (the inference gates). Logs written before gamma logging have no such columns: the
  panel is replaced by a one-line note;
- held-out originals over their reconstructions with the inference gates
  (:func:`refimpl.evaluate.reconstructions`) from the checkpoint's model; when the dataset
  cannot be opened (a file-backed dataset that is not present) a one-line note instead;
- a title with the dataset, image shape, n, tau, batches done and open gates.

Long logs stay fast to draw: each line is decimated to at most ``MAX_POINTS`` points
(:func:`decimate`, keeping every bucket's minimum and maximum, so spikes and the envelope
of noisy series survive); moving averages are computed on the full series first.

matplotlib is optional (extra ``plots``); without it :func:`plot_run` raises
:class:`PlottingUnavailable` (a RuntimeError) whose message is the one-line install hint.
A folder that is not a run, or an empty or unreadable ``log.csv``, raises
:class:`refimpl.runread.RunReadError` (an OSError), a missing ``log.csv``
FileNotFoundError; each message is one line naming the path.

Command line: ``refimpl plot RUN [--out FILE] [--count N] [--backend B]`` (also
``python -m refimpl.plot RUN ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy

from .branch import lineage
from .figures import require_pyplot, save_figure
from .runread import gamma_columns, load_history, run_folder
from .training import Run

PLOT_FILE = "plot.png"
MAX_POINTS = 5000  # points drawn per line at most
SMOOTHING = 0.99  # moving-average factor of the noisy series (E2, hit fraction)
PROG = "refimpl plot"


# ----------------------------------------------------------------------------------------
# Series helpers


def decimate(values, cap: int = MAX_POINTS) -> numpy.ndarray:
    """Indices of at most ``cap`` points of ``values`` to draw: all of them when there are
    at most ``cap``, else the first, the last and each bucket's minimum and maximum
    (in order). NaNs are kept (argmin/argmax return them), so a line still breaks there.
    ``cap`` must be at least 4."""
    y = numpy.asarray(values, dtype=numpy.float64)
    length = y.size
    if cap < 4:
        raise ValueError(f"cap={cap}: expected >= 4")
    if length <= cap:
        return numpy.arange(length)
    buckets = (cap - 2) // 2  # two points per bucket, plus the first and the last
    size = -(-length // buckets)
    buckets = -(-length // size)
    padded = numpy.pad(y, (0, buckets * size - length), mode="edge").reshape(buckets, size)
    offsets = numpy.arange(buckets) * size
    picks = numpy.concatenate([[0], offsets + padded.argmin(axis=1), offsets + padded.argmax(axis=1), [length - 1]])
    return numpy.unique(numpy.minimum(picks, length - 1))


def smooth(values, factor: float = SMOOTHING) -> numpy.ndarray:
    """Running exponential moving average m <- factor m + (1 - factor) v, started at the first value."""
    out = numpy.empty(len(values))
    m = None
    for i, v in enumerate(numpy.asarray(values, dtype=numpy.float64).tolist()):  # Python floats: faster
        m = v if m is None else factor * m + (1 - factor) * v
        out[i] = m
    return out


def sigmoid(x):
    return 0.5 * (1.0 + numpy.tanh(0.5 * numpy.asarray(x, dtype=numpy.float64)))  # no overflow for large |x|


def _note(notes, text: str) -> None:
    if notes is None:
        print(f"{PROG}: note: {text}", file=sys.stderr)
    else:
        notes.append(text)


def _recon_images(run, count: int):
    """(originals, reconstructions) of ``count`` held-out images, or a one-line reason they are missing."""
    from .data import DatasetError
    from .evaluate import heldout_indices, reconstructions, spread_indices

    try:
        return reconstructions(run, spread_indices(heldout_indices(run), count))
    except (DatasetError, OSError) as exc:
        return f"reconstructions not drawn: the dataset cannot be opened ({' '.join(str(exc).split())})"


# ----------------------------------------------------------------------------------------
# The figure


def batch_axis(ax) -> None:
    """Integer batch ticks, written 25K / 1.5M when large (long runs' labels otherwise overlap)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def label(x, _pos):
        for scale, suffix, start in ((1e6, "M", 1e6), (1e3, "K", 1e4)):
            if abs(x) >= start:
                return f"{x / scale:g}{suffix}"
        return f"{x:g}"

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(label))


def branch_lines(ax, branches) -> None:
    """A dotted vertical line at each step where the run's history branches: branches [(step, parent name)]."""
    for step, _ in branches:
        ax.axvline(step, color="0.4", ls=":", lw=1.0)


def plot_run(run_dir, out=None, recon_count: int = 8, backend=None, notes: list | None = None,
             execution=None) -> Path:
    """Draw Figure 1 (plus per-gate lines and held-out reconstructions) of run folder ``run_dir``.

    Writes ``out`` (default ``RUN/plot.png``) atomically and returns its path.
    ``recon_count``: held-out images shown (0: no reconstruction row). ``backend``: for
    the model that reconstructs (default $REFIMPL_BACKEND or numpy). Notes on parts that
    could not be drawn (one line each) go to ``notes`` when it is a list, else to stderr.
    ``execution``: the fast paths of that model (refimpl/execution.py; default: the default setting's).

    Raises RunReadError (not a run folder; empty or unreadable log), FileNotFoundError (no
    log.csv), PlottingUnavailable (no matplotlib) and, from :meth:`Run.load`, CheckpointError
    (an unreadable checkpoint) or BackendError (``backend`` not available).
    """

    if not isinstance(recon_count, (int, numpy.integer)) or recon_count < 0:
        raise ValueError(f"recon_count={recon_count!r}: expected a non-negative integer")
    folder = run_folder(run_dir)
    out = Path(out) if out is not None else folder / PLOT_FILE
    log = load_history(folder)
    branches = [(step, parent.name) for parent, step in lineage(folder)[:-1]]
    plt = require_pyplot()

    run = Run.load(folder, backend=backend, for_training=False, execution=execution)  # settings and model
    k, tau, n = run.hyper.k, run.hyper.tau, run.config.latent  # a baseline's hyper has tau = 0
    shape = "x".join(str(s) for s in run.arch.image_shape)
    step = log["step"]
    gammas = gamma_columns(log)
    final_open = int(log["open_gates"][-1]) if "open_gates" in log else None

    images = _recon_images(run, int(recon_count)) if recon_count else None
    # rows: Figure 1 (2), gates, reconstructions; a row that holds only a note is short
    heights = [1.0, 1.0, 1.15 if gammas else 0.2, 0.01 if images is None else 0.2 if isinstance(images, str) else 0.9]
    fig = plt.figure(figsize=(12, 3.0 * sum(heights) + 1.2))
    grid = fig.add_gridspec(4, 2, height_ratios=heights)

    def line(ax, y, **kw):  # one decimated line against the batch number
        idx = decimate(y, MAX_POINTS)
        ax.plot(step[idx], y[idx], **kw)

    def log_scale_if_wide(ax, y):  # log y when the positive finite values span more than 20x
        y = y[numpy.isfinite(y)]
        if y.size and y.min() > 0 and y.max() > 20 * y.min():
            ax.set_yscale("log")

    # Figure 1, top left: E2 per batch, its moving average and tau
    ax = fig.add_subplot(grid[0, 0])
    line(ax, log["E2"], lw=0.5, color="C0", alpha=0.3, label="E2 per batch")
    line(ax, smooth(log["E2"]), lw=1.2, color="C0", label=f"moving average ({SMOOTHING})")
    if "tau" in log and numpy.ptp(log["tau"]) > 0:  # a branch that changed tau: the tau of each batch
        line(ax, log["tau"], color="red", lw=1.2, label=f"tau (now {tau:g})")
    else:
        ax.axhline(tau, color="red", lw=1.2, label=f"tau = {tau:g}")
    log_scale_if_wide(ax, log["E2"])
    ax.set_title("reconstruction error E2 (SSE per image)")
    ax.legend(loc="upper right", fontsize=8)
    # top right: ||sigmoid(k gamma)||_1
    ax = fig.add_subplot(grid[0, 1])
    line(ax, log["gates_l1"], lw=1.0, color="C1")
    finite = log["gates_l1"][numpy.isfinite(log["gates_l1"])]
    ax.set_ylim(-0.2, max(n, finite.max() if finite.size else 0.0) + 0.5)
    ax.set_title(r"$\|\sigma(k\gamma)\|_1$ (continuous count of open gates)")
    # bottom left: lambda'
    ax = fig.add_subplot(grid[1, 0])
    line(ax, log["lambda_eff"], lw=1.0, color="C2")
    log_scale_if_wide(ax, log["lambda_eff"])  # lambda' spans lambda_min..lambda_max (1e-5..5)
    ax.set_title(r"Lagrange multiplier $\lambda'$")
    ax.set_xlabel("batch")
    # bottom right: fraction of the batch within tolerance
    ax = fig.add_subplot(grid[1, 1])
    line(ax, log["hit_fraction"], lw=0.5, color="C3", alpha=0.3)
    line(ax, smooth(log["hit_fraction"]), lw=1.2, color="C3")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(r"fraction of the batch with $e_2 \leq \tau$")
    ax.set_xlabel("batch")
    for a in fig.axes:
        a.grid(alpha=0.3)
        batch_axis(a)
        branch_lines(a, branches)

    # per-gate panel: sigmoid(k gamma_j) over batches
    ax = fig.add_subplot(grid[2, :])
    if gammas:
        last_open = [j for j, c in enumerate(gammas) if log[c][-1] > 0]
        for j, c in enumerate(gammas):
            state = "open" if log[c][-1] > 0 else "closed"
            line(ax, sigmoid(k * log[c]), lw=1.0, color=f"C{j % 10}", ls="-" if state == "open" else "--",
                 label=f"gate {j} ({state})")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("batch")
        batch_axis(ax)
        branch_lines(ax, branches)
        ax.set_title(rf"gate probabilities $\sigma(k\gamma_j)$, k = {k:g}: "
                     f"{len(last_open)}/{len(gammas)} open at the end (gamma_j > 0)")
        ax.grid(alpha=0.3)
        if len(gammas) <= 40:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, ncol=-(-len(gammas) // 20))
        if final_open is None:
            final_open = len(last_open)
    else:
        text = "per-gate panel missing: this log predates gamma logging (no gamma_j columns)"
        _note(notes, text)
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()

    # held-out originals over reconstructions
    if images is not None:
        ax = fig.add_subplot(grid[3, :])
        ax.set_axis_off()
        if isinstance(images, str):
            _note(notes, images)
            ax.text(0.5, 0.5, images, ha="center", va="center", transform=ax.transAxes, wrap=True)
        else:
            from .evaluate import image_grid

            originals, recons = images
            pixels = numpy.asarray(image_grid([originals, recons]))
            ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(f"{len(originals)} held-out images (top) and reconstructions with "
                         f"{run.model.open_gates()}/{n} gates open (bottom), checkpoint at batch {run.state.step}")

    gates = f"{final_open}/{n} gates open" if final_open is not None else f"n = {n}"
    changed = ", ".join(f"{k}={v}" for k, v in (run.parent or {}).get("changed", {}).items()) or "no option changed"
    origin = "".join(f"\nbranch of {name} at batch {s:,} ({changed}; dotted line)" for s, name in branches[-1:])
    fig.suptitle(f"{folder.name}: {run.config.dataset} {shape}, n = {n}, tau = {tau:g}, "
                 f"{int(step[-1])} batches, {gates}{origin}")
    return save_figure(fig, out)


# ----------------------------------------------------------------------------------------
# Command line


def add_arguments(parser) -> None:
    """The options of ``refimpl plot``."""
    import argparse

    from .backend import BACKENDS

    def count(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
        return value

    parser.add_argument("run", metavar="RUN", help="run folder (or its checkpoint.npz)")
    parser.add_argument("--out", default=None, metavar="FILE", help=f"PNG output (default: RUN/{PLOT_FILE})")
    parser.add_argument("--count", type=count, default=8, metavar="N",
                        help="held-out reconstructions shown (default: 8; 0: none)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="array backend of the reconstructions (default: $REFIMPL_BACKEND or numpy)")


def run(args) -> int:
    """``refimpl plot``: write the PNG, print its path and a note per missing part; 1 without matplotlib."""
    notes = []
    path = plot_run(args.run, out=args.out, recon_count=args.count, backend=args.backend, notes=notes)
    for text in notes:
        print(f"{PROG}: note: {text}", file=sys.stderr)
    print(f"Figure 1 of {run_folder(args.run)}: {path}")
    return 0
