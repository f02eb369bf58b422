"""Fused CUDA kernels for the CuPy backend: one launch where the plain array code needs many.

At the paper's sizes a CuPy training step is bound by launching kernels, not by the GPU
(bench/NOTES.md: about 1,500 launches per step, the GPU busy a fifth of the time). Each
function here replaces one such chain with a single ``cupy.ElementwiseKernel``:

- :func:`adam_update`: Adam's ~13 array operations per parameter (refimpl/adam.py);
- :func:`im2col` and :func:`col2im`: the pad and the ``kh * kw`` slice copies or adds of
  refimpl/layers/im2col.py, as one gather each (every output element reads its inputs;
  no atomics, and col2im sums its terms in the reference's order);
- BatchNorm's elementwise chains (refimpl/layers/batchnorm.py): the per-channel running
  statistics and 1/sqrt(var + eps), the normalisation with the affine map, and the
  training-mode input gradient; its reductions stay CuPy's.

The plain array code stays the reference and runs on NumPy and, with the kernels switched
off, on CuPy too: a caller takes a kernel only where the run's resolved setting says
``cuda_kernels`` (:class:`refimpl.execution.FastPaths`: on with CuPy unless ``--reference``
or ``--no-cuda-kernels``), never by looking at the arrays. tests/test_kernels.py checks each
kernel against the reference (skipped without CUDA). Kernels are compiled on first
use (CuPy caches them on disk) with ``--fmad=false``, so that no multiply-add is
contracted into an FMA that the NumPy reference does not do.
"""

from __future__ import annotations

import functools

from .backend import array_module

_OPTIONS = ("--fmad=false",)


@functools.cache
def _kernel(name: str):
    import cupy  # only reached with CuPy arrays in hand (FastPaths.cuda_kernels is true on cupy only)

    params, outputs, body = _SOURCES[name]
    return cupy.ElementwiseKernel(params, outputs, body, f"refimpl_{name}", options=_OPTIONS)


_SOURCES = {
    # refimpl/adam.py, Adam.step, for one parameter; every scalar is cast to T first, as there
    "adam": (
        "T g, T sign, T b1, T b2, T one_minus_b1, T one_minus_b2, T sqrt_c2, T eps, T step_size",
        "T p, T m, T v",
        """
        T gs = sign * g;
        m = m * b1 + one_minus_b1 * gs;
        v = v * b2 + one_minus_b2 * (gs * gs);
        p = p - step_size * (m / (sqrt(v) / sqrt_c2 + eps));
        """,
    ),
    # refimpl/layers/im2col.py, im2col: cols (C, kh, kw, N, Ho, Wo) from x (N, C, H, W), zero padding
    "im2col": (
        "raw T x, int32 C, int32 H, int32 W, int32 kh, int32 kw, int32 N, int32 Ho, int32 Wo, "
        "int32 sh, int32 sw, int32 ph, int32 pw",
        "T cols",
        """
        ptrdiff_t q = i;
        const int wo = q % Wo; q /= Wo;
        const int ho = q % Ho; q /= Ho;
        const int n = q % N; q /= N;
        const int b = q % kw; q /= kw;
        const int a = q % kh;
        const int c = q / kh;
        const int r = ho * sh + a - ph, s = wo * sw + b - pw;
        cols = (r >= 0 && r < H && s >= 0 && s < W) ? x[((ptrdiff_t)(n * C + c) * H + r) * W + s] : (T)0;
        """,
    ),
    # refimpl/layers/im2col.py, col2im: dx (N, C, H, W) = the sum of every window holding (r, s),
    # in the reference's order (offsets (a, b) row by row)
    "col2im": (
        "raw T cols, int32 N, int32 C, int32 H, int32 W, int32 kh, int32 kw, int32 Ho, int32 Wo, "
        "int32 sh, int32 sw, int32 ph, int32 pw",
        "T dx",
        """
        ptrdiff_t q = i;
        const int s = q % W; q /= W;
        const int r = q % H; q /= H;
        const int c = q % C;
        const int n = q / C;
        T acc = 0;
        for (int a = 0; a < kh; ++a) {
            const int rr = r + ph - a;
            if (rr < 0 || rr % sh != 0 || rr / sh >= Ho) continue;
            for (int b = 0; b < kw; ++b) {
                const int ss = s + pw - b;
                if (ss < 0 || ss % sw != 0 || ss / sw >= Wo) continue;
                acc += cols[((((ptrdiff_t)(c * kh + a) * kw + b) * N + n) * Ho + rr / sh) * Wo + ss / sw];
            }
        }
        dx = acc;
        """,
    ),
    # refimpl/layers/batchnorm.py: per channel, the running statistics (in place) ...
    "bn_running": (
        "T mean, T var, T m, T one_minus_m, T var_scale",
        "T running_mean, T running_var",
        """
        running_mean = m * running_mean + one_minus_m * mean;
        running_var = m * running_var + one_minus_m * (var * var_scale);
        """,
    ),
    # ... and 1 / sqrt(var + eps)
    "bn_inv_std": ("T var, T eps", "T inv_std", "inv_std = (T)1 / sqrt(var + eps);"),
    # x_hat and y = w x_hat + b; per-channel operands broadcast as (1, C, 1, 1) or (1, C)
    "bn_normalize": (
        "T x, T mean, T inv_std, T w, T b",
        "T x_hat, T y",
        """
        x_hat = (x - mean) * inv_std;
        y = w * x_hat + b;
        """,
    ),
    # training mode: dx = w inv_std (dy - sum(dy) / m - x_hat sum(dy x_hat) / m)
    "bn_backward": (
        "T dy, T x_hat, T w, T inv_std, T sum_dy, T sum_dy_x_hat, T m",
        "T dx",
        "dx = (w * inv_std) * ((dy - sum_dy / m) - x_hat * (sum_dy_x_hat / m));",
    ),
}


