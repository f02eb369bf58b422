"""The training run: Algorithm 1's loop (l. 2) over batches, with a log, checkpoints and resume.

A run lives in one folder (``refimpl train --out DIR``):

- ``config.json``: the run's configuration (:class:`RunConfig`) and architecture;
- ``log.csv``: one row per step, every scalar :func:`refimpl.algorithm1.train_step`
  returns (the four quantities of Figure 1 among them: ``E2``, ``gates_l1``,
  ``lambda_eff``, ``hit_fraction``), plus ``tau`` and ``seconds`` (wall time of the step);
- ``checkpoint.npz``: the latest good checkpoint (:mod:`refimpl.checkpoint`), written at
  step 0, every ``checkpoint_every`` steps, at the end and on Ctrl-C / SIGTERM;
- ``summary.json``: written when the run reaches its target: final gates, errors, time.

Random streams: four generators derived from the one seed (:func:`stream`): ``init``
(weights), ``split`` (the held-out split), ``batches`` (the batch order) and ``train``
(Algorithm 1's u and eps). The last two are saved in every checkpoint, so a resumed
run draws exactly what an uninterrupted one would: on the NumPy backend its
parameters, Adam state, GECO state and random streams are bit-identical.

A non-finite loss stops the run (:class:`NonFiniteLoss`) without writing a checkpoint,
so the last good one stays on disk.

Smaller models for quick runs and tests: ``image_size`` average-pools the dataset's
images by an integer factor (64 -> 32, 16, 8) and :func:`build_architecture` scales
the paper's encoder/decoder to that size; ``channels`` sets the conv widths.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy

from . import checkpoint as ckpt
from .algorithm1 import Hyper, init_state, train_step
from .atomic import atomic_write, remove_stale_temporaries
from .backend import backend_name, get_dtype, get_xp, to_device, to_host
from .data import BatchIterator, DEFAULT_DATASET, open_dataset, split_indices
from .model import Architecture, ConvSpec, GatedVAE, default_fused
from .rng import generator, get_state, set_state

CONFIG_FILE = "config.json"
LOG_FILE = "log.csv"
CHECKPOINT_FILE = "checkpoint.npz"
SUMMARY_FILE = "summary.json"
STREAMS = ("init", "split", "batches", "train")

# Default GECO tolerance per dataset at its native size (sum of squared errors per image,
# interpretation (a)), chosen inside the paper's ranges (Fig. 1-3, Table 1); scaled by the
# pixel ratio when images are average-pooled with ``image_size``.
DEFAULT_TAU = {"synthetic-dsprites": 30.0, "dsprites": 30.0, "mnist": 10.0, "shapes3d": 40.0, "cars3d": 100.0,
               "cifar100": 300.0}
PAPER_WIDTHS = (32, 32, 64, 64)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the kept checkpoint."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint."""

    def __init__(self, step: int, signum: int, path: Path):
        self.step, self.signum, self.path = step, signum, path
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}; checkpoint saved to {path}")

    def __reduce__(self):  # picklable, so that it crosses from a worker process
        return (type(self), (self.step, self.signum, self.path))


