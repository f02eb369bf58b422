"""How the CPU step uses the machine's cores: BLAS threads, l. 12 beside l. 13, dW beside dx, elementwise halves.

Four switches of the execution setting (:class:`refimpl.execution.Execution`, ``refimpl train
--blas-threads``, ``--decoder-passes``, ``--parallel-grads``, ``--parallel-elementwise``), not part of
a run, resolved once for a model (:func:`resolve`, from its :class:`~refimpl.execution.FastPaths`) and
kept in :class:`refimpl.algorithm1.TrainState` as its :class:`DecoderPasses` (the last two: read by the
layers from their ``paths``):

- ``blas_threads``: the threads OpenBLAS (NumPy's GEMMs) may use in the step. ``auto``:
  one for a model whose GEMMs are small (the 16x16 and 28x28 models), half the cores for
  larger ones (one on 2 cores), the other half going to the second decoder pass; the
  library's own count when ``$OPENBLAS_NUM_THREADS`` or ``$OMP_NUM_THREADS`` is set (a
  sweep's workers set them). More BLAS threads than free cores is what a busy machine
  punishes most: a GEMM split over 2 threads waits for the one that shares its core
  (bench/NOTES.md, 2026-12-06: the 16x16 step 17 -> 650 ms).
- ``decoder_passes``: ``parallel`` runs the E1 decoder pass (l. 12, never
  differentiated) in a second thread beside the E2 pass (l. 13); NumPy releases the GIL
  inside its loops and GEMMs. ``sequential`` is the reference (``--reference``): l. 12,
  then l. 13, as written. The E1 pass runs on a twin of the decoder (:meth:`refimpl.layers.layer.Layer.twin`:
  the same parameters, its own caches and scratch arrays). Only where the two passes are
  independent: the NumPy backend, and E1 with its own batch statistics
  (``e1_batchnorm="batch"``); ``batch_update`` writes and ``running`` reads the running
  statistics the E2 pass updates, so those run in order.
- ``parallel_grads``: in the backward pass of each convolution (``Conv2d``,
  ``UpsampleConv2d``), the weight gradient's GEMM runs in a worker thread
  (:func:`side_by_side`) beside the input gradient's, which the layer's main thread runs; the
  layers read the switch from their ``paths`` (``layers/grad_gemms.py``'s twin). Both
  GEMMs run whole, on the step's BLAS threads, as in order: never one GEMM split over threads,
  which OpenBLAS rounds differently in float32.
- ``parallel_elementwise``: elementwise lines over two halves, one in the same worker thread
  (:func:`in_halves`), the other in the calling thread: BatchNorm's fast twin (centring, the
  affine line, the backward's lines; never its per-channel sums), LeakyReLU both ways, the
  encoder's im2col and col2im through stride phases (copies by kernel row, sums by row phase,
  each sum in its order) and UpsampleConv2d's col2im backward phases. Each element is computed
  by the same operations as whole, so the same numbers bit for bit. Only on maps of
  :data:`ELEMENTWISE_MIN_BYTES` or more (:func:`elementwise_runner`), and not while the decoder
  passes run side by side (:func:`cores_taken`: both cores are busy then).

Each decoder pass runs its GEMMs on half the step's BLAS threads (at least one), in order
and side by side alike: OpenBLAS's float32 GEMMs round differently with 1 and 2 threads
(float64 too for some shapes), so the same thread count in both ways is what makes them
equal bit for bit (``tests/test_threads.py``). A run's numbers depend on its BLAS thread
count, so a resumed run continues bit for bit with the same ``--blas-threads`` (``auto``
gives the same count on the same machine).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy

from .execution import FastPaths, cores

BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
# auto: more than one BLAS thread from this many GEMM multiply-adds per image of a decoder pass
# on (bench/NOTES.md, 2026-12-06: the 16x16 model (2.6e6) gains 7% from a second thread on an idle
# machine, the 32x32 one (7.5e6) 20%).
BLAS_WORK_THRESHOLD = 5e6


def decoder_work(model) -> float:
    """GEMM multiply-adds per image of one decoder pass (the measure ``auto`` compares with the threshold)."""
    total, shape = 0.0, None
    for _, layer in model.decoder.children():
        weight = layer.params.get("weight")
        kind = type(layer).__name__
        if kind == "Linear":
            total += weight.size
        elif kind == "Reshape":
            shape = layer.shape
        elif kind in ("Conv2d", "UpsampleConv2d"):
            c, h, w = shape
            h, w = (2 * h, 2 * w) if kind == "UpsampleConv2d" else (h, w)
            total += weight.size * h * w  # the upsampled map's every pixel, each tap
            shape = (weight.shape[0], h, w)
        elif kind == "Upsample":
            shape = (shape[0], 2 * shape[1], 2 * shape[2])
    return total


def library_threads() -> int:
    """The threads NumPy's BLAS uses now (threadpoolctl)."""
    counts = [lib["num_threads"] for lib in _controller().info() if lib["user_api"] == "blas"]
    return max(counts, default=1)


