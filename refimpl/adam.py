"""Adam (Kingma & Ba), bias-corrected, in the same form as ``torch.optim.Adam``:

    m <- b1 m + (1 - b1) g                 v <- b2 v + (1 - b2) g^2
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

``eps`` is a parameter because the two frameworks the paper could have used differ:
PyTorch's default is 1e-8; Keras's is 1e-7 and Keras adds it to sqrt(v) *before* the
bias correction of v ("epsilon hat"), which only matters in the first steps. We use
the PyTorch form with the PyTorch default 1e-8.

Step counts (interpretation (n) of ``refimpl/INTERPRETATIONS.md``): ``t`` in the bias
corrections is counted per parameter, in ``steps[name]``. A plain ``step(grads)`` steps
every parameter, so every count equals the global count ``t`` (TF/Keras and optax keep
one count for all). ``step(grads, skip=names)`` leaves the named parameters exactly as
they are -- no moment decay, no update, no count -- which is what ``torch.optim.Adam``
does with a parameter whose ``.grad`` is None: its count then starts at its first
gradient (Algorithm 1's gamma before the first hit, ``Hyper.adam_steps="per_parameter"``).

Parameters and gradients are dicts of backend arrays (``Layer.parameters()`` and
``Layer.gradients()``); ``step`` updates the parameter arrays in place. ``maximize``
names parameters that are moved up their gradient instead of down (GECO's lambda);
``lrs`` gives parameters a learning rate of their own (name -> lr, the rest use ``lr``;
lambda's, interpretation (q)). Learning rates are settings, not state: ``state_dict``
holds none, so a checkpoint resumes under any rates.

``cuda_kernels`` (the run's resolved setting, :class:`refimpl.execution.FastPaths`; CuPy
only): each parameter's update as one CUDA kernel (refimpl/kernels.py, the same formulas;
equal to a few units in the last place, tests/test_kernels.py) instead of the plain lines
of :meth:`Adam._update`.
"""

from __future__ import annotations

import math

from .backend import array_module, to_device, to_host
from .kernels import adam_update


class Adam:
    def __init__(self, params: dict, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=(), lrs=None,
                 cuda_kernels: bool = False):
        lrs = dict(lrs or {})
        for name, rate in [("lr", lr), *((f"lrs[{k!r}]", v) for k, v in lrs.items())]:
            if not rate > 0:  # also rejects NaN
                raise ValueError(f"Adam {name}={rate}: expected > 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Adam betas={betas}: expected both in [0, 1)")
        if not eps > 0:
            raise ValueError(f"Adam eps={eps}: expected > 0")
        for option, names in (("maximize", maximize), ("lrs", lrs)):
            unknown = sorted(set(names) - set(params))
            if unknown:
                raise ValueError(f"Adam {option}={unknown}: not among the parameters")
        self.params = params
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.lrs = {name: lrs.get(name, lr) for name in params}  # each parameter's learning rate
        self.maximize = frozenset(maximize)
        self.update = self._update_cuda if cuda_kernels else self._update  # the twin, chosen once
        self.t = 0  # calls of step(): the global count
        self.steps = {name: 0 for name in params}  # updates each parameter has had: its own count
        self.m = {name: array_module(p).zeros_like(p) for name, p in params.items()}
        self.v = {name: array_module(p).zeros_like(p) for name, p in params.items()}

    def step(self, grads: dict, skip=()) -> None:
        """One update of every parameter from ``grads`` (same names as the parameters).

        ``skip``: names of parameters that had no gradient at this step; they are left
        untouched (moments, value and step count), as ``torch.optim.Adam`` leaves a
        parameter whose ``.grad`` is None. Their entries in ``grads`` are not read.
        """
        skip = frozenset(skip)
        unknown = sorted(skip - set(self.params))
        if unknown:
            raise ValueError(f"Adam.step: skip names {unknown}, not among the parameters")
        missing = sorted(set(self.params) - set(grads) - skip)
        if missing:
            raise ValueError(f"Adam.step: no gradient for {missing}")
        self.t += 1
        for name in self.params:
            if name not in skip:
                self.steps[name] += 1
                self.update(name, grads[name])

    def _update(self, name: str, grad) -> None:
        """The update of parameter ``name`` at its own count t (module docstring), in place."""
        b1, b2 = self.betas
        t = self.steps[name]
        p, m, v = self.params[name], self.m[name], self.v[name]
        g = -grad if name in self.maximize else grad
        m *= b1
        m += (1 - b1) * g  # m <- b1 m + (1 - b1) g
        v *= b2
        v += (1 - b2) * (g * g)  # v <- b2 v + (1 - b2) g^2
        denom = array_module(p).sqrt(v) / math.sqrt(1 - b2**t) + self.eps
        p -= (self.lrs[name] / (1 - b1**t)) * (m / denom)  # p <- p - lr m_hat / (sqrt(v_hat) + eps)

    def _update_cuda(self, name: str, grad) -> None:
        """:meth:`_update` as one CUDA kernel (refimpl/kernels.py)."""
        b1, b2 = self.betas
        t = self.steps[name]
        adam_update(self.params[name], grad, self.m[name], self.v[name], sign=-1.0 if name in self.maximize else 1.0,
                    b1=b1, b2=b2, sqrt_c2=math.sqrt(1 - b2**t), eps=self.eps, step_size=self.lrs[name] / (1 - b1**t))

    def state_dict(self) -> dict:
        """Host copies of the step counts and moments (for checkpoints): ``t`` (global),
        ``steps`` (name -> the parameter's own count), ``m``, ``v``."""
        return {"t": self.t, "steps": dict(self.steps),
                "m": {k: to_host(a).copy() for k, a in self.m.items()},
                "v": {k: to_host(a).copy() for k, a in self.v.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output. A state without ``steps`` (checkpoints written
        before per-parameter counts existed, when every parameter stepped every time) gives
        every parameter the global count ``t``."""
        for key in ("m", "v"):
            if set(state[key]) != set(self.params):
                raise ValueError(f"Adam state {key!r} names {sorted(state[key])}, expected {sorted(self.params)}")
        t = int(state["t"])
        steps = state.get("steps")
        if steps is None:
            steps = {name: t for name in self.params}
        if set(steps) != set(self.params):
            raise ValueError(f"Adam state 'steps' names {sorted(steps)}, expected {sorted(self.params)}")
        bad = sorted(name for name, s in steps.items() if not 0 <= int(s) <= t)
        if bad:
            raise ValueError(f"Adam state 'steps' of {bad} outside [0, t={t}]")
        self.t = t
        self.steps = {name: int(steps[name]) for name in self.params}
        for name, p in self.params.items():
            xp = array_module(p)
            self.m[name][...] = to_device(state["m"][name], xp, p.dtype)
            self.v[name][...] = to_device(state["v"][name], xp, p.dtype)