def adam_update(p, g, m, v, *, sign, b1, b2, sqrt_c2, eps, step_size) -> None:
    """In place: m, v and p of one parameter after one Adam step (refimpl/adam.py's formulas).

    p, g, m, v: same shape and dtype; ``sign`` -1 for a maximised parameter, else 1.
    """
    t = p.dtype.type  # the scalars in p's dtype, as NumPy casts Python floats in the reference
    _kernel("adam")(g, t(sign), t(b1), t(b2), t(1 - b1), t(1 - b2), t(sqrt_c2), t(eps), t(step_size), p, m, v)


def im2col(x, kernel, stride, padding, out_size):
    """x: (N, C, H, W) -> cols: (C*kh*kw, N*Ho*Wo), as refimpl.layers.im2col.im2col."""
    xp = array_module(x)
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = kernel, stride, padding, out_size
    n, c, h, w = x.shape
    cols = xp.empty((c * kh * kw, n * ho * wo), dtype=x.dtype)
    _kernel("im2col")(xp.ascontiguousarray(x), c, h, w, kh, kw, n, ho, wo, sh, sw, ph, pw, cols)
    return cols


def col2im(cols, x_shape, kernel, stride, padding, out_size):
    """cols: (C*kh*kw, N*Ho*Wo) -> dx: (N, C, H, W), as refimpl.layers.im2col.col2im."""
    xp = array_module(cols)
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = kernel, stride, padding, out_size
    n, c, h, w = x_shape
    dx = xp.empty((n, c, h, w), dtype=cols.dtype)
    _kernel("col2im")(xp.ascontiguousarray(cols), n, c, h, w, kh, kw, ho, wo, sh, sw, ph, pw, dx)
    return dx


def batchnorm_running_update(running_mean, running_var, mean, var, *, momentum, var_scale) -> None:
    """In place: running = momentum running + (1 - momentum) batch, for the mean and var * var_scale.

    running_*: (C,); mean, var: (C,) (callers flatten their (1, C, 1, 1) statistics).
    """
    t = running_mean.dtype.type
    _kernel("bn_running")(mean, var, t(momentum), t(1 - momentum), t(var_scale), running_mean, running_var)


def batchnorm_inv_std(var, eps):
    """1 / sqrt(var + eps), elementwise."""
    return _kernel("bn_inv_std")(var, var.dtype.type(eps))


def batchnorm_normalize(x, mean, inv_std, weight, bias):
    """(x_hat, y): x_hat = (x - mean) inv_std, y = weight x_hat + bias; per-channel arrays shaped to broadcast."""
    return _kernel("bn_normalize")(x, mean, inv_std, weight, bias)


def batchnorm_backward(dy, x_hat, weight, inv_std, sum_dy, sum_dy_x_hat, m):
    """Training-mode dx of BatchNorm from the per-channel sums of dy and dy x_hat over m values."""
    return _kernel("bn_backward")(dy, x_hat, weight, inv_std, sum_dy, sum_dy_x_hat, dy.dtype.type(m))
