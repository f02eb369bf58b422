"""Memory a command will need, estimated before it allocates, against what the machine has.

A size that cannot fit (``train --latent 1000000000``, ``reconstruct --scale 100000``,
``trace --steps 100000``) is refused with one line giving the estimate and the memory
available, instead of a MemoryError or the kernel's OOM killer much later.

Estimates, in bytes (sums of array sizes; rough, but never far below what is used):

- training step: the parameters four times (values, gradients, Adam's m and v) plus one
  batch's activations (:func:`activation_count`: every layer's output and im2col buffer,
  the decoder's twice on NumPy, for its two passes running side by side, and with
  ``--parallel-grads`` each convolution's second column matrix; 25-30% above the measured
  peak of a step with the plain decoder, several times above the fused one's);
- trace (host memory): per step, three copies of the parameters (before, gradient,
  after) and the step's inputs and intermediates (x, x1, x2, u, eps, mu, ...);
- image grid: the float64 canvas, its uint8 copy and the scaled image, twice (PNG encoding).

Available memory: ``MemAvailable`` of /proc/meminfo (else free pages from ``os.sysconf``);
on the CuPy backend the device's free memory.
"""

from __future__ import annotations

import math
import os

from .layers.im2col import conv_output_size
from .optionspec import OptionError

# Activations held at once, relative to one pass of the estimate's sum: calibrated on the
# traced peak of two real steps from a fresh model, the layers' kept scratch included, with
# the plain decoder (the larger; 64x64, 32x32, 16x16): the sum alone covers them by 5-8%
# (2026-12-03), and 1.2 leaves a margin. With the two decoder passes side by side (2026-12-06)
# the peak is 1.9x that of the passes in order (plain decoder; 1.4-1.5x fused), and the sum
# with the decoder counted twice, times 1.2, is 1.25-1.30x it.
ACTIVATION_FACTOR = 1.2


class NotEnoughMemory(OptionError):
    """A command's sizes need more memory than the machine has (a bad option: exit status 2)."""


def available_bytes(xp=None) -> tuple[int, str]:
    """(bytes available, where the number comes from) for arrays of backend ``xp`` (None: host)."""
    if xp is not None and xp.__name__ == "cupy":
        free, _ = xp.cuda.Device().mem_info
        return free + xp.get_default_memory_pool().free_bytes(), "free GPU memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free memory"


