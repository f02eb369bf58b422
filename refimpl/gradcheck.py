"""Central finite differences, for checking hand-written backward passes (cf. Chainer's gradient_check).

Everything here runs in whatever dtype the inputs have; use float64 for tight tolerances.
"""

from __future__ import annotations

from .backend import array_module


def numerical_gradient(f, x, eps=1e-6):
    """d f / d x by central differences, perturbing ``x`` in place element by element.

    f: () -> scalar, reading ``x``; x: any-shape array. Returns an array shaped like x.
    """
    xp = array_module(x)
    grad = xp.zeros_like(x)
    flat_x, flat_g = x.reshape(-1), grad.reshape(-1)
    for k in range(flat_x.size):
        original = flat_x[k].copy()
        flat_x[k] = original + eps
        plus = float(f())
        flat_x[k] = original - eps
        minus = float(f())
        flat_x[k] = original
        flat_g[k] = (plus - minus) / (2 * eps)
    return grad


def layer_loss(layer, x, dy):
    """The scalar sum(forward(x) * dy) whose gradients are exactly what backward(dy) returns."""
    return float((layer.forward(x, cache=False) * dy).sum())


def check_layer_gradients(layer, x, dy, eps=1e-6, atol=1e-8, rtol=1e-6):
    """Compare ``layer.backward(dy)`` (input and parameter gradients) with finite differences.

    Returns a dict name -> (analytic, numeric) and raises AssertionError on the first mismatch.
    The layer's running statistics (BatchNorm) are restored after the numeric passes.
    """
    xp = array_module(x)
    saved_buffers = {name: b.copy() for name, b in layer.named_buffers()}
    layer.zero_grad()
    layer.forward(x, cache=True)
    analytic = {"x": layer.backward(dy)}
    analytic.update({name: g.copy() for name, g in layer.gradients().items()})
    numeric = {"x": numerical_gradient(lambda: layer_loss(layer, x, dy), x, eps)}
    for name, p in layer.parameters().items():
        numeric[name] = numerical_gradient(lambda: layer_loss(layer, x, dy), p, eps)
    for name, b in layer.named_buffers():
        b[...] = saved_buffers[name]
    results = {}
    for name in analytic:
        a, n = analytic[name], numeric[name]
        if not xp.allclose(a, n, atol=atol, rtol=rtol):
            err = float(xp.abs(a - n).max())
            raise AssertionError(f"{type(layer).__name__} gradient {name!r}: max abs error {err:.3e} "
                                 f"(atol={atol}, rtol={rtol})")
        results[name] = (a, n)
    return results
