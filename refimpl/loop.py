"""Algorithm 1's loop (l. 2) over a run's batches: the step (l. 3-31, or its device form),
a row of ``log.csv`` per step, checkpoints, progress, and stopping on a signal or a
non-finite loss. :meth:`refimpl.training.Run.train` checks its arguments and calls it.
"""

from __future__ import annotations

import math
import signal
import time

import numpy

from .algorithm1 import train_step
from .backend import to_host
from .console import Progress, StopOnSignal
from .device_step import DeviceStep, applies
from .errors import NonFiniteLoss, TrainingInterrupted
from .provenance import record
from .runfolder import LOG_FILE
from .runlog import CsvLog
from .threads import blas_limit


def run_loop(run, progress: bool, log_interval, stop) -> None:
    """Alg. 1 l. 2-31 on ``run`` (a :class:`refimpl.training.Run` open for training) up to its schedule's
    target: a row of log.csv per step, a checkpoint every ``checkpoint_every`` steps, at a kept step, at
    the end and when stopped (``stop()`` says True, or SIGINT/SIGTERM: :class:`TrainingInterrupted`).
    A non-finite loss raises :class:`NonFiniteLoss` without a checkpoint. The rest as :meth:`Run.train`.
    With the run's ``paths.device_step``, from the first hit on the step is :class:`DeviceStep`."""
    batches, checkpoint_every = run.schedule.batches, run.schedule.checkpoint_every
    run.batch_order  # opens the dataset before the log
    state, tau = run.state, run.hyper.tau
    if state.step < batches:
        record(run, state.step, batches)  # sessions.jsonl: under what this session trains
    run.csv_log = CsvLog(run.out / LOG_FILE)
    bar = Progress(batches, state.step, run.config.latent, enabled=progress, interval=log_interval)
    fast = None  # the DeviceStep, once it applies
    try:
        with StopOnSignal() as signalled, numpy.errstate(all="ignore"), blas_limit(state.passes.threads.blas):
            while state.step < batches:  # Alg. 1 l. 2: foreach x_i in D
                if signalled.signum is None and stop is not None and stop():
                    signalled.signum = signal.SIGTERM
                if signalled.signum is not None:
                    break
                t0 = time.perf_counter()
                if run.paths.device_step and fast is None and applies(state):
                    fast = DeviceStep(state)
                x = run.next_batch()
                if fast is None:
                    log = train_step(state, x, run.train_rng)  # l. 3-31
                else:
                    log = fast.host_log(fast(x, run.train_rng))  # the same, without host reads mid-step
                seconds = time.perf_counter() - t0
                run.elapsed += seconds
                gamma = to_host(run.model.params["gamma"])  # after l. 31: the gates' state for the plot
                run.csv_log.write({**log, "tau": tau, "seconds": seconds,
                                   **{f"gamma_{j}": g for j, g in enumerate(gamma)}})
                if not all(math.isfinite(log[k]) for k in ("loss", "E2", "lambda_raw", "gates_l1")):
                    run.csv_log.sync()
                    kept = (f"the last good checkpoint (step {run.checkpoint_step}) is kept at "
                            f"{run.checkpoint_path()}")
                    raise NonFiniteLoss(f"non-finite loss at step {state.step} (loss={log['loss']}, "
                                        f"E2={log['E2']}, lambda={log['lambda_raw']}); stopped; {kept}")
                bar.update(log, tau)
                if state.step % checkpoint_every == 0 or run.keeps(state.step):
                    run.save_checkpoint()
            if signalled.signum is not None:
                if run.checkpoint_step != state.step:
                    run.save_checkpoint()
                raise TrainingInterrupted(state.step, signalled.signum, run.checkpoint_path())
        if run.checkpoint_step != state.step:
            run.save_checkpoint()
    finally:
        bar.close()
        run.csv_log.close()
        run.csv_log = None
