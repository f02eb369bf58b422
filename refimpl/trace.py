"""Golden traces: K steps of Algorithm 1 recorded tensor by tensor in one ``.npz`` file.

A trace holds, for every step, every input the step consumed (images x, the noise eps,
the uniforms u), the parameters and BatchNorm statistics before the step, every
intermediate that Algorithm 1 names (nu1, nu2, mu, s, z, x1, x2, e1, e2, E1, E2, C,
C_ma, C', lambda', KL_elem, the KL term, the L0 term, L), every gradient (the ARM term
on its own as well) and the parameters after the Adam step; plus a JSON manifest.
Two implementations that consume the same inputs can then be compared tensor by
tensor (:mod:`refimpl.compare`); ``bench/torch_algorithm1.py`` replays a trace in
PyTorch and writes its own trace with the same keys.

Keys (``KKKK`` is the 0-based step, 4 digits; ``<p>`` a parameter name as in the
model's state dict, plus ``lambda``, GECO's raw multiplier; ``<b>`` a buffer name):

=============================  =============================================================
``init/adam_m/<p>``            Adam's first moment before step 0 (zeros for a fresh run)
``init/adam_v/<p>``            Adam's second moment before step 0
``stepKKKK/state/hit``         l. 1/25: ``hit`` before the step (bool, 0-d)
``stepKKKK/state/c_ma``        l. 15-19: C_ma before the step (float64, 0-d; NaN before step i = 0)
``stepKKKK/state/last_constraint_met``  C <= 0 on the previous step (bool; used by hit="per_step")
``stepKKKK/param/<p>``         parameters before the step
``stepKKKK/buffer/<b>``        BatchNorm running statistics before the step
``stepKKKK/input/x``           the batch (B, C, H, W)
``stepKKKK/input/u``           l. 4: uniforms (S, n), S = 1 or B; only on steps that sample gates
``stepKKKK/input/u1``          the second, independent uniforms (S, n) of estimator="reinforce_loo" (nu1's)
``stepKKKK/input/eps``         l. 11: standard normal noise (B, n)
``stepKKKK/value/<v>``         intermediates, see :data:`VALUES`
``stepKKKK/grad/<p>``          the gradient Adam is given at l. 31 (for gamma: l. 27 + the ARM term)
``stepKKKK/arm/gamma``         l. 29: the estimator's term alone (n,): ARM, or DisARM / REINFORCE-LOO
                               per the manifest's ``hyper.estimator``; only on steps that sample gates
``stepKKKK/param_after/<p>``   parameters after the Adam step (l. 31)
``stepKKKK/buffer_after/<b>``  BatchNorm running statistics after the step
``manifest``                   0-d unicode array: the JSON manifest (see :func:`build_manifest`)
=============================  =============================================================

Arrays keep the run's dtype; scalars are float64 0-d arrays, flags bool 0-d arrays.
The file is written atomically (temporary file in the same folder, then ``os.replace``).

Command line (wired by ``refimpl.cli``): ``refimpl trace [DATASET] --steps K --out FILE``
with the options of ``refimpl train``; it traces exactly the first K steps that
``refimpl train`` with the same options would take.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy

from . import __version__
from .algorithm1 import train_step
from .backend import to_host
from .atomic import atomic_write
from .checkpoint import read_npz
from .errors import TraceError, TraceKeyError
from .execution import Execution

FORMAT = "refimpl-trace"
VERSION = 1
DEFAULT_FILE = "trace.npz"

# Every key of a step, in Algorithm 1's order: (group, name ("*": every parameter or buffer), line,
# meaning). refimpl.compare compares a step's tensors in this order (the last line number of each
# row never decreases), so the first divergence it reports is the earliest line that differs.
STEP_KEYS = (
    ("state", "hit", "1", "hit before the step (bool): l. 1, set at l. 25"),
    ("state", "last_constraint_met", "1", "C <= 0 on the previous step (bool; used by hit=per_step)"),
    ("state", "c_ma", "1", "C_ma before the step (NaN before step i = 0)"),
    ("param", "*", "1", "parameters before the step"),
    ("buffer", "*", "1", "BatchNorm running statistics before the step"),
    ("input", "x", "2", "the batch x_i (B, C, H, W)"),
    ("value", "sampling", "3", "gates sampled at this step (bool): hit, or the previous step's C <= 0 with hit=per_step"),
    ("input", "u", "4", "uniforms (S, n), S = 1 or B; only on steps that sample gates"),
    ("input", "u1", "4", "the second, independent uniforms (S, n) of estimator=reinforce_loo (nu1's sample); "
                         "only with that estimator, on steps that sample gates"),
    ("value", "nu1", "5/8", "gate mask of the E1 pass (S, n): 1[u > sigmoid(-k gamma)], or 1[u1 < sigmoid(k gamma)] "
                            "with estimator=reinforce_loo"),
    ("value", "nu2", "6/9", "gate mask of the E2 pass (S, n): 1[u < sigmoid(k gamma)] (every estimator)"),
    ("value", "mu", "11", "encoder mean (B, n)"),
    ("value", "s", "11", "encoder log-scale output (B, n): log sigma^2 or log sigma (Hyper.encoder_output)"),
    ("input", "eps", "11", "standard normal noise (B, n)"),
    ("value", "z", "11", "z = mu + sigma * eps (B, n)"),
    ("value", "x1", "12", "g_dec(z * nu1) (B, C, H, W); equal to x2 on steps that do not sample gates"),
    ("value", "e1", "12", "per-image error of x1 (B,)"),
    ("value", "E1", "12", "batch mean of e1"),
    ("value", "x2", "13", "g_dec(z * nu2) (B, C, H, W)"),
    ("value", "e2", "13", "per-image error of x2 (B,)"),
    ("value", "E2", "13", "batch mean of e2"),
    ("buffer_after", "*", "12-13", "BatchNorm running statistics after the step (updated by the decoder passes)"),
    ("value", "C", "14", "E2 - tau"),
    ("value", "C_ma", "15-19", "moving average of C after this step"),
    ("value", "C_prime", "20", "C + StopGradient(C_ma - C) (value: C_ma)"),
    ("value", "lambda_eff", "21", "lambda' = clamp(softplus(lambda)^2, lambda_min, lambda_max)"),
    ("value", "kl_elem", "22", "KL_elem, Eq. 15 (B, n)"),
    ("value", "kl", "22", "the KL term ||KL_elem * nu2||_1 / ||nu2||_0, batch mean"),
    ("value", "l0_added", "23", "C <= 0: the L0 term is added (bool); with constraint=per_image, some image's "
                                "e_b <= tau (the term then weighted by their fraction, interpretation (p))"),
    ("value", "gates_l1", "24", "the L0 term sum_j sigmoid(k gamma_j) (computed whether added or not)"),
    ("value", "L", "22-24", "the loss L"),
    ("value", "hit", "25", "hit after the step (bool)"),
    ("grad", "*", "27", "the gradient Adam is given at l. 31, in backpropagation order (gamma's: below)"),
    ("arm", "gamma", "29", "the estimator's term alone (n,): L0-ARM (Eq. 13), or DisARM / REINFORCE-LOO per "
                           "hyper.estimator (interpretation (o); the key is the same for all three); only on steps "
                           "that sample gates"),
    ("grad", "gamma", "29", "gamma's gradient: l. 27 plus the estimator's term"),
    ("param_after", "*", "31", "parameters after the Adam step"),
)
# The intermediates under stepKKKK/value/: (name, line, meaning), recorded in the manifest.
VALUES = tuple((name, line, meaning) for group, name, line, meaning in STEP_KEYS if group == "value")
VALUE_NAMES = tuple(v[0] for v in VALUES)
FLAGS = ("sampling", "l0_added", "hit")


def step_prefix(step: int) -> str:
    """``step0003`` for step 3."""
    return f"step{int(step):04d}"


def split_key(key: str):
    """``"step0003/grad/gamma"`` -> ``(3, "grad/gamma")``; ``"init/adam_m/gamma"`` -> ``(None, ...)``."""
    head, _, rest = key.partition("/")
    if head.startswith("step") and head[4:].isdigit():
        return int(head[4:]), rest
    return None, key


def _host(a):
    return numpy.array(to_host(a))  # always a copy


def _scalar(value) -> numpy.ndarray:
    return numpy.asarray(numpy.nan if value is None else float(value), dtype=numpy.float64)


def _flag(value) -> numpy.ndarray:
    return numpy.asarray(bool(value))


def snapshot(params: dict, buffers: dict, hit, c_ma, last_constraint_met) -> dict:
    """Host copies of what a step reads from the training state (``before`` / ``after`` of :func:`step_entries`)."""
    return {"params": {k: _host(v) for k, v in params.items()},
            "buffers": {k: _host(v) for k, v in buffers.items()},
            "state": {"hit": bool(hit), "c_ma": c_ma, "last_constraint_met": bool(last_constraint_met)}}


def step_entries(step: int, before: dict, record: dict, after: dict) -> dict:
    """The trace arrays of one step.

    before, after: :func:`snapshot` of the state around the step. record: the dict that
    :func:`refimpl.algorithm1.train_step` fills (``x, u, nu1, nu2, eps, mu, s, z, x1,
    x2, e1, e2, kl_elem, arm, grads, scalars``); ``bench/torch_algorithm1.py`` fills the
    same dict, so both write the same keys.
    """
    p = step_prefix(step) + "/"
    out = {}
    out[p + "state/hit"] = _flag(before["state"]["hit"])
    out[p + "state/c_ma"] = _scalar(before["state"]["c_ma"])
    out[p + "state/last_constraint_met"] = _flag(before["state"]["last_constraint_met"])
    out.update({p + "param/" + k: v for k, v in before["params"].items()})
    out.update({p + "buffer/" + k: v for k, v in before["buffers"].items()})
    out[p + "input/x"] = _host(record["x"])
    if record.get("u") is not None:
        out[p + "input/u"] = _host(record["u"])
    if record.get("u1") is not None:
        out[p + "input/u1"] = _host(record["u1"])
    out[p + "input/eps"] = _host(record["eps"])
    sc = record["scalars"]
    values = {name: record[name] for name in ("nu1", "nu2", "mu", "s", "z", "x1", "e1", "x2", "e2", "kl_elem")}
    values.update({name: _scalar(sc[name]) for name in ("E1", "E2", "C", "C_ma", "lambda_eff", "kl", "gates_l1")})
    values["C_prime"] = _scalar(sc.get("C_prime", sc["C_ma"]))  # refimpl: the value of C' is C_ma
    values["L"] = _scalar(sc["loss"])
    values["sampling"] = _flag(record.get("u") is not None)
    values["l0_added"] = _flag(sc["l0_added"])
    values["hit"] = _flag(sc["hit"])
    for name in VALUE_NAMES:
        out[p + "value/" + name] = _host(values[name])
    out.update({p + "grad/" + k: _host(v) for k, v in record["grads"].items()})
    if record.get("arm") is not None:
        out[p + "arm/gamma"] = _host(record["arm"])
    out.update({p + "param_after/" + k: v for k, v in after["params"].items()})
    out.update({p + "buffer_after/" + k: v for k, v in after["buffers"].items()})
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (numpy.integer, numpy.floating, numpy.bool_)):
        return value.item()
    return value


def build_manifest(arrays: dict, *, steps: int, writer: str, architecture: dict, hyper: dict, n_latent: int,
                   parameters, buffers, initial_state: dict, seed=None, extra: dict | None = None) -> dict:
    """The manifest: format, version, writer, what was run, and name/shape/dtype of every key.

    ``parameters`` / ``buffers``: names in state-dict order (``lambda`` last among the
    parameters); :mod:`refimpl.compare` orders gradients by them.
    """
    x = arrays.get(step_prefix(0) + "/input/x")
    return _jsonable({
        "format": FORMAT,
        "version": VERSION,
        "writer": writer,
        "steps": int(steps),
        "dtype": str(x.dtype) if x is not None else None,
        "batch_size": int(x.shape[0]) if x is not None else None,
        "n_latent": int(n_latent),
        "architecture": architecture,
        "hyper": hyper,
        "seed": seed,
        "parameters": list(parameters),
        "buffers": list(buffers),
        "initial_state": initial_state,
        "values": [{"name": n, "line": line, "meaning": m} for n, line, m in VALUES],
        "extra": extra or {},
        "keys": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
    })


def save_trace(path, arrays: dict, manifest: dict) -> Path:
    """Write ``arrays`` and ``manifest`` to ``path`` atomically; returns the path."""
    path = Path(path)
    if "manifest" in arrays:
        raise ValueError("trace array name 'manifest' is reserved")
    members = {**arrays, "manifest": numpy.asarray(json.dumps(manifest, sort_keys=True))}
    atomic_write(path, lambda f: numpy.savez(f, **members))
    return path


def _batch_source(batches, steps: int):
    """Yield ``steps`` batches: one array (B, C, H, W) reused every step, or the items of an iterable."""
    if hasattr(batches, "shape") and hasattr(batches, "ndim"):
        for _ in range(steps):
            yield batches
        return
    it = iter(batches)
    for k in range(steps):
        try:
            yield next(it)
        except StopIteration:
            raise ValueError(f"batches: ran out after {k} batches, expected steps={steps}") from None


def write_trace(path, state, batches, rng, steps: int, *, seed=None, extra: dict | None = None) -> dict:
    """Run ``steps`` training steps of Algorithm 1 on ``state`` and write their trace to ``path``.

    state: a :class:`refimpl.algorithm1.TrainState` (it is trained: the steps are real).
    batches: an array x: (B, C, H, W) used at every step, or an iterable of such arrays.
    rng: the generator :func:`refimpl.algorithm1.train_step` draws u and eps from.
    seed, extra: recorded in the manifest. Returns the manifest.
    """
    if not isinstance(steps, (int, numpy.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r}: expected an integer >= 1")
    model = state.model

    def buffers():
        return dict(model.named_buffers())

    opt = state.optimizer.state_dict()
    arrays = {f"init/adam_m/{k}": v for k, v in opt["m"].items()}
    arrays.update({f"init/adam_v/{k}": v for k, v in opt["v"].items()})
    initial = {"step": state.step, "hit": state.hit, "c_ma": state.c_ma,
               "last_constraint_met": state.last_constraint_met, "adam_t": opt["t"], "adam_steps": opt["steps"]}
    for k, x in enumerate(_batch_source(batches, steps)):
        before = snapshot(state.parameters(), buffers(), state.hit, state.c_ma, state.last_constraint_met)
        record = {}
        train_step(state, x, rng, record=record)
        after = snapshot(state.parameters(), buffers(), state.hit, state.c_ma, state.last_constraint_met)
        arrays.update(step_entries(k, before, record, after))
    manifest = build_manifest(
        arrays, steps=steps, writer=f"refimpl {__version__}", architecture=asdict(model.arch),
        hyper=state.hyper.as_dict(), n_latent=model.n_latent, parameters=list(state.parameters()),
        buffers=list(buffers()), initial_state=initial, seed=seed,
        extra={"backend": type(model.params["gamma"]).__module__.split(".")[0], "execution": model.paths.to_dict(),
               **(extra or {})})
    save_trace(path, arrays, manifest)
    return manifest


class Trace:
    """A trace read back: ``manifest`` (dict), ``arrays`` (key -> host numpy array), ``path``.

    ``trace[key]`` raises :class:`TraceKeyError` naming the file and key;
    ``trace.step(k)`` is the dict of step k's arrays with the ``stepKKKK/`` prefix removed.
    """

    def __init__(self, path, manifest: dict, arrays: dict):
        self.path, self.manifest, self.arrays = Path(path), manifest, arrays

    @property
    def steps(self) -> int:
        return int(self.manifest["steps"])

    @property
    def estimator(self) -> str:
        """l. 29's estimator (interpretation (o)); "arm" for traces written before the switch existed."""
        return (self.manifest.get("hyper") or {}).get("estimator", "arm")

    def keys(self):
        return self.arrays.keys()

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)

    def __contains__(self, key) -> bool:
        return key in self.arrays

    def __getitem__(self, key: str) -> numpy.ndarray:
        try:
            return self.arrays[key]
        except KeyError:
            hint = ""
            step, rest = split_key(key)
            if rest in ("input/u", "arm/gamma"):
                hint = " (u and the ARM term exist only on steps that sample gates)"
            elif rest == "input/u1":
                hint = (" (u1 exists only with estimator=reinforce_loo, on steps that sample gates; this trace's "
                        f"estimator: {self.estimator})")
            elif step is not None and step >= self.steps:
                hint = f" (the trace has steps 0..{self.steps - 1})"
            raise TraceKeyError(f"{self.path}: trace has no key {key!r}{hint}") from None

    def get(self, key: str, default=None):
        return self.arrays.get(key, default)

    def step(self, k: int) -> dict:
        if not 0 <= k < self.steps:
            raise TraceKeyError(f"{self.path}: no step {k} (the trace has steps 0..{self.steps - 1})")
        prefix = step_prefix(k) + "/"
        return {key[len(prefix):]: v for key, v in self.arrays.items() if key.startswith(prefix)}

    def initial(self, group: str) -> dict:
        """``init/<group>/*`` (``adam_m``, ``adam_v``) without the prefix."""
        prefix = f"init/{group}/"
        return {key[len(prefix):]: v for key, v in self.arrays.items() if key.startswith(prefix)}


