"""What a run's checkpoint holds, and back: a :class:`refimpl.training.Run`'s model, Adam and
GECO state, random streams, batch position, schedule and settings as the arrays and meta
of :mod:`refimpl.checkpoint` (``checkpoint.npz``), and a built Run restored from them.

Arrays: ``model/NAME`` (the state dict), ``lambda``, ``adam/m/NAME`` and ``adam/v/NAME``.
Meta: the step, Adam's and GECO's scalars, the ``train`` stream's and the batch order's
state, the schedule, the parent record of a branch, the config and architecture, timing.
"""

from __future__ import annotations

from . import checkpoint as ckpt
from .backend import to_device, to_host
from .config import saved_schedule
from .rng import get_state, set_state

META_KEYS = ("step", "adam_t", "hit", "c_ma", "last_constraint_met", "train_rng", "batch_iterator", "config",
             "architecture")  # those every checkpoint must hold


def contents(run) -> tuple[dict, dict]:
    """(arrays, meta) of ``run``'s current state, on the host."""
    state = run.state
    arrays = {f"model/{k}": to_host(v).copy() for k, v in run.model.state_dict().items()}
    arrays["lambda"] = to_host(state.lam).copy()
    adam = state.optimizer.state_dict()
    arrays.update({f"adam/m/{k}": v for k, v in adam["m"].items()})
    arrays.update({f"adam/v/{k}": v for k, v in adam["v"].items()})
    meta = {
        "step": state.step, "adam_t": adam["t"], "adam_steps": adam["steps"],
        "hit": state.hit, "c_ma": state.c_ma, "last_constraint_met": state.last_constraint_met,
        "train_rng": get_state(run.train_rng),
        "batch_iterator": run.batch_state,
        "target_batches": run.schedule.batches, "checkpoint_every": run.schedule.checkpoint_every,
        "keep_checkpoints": run.schedule.keep_checkpoints, "parent": run.parent,
        "config": run.config.to_dict(), "architecture": run.arch.to_dict(),
        "timing": {"elapsed_s": run.elapsed, "backend": run.backend},
    }
    return arrays, meta


def restore(run, arrays: dict, meta: dict, path) -> None:
    """Put checkpoint ``path``'s ``arrays`` and ``meta`` into ``run`` (built with its config and
    architecture); CheckpointError when a key or shape does not fit."""
    state, xp = run.state, run.xp
    shapes = {f"model/{k}": v.shape for k, v in run.model.state_dict().items()}
    shapes.update({f"adam/{m}/{k}": p.shape for m in "mv" for k, p in state.optimizer.params.items()})
    ckpt.check_contents(path, arrays, meta, {**shapes, "lambda": ()}, META_KEYS)
    run.model.load_state_dict({k: to_device(v, xp, run.dtype) for k, v in ckpt.prefixed(arrays, "model/").items()})
    state.lam[...] = to_device(arrays["lambda"], xp, run.dtype)
    try:
        state.optimizer.load_state_dict({"t": meta["adam_t"], "steps": meta.get("adam_steps"),
                                         "m": ckpt.prefixed(arrays, "adam/m/"),
                                         "v": ckpt.prefixed(arrays, "adam/v/")})
    except (ValueError, TypeError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {path}: {exc}") from None
    state.step, state.hit, state.c_ma = int(meta["step"]), bool(meta["hit"]), meta["c_ma"]
    state.last_constraint_met = bool(meta["last_constraint_met"])
    set_state(run.train_rng, meta["train_rng"])
    run.elapsed = float(meta.get("timing", {}).get("elapsed_s", 0.0))
    run.schedule = saved_schedule(meta)
    run.parent = meta.get("parent")
    run.batch_state = meta["batch_iterator"]
    run.checkpoint_step = state.step
