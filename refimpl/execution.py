"""How a run executes: every fast path's switch, ``--reference``, and the threads; never part of the run.

The readable code the paper's math lives in is the *reference*; beside it, under names
that say so, sit faster twins that compute the same numbers (bit for bit, or to a stated
rounding: docs/execution.md has the table). :class:`Execution` holds one switch per fast
path, each declared once as an option of ``refimpl train`` (and ``trace``, ``evaluate``,
``sweep`` and the experiments); ``--reference`` turns every fast path off, and a switch
given on its own still wins (``--reference --shift-flat``: the plain program with one
fast twin, for benchmarking).

An Execution is resolved once, when a run or model is built (:meth:`Execution.resolve`),
into a frozen :class:`FastPaths` for one backend; the layers, Adam, the loop and the
threads (:mod:`refimpl.threads`) receive it then and read only it. Nothing here is saved
with a run: a run may continue under another setting or backend (its numbers then
continue to the twins' stated agreement, bit for bit where every twin it changes claims
that).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields

from .optionspec import OptionError, option

UPSAMPLE_METHODS = ("auto", "im2col", "col2im", "difference")  # refimpl/layers/upsample_conv2d.py
DECODER_PASSES = ("parallel", "sequential")


def cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _blas_threads(text: str) -> str:
    """An argparse type: ``auto`` or a positive integer (kept as text)."""
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}")
    return text


@dataclass
class Execution:
    """How the step executes (options of ``refimpl train``), not part of the run. A switch left at None
    takes its default: on (where its backend says so), off with ``reference``."""

    reference: bool = option(False, "run every layer, Adam and the step on their plain code, the reference "
                                    "(every fast path below off unless given)", parse=bool)
    fused: bool | None = option(None, "decoder blocks as one UpsampleConv2d on the low-resolution input, or as "
                                      "Upsample then Conv2d (the plain pair); to rounding (default: fused on numpy, "
                                      "the pair on cupy, the faster on each)", parse=bool)
    upsample_method: str = option("auto", "how the fused decoder block evaluates its four phases: one GEMM over a "
                                          "3x3 im2col, one over x and a col2im, or nine products with x and its "
                                          "differences; auto picks by channels; to rounding", choices=UPSAMPLE_METHODS)
    fast_batchnorm: bool | None = option(None, "BatchNorm in fewer passes over the maps (dot products for the "
                                               "sums, factors folded); to rounding (default: on)", parse=bool)
    cuda_kernels: bool | None = option(None, "cupy: refimpl/kernels.py's fused CUDA kernels for im2col, col2im, "
                                             "BatchNorm and Adam; col2im's and im2col's bit for bit, the rest to "
                                             "rounding (default: on with cupy)", parse=bool)
    im2col_phases: bool | None = option(None, "strided convolutions' im2col and col2im through the input's stride "
                                              "phases; bit for bit (default: on)", parse=bool)
    shift_flat: bool | None = option(None, "shifted block copies as one flat slice per row (im2col's phases, the "
                                           "fused decoder block); bit for bit (default: on)", parse=bool)
    device_step: bool = option(False, "after the first hit, Algorithm 1's step without host reads "
                                      "(refimpl/device_step.py): for GPUs; the same numbers up to the last bit "
                                      "of lambda'", parse=bool)
    decoder_passes: str | None = option(None, "l. 12-13: the E1 decoder pass in a second thread beside the E2 pass "
                                              "(NumPy, --e1-batchnorm batch, 2 cores or more), or one after the "
                                              "other; bit for bit (default: parallel; sequential with --reference)",
                                        choices=DECODER_PASSES)
    parallel_grads: bool | None = option(None, "each convolution's backward pass (Conv2d, UpsampleConv2d): the "
                                               "weight gradient's GEMM in a second thread beside the input "
                                               "gradient's (NumPy; one more column matrix per layer); bit for bit "
                                               "(default: on with NumPy and 2 cores or more, off where "
                                               "--blas-threads N is over half the cores)", parse=bool)
    parallel_elementwise: bool | None = option(None, "the elementwise lines of BatchNorm's fast twin, LeakyReLU and "
                                                     "the fused decoder block's backward phases over two halves "
                                                     "(of the batch, or of the phases) in two threads, on maps "
                                                     "large enough to pay; never a reduction (NumPy); bit for bit "
                                                     "(default: on with NumPy and 2 cores or more)", parse=bool)
    blas_threads: str = option("auto", "BLAS threads for the step's GEMMs, each decoder pass using half of them: "
                               "auto (1 for small models, half the cores for larger ones; $OPENBLAS_NUM_THREADS or "
                               "$OMP_NUM_THREADS when set) or a number. Numbers depend on it (OpenBLAS's rounding)",
                               parse=_blas_threads, metavar="auto|N")

    def __post_init__(self):
        try:
            _blas_threads(str(self.blas_threads))
        except argparse.ArgumentTypeError as exc:
            raise OptionError(f"blas_threads: {exc}") from None
        for f in fields(self):  # the switches: on, off, or (where the default decides) not given
            if f.metadata.get("parse") is bool and getattr(self, f.name) not in (None, True, False):
                raise OptionError(f"{f.name}={getattr(self, f.name)!r}: expected true or false")
        for name, choices in (("decoder_passes", (None, *DECODER_PASSES)), ("upsample_method", UPSAMPLE_METHODS)):
            if getattr(self, name) not in choices:
                raise OptionError(f"{name}={getattr(self, name)!r}: expected one of "
                                  f"{', '.join(c for c in choices if c)}")

    def resolve(self, backend: str) -> "FastPaths":
        """The fast paths taken on ``backend`` ("numpy" or "cupy"; a module's ``__name__``): each switch
        given, else its default (off with ``reference``)."""
        backend = getattr(backend, "__name__", backend)
        cupy = backend == "cupy"

        def on(switch, default=True):
            return bool(switch) if switch is not None else default and not self.reference

        return FastPaths(
            fused=on(self.fused, not cupy),  # bench/NOTES.md: 2-22x faster on the CPU, twice slower on an H100
            upsample_method=self.upsample_method,
            fast_batchnorm=on(self.fast_batchnorm),
            cuda_kernels=cupy and on(self.cuda_kernels),
            im2col_phases=on(self.im2col_phases),
            shift_flat=on(self.shift_flat),
            device_step=bool(self.device_step),
            decoder_passes=self.decoder_passes or ("sequential" if self.reference else "parallel"),
            # two GEMMs at once, each on the step's BLAS threads: by default only where both fit the cores
            parallel_grads=not cupy and on(self.parallel_grads, cores() >= 2 and (
                self.blas_threads == "auto" or 2 * int(self.blas_threads) <= cores())),
            parallel_elementwise=not cupy and on(self.parallel_elementwise, cores() >= 2),
            blas_threads=str(self.blas_threads),
        )


@dataclass(frozen=True)
class FastPaths:
    """An :class:`Execution` resolved for one backend: which twin each switch takes (True: the fast one).
    The default, ``FastPaths()``, is the reference: every plain twin, in order."""

    fused: bool = False  # refimpl/model.py: UpsampleConv2d, else Upsample + Conv2d
    upsample_method: str = "auto"  # UpsampleConv2d's method
    fast_batchnorm: bool = False  # BatchNorm's _fast twins, else _plain
    cuda_kernels: bool = False  # refimpl/kernels.py (cupy only)
    im2col_phases: bool = False  # im2col's _phases twins, else _windows
    shift_flat: bool = False  # shift.shift_flat, else shift.shift
    device_step: bool = False  # refimpl/device_step.py after the first hit, else train_step
    decoder_passes: str = "sequential"  # refimpl/threads.py
    parallel_grads: bool = False  # Conv2d's and UpsampleConv2d's backward: dW's GEMM beside dx's (refimpl/threads.py)
    parallel_elementwise: bool = False  # BatchNorm, LeakyReLU, UpsampleConv2d: elementwise lines in halves (threads.py)
    blas_threads: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


REFERENCE = FastPaths()


def default_paths(backend) -> FastPaths:
    """The default setting's paths on ``backend`` (a name or an array module): a layer built on its own."""
    return Execution().resolve(backend)


if __name__ == "__main__":  # python -m refimpl.execution: the README's table of these options
    from .options import markdown_table
    print(markdown_table(Execution))
