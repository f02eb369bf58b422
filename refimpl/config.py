"""What defines a run (:class:`RunConfig`) and how long it trains (:class:`Schedule`).

Every field declares its command-line option (:func:`refimpl.optionspec.option`): its
default and help live here and nowhere else; :mod:`refimpl.options` turns the fields
into the options of ``train``, ``trace`` and the experiments. Algorithm 1's own
parameters are the fields of :class:`refimpl.algorithm1.Hyper`, kept in
``RunConfig.hyper`` as a dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy

from .algorithm1 import Hyper, softplus
from .backend import DTYPES, get_dtype
from .data import DATASET_NAMES, DEFAULT_DATASET, dataset_info
from .optionspec import OptionError, int_list, nonnegative_int, option, positive_int


@dataclass
class RunConfig:
    """What defines a run; a resumed run must match it exactly.

    ``baseline``: Table 1's step one, a plain VAE: the gated model with tau = 0, so C =
    E2 > 0 on every step, l. 23 never holds, no gate is ever sampled and gamma never
    moves (all n dimensions stay open). How the run executes (the fast paths, threads) is not
    part of it: :class:`refimpl.execution.Execution`.
    """

    dataset: str = option(DEFAULT_DATASET, f"one of {', '.join(DATASET_NAMES)}", choices=DATASET_NAMES,
                          metavar="DATASET", positional=True)
    data: str | None = option(None, "dataset file or folder (default: under $REFIMPL_DATA)", parse=str,
                              metavar="PATH")
    latent: int = option(10, "latent dimensions n", parse=positive_int, metavar="N")
    batch_size: int = option(64, "batch size", parse=positive_int, metavar="B")
    dtype: str = option("float32", "computation dtype", choices=tuple(DTYPES))
    seed: int = option(0, "seed of every random stream: weights, held-out split, batch order, Algorithm 1's u "
                          "and eps", parse=nonnegative_int, metavar="N")
    image_size: int | None = option(None, "average-pool the images to SxS (64 -> 32, 16, 8) and scale the "
                                          "paper's network to it (default: the dataset's size)",
                                    parse=positive_int, metavar="S")
    channels: tuple | None = option(None, "encoder conv widths, mirrored in the decoder (default: 32,32,64,64 at "
                                          "64x64, the last m of them with m convs)",
                                    parse=int_list, metavar="C1,C2,...")
    hidden: int = option(128, "hidden linear units", parse=positive_int, metavar="H")
    holdout: int = option(1000, "held-out images (never trained on) for evaluate and reconstruct",
                          parse=positive_int, metavar="N")
    baseline: bool = option(False, "a plain VAE (Table 1 step one): tau = 0, so gates are never sampled and all "
                                   "n stay open", parse=bool)
    hyper: dict = option(help="Algorithm 1's Hyper fields", flag=False, default_factory=dict)
    split_seed: int | None = option(None, "the seed of the held-out split (and of factors' sample) when not "
                                          "``seed``: a branch with another --seed keeps its parent's", flag=False)

    def __post_init__(self):
        if self.channels is not None:
            self.channels = tuple(int(c) for c in self.channels)
        dataset_info(self.dataset)
        for name, low in (("latent", 1), ("batch_size", 1), ("hidden", 1), ("holdout", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, numpy.integer)) or value < low:
                raise OptionError(f"{name}={value!r}: expected an integer >= {low}")
        for name, value in (("seed", self.seed), ("split_seed", self.data_seed())):
            if not isinstance(value, (int, numpy.integer)) or value < 0:
                raise OptionError(f"{name}={value!r}: expected a non-negative integer")
        get_dtype(self.dtype)
        if self.image_size is not None and self.image_size < 1:
            raise OptionError(f"image_size={self.image_size!r}: expected a positive integer")
        if self.baseline and self.hyper.get("tau", 0.0) != 0.0:
            raise OptionError(f"--baseline trains with tau=0; drop --tau {self.hyper['tau']:g}")
        if self.baseline or "tau" in self.hyper:
            check_dtype_range(self.make_hyper(), self.dtype)

    def make_hyper(self) -> Hyper:
        kw = dict(self.hyper)
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        if self.baseline:
            kw["tau"] = 0.0
        return Hyper(**kw)

    def data_seed(self) -> int:
        """The seed of the held-out split: ``split_seed``, or ``seed`` when that is None."""
        return self.seed if self.split_seed is None else self.split_seed

    def image_shape(self) -> tuple:
        """(C, S, S): the dataset's images (registry shape), pooled to ``image_size``."""
        c, h, w = dataset_info(self.dataset).shape
        size = self.image_size or h
        if h % size:
            raise OptionError(f"image_size={size}: must divide the dataset's {h}x{w} images")
        return (c, size, size)

    def pool_factor(self) -> int:
        """How many native pixels one pooled pixel averages, per side."""
        return dataset_info(self.dataset).shape[1] // self.image_shape()[1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels) if self.channels is not None else None
        d["hyper"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hyper.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        # Keys no field reads are ignored: runs made before the fast paths left the run's identity carry
        # "fused" (now refimpl/execution.py's --fused), which changes no number beyond rounding.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_dtype_range(hyper: Hyper, dtype: str) -> None:
    """Refuse (OptionError) a float option that ``dtype`` cannot hold (beyond its largest finite
    value, or a non-zero value that rounds to 0), and starting values whose first step overflows:
    k * gamma_init (the gates' sigmoid), lambda' = softplus(lambda)^2 (l. 21)."""
    info = numpy.finfo(dtype)
    largest, tiny = float(info.max), float(info.tiny)  # Python floats: comparing with numpy's would cast and warn
    values = [(f.name, getattr(hyper, f.name)) for f in fields(Hyper) if f.name != "betas"]
    values += [(f"betas[{i}]", b) for i, b in enumerate(hyper.betas)]
    for name, value in values:
        if not isinstance(value, float) or isinstance(value, bool):
            continue
        if abs(value) > largest:
            raise OptionError(f"{name}={value:g}: beyond {dtype}'s largest value {largest:.4g}")
        if value != 0 and abs(value) < tiny:
            raise OptionError(f"{name}={value:g}: rounds to 0 in {dtype} (smallest normal {tiny:.4g})")
    if abs(hyper.k * hyper.gamma_init) > largest:
        raise OptionError(f"k * gamma_init = {hyper.k * hyper.gamma_init:g}: beyond {dtype}'s largest value "
                          f"{largest:.4g} (the gates' sigmoid(k gamma) at step 1)")
    if hyper.lambda_init_on == "effective":
        start = math.sqrt(hyper.lambda_init)  # softplus(lambda) at the start; its raw lambda is about as large
        if start > 700:  # exp(start) in the inverse softplus overflows
            raise OptionError(f"lambda_init={hyper.lambda_init:g} with lambda_init_on='effective': at most 490000 "
                              "(its raw lambda needs exp(sqrt(lambda_init)))")
    else:
        start = softplus(hyper.lambda_init)
    if start > math.sqrt(largest):
        raise OptionError(f"lambda_init={hyper.lambda_init:g}: lambda' = softplus(lambda)^2 = {start:.4g}^2 is beyond "
                          f"{dtype}'s largest value {largest:.4g}")


@dataclass
class Schedule:
    """How long a run trains and how often it saves: not part of what defines the run."""

    batches: int = option(5000, "total number of batches (with --resume: the run's own target)",
                          parse=positive_int, metavar="B")
    checkpoint_every: int = option(100, "write a checkpoint every N batches; also at the end and on Ctrl-C",
                                   parse=positive_int, metavar="N")
    keep_checkpoints: int = option(0, "also keep the checkpoint of every N-th batch, as checkpoints/step-XXXXXXXX.npz "
                                      "(a later run can branch there: train --from RUN --at STEP); 0: none",
                                   parse=nonnegative_int, metavar="N")


def saved_schedule(meta: dict) -> Schedule:
    """The Schedule a checkpoint's ``meta`` records (Schedule's defaults for what an older one lacks)."""
    defaults = Schedule()
    return Schedule(meta.get("target_batches") or defaults.batches,
                    meta.get("checkpoint_every") or defaults.checkpoint_every,
                    meta.get("keep_checkpoints") or defaults.keep_checkpoints)


def default_tau(dataset: str, image_size: int | None) -> float:
    """The registry's tau for ``dataset``, scaled by (image_size / native size)^2 when images are pooled."""
    info = dataset_info(dataset)
    return info.tau * ((image_size or info.shape[1]) / info.shape[1]) ** 2


def new_config(given: dict) -> RunConfig:
    """A RunConfig from the given fields (``hyper`` a dict); defaults for the rest, tau per dataset."""
    kw = {k: v for k, v in given.items() if k != "hyper"}
    hyper = dict(given.get("hyper", {}))
    if kw.get("baseline"):
        if hyper.get("tau", 0.0) != 0.0:
            raise OptionError(f"--baseline trains with tau=0; drop --tau {hyper['tau']:g}")
        hyper["tau"] = 0.0
    elif "tau" not in hyper:
        hyper["tau"] = default_tau(kw.get("dataset", DEFAULT_DATASET), kw.get("image_size"))
    if kw.get("data") is not None:
        kw["data"] = str(Path(kw["data"]).resolve())
    config = RunConfig(**kw, hyper=hyper)
    config.make_hyper()  # validates every Hyper field now
    config.image_shape()  # and the image size
    return config


OUT_PATTERN = "runs/<dataset>[-s<S>]-n<n>-tau<T>|baseline-seed<seed>"  # default_out's names (-s<S>: --image-size)


def default_out(config: RunConfig) -> Path:
    """The run folder of ``config`` when none is given: :data:`OUT_PATTERN`."""
    tau = "baseline" if config.baseline else f"tau{config.hyper['tau']:g}"
    size = f"-s{config.image_size}" if config.image_size else ""
    return Path("runs") / f"{config.dataset}{size}-n{config.latent}-{tau}-seed{config.seed}"


def changed_fields(stored: RunConfig, given: dict) -> dict:
    """The entries of ``given`` (config field -> value, ``hyper`` a dict) that differ from ``stored``:
    field -> (given value, stored value); a Hyper field stored implicitly has its default."""
    stored_d = stored.to_dict()
    defaults = {f.name: f.default for f in fields(Hyper)}
    pairs = [(k, v, stored_d.get(k)) for k, v in given.items() if k != "hyper"]
    pairs += [(k, v, stored_d["hyper"].get(k, defaults.get(k) if k != "tau" else None))
              for k, v in given.get("hyper", {}).items()]
    changed = {}
    for key, value, old in pairs:
        value, old = (tuple(a) if isinstance(a, list) else a for a in (value, old))  # JSON stores tuples as lists
        if old != value:
            changed[key] = (value, old)
    return changed


def config_differences(stored: RunConfig, given: dict) -> list[str]:
    """The entries of ``given`` (config field -> value, ``hyper`` a dict) that differ from ``stored``, as text."""
    return [f"{key}={value!r} (the run has {old!r})" for key, (value, old) in changed_fields(stored, given).items()]