def human(n: float) -> str:
    """Bytes as ``1.5 GB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _encoder_sizes(arch):
    """(c_in, ConvSpec, h_out, w_out) for each encoder conv."""
    c, h, w = arch.image_shape
    for spec in arch.encoder_convs:
        h, w = (conv_output_size(s, spec.kernel, spec.stride, spec.padding) for s in (h, w))
        yield c, spec, h, w
        c = spec.channels


def _decoder_sizes(arch):
    """(c_in, h_in, w_in, ConvSpec, h_out, w_out) for each decoder block (BatchNorm, x2 upsample, conv)."""
    c, h, w = arch.encoder_feature_shape()
    for spec in arch.decoder_convs:
        h2, w2 = (conv_output_size(2 * s, spec.kernel, spec.stride, spec.padding) for s in (h, w))
        yield c, h, w, spec, h2, w2
        c, h, w = spec.channels, h2, w2


def parameter_count(arch, latent: int) -> int:
    """Parameters of the gated VAE (convs, BatchNorm affines, linears, gamma); exact."""
    feat = math.prod(arch.encoder_feature_shape())
    total = sum(s.channels * (c * s.kernel**2 + 1) + 2 * s.channels for c, s, _, _ in _encoder_sizes(arch))
    total += (feat + 1) * arch.hidden + (arch.hidden + 1) * 2 * latent  # encoder linears
    total += (latent + 1) * arch.hidden + (arch.hidden + 1) * feat  # decoder linears
    total += sum(2 * c + s.channels * (c * s.kernel**2 + 1) for c, _, _, s, _, _ in _decoder_sizes(arch))
    return total + latent  # gamma


def activation_count(arch, latent: int, batch: int, decoder_passes: int = 2, parallel_grads: bool = False) -> int:
    """Array elements one training step holds at once for a batch (an estimate).

    decoder_passes: the decoder passes in flight at once: 2 where l. 12 runs beside l. 13, each
    with its own scratch (NumPy, refimpl/threads.py), else 1. parallel_grads: the convolutions'
    backward GEMMs side by side (``FastPaths.parallel_grads``): each convolution that computes dx
    keeps a second column matrix, the input gradient's own (its "dcols" scratch), beside the one
    the weight gradient reads (the plain decoder's, the larger, for the decoder)."""
    per_image = math.prod(arch.image_shape) * 4  # x, x1, x2, the error's difference
    for c, s, h, w in _encoder_sizes(arch):
        per_image += c * s.kernel**2 * h * w + 4 * s.channels * h * w  # im2col, conv, leaky ReLU, BatchNorm
    per_image += 3 * arch.hidden + 3 * math.prod(arch.encoder_feature_shape()) + 12 * latent
    decoder = sum(2 * c * h * w + 4 * c * h * w + c * s.kernel**2 * h2 * w2 + 3 * s.channels * h2 * w2
                  for c, h, w, s, h2, w2 in _decoder_sizes(arch))
    per_image += decoder_passes * decoder
    if parallel_grads:  # dx's columns: every conv but the first (no dx for the image), once (backward is E2's)
        per_image += sum(c * s.kernel**2 * h * w for c, s, h, w in list(_encoder_sizes(arch))[1:])
        per_image += sum(c * s.kernel**2 * h2 * w2 for c, _, _, s, h2, w2 in _decoder_sizes(arch))
    return int(ACTIVATION_FACTOR * batch * per_image)


def training_bytes(arch, latent: int, batch: int, itemsize: int, decoder_passes: int = 2,
                   parallel_grads: bool = False) -> int:
    """A training step: parameters, gradients, Adam's moments and a batch's activations."""
    return itemsize * (4 * parameter_count(arch, latent)
                       + activation_count(arch, latent, batch, decoder_passes, parallel_grads))


def trace_bytes(arch, latent: int, batch: int, itemsize: int, steps: int) -> int:
    """``refimpl trace --steps``: the host copies of every step's recorded tensors (the training
    step itself is :func:`training_bytes`)."""
    per_step = 3 * parameter_count(arch, latent) + batch * (3 * math.prod(arch.image_shape) + 12 * latent)
    return steps * itemsize * per_step


def grid_bytes(height: int, width: int, channels: int, scale: int) -> int:
    """An image grid of ``height`` x ``width`` pixels (before scaling) saved as PNG."""
    pixels = height * width * channels
    return pixels * (8 + 1) + 2 * pixels * scale * scale


def check(need: int, what: str, advice: str, xp=None) -> None:
    """Refuse (:class:`NotEnoughMemory`) when ``need`` bytes exceed the memory available."""
    have, source = available_bytes(xp)
    if need > have:
        raise NotEnoughMemory(f"{what} needs about {human(need)} of memory; {human(have)} available ({source}): "
                              f"{advice}")


def check_training(arch, config, xp=None, paths=None) -> None:
    """Refuse a run whose training step cannot fit (before its model is built). ``paths``: the run's
    resolved execution (refimpl/execution.py; default: the default setting's for ``xp``)."""
    import numpy

    from .execution import default_paths

    passes = 2 if xp is None or xp.__name__ == "numpy" else 1  # CuPy runs the passes in order
    paths = paths or default_paths(xp or numpy)
    need = training_bytes(arch, config.latent, config.batch_size, numpy.dtype(config.dtype).itemsize, passes,
                          paths.parallel_grads)
    size = "x".join(map(str, arch.image_shape))
    check(need, f"a model of {parameter_count(arch, config.latent):,} parameters (n={config.latent}, {size} "
                f"images, hidden {arch.hidden}) trained on batches of {config.batch_size} ({config.dtype})",
          "reduce --latent, --batch-size, --hidden, --channels or --image-size", xp)
