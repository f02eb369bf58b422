"""Parameter initialisation, drawn on the host from an explicit generator.

The paper does not say how weights are initialised. The default, ``"torch"``, is
PyTorch's default for Conv2d and Linear: weight and bias ~ U(-1/sqrt(fan_in),
1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5)). ``"keras"`` is Keras's default:
Glorot-uniform weight, U(-sqrt(6/(fan_in+fan_out)), +...), and zero bias.
fan_in = in_features * kh * kw, fan_out = out_features * kh * kw.
"""

from __future__ import annotations

import math

from ..rng import uniform

INITS = ("torch", "keras")


def init_weight_bias(rng, weight_shape, xp, dtype, init: str = "torch"):
    """Return ``(weight, bias)`` for a Linear (out, in) or Conv2d (out, in, kh, kw) weight shape."""
    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {', '.join(INITS)}")
    receptive = math.prod(weight_shape[2:])
    fan_in = weight_shape[1] * receptive
    fan_out = weight_shape[0] * receptive
    if init == "torch":
        bound = 1.0 / math.sqrt(fan_in)
        weight = uniform(rng, weight_shape, xp, dtype, -bound, bound)
        bias = uniform(rng, (weight_shape[0],), xp, dtype, -bound, bound)
    else:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        weight = uniform(rng, weight_shape, xp, dtype, -limit, limit)
        bias = xp.zeros((weight_shape[0],), dtype=dtype)
    return weight, bias
