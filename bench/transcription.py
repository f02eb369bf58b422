"""What the two transcriptions of Algorithm 1 share: no torch, no jax, only plain Python.

``bench/torch_algorithm1.py`` (torch.nn, autograd) and ``bench/jax_algorithm1.py`` (pure
functions, jax.grad, optax) each transcribe the paper's model and Algorithm 1 on their
own; what is not about the framework lives here, once:

- Algorithm 1's parameters and refimpl's default interpretations (:data:`DEFAULTS`,
  the fields of ``refimpl.algorithm1.Hyper``), the architecture defaults and the
  helpers that read an architecture (``refimpl.model.Architecture`` as a dict or
  dataclass): :func:`as_config`, :func:`conv_specs`, :func:`feature_shape`,
  :func:`paper_architecture`;
- Section 4's initial lambda under interpretation (d) (:func:`initial_lambda`) and lambda's
  learning rate under (q) (:func:`lambda_rate`);
- the porting-bug catalogue's names for ``--plant`` (refimpl/porting_bugs.py);
- replaying a golden trace (refimpl/trace.py): the initial state a trace records
  (:func:`initial_state`), the loop over its steps with the recorded inputs
  (:func:`replay`) and the command line of both scripts (:func:`main`).

A transcription plugs into :func:`replay` with a *port*: an object with
``sampling()`` (l. 3: does this step sample gates?), ``snapshot()`` (the state before
and after a step, as ``refimpl.trace.snapshot``) and ``replay_step(x, eps, u, u1)``
(one pass of l. 3-31 on the recorded inputs; u, u1 None where the trace has none: the
port then draws its own, which only a planted bug makes it do). refimpl is imported
only inside the functions that read and write traces.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from types import SimpleNamespace

# Algorithm 1's parameters (Section 4) and refimpl's default interpretations (refimpl.algorithm1.Hyper);
# the letters are those of refimpl/INTERPRETATIONS.md.
DEFAULTS = {
    "alpha": 0.99, "k": 7.0, "lambda_min": 1e-5, "lambda_max": 5.0, "lr": 1e-3, "betas": (0.9, 0.999),
    "adam_eps": 1e-8, "gamma_init": 0.42, "lambda_init": 1.0,
    "error": "sse",  # (a) "sse" | "l2"
    "lambda_update": "ascent",  # (b) "ascent" | "descent"
    "lambda_clamp_grad": "outward",  # (c) "outward" | "zero"
    "lambda_init_on": "raw",  # (d) "raw" | "effective"
    "encoder_output": "logvar",  # (e) "logvar" | "logstd" | "literal" (r)
    "kl_normalizer": "open",  # (f) "open" | "all"
    "hit": "sticky",  # (g) "sticky" | "per_step"
    "e1_batchnorm": "batch",  # (h) "batch" | "batch_update" | "running"
    "gate_samples": "batch",  # (i) "batch" | "per_example"
    "arm_objective": "error",  # (k) "error" | "loss"
    "adam_steps": "global",  # (n) "global" | "per_parameter"
    "estimator": "arm",  # (o) "arm" | "disarm" | "reinforce_loo"
    "constraint": "batch",  # (p) "batch" | "per_image"
    "lambda_optimizer": "adam",  # (q) "adam" | "sgd"
    "lambda_lr": None,  # (q) lambda's own learning rate; None: lr
}
# Section 4's layer settings (refimpl.model.Architecture's defaults); channel widths and paddings are refimpl's.
ARCH_DEFAULTS = {"hidden": 128, "leaky_slope": 0.02, "bn_momentum": 0.8, "bn_eps": 1e-3, "bn_running_var": "biased"}


def as_config(obj, defaults=None) -> SimpleNamespace:
    """A namespace from a dict, a dataclass (refimpl's Architecture or Hyper) or a namespace."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    elif not isinstance(obj, dict):
        obj = vars(obj)
    return SimpleNamespace(**{**(defaults or {}), **obj})


# ----------------------------------------------------------------------------------------
# The architecture (Section 4)


def conv_out(size: int, spec) -> int:
    """Output size of a conv with ``spec`` (kernel, stride, padding) on ``size`` pixels."""
    return (size + 2 * spec.padding - spec.kernel) // spec.stride + 1


def conv_specs(arch):
    """(encoder convs, decoder convs), each a list of namespaces with channels, kernel, stride, padding."""
    return [as_config(s) for s in arch.encoder_convs], [as_config(s) for s in arch.decoder_convs]


def feature_shape(arch) -> tuple:
    """(channels, height, width) after the encoder's last conv."""
    c, h, w = arch.image_shape
    for spec in conv_specs(arch)[0]:
        c, h, w = spec.channels, conv_out(h, spec), conv_out(w, spec)
    return c, h, w


def paper_architecture(channels: int = 1) -> dict:
    """Section 4's network for 64x64 images with ``channels`` colour channels (refimpl's widths and paddings).

    Encoder: convs 4x4/2 then three 3x3/2 (32, 32, 64, 64 channels, padding 1) down to 4x4;
    decoder: four blocks of x2 upsample + 3x3/1 conv (64, 32, 32, C channels).
    """
    def conv(c, k, s, p):
        return {"channels": c, "kernel": k, "stride": s, "padding": p}

    return {"image_shape": (channels, 64, 64),
            "encoder_convs": [conv(32, 4, 2, 1), conv(32, 3, 2, 1), conv(64, 3, 2, 1), conv(64, 3, 2, 1)],
            "decoder_convs": [conv(64, 3, 1, 1), conv(32, 3, 1, 1), conv(32, 3, 1, 1), conv(channels, 3, 1, 1)],
            **ARCH_DEFAULTS}


# ----------------------------------------------------------------------------------------
# Algorithm 1's set-up


def initial_lambda(h, flip: bool = False) -> float:
    """Raw lambda at the start, interpretation (d): lambda = lambda_init, or lambda' = lambda_init.

    ``flip``: the other reading (the ``lambda-init-wrong-side`` plant)."""
    if (h.lambda_init_on == "raw") != flip:
        return float(h.lambda_init)
    return math.log(math.expm1(math.sqrt(h.lambda_init)))  # softplus(lambda)^2 = lambda_init


def lambda_rate(h) -> float:
    """lambda's learning rate at l. 31, interpretation (q): ``lambda_lr``, or Adam's ``lr`` when None."""
    return h.lr if h.lambda_lr is None else h.lambda_lr


def plant_catalogue() -> dict:
    """refimpl's catalogue of porting bugs (name -> PortingBug), refimpl/porting_bugs.py."""
    from refimpl.porting_bugs import BY_NAME

    return BY_NAME


def check_plant(plant):
    """``plant`` if it is None or a name in the catalogue; else a ValueError listing the names."""
    if plant is not None and plant not in plant_catalogue():
        raise ValueError(f"plant={plant!r}: expected one of {', '.join(plant_catalogue())}")
    return plant


# ----------------------------------------------------------------------------------------
# Replaying a golden trace (refimpl/trace.py)


def initial_state(trace) -> SimpleNamespace:
    """The state a trace starts from, framework-free (host numpy arrays and Python numbers).

    ``params`` (state-dict order, ``lambda`` last) and ``buffers`` as recorded before step 0;
    ``hit``, ``c_ma`` (None before the first step), ``last_constraint_met``; Adam's global
    count ``adam_t``, each parameter's own count ``adam_steps`` (interpretation (n): the
    manifest's ``initial_state.adam_steps``, or ``adam_t`` for every parameter in a trace
    written before per-parameter counts existed) and its moments ``adam_m``, ``adam_v``.
    """
    m = trace.manifest
    first = trace.step(0)
    init = m["initial_state"]
    t = int(init["adam_t"])
    steps = init.get("adam_steps") or {name: t for name in m["parameters"]}
    return SimpleNamespace(
        dtype=str(first["input/x"].dtype), n_latent=int(m["n_latent"]),
        params={name: first["param/" + name] for name in m["parameters"]},
        buffers={name: first["buffer/" + name] for name in m["buffers"]},
        hit=bool(init["hit"]), c_ma=None if init["c_ma"] is None else float(init["c_ma"]),
        last_constraint_met=bool(init["last_constraint_met"]),
        adam_t=t, adam_steps={name: int(steps[name]) for name in m["parameters"]},
        adam_m=trace.initial("adam_m"), adam_v=trace.initial("adam_v"))


def replay(trace_path, out_path, start, *, framework: str, writer: str, steps: int | None = None,
           plant: str | None = None, extra: dict | None = None) -> dict:
    """Replay the trace at ``trace_path`` with a port on its recorded inputs; write a trace to ``out_path``.

    ``start(trace, plant)`` returns the port (see the module docstring) in the state the trace
    starts from. Each step is run on the recorded x, eps, u and (REINFORCE-LOO) u1. A step at
    which the port samples gates but the trace holds no u (the two disagree on ``hit``) raises a
    ValueError naming the step; with a plant the port draws its own u there instead, so that
    ``compare`` can show where hit went wrong. Returns the manifest written.
    """
    from refimpl.trace import build_manifest, read_trace, save_trace, step_entries, step_prefix

    check_plant(plant)
    trace = read_trace(trace_path)
    steps = trace.steps if steps is None else min(int(steps), trace.steps)
    port = start(trace, plant)
    arrays = {f"init/adam_{which}/{k}": v for which in ("m", "v") for k, v in trace.initial(f"adam_{which}").items()}
    for k in range(steps):
        recorded = trace.step(k)
        sampling = port.sampling()  # l. 3
        if sampling and "input/u" not in recorded and plant is None:
            raise ValueError(f"{trace.path}: the {framework} replay samples gates at step {k}, but the trace has no "
                             f"{step_prefix(k)}/input/u (the two disagree on hit)")
        u = recorded.get("input/u") if sampling else None
        u1 = recorded.get("input/u1") if sampling else None
        before = port.snapshot()
        record = port.replay_step(recorded["input/x"], recorded["input/eps"], u, u1)
        arrays.update(step_entries(k, before, record, port.snapshot()))
    m = trace.manifest
    manifest = build_manifest(
        arrays, steps=steps, writer=writer, architecture=m["architecture"], hyper=m["hyper"], n_latent=m["n_latent"],
        parameters=m["parameters"], buffers=m["buffers"], initial_state=m["initial_state"], seed=m.get("seed"),
        extra={"replay_of": str(trace.path), "plant": plant, **(extra or {})})
    save_trace(out_path, arrays, manifest)
    return manifest


def main(argv, *, framework: str, version: str, replay_trace, default_out: str, add_arguments=None,
         replay_options=None) -> int:
    """The command line of a transcription: ``SCRIPT TRACE [--out FILE] [--steps K] [--plant NAME|list]
    [--flip-arm-sign]`` plus the script's own options.

    ``replay_trace(trace, out, steps=, plant=, **replay_options(args))`` replays; ``add_arguments(parser)``
    adds the script's options.
    """
    parser = argparse.ArgumentParser(description=f"Replay a refimpl trace in {framework} and write a trace of the "
                                                 "replay.")
    parser.add_argument("trace", nargs="?", help="trace file written by `refimpl trace` (refimpl/trace.py)")
    parser.add_argument("--out", default=default_out, help=f"trace of the replay (default: {default_out})")
    parser.add_argument("--steps", type=int, default=None, help="replay only the first STEPS steps")
    parser.add_argument("--plant", default=None, metavar="NAME",
                        help="plant a porting bug from refimpl's catalogue (refimpl/porting_bugs.py); "
                             "'--plant list' prints the catalogue")
    parser.add_argument("--flip-arm-sign", action="store_true", help="plant a bug: negate the ARM term (l. 29); "
                        "the same as --plant arm-sign")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.plant == "list":
        from refimpl.porting_bugs import render_list

        print(render_list())
        return 0
    if args.trace is None:
        parser.error("the trace file is required (unless --plant list)")
    if args.plant is not None and args.plant not in plant_catalogue():
        parser.error(f"--plant {args.plant}: expected one of {', '.join(plant_catalogue())} (or list)")
    if args.flip_arm_sign and args.plant not in (None, "arm-sign"):
        parser.error("--flip-arm-sign and --plant name two different bugs")
    plant = "arm-sign" if args.flip_arm_sign else args.plant
    options = replay_options(args) if replay_options is not None else {}
    manifest = replay_trace(args.trace, args.out, steps=args.steps, plant=plant, **options)
    planted = f" with the bug {plant!r} planted" if plant else ""
    print(f"replayed {manifest['steps']} steps of {args.trace} in {version}{planted}; wrote {args.out}")
    return 0