def read_trace(path) -> Trace:
    """Read and validate a trace file; a :class:`TraceError` (naming the file and key) if malformed."""
    path = Path(path)
    arrays = read_npz(path, TraceError, f"{path}: no such trace file", f"{path}:")
    if "manifest" not in arrays:
        raise TraceKeyError(f"{path}: trace has no key 'manifest'; not a {FORMAT} file")
    try:
        manifest = json.loads(str(arrays.pop("manifest")[()]))
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: 'manifest' is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise TraceError(f"{path}: format {got!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise TraceError(f"{path}: {FORMAT} version {manifest.get('version')!r}; this refimpl reads version {VERSION}")
    for field in ("steps", "keys", "parameters", "buffers", "hyper", "architecture", "n_latent"):
        if field not in manifest:
            raise TraceKeyError(f"{path}: manifest has no key {field!r}")
    for key, spec in manifest["keys"].items():
        if key not in arrays:
            raise TraceKeyError(f"{path}: trace has no key {key!r} (listed in its manifest)")
        a = arrays[key]
        if list(a.shape) != list(spec["shape"]) or str(a.dtype) != spec["dtype"]:
            raise TraceError(f"{path}: key {key!r} has shape {list(a.shape)} {a.dtype}, manifest says "
                             f"{spec['shape']} {spec['dtype']}")
    unlisted = sorted(set(arrays) - set(manifest["keys"]))
    if unlisted:
        raise TraceError(f"{path}: key {unlisted[0]!r} is not listed in the manifest")
    return Trace(path, manifest, arrays)


# ----------------------------------------------------------------------------------------
# Command line: refimpl trace


def add_arguments(parser) -> None:
    """The options of ``refimpl trace``: those of ``refimpl train`` that define a run, plus --steps."""
    from . import options
    from .optionspec import positive_int

    options.add_run_options(parser)
    parser.set_defaults(dtype="float64")
    options.add_backend_option(parser)
    options.add_options(parser, Execution, exclude=("device_step",),  # a trace records train_step's steps
                        title="execution (not part of the run; refimpl/execution.py)")
    parser.add_argument("--steps", type=positive_int, default=3, metavar="K", help="training steps to trace (default: 3)")
    parser.add_argument("--out", default=DEFAULT_FILE, metavar="FILE", help=f"trace file (default: {DEFAULT_FILE})")
    parser.add_argument("--force-hit", action="store_true",
                        help="start with hit = True, so gates are sampled and the ARM term is active from step 0")


def run(args) -> int:
    """``refimpl trace``: build the run ``refimpl train`` would build from the same options (``Run.build``),
    and trace its first K steps, taking batches from ``Run.next_batch`` as training does."""
    from .config import new_config
    from .options import given, given_run_options
    from .training import Run

    config = new_config(given_run_options(args))
    check_memory(config, args.steps)
    run_ = Run.build(config, backend=args.backend, execution=Execution(**given(args, Execution)))
    if args.force_hit:
        run_.state.hit = True
    batches = (run_.next_batch() for _ in range(args.steps))
    manifest = write_trace(args.out, run_.state, batches, run_.train_rng, args.steps, seed=config.seed,
                           extra={"config": config.to_dict(), "force_hit": bool(args.force_hit)})
    trace = read_trace(args.out)
    sampled = [k for k in range(args.steps) if f"{step_prefix(k)}/arm/gamma" in trace]
    nonzero = [k for k in sampled if numpy.any(trace[f"{step_prefix(k)}/arm/gamma"] != 0)]
    print(f"traced {args.steps} steps of {config.dataset} ({'x'.join(map(str, run_.arch.image_shape))}, "
          f"n={config.latent}, batch {config.batch_size}, {config.dtype}, tau={run_.hyper.tau:g}) to {args.out}: "
          f"{len(manifest['keys'])} tensors; gates sampled at steps {sampled or 'none'}, "
          f"ARM term non-zero at steps {nonzero or 'none'}")
    return 0


def check_memory(config, steps: int) -> None:
    """Refuse (OptionError) a trace of ``steps`` steps that cannot fit in memory: every tensor of every step."""
    from . import memory
    from .model import build_architecture

    arch = build_architecture(config.image_shape(), config.channels, config.hidden)
    itemsize = numpy.dtype(config.dtype).itemsize
    memory.check(memory.trace_bytes(arch, config.latent, config.batch_size, itemsize, steps),
                 f"a trace of {steps} steps (every tensor of every step; batches of {config.batch_size}, "
                 f"n={config.latent}, {config.dtype})", "trace fewer --steps")
