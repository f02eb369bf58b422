"""Compare two golden traces tensor by tensor and find the first one that diverges.

For every key the two traces share (see :mod:`refimpl.trace` for the keys), per step:

- ``max_abs`` = max |a - b| over the tensor's elements;
- ``max_rel`` = max_abs / max(max |a|, max |b|), the error relative to the tensor's
  largest magnitude (0 when both are all zeros). Element-wise relative errors are not
  used: a gradient element that is a sum with cancellation can be ~0 in both traces and
  its element-wise relative error is noise;
- the tensor *diverges* when max_abs > atol + rtol * max(max |a|, max |b|), when the
  shapes differ, when NaNs sit in different places, or when the key is in one trace only.

Rows are ordered by step, then within a step in Algorithm 1's line order
(:func:`order_key`), so the first diverging row is the earliest point where the two
computations part ways: e.g. a wrong ARM term shows as ``arm/gamma`` of the first step
that samples gates, before the gamma gradient and the parameters after the step.
``arm/gamma`` holds l. 29's term whichever estimator the trace ran (``hyper.estimator``,
interpretation (o)); two traces with different estimators are listed as a manifest
difference, and diverge at ``input/u1`` or ``value/nu1`` (reinforce_loo against the
antithetic pair) or at ``arm/gamma`` (arm against disarm).

Parameters and BatchNorm statistics can differ more than gradients for a benign reason
(Adam divides by |g| + eps, so where a gradient is ~0 rounding noise is amplified by up
to lr / eps); :func:`diagnose` notes it and ``param_rtol`` sets a separate tolerance.
It also notes a ``param_after/gamma`` that diverges while its gradient agrees on the
first step where gamma has a gradient (or a step where it has none): Adam's step count
for gamma, interpretation (n) (``--adam-steps``).

Likely causes: the porting bugs of :mod:`refimpl.porting_bugs` whose first diverging
tensor matches the comparison's first divergence (``Comparison.likely_causes``, printed
under the table and in the JSON as ``likely_causes``).

Command line (wired by ``refimpl.cli``): ``refimpl compare A B [--rtol R] [--atol A]
[--param-rtol R] [--all] [--json FILE]``; exit status 0 when every tensor agrees,
non-zero when one diverges.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy

from .porting_bugs import likely_causes
from .trace import STEP_KEYS, Trace, read_trace, split_key

DEFAULT_RTOL = 1e-8
DEFAULT_ATOL = 0.0
# Groups holding the state Adam carries from step to step (``param_rtol`` applies to them).
STATE_GROUPS = ("param", "buffer", "buffer_after", "param_after")

# Manifest entries that should match for a comparison to mean something.
MANIFEST_FIELDS = ("steps", "dtype", "batch_size", "n_latent", "architecture", "hyper", "parameters", "buffers",
                   "initial_state")


def order_key(rel: str, parameters) -> tuple:
    """Position of key ``rel`` (without the step prefix) within a step: its row in
    :data:`refimpl.trace.STEP_KEYS`, which lists a step's keys with their lines of Algorithm 1.

    parameters: parameter names in state-dict order (the manifest's ``parameters``), the
    order of ``param/*`` and ``param_after/*``; gradients (l. 27) come in backpropagation
    order: lambda, then the decoder's and the encoder's parameters from the output back.
    Keys the table does not know go last, alphabetically.
    """
    group, _, name = rel.partition("/")
    row = _ROWS.get((group, name), _ROWS.get((group, "*")))
    if row is None:
        return (len(STEP_KEYS), 0, rel)
    if group in ("param", "param_after"):
        return (row, parameters.index(name) if name in parameters else len(parameters), name)
    if group == "grad":
        backprop = ["lambda"] + [p for p in parameters if p not in ("gamma", "lambda")][::-1]
        return (row, backprop.index(name) if name in backprop else len(backprop), name)
    return (row, 0, name)


_ROWS = {(group, name): i for i, (group, name, _, _) in enumerate(STEP_KEYS)}


def sort_keys(keys, parameters) -> list:
    """Trace keys in comparison order: ``init/`` first, then step by step in :func:`order_key` order."""
    def key(k):
        step, rel = split_key(k)
        return (-1 if step is None else step, order_key(rel, parameters) if step is not None else (0, 0, rel))
    return sorted(keys, key=key)


@dataclass
class Row:
    """One tensor of one step. ``step`` is None for ``init/`` keys; ``name`` is the key without the step."""

    key: str
    step: int | None
    name: str
    shape: list | None
    max_abs: float | None
    max_rel: float | None
    ok: bool
    note: str = ""


@dataclass
class Comparison:
    """The result of :func:`compare_traces`: rows in comparison order and the first divergence."""

    a: str
    b: str
    rtol: float
    atol: float
    rows: list = field(default_factory=list)
    manifest_differences: list = field(default_factory=list)
    param_rtol: float | None = None
    estimator: str | None = None  # trace A's l. 29 estimator (interpretation (o)); narrows the likely causes

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def first_divergence(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)

    @property
    def likely_causes(self) -> list:
        """Porting bugs of the catalogue (:mod:`refimpl.porting_bugs`) whose first diverging tensor is
        this comparison's first divergence; [] when everything agrees."""
        first = self.first_divergence
        return [] if first is None or first.step is None else likely_causes(first.name, self.estimator)

    def worst(self, step) -> Row | None:
        rows = [r for r in self.rows if r.step == step and r.max_rel is not None]
        return max(rows, key=lambda r: r.max_rel, default=None)

    def to_dict(self) -> dict:
        first = self.first_divergence
        return {"a": self.a, "b": self.b, "rtol": self.rtol, "atol": self.atol, "param_rtol": self.param_rtol,
                "ok": self.ok,
                "tensors": len(self.rows), "diverging": sum(not r.ok for r in self.rows),
                "first_divergence": None if first is None else _json_row(first),
                "likely_causes": [{"name": b.name, "line": b.line, "description": b.description}
                                  for b in self.likely_causes],
                "manifest_differences": self.manifest_differences,
                "rows": [_json_row(r) for r in self.rows]}

    def to_json(self, indent=2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_table(self, all_rows: bool = False, limit: int | None = 25) -> str:
        """A text table: every row (``all_rows``), or the first ``limit`` diverging rows and each
        step's largest error."""
        steps = sorted({r.step for r in self.rows}, key=lambda s: -1 if s is None else s)
        shown, bad_shown, cut = [], 0, 0
        for step in steps:
            rows = [r for r in self.rows if r.step == step]
            worst = self.worst(step)
            for r in rows:
                if all_rows or (r.ok and r is worst and r.max_rel > 0):
                    shown.append(r)
                elif not r.ok:
                    if limit is None or bad_shown < limit:
                        shown.append(r)
                        bad_shown += 1
                    else:
                        cut += 1
        lines = [f"A: {self.a}", f"B: {self.b}",
                 f"tolerance: max|A-B| <= {self.atol:g} + {self.rtol:g} * max(max|A|, max|B|) per tensor"]
        if self.param_rtol is not None:
            lines.append(f"           rtol {self.param_rtol:g} for parameters and BatchNorm statistics "
                         f"({', '.join(g + '/' for g in STATE_GROUPS)})")
        lines += [f"manifest differs: {d}" for d in self.manifest_differences]
        header = f"{'step':>5}  {'tensor':<44} {'shape':<16} {'max abs err':>12} {'max rel err':>12}  status"
        lines += ["", header, "-" * len(header)] if shown else []  # no table when every tensor is equal
        for r in shown:
            step = "init" if r.step is None else str(r.step)
            shape = "x".join(map(str, r.shape)) if r.shape is not None else "-"
            shape = shape or "()"
            status = "ok" if r.ok else "DIVERGES"
            if r.note:
                status += f" ({r.note})"
            lines.append(f"{step:>5}  {r.name:<44} {shape:<16} {_fmt(r.max_abs):>12} {_fmt(r.max_rel):>12}  {status}")
        if cut:
            lines.append(f"  ... {cut} more diverging tensors (--all shows every tensor)")
        lines.append("")
        first = self.first_divergence
        n_bad = sum(not r.ok for r in self.rows)
        if first is None:
            lines.append(f"all {len(self.rows)} tensors agree" + ("" if shown else ", bit for bit"))
        else:
            where = "init" if first.step is None else f"step {first.step}"
            lines.append(f"{n_bad} of {len(self.rows)} tensors diverge; first: {where} {first.name} "
                         f"(max abs err {_fmt(first.max_abs)}, max rel err {_fmt(first.max_rel)}"
                         + (f", {first.note}" if first.note else "") + ")")
            causes = self.likely_causes
            if causes:
                lines.append(f"likely causes (porting bugs whose first diverging tensor is {first.name}; "
                             "refimpl/porting_bugs.py):")
                lines += [f"  {b.name} ({b.line}): {b.description}" for b in causes]
        if shown and not all_rows:
            most = "" if limit is None else f" (at most {limit})"
            lines.append(f"(shown: diverging tensors{most} and each step's largest error; --all for every tensor)")
        return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.3e}"


def _json_row(r: Row) -> dict:
    d = asdict(r)
    for k in ("max_abs", "max_rel"):
        if d[k] is not None and not math.isfinite(d[k]):
            d[k] = "inf" if d[k] > 0 else "nan"
    return d


def tensor_errors(a, b) -> tuple:
    """``(max_abs, scale, note)`` for two arrays; max_abs is inf when shapes or NaN positions differ."""
    a, b = numpy.asarray(a), numpy.asarray(b)
    if a.shape != b.shape:
        return math.inf, 0.0, f"shape {list(a.shape)} vs {list(b.shape)}"
    if a.size == 0:
        return 0.0, 0.0, ""
    a = a.astype(numpy.float64)
    b = b.astype(numpy.float64)
    nan_a, nan_b = numpy.isnan(a), numpy.isnan(b)
    if (nan_a != nan_b).any():
        return math.inf, 0.0, "NaN in one trace only"
    keep = ~nan_a
    if not keep.any():
        return 0.0, 0.0, ""
    a, b = a[keep], b[keep]
    with numpy.errstate(invalid="ignore", over="ignore"):
        diff = numpy.abs(a - b)
        inf_match = numpy.isinf(a) & (a == b)
        diff[inf_match] = 0.0
        max_abs = float(diff.max())
        finite = numpy.isfinite(a) & numpy.isfinite(b)
        scale = float(max(numpy.abs(a[finite]).max(initial=0.0), numpy.abs(b[finite]).max(initial=0.0)))
    if math.isnan(max_abs):
        max_abs = math.inf
    return max_abs, scale, ""


def relative_error(max_abs: float, scale: float) -> float:
    """max_rel: ``max_abs`` over the tensor's scale (0 for equal zero tensors, inf for a difference from zero)."""
    return max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)


def _as_trace(t) -> Trace:
    return t if isinstance(t, Trace) else read_trace(t)


def _hyper_defaults() -> dict:
    """Hyper's defaults: a trace written before a switch existed (``adam_steps``, ``estimator``) ran its default."""
    from dataclasses import MISSING, fields

    from .algorithm1 import Hyper

    return {f.name: f.default for f in fields(Hyper) if f.default is not MISSING}


def manifest_differences(ma: dict, mb: dict) -> list:
    """One line per manifest entry of :data:`MANIFEST_FIELDS` that differs between the two traces.

    A ``hyper`` key missing from one manifest counts as Hyper's default for it (a trace from
    before the switch existed), so an old ARM trace and a new one with ``estimator="arm"`` agree.
    """
    out = []
    for name in MANIFEST_FIELDS:
        va, vb = ma.get(name), mb.get(name)
        if name == "hyper" and isinstance(va, dict) and isinstance(vb, dict):
            defaults = _hyper_defaults()
            va = {**{k: d for k, d in defaults.items() if k in vb}, **va}
            vb = {**{k: d for k, d in defaults.items() if k in va}, **vb}
        if isinstance(va, dict) and isinstance(vb, dict):
            for k in sorted(set(va) | set(vb)):
                if va.get(k) != vb.get(k):
                    out.append(f"{name}.{k}: {va.get(k)!r} vs {vb.get(k)!r}")
        elif va != vb:
            out.append(f"{name}: {va!r} vs {vb!r}")
    return out


def compare_traces(a, b, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                   param_rtol: float | None = None) -> Comparison:
    """Compare traces ``a`` and ``b`` (paths or :class:`refimpl.trace.Trace`) tensor by tensor.

    ``param_rtol``: if given, the relative tolerance for the state Adam carries from step
    to step (``param/``, ``param_after/``, ``buffer/``, ``buffer_after/``), where rounding
    noise can be amplified (see :func:`diagnose`); ``rtol`` for everything else.
    Returns a :class:`Comparison`: ``rows`` (one per key, in comparison order),
    ``first_divergence``, ``ok``, ``to_table()``, ``to_json()``.
    """
    if not (rtol >= 0 and atol >= 0 and (param_rtol is None or param_rtol >= 0)):
        raise ValueError(f"rtol={rtol}, atol={atol}, param_rtol={param_rtol}: expected all >= 0")
    ta, tb = _as_trace(a), _as_trace(b)
    result = Comparison(str(ta.path), str(tb.path), float(rtol), float(atol),
                        manifest_differences=manifest_differences(ta.manifest, tb.manifest),
                        param_rtol=None if param_rtol is None else float(param_rtol), estimator=ta.estimator)
    parameters = ta.manifest.get("parameters") or tb.manifest.get("parameters") or []
    for key in sort_keys(set(ta.keys()) | set(tb.keys()), parameters):
        step, name = split_key(key)
        if key not in tb or key not in ta:
            where = "B" if key not in tb else "A"
            shape = list((ta if key in ta else tb)[key].shape)
            result.rows.append(Row(key, step, name, shape, math.inf, math.inf, False, f"missing in {where}"))
            continue
        r = rtol if param_rtol is None or name.partition("/")[0] not in STATE_GROUPS else param_rtol
        max_abs, scale, note = tensor_errors(ta[key], tb[key])
        max_rel = relative_error(max_abs, scale)
        ok = max_abs <= atol + r * scale
        if not ok and not note:
            note = diagnose(ta, tb, step, name, rtol, atol, scale)
        result.rows.append(Row(key, step, name, list(ta[key].shape), max_abs, max_rel, bool(ok), note))
    return result


def diagnose(ta: Trace, tb: Trace, step, name: str, rtol: float, atol: float, scale: float) -> str:
    """A note on why a tensor that carries state across steps diverges, or "".

    - ``param/`` or ``buffer/`` equal in each trace to the previous step's ``*_after``:
      the difference was carried over from there.
    - ``param_after/gamma`` whose gradient agrees, on the first step where gamma has a
      gradient (the L0 term or sampled gates) after earlier Adam steps, or on a step where
      it has none after having had one: Adam's step count for gamma (interpretation (n),
      :func:`_adam_steps_note`).
    - ``param_after/<p>`` whose gradient agrees, but which differs only at elements
      with |grad| < 1e3 * adam_eps: Adam's first update is lr * g / (|g| + eps), so
      where the gradient is ~0 (e.g. a conv bias followed by BatchNorm, in a channel
      whose pre-activations share one sign over the batch: mathematically 0, ~1e-14 in
      floating point) rounding noise in g is amplified by up to lr / eps = 1e5.
    """
    if step is None:
        return ""
    group, _, pname = name.partition("/")
    prefix = f"step{step:04d}/"
    if group in ("param", "buffer") and step > 0:
        prev = f"step{step - 1:04d}/{group}_after/{pname}"
        if all(prev in t and numpy.array_equal(t[prev], t[prefix + name], equal_nan=True) for t in (ta, tb)):
            return f"carried over from step {step - 1}"
        return ""
    if group != "param_after":
        return ""
    gkey = prefix + "grad/" + pname
    if gkey not in ta or gkey not in tb:
        return ""
    g_abs, g_scale, g_note = tensor_errors(ta[gkey], tb[gkey])
    if g_note or g_abs > atol + rtol * g_scale:
        return ""
    note = _adam_steps_note(ta, step) if pname == "gamma" else ""
    if note:
        return note
    eps = float((ta.manifest.get("hyper") or {}).get("adam_eps", 1e-8))
    a, b = numpy.asarray(ta[prefix + name], numpy.float64), numpy.asarray(tb[prefix + name], numpy.float64)
    bad = numpy.abs(a - b) > atol + rtol * scale
    g = numpy.maximum(numpy.abs(numpy.asarray(ta[gkey], numpy.float64)), numpy.abs(numpy.asarray(tb[gkey], numpy.float64)))
    if bad.any() and (g[bad] < 1e3 * eps).all():
        return (f"Adam-amplified rounding noise: gradient agrees; differs only where |grad| < {1e3 * eps:g} "
                f"({int(bad.sum())} of {bad.size} elements)")
    return ""


def _gamma_has_gradient(t: Trace, step: int) -> bool:
    """Whether gamma is part of L at ``step``: the L0 term is added (l. 24) or gates are sampled (the ARM term, l. 29)."""
    p = f"step{step:04d}/value/"
    return bool(t.get(p + "l0_added", False)) or bool(t.get(p + "sampling", False))


def _adam_steps_note(ta: Trace, step: int) -> str:
    """Why ``param_after/gamma`` can differ while its gradient agrees: Adam's step count for gamma
    (interpretation (n), ``Hyper.adam_steps``). torch.optim.Adam skips a parameter without a
    gradient and counts its steps from its first one ("per_parameter"); TF/Keras and optax (and
    refimpl's default) count every step for every parameter ("global")."""
    init = ta.manifest.get("initial_state") or {}
    adam_t = int(init.get("adam_t") or 0)
    m0 = ta.get("init/adam_m/gamma")
    had_gradient = bool(init.get("hit")) or (m0 is not None and bool(numpy.any(m0 != 0)))
    earlier = had_gradient or any(_gamma_has_gradient(ta, k) for k in range(step))
    switch = "interpretation (n), --adam-steps global|per_parameter"
    if _gamma_has_gradient(ta, step) and not earlier and adam_t + step > 0:
        return (f"gradient agrees; gamma's first gradient (first hit / first gate sample) comes on Adam step "
                f"{adam_t + step + 1}: likely Adam's step count for gamma, {switch} (bias correction with t = "
                f"{adam_t + step + 1} globally, 1 per parameter)")
    if not _gamma_has_gradient(ta, step) and earlier:
        return ("gradient agrees; gamma has no gradient at this step (no L0 term, no gates sampled): likely Adam's "
                f"step count for gamma, {switch} (torch.optim.Adam leaves it alone; a global count moves it on its "
                "moments)")
    return ""


# ----------------------------------------------------------------------------------------
# Command line: refimpl compare A B


def add_arguments(parser) -> None:
    """The options of ``refimpl compare``."""
    from .optionspec import nonnegative_float

    parser.add_argument("a", metavar="A", help="trace file (e.g. from refimpl trace)")
    parser.add_argument("b", metavar="B", help="trace file to compare with A (e.g. bench/torch_algorithm1.py's replay)")
    parser.add_argument("--rtol", type=nonnegative_float, default=DEFAULT_RTOL,
                        help=f"relative tolerance per tensor, against its largest magnitude (default: {DEFAULT_RTOL:g})")
    parser.add_argument("--atol", type=nonnegative_float, default=DEFAULT_ATOL, help=f"absolute tolerance (default: {DEFAULT_ATOL:g})")
    parser.add_argument("--param-rtol", type=nonnegative_float, default=None, metavar="R",
                        help="relative tolerance for parameters and BatchNorm statistics (default: --rtol); Adam "
                             "amplifies rounding noise where a gradient is ~0, see refimpl.compare.diagnose")
    parser.add_argument("--all", action="store_true", help="print every tensor, not only diverging ones")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the full comparison as JSON ('-': stdout)")


def run(args) -> int:
    """``refimpl compare``: print the table (and JSON); 0 when every tensor agrees, 1 otherwise."""
    result = compare_traces(args.a, args.b, rtol=args.rtol, atol=args.atol, param_rtol=args.param_rtol)
    if args.json == "-":
        print(result.to_json())
    else:
        print(result.to_table(all_rows=args.all))
        if args.json:
            Path(args.json).write_text(result.to_json() + "\n")
    return 0 if result.ok else 1