def blas_thread_count(setting: str, model, environ=os.environ) -> int | None:
    """The BLAS threads for ``model``'s step under ``setting``; None: leave the library's own."""
    if setting != "auto":
        return int(setting)
    if model.xp.__name__ != "numpy" or any(environ.get(k) for k in BLAS_ENV):
        return None
    return 1 if decoder_work(model) < BLAS_WORK_THRESHOLD else max(1, cores() // 2)


@dataclass(frozen=True)
class Threads:
    """A :class:`~refimpl.execution.FastPaths` resolved for one model: BLAS threads of the step and of each decoder pass
    (None: the library's), and whether the passes run side by side."""

    blas: int | None = None
    pass_blas: int | None = None
    parallel_passes: bool = False


SEQUENTIAL = Threads()


def resolve(paths: FastPaths, model) -> Threads:
    """The threading of ``model``'s step under ``paths``.

    Each decoder pass gets half the step's BLAS threads (at least one), in order or side by side
    alike: OpenBLAS's GEMMs round differently with 1 and 2 threads, so both ways must use the same
    count to give the same numbers. Side by side only where the two halves fit the cores. CuPy
    never threads.
    """
    if model.xp.__name__ != "numpy":
        return SEQUENTIAL
    blas = blas_thread_count(paths.blas_threads, model)
    share = max(1, (blas if blas is not None else library_threads()) // 2)
    return Threads(blas, share, paths.decoder_passes == "parallel" and 2 * share <= cores())


@functools.cache
def _controller():
    """threadpoolctl's handle on the loaded thread pools (found once: ~1 ms; a limit then costs ~10 us)."""
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()


@contextlib.contextmanager
def blas_limit(threads: int | None):
    """BLAS limited to ``threads`` inside the block (None: unchanged); restored after."""
    if threads is None:
        yield
        return
    with _controller().limit(limits=threads, user_api="blas"):
        yield


class DecoderPasses:
    """l. 12 and l. 13 for one model: in order, or the E1 pass in a worker thread beside the E2 pass."""

    def __init__(self, model, threads: Threads):
        self.model, self.threads = model, threads
        self._twin = None

    def __call__(self, z1, z2, mode: str, e1_pass):
        """The decoder's outputs (x1, x2) for z1 = z * nu1 (l. 12, not cached) and z2 = z * nu2 (l. 13, cached).

        z1, z2: (B, n); mode: ``Hyper.e1_batchnorm``; e1_pass(model, z1, mode): the reference l. 12.
        Side by side only with ``mode == "batch"``, where the E1 pass reads and writes nothing the E2 pass does.
        """
        decoder = self.model.decoder
        with blas_limit(self.threads.pass_blas):  # both ways the same GEMMs on the same threads
            if not (self.threads.parallel_passes and mode == "batch"):
                return e1_pass(self.model, z1, mode), decoder.forward(z2)  # l. 12, then l. 13
            if self._twin is None:
                self._twin = decoder.twin()
                for _, layer in self._twin.children():
                    if hasattr(layer, "update_running"):
                        layer.update_running = False  # (h) "batch": E1 leaves the running statistics alone
            with cores_taken():  # both cores busy: the layers' elementwise lines run whole
                # the caller's context (NumPy's errstate lives in a context variable) travels with the task
                context = contextvars.copy_context()
                x1 = _worker("refimpl-e1", os.getpid()).submit(context.run, self._twin.forward, z1, False)  # l. 12
                try:
                    x2 = decoder.forward(z2)  # l. 13
                finally:
                    x1 = x1.result()
            return x1, x2


GRADS_THREAD = "refimpl-grads"


@functools.cache
def _worker(name: str, pid: int) -> ThreadPoolExecutor:
    """The one worker thread called ``name`` in process ``pid`` (the E1 pass's, :func:`side_by_side`'s), made on
    first use and kept for the process (a forked child makes its own: the parent's thread does not exist there)."""
    return ThreadPoolExecutor(1, thread_name_prefix=name)


def side_by_side(f, g):
    """(f(), g()) with f in a worker thread while g runs in this one: two GEMMs at once (NumPy releases the GIL in them).

    Returns when both have finished. An exception of g is raised once f has finished too; else one of f's.
    The caller's context (NumPy's errstate lives in a context variable) travels with f. A call from the worker
    itself runs f, then g, in order (the worker never waits on itself).
    """
    if threading.current_thread().name.startswith(GRADS_THREAD):
        return f(), g()
    future = _worker(GRADS_THREAD, os.getpid()).submit(contextvars.copy_context().run, f)
    try:
        b = g()
    except BaseException:
        wait((future,))  # f may still read what the caller is about to reuse
        raise
    return future.result(), b


# ------------------------------------------------------------ elementwise work over the batch's two halves

# parallel_elementwise: an elementwise line runs over two halves side by side only on arrays of at least this many
# bytes. Measured (bench/NOTES.md, 2026-12-07, lever 2; idle 2-CPU VM): a hand-over to the worker costs ~30-60 us
# here, so LeakyReLU's forward + backward over two halves took 1.19x its whole time on a 2 MiB float32 map, 0.99x
# on 2 MiB of float64, 0.70x on 4 MiB and 0.50x on 8 MiB; in the gated 64x64 step (one process, on/off) thresholds
# of 1 / 2 / 4 / 8 MiB gave 1.07 / 1.05 / 1.00 / 1.00 (64x64x1 float32) and 0.95 / 0.93 / 0.92 / 0.92 (64x64x3 float32).
ELEMENTWISE_MIN_BYTES = 4 << 20

_cores_taken = contextvars.ContextVar("refimpl_cores_taken", default=False)


@contextlib.contextmanager
def cores_taken():
    """Inside the block, :func:`elementwise_runner` runs every line whole (the step's threads already hold the cores:
    the decoder passes side by side). The E1 pass's task copies the context, so it sees this too."""
    token = _cores_taken.set(True)
    try:
        yield
    finally:
        _cores_taken.reset(token)


def whole(line, n: int) -> None:
    """line(slice(0, n)): an elementwise line over the whole batch (the reference)."""
    line(slice(0, n))


def in_halves(line, n: int) -> None:
    """:func:`whole`'s twin: line(slice(0, n // 2)) in the worker thread (:func:`side_by_side`) beside
    line(slice(n // 2, n)) here. Each element computed by the same operations as whole, so the same values bit
    for bit; never for a reduction (its sums would be associated differently)."""
    if n < 2:
        return line(slice(0, n))
    h = n // 2
    side_by_side(lambda: line(slice(0, h)), lambda: line(slice(h, n)))


def elementwise_runner(paths: FastPaths, a):
    """:func:`in_halves` for elementwise lines over arrays shaped like ``a`` (batch first) where
    ``paths.parallel_elementwise``, ``a`` is a NumPy array of at least :data:`ELEMENTWISE_MIN_BYTES` and
    two images, and no other thread of the step holds the second core; else :func:`whole`."""
    if (paths.parallel_elementwise and type(a) is numpy.ndarray and a.nbytes >= ELEMENTWISE_MIN_BYTES
            and a.shape[0] >= 2 and not _cores_taken.get()
            and not threading.current_thread().name.startswith(GRADS_THREAD)):
        return in_halves
    return whole