def stream(seed: int, name: str) -> numpy.random.Generator:
    """The generator for stream ``name`` (one of STREAMS) of run seed ``seed``: independent PCG64 streams."""
    if name not in STREAMS:
        raise ValueError(f"stream {name!r}: expected one of {', '.join(STREAMS)}")
    if not isinstance(seed, (int, numpy.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative integer")
    state = numpy.random.SeedSequence([int(seed), STREAMS.index(name)]).generate_state(1, numpy.uint64)
    return generator(int(state[0]))


# ----------------------------------------------------------------------------------------
# Architecture


def build_architecture(image_shape, channels=None, hidden: int = 128) -> Architecture:
    """The paper's encoder/decoder (refimpl.model docstring) for square images of side S.

    S = 64: Section 4's network (with ``channels=None`` equal to
    :func:`refimpl.model.paper_architecture`). S = 28: the MNIST network. Other S = 4 * 2^m
    (8, 16, 32, 128): the same pattern with m stride-2 convs (4x4 first, then 3x3) down to
    4x4 and m upsample + 3x3 conv blocks back. ``channels``: the encoder conv widths
    (length m, or 3 for S = 28); the decoder mirrors them, as the paper's
    (enc 32,32,64,64 -> dec 64,32,32,C). Default widths: the last m of 32,32,64,64.
    """
    c, h, w = (int(s) for s in image_shape)
    if h != w:
        raise ValueError(f"image_shape={tuple(image_shape)}: expected square images")
    if h == 28:
        enc_k, dec_k = [(4, 2, 1), (3, 2, 1), (2, 2, 0)], [(2, 1, 1), (3, 1, 1), (3, 1, 1)]
    elif h >= 8 and h % 4 == 0 and (h // 4) & (h // 4 - 1) == 0:
        m = (h // 4).bit_length() - 1
        enc_k, dec_k = [(4, 2, 1)] + [(3, 2, 1)] * (m - 1), [(3, 1, 1)] * m
    else:
        raise ValueError(f"image size {h}: expected 28 (MNIST) or 4 * 2^m >= 8 (8, 16, 32, 64, ...)")
    m = len(enc_k)
    if channels is None:
        channels = (PAPER_WIDTHS[-m:] if m <= 4 else (PAPER_WIDTHS[0],) * (m - 4) + PAPER_WIDTHS)
    channels = tuple(int(ch) for ch in channels)
    if len(channels) != m or min(channels) < 1:
        raise ValueError(f"channels={','.join(map(str, channels))}: expected {m} positive widths for {h}x{h} images")
    if hidden < 1:
        raise ValueError(f"hidden={hidden}: expected >= 1")
    dec_channels = tuple(reversed(channels))[1:] + (c,)
    return Architecture(
        (c, h, w),
        encoder_convs=tuple(ConvSpec(ch, *k) for ch, k in zip(channels, enc_k)),
        decoder_convs=tuple(ConvSpec(ch, *k) for ch, k in zip(dec_channels, dec_k)),
        hidden=int(hidden),
    ).validate()


def arch_to_dict(arch: Architecture) -> dict:
    return asdict(arch)


def arch_from_dict(d: dict) -> Architecture:
    d = dict(d)
    d["image_shape"] = tuple(d["image_shape"])
    d["encoder_convs"] = tuple(ConvSpec(**s) for s in d["encoder_convs"])
    d["decoder_convs"] = tuple(ConvSpec(**s) for s in d["decoder_convs"])
    return Architecture(**d).validate()


def downsample(x, factor: int):
    """Average-pool images x: (B, C, H, W) by ``factor`` in both directions -> (B, C, H/f, W/f)."""
    if factor == 1:
        return x
    b, c, h, w = x.shape
    return x.reshape(b, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))


# ----------------------------------------------------------------------------------------
# Configuration


@dataclass
class RunConfig:
    """What defines a run; a resumed run must match it exactly.

    ``hyper``: Algorithm 1's :class:`Hyper` as a dict. ``baseline``: Table 1's step one, a
    plain VAE: the gated model with tau = 0, so C = E2 > 0 on every step, l. 23 never
    holds, no gate is ever sampled and gamma never moves (all n dimensions stay open).
    ``image_size``: None for the dataset's own size. ``channels``: None for the default
    widths of :func:`build_architecture`. ``fused``: decoder blocks as one fused
    upsample+conv layer or as the pair; None picks by backend (``model.default_fused``) and
    the resolved value is stored.
    """

    dataset: str = DEFAULT_DATASET
    data: str | None = None
    latent: int = 10
    batch_size: int = 64
    dtype: str = "float32"
    seed: int = 0
    image_size: int | None = None
    channels: tuple | None = None
    hidden: int = 128
    holdout: int = 1000
    baseline: bool = False
    fused: bool | None = None
    hyper: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.channels is not None:
            self.channels = tuple(int(c) for c in self.channels)
        for name, low in (("latent", 1), ("batch_size", 1), ("hidden", 1), ("holdout", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, numpy.integer)) or value < low:
                raise ValueError(f"{name}={value!r}: expected an integer >= {low}")
        if not isinstance(self.seed, (int, numpy.integer)) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: expected a non-negative integer")
        get_dtype(self.dtype)
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size={self.image_size!r}: expected a positive integer")
        if self.baseline and self.hyper.get("tau", 0.0) != 0.0:
            raise ValueError(f"baseline runs have tau=0 (a plain VAE); got tau={self.hyper['tau']}")

    def make_hyper(self) -> Hyper:
        kw = dict(self.hyper)
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        if self.baseline:
            kw["tau"] = 0.0
        return Hyper(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels) if self.channels is not None else None
        d["hyper"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hyper.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def default_tau(dataset: str, native_shape, image_size: int | None) -> float:
    """DEFAULT_TAU[dataset], scaled by (image_size / native size)^2 when images are pooled."""
    tau = DEFAULT_TAU.get(dataset, 30.0)
    if image_size is not None:
        tau *= (image_size / native_shape[1]) ** 2
    return tau


# ----------------------------------------------------------------------------------------
# The per-step log


def _format(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)  # shortest string that reads back to the same float
    return str(value)


class CsvLog:
    """``log.csv``: a header, then one row per step; flushed every row, fsynced on :meth:`sync`."""

    def __init__(self, path):
        self.path = Path(path)
        self.columns = None
        self._file = None
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                self.columns = next(csv.reader(f), None)

    def write(self, row: dict) -> None:
        if self._file is None:
            new = self.columns is None
            self._file = open(self.path, "a", newline="")
            if new:
                self.columns = list(row)
                self._file.write(",".join(self.columns) + "\n")
        self._file.write(",".join(_format(row.get(c, "")) for c in self.columns) + "\n")
        self._file.flush()

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def truncate(path, last_step: int) -> int:
        """Keep the header and the complete rows with step <= ``last_step`` (rows a killed
        run wrote after its last checkpoint, or a torn last line, are dropped). Returns the
        number of rows kept."""
        path = Path(path)
        if not path.is_file():
            return 0
        lines = path.read_text().split("\n")
        header = lines[0].split(",")
        kept = [lines[0]]
        for line in lines[1:]:
            cells = line.split(",")
            if len(cells) != len(header):
                break  # a torn line can only be the last one
            try:
                step = int(cells[header.index("step")])
            except ValueError:
                break
            if step > last_step:
                break
            kept.append(line)
        text = "\n".join(kept) + "\n"
        atomic_write(path, lambda f: f.write(text.encode()))
        return len(kept) - 1


def read_log(path) -> dict:
    """``log.csv`` as columns: name -> list of floats."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    header, body = rows[0], rows[1:]
    return {name: [float(r[i]) for r in body] for i, name in enumerate(header)}


def moving_average(values, factor: float = 0.95) -> float:
    """Exponential moving average m <- factor m + (1 - factor) v, started at the first value (Table 1)."""
    m = None
    for v in values:
        m = v if m is None else factor * m + (1 - factor) * v
    return float("nan") if m is None else m


# ----------------------------------------------------------------------------------------
# Progress


class Progress:
    """A tqdm bar when tqdm is installed (extra ``progress``), else a line every ``interval`` seconds.

    Shows the step, ETA and Figure 1's live quantities: E2, tau, open gates, lambda', hit fraction.
    """

    def __init__(self, total: int, initial: int, n_latent: int, enabled: bool = True, interval: float = 10.0,
                 stream=None):
        self.total, self.step, self.n = total, initial, n_latent
        self.enabled, self.interval = enabled, interval
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.start, self.start_step, self.last_print = time.monotonic(), initial, 0.0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                tty = hasattr(self.stream, "isatty") and self.stream.isatty()
                self.bar = tqdm(total=total, initial=initial, unit="batch", file=self.stream, dynamic_ncols=True,
                                mininterval=0.1 if tty else interval)  # a log file gets a line per interval

    @staticmethod
    def describe(log: dict, tau: float, n: int) -> str:
        return (f"E2={log['E2']:.4g} tau={tau:g} open={log['open_gates']}/{n} "
                f"lambda'={log['lambda_eff']:.3g} hit={log['hit_fraction']:.2f}")

    def update(self, log: dict, tau: float) -> None:
        self.step = log["step"]
        if not self.enabled:
            return
        text = self.describe(log, tau, self.n)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last_print >= self.interval or self.step == self.total:
            self.last_print = now
            elapsed = now - self.start
            done = self.step - self.start_step
            eta = elapsed / done * (self.total - self.step) if done else float("nan")
            print(f"step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%) "
                  f"{_hms(elapsed)} elapsed, ETA {_hms(eta)} | {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _StopOnSignal:
    """Turns the first SIGINT / SIGTERM into a flag checked between steps (so a step is never
    cut in half); a second one raises KeyboardInterrupt at once. Only in the main thread."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ----------------------------------------------------------------------------------------
# The run


class Run:
    """One training run in folder ``out``: model, Algorithm 1's state, data stream, log, checkpoints.

    Make one with :meth:`create` (a new run) or :meth:`load` (from ``out/checkpoint.npz``);
    then :meth:`train` to a total number of batches.
    """

    def __init__(self, config: RunConfig, out, backend: str | None = None):
        self.config = config
        self.out = Path(out)
        self.backend = backend_name(backend)
        self.xp = get_xp(self.backend)
        self.dtype = get_dtype(config.dtype)
        self.hyper = config.make_hyper()
        self._dataset = None
        self._split = None
        self.arch = None
        self.model = None
        self.state = None
        self.train_rng = stream(config.seed, "train")
        self.batches = None
        self.elapsed = 0.0
        self.checkpoint_step = None
        self.target = None  # the total number of batches asked for (kept in checkpoints)
        self._log = None
        self._batch_state = None  # the batch iterator's state as loaded, kept when the stream is not rebuilt

    # -- data

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = open_dataset(self.config.dataset, self.config.data)
        return self._dataset

    @property
    def factor(self) -> int:
        native = self.dataset.shape[1]
        size = self.config.image_size or native
        if native % size or self.dataset.shape[1] != self.dataset.shape[2]:
            raise ValueError(f"image_size={size}: must divide the dataset's {native}x{self.dataset.shape[2]} images")
        return native // size

    def image_shape(self) -> tuple:
        c, h, _ = self.dataset.shape
        size = self.config.image_size or h
        self.factor  # validates
        return (c, size, size)

    @property
    def split(self):
        """(train indices, held-out indices), from the ``split`` stream."""
        if self._split is None:
            n = len(self.dataset)
            if self.config.holdout >= n:
                raise ValueError(f"holdout={self.config.holdout}: the dataset has only {n} images")
            self._split = split_indices(n, int(self.config.holdout), stream(self.config.seed, "split"))
        return self._split

    def images(self, indices):
        """Images x: (B, C, S, S) on the backend, in the run's dtype, pooled to ``image_size``."""
        x = to_device(self.dataset.get(indices, self.dtype), self.xp, self.dtype)
        return downsample(x, self.factor)

    def _make_batches(self):
        train_idx = self.split[0]
        if self.config.batch_size > train_idx.size:
            raise ValueError(f"batch_size={self.config.batch_size} exceeds the {train_idx.size} training images")
        self.batches = BatchIterator(train_idx, self.config.batch_size, stream(self.config.seed, "batches"))
        if self._batch_state is not None:  # continue a loaded run's stream
            self.batches.load_state_dict(self._batch_state)

    # -- construction

    def _build(self, arch: Architecture, fused: bool):
        self.arch = arch
        self.model = GatedVAE(arch, self.config.latent, rng=stream(self.config.seed, "init"), xp=self.xp,
                              dtype=self.dtype, gated=True, gamma_init=self.hyper.gamma_init, fused=fused)
        self.state = init_state(self.model, self.hyper)

    @classmethod
    def create(cls, config: RunConfig, out, backend: str | None = None, overwrite: bool = False) -> "Run":
        """A new run in ``out`` (created); writes config.json and the step-0 checkpoint."""
        out = Path(out)
        if (out / CHECKPOINT_FILE).exists() and not overwrite:
            raise FileExistsError(f"{out} already holds a run ({CHECKPOINT_FILE}); continue it with --resume, "
                                  f"start afresh with --overwrite, or choose another --out")
        if "tau" not in config.hyper and not config.baseline:
            raise ValueError("config.hyper needs 'tau' (or baseline=True)")
        run = cls(config, out, backend)
        if config.fused is None:
            config.fused = default_fused(run.xp)
        arch = build_architecture(run.image_shape(), config.channels, config.hidden)
        run._build(arch, config.fused)
        run._make_batches()
        out.mkdir(parents=True, exist_ok=True)
        for name in (LOG_FILE, SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
        remove_stale_temporaries(out)
        text = json.dumps({"config": config.to_dict(), "architecture": arch_to_dict(arch)}, indent=2)
        atomic_write(out / CONFIG_FILE, lambda f: f.write(text.encode()))
        run.save_checkpoint()
        return run

    @classmethod
    def load(cls, path, backend: str | None = None, for_training: bool = True) -> "Run":
        """The run saved at ``path`` (a run folder or a checkpoint file).

        ``for_training``: also restore the batch stream (opens the dataset) and cut
        ``log.csv`` back to the checkpoint's step.
        """
        path = Path(path)
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        if path.is_dir() and not file.exists():
            raise ckpt.CheckpointError(f"{path} holds no {CHECKPOINT_FILE}: not a refimpl run folder")
        arrays, meta = ckpt.load(file)
        config = RunConfig.from_dict(meta["config"])
        run = cls(config, file.parent, backend)
        run._build(arch_from_dict(meta["architecture"]), bool(config.fused))
        run._restore(arrays, meta)
        if for_training:
            remove_stale_temporaries(run.out)
            run._make_batches()
            CsvLog.truncate(run.out / LOG_FILE, run.state.step)
        return run

    # -- checkpoints

    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_FILE

    def save_checkpoint(self) -> Path:
        """Write the current state to ``out/checkpoint.npz`` atomically (log synced first)."""
        if self._log is not None:
            self._log.sync()
        st = self.state
        arrays = {f"model/{k}": to_host(v).copy() for k, v in self.model.state_dict().items()}
        arrays["lambda"] = to_host(st.lam).copy()
        opt = st.optimizer.state_dict()
        arrays.update({f"adam/m/{k}": v for k, v in opt["m"].items()})
        arrays.update({f"adam/v/{k}": v for k, v in opt["v"].items()})
        meta = {
            "step": st.step, "adam_t": opt["t"], "hit": st.hit, "c_ma": st.c_ma,
            "last_constraint_met": st.last_constraint_met,
            "train_rng": get_state(self.train_rng),
            "batch_iterator": self.batches.state_dict() if self.batches is not None else self._batch_state,
            "target_batches": self.target,
            "config": self.config.to_dict(), "architecture": arch_to_dict(self.arch),
            "timing": {"elapsed_s": self.elapsed, "backend": self.backend},
        }
        ckpt.save(self.checkpoint_path(), arrays, meta)
        self.checkpoint_step = st.step
        return self.checkpoint_path()

    def _restore(self, arrays: dict, meta: dict) -> None:
        st, xp = self.state, self.xp
        model_state = ckpt.prefixed(arrays, "model/")
        self.model.load_state_dict({k: to_device(v, xp, self.dtype) for k, v in model_state.items()})
        st.lam[...] = to_device(arrays["lambda"], xp, self.dtype)
        st.optimizer.load_state_dict({"t": meta["adam_t"], "m": ckpt.prefixed(arrays, "adam/m/"),
                                      "v": ckpt.prefixed(arrays, "adam/v/")})
        st.step, st.hit, st.c_ma = int(meta["step"]), bool(meta["hit"]), meta["c_ma"]
        st.last_constraint_met = bool(meta["last_constraint_met"])
        set_state(self.train_rng, meta["train_rng"])
        self.elapsed = float(meta.get("timing", {}).get("elapsed_s", 0.0))
        self.target = meta.get("target_batches")
        self._batch_state = meta["batch_iterator"]
        self.checkpoint_step = st.step

    # -- training

    def train(self, batches: int, checkpoint_every: int | None = 100, progress: bool = True, log_interval=10.0):
        """Run Algorithm 1 until ``batches`` steps in total; returns the summary dict.

        Raises :class:`NonFiniteLoss` (no checkpoint written) or :class:`TrainingInterrupted`
        (checkpoint written) instead of finishing.
        """
        if not isinstance(batches, (int, numpy.integer)) or batches < 0:
            raise ValueError(f"batches={batches!r}: expected a non-negative integer")
        if batches < self.state.step:
            raise ValueError(f"batches={batches}: this run has already done {self.state.step} batches")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every}: expected a positive integer")
        if self.batches is None:
            self._make_batches()
        self.target = int(batches)
        st, tau = self.state, self.hyper.tau
        self._log = CsvLog(self.out / LOG_FILE)
        bar = Progress(batches, st.step, self.config.latent, enabled=progress, interval=log_interval)
        try:
            with _StopOnSignal() as stop:
                while st.step < batches and stop.signum is None:
                    t0 = time.perf_counter()
                    x = self.images(next(self.batches))
                    log = train_step(st, x, self.train_rng)
                    seconds = time.perf_counter() - t0
                    self.elapsed += seconds
                    self._log.write({**log, "tau": tau, "seconds": seconds})
                    if not all(math.isfinite(log[k]) for k in ("loss", "E2", "lambda_raw", "gates_l1")):
                        self._log.sync()
                        kept = (f"the last good checkpoint (step {self.checkpoint_step}) is kept at "
                                f"{self.checkpoint_path()}")
                        raise NonFiniteLoss(f"non-finite loss at step {st.step} (loss={log['loss']}, "
                                            f"E2={log['E2']}, lambda={log['lambda_raw']}); stopped; {kept}")
                    bar.update(log, tau)
                    if checkpoint_every and st.step % checkpoint_every == 0:
                        self.save_checkpoint()
                if stop.signum is not None:
                    if self.checkpoint_step != st.step:
                        self.save_checkpoint()
                    raise TrainingInterrupted(st.step, stop.signum, self.checkpoint_path())
            if self.checkpoint_step != st.step:
                self.save_checkpoint()
        finally:
            bar.close()
            self._log.close()
            self._log = None
        return self.write_summary()

    def summary(self) -> dict:
        """Final gates and errors of the run so far (from the model and log.csv)."""
        gamma = to_host(self.model.params["gamma"]).astype(float)
        gates = to_host(self.model.inference_gates()).astype(int)
        out = {"step": self.state.step, "n_latent": self.config.latent, "open_gates": int(gates.sum()),
               "gates": gates.tolist(), "gamma": gamma.tolist(), "tau": self.hyper.tau,
               "lambda_eff": None, "hit": self.state.hit, "elapsed_s": self.elapsed, "backend": self.backend}
        log_path = self.out / LOG_FILE
        if log_path.is_file():
            cols = read_log(log_path)
            if cols.get("E2"):
                out.update(E2_last=cols["E2"][-1], E2_ma95=moving_average(cols["E2"], 0.95),
                           lambda_eff=cols["lambda_eff"][-1], gates_l1=cols["gates_l1"][-1])
        return out

    def write_summary(self) -> dict:
        summary = self.summary()
        text = json.dumps(summary, indent=2)
        atomic_write(self.out / SUMMARY_FILE, lambda f: f.write(text.encode()))
        return summary


def config_differences(stored: RunConfig, given: dict) -> list[str]:
    """The entries of ``given`` (config field -> value, ``hyper`` a dict) that differ from ``stored``."""
    stored_d = stored.to_dict()
    pairs = [(k, v, stored_d.get(k)) for k, v in given.items() if k != "hyper"]
    pairs += [(k, v, stored_d["hyper"].get(k, getattr(Hyper, k, None) if k != "tau" else None))
              for k, v in given.get("hyper", {}).items()]
    diffs = []
    for key, value, old in pairs:
        value, old = (tuple(a) if isinstance(a, list) else a for a in (value, old))  # JSON stores tuples as lists
        if old != value:
            diffs.append(f"{key}={value!r} (the run has {old!r})")
    return diffs


__all__ = ["CsvLog", "DEFAULT_TAU", "NonFiniteLoss", "Progress", "Run", "RunConfig", "TrainingInterrupted",
           "arch_from_dict", "arch_to_dict", "build_architecture", "config_differences", "default_tau",
           "downsample", "moving_average", "read_log", "stream"]
