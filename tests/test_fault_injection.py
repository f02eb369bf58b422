"""SIGKILL a training run at 30 random moments, resuming after each: it must end bit for bit
where an uninterrupted run ends, with log.csv holding rows 1..B exactly once.

``$REFIMPL_TEST_SLOW_WRITE`` makes every checkpoint write pause between its temporary file
and the rename, and every log row pause between its two halves, so that kills land inside
those writes (refimpl/atomic.py, refimpl/runlog.py). The moments are drawn from a seeded
generator: a quarter during start-up (imports, the lock, the log check, the step-0
checkpoint), the rest while training. Where each kill landed is read off the folder
afterwards (a temporary left behind, a torn last row, ...) and printed as a tally. Where
the random moments missed a checkpoint write or a log row write (on a loaded machine start-up
takes longer and draws more of them), one more kill is aimed at it: the folder is watched
until the write is half done, then the run is killed.
"""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy
import pytest

from refimpl import checkpoint as ckpt
from refimpl.atomic import SLOW_WRITE_ENV, temporary_name
from refimpl.runlog import read_log

ARGS = ["--image-size", "16", "--channels", "4,4", "--hidden", "16", "--batch-size", "16", "--latent", "4",
        "--holdout", "32", "--tau", "2", "--quiet"]
SLOW = 0.04  # seconds each write pauses in the middle
TRAINING_WINDOW = 0.6  # a training-phase kill comes up to this long after the run says it started


def refimpl(out, *extra, slow=False):
    env = {**os.environ, SLOW_WRITE_ENV: str(SLOW)} if slow else None
    return subprocess.Popen([sys.executable, "-m", "refimpl", "train", *ARGS, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def progress(out: Path) -> tuple:
    """(checkpoint step, log rows) of the folder as it is."""
    step = ckpt.load(out / "checkpoint.npz")[1]["step"] if (out / "checkpoint.npz").is_file() else None
    log = out / "log.csv"
    return step, (log.read_bytes().count(b"\n") - 1 if log.is_file() else None)


def where_it_landed(out: Path, before: tuple, total: int) -> str:
    names = [p.name for p in out.iterdir()] if out.is_dir() else []
    for target, place in (("checkpoint.npz", "inside a checkpoint write"), ("config.json", "inside the config write"),
                          ("log.csv", "inside the log check's rewrite"), ("summary.json", "inside the summary write"),
                          ("plot.png", "inside the plot write")):
        if any(temporary_name(target).fullmatch(n) for n in names):
            return place
    log = out / "log.csv"
    if log.is_file() and log.stat().st_size and not log.read_bytes().endswith(b"\n"):
        return "inside a log row write"
    now = progress(out)
    if now[0] == total:
        return "after the last step (summary, plot)"
    return "start-up (imports, lock, log check)" if now == before else "between writes (computing a step)"


def assert_same_run(a: Path, b: Path) -> None:
    arrays_a, meta_a = ckpt.load(a / "checkpoint.npz")
    arrays_b, meta_b = ckpt.load(b / "checkpoint.npz")
    meta_a.pop("timing"), meta_b.pop("timing")
    assert meta_a == meta_b  # step, Adam's counts, GECO state, RNG and batch-stream states, config
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:  # parameters, BatchNorm statistics, lambda, Adam's moments
        assert arrays_a[name].dtype == arrays_b[name].dtype and arrays_a[name].tobytes() == arrays_b[name].tobytes()
    log_a, log_b = read_log(a / "log.csv"), read_log(b / "log.csv")
    log_a.pop("seconds"), log_b.pop("seconds")
    assert log_a == log_b


def mid_checkpoint_write(out: Path) -> bool:
    return any(temporary_name("checkpoint.npz").fullmatch(p.name) for p in out.iterdir()) if out.is_dir() else False


def mid_log_row_write(out: Path) -> bool:
    log = out / "log.csv"
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        return False
    return data.count(b"\n") > 1 and not data.endswith(b"\n")  # a torn row after the header and a first row


AIMED = {"inside a checkpoint write": mid_checkpoint_write, "inside a log row write": mid_log_row_write}


def resume_or_start(out: Path, total: int, every: int) -> list:
    """The training arguments that continue the folder's run, or start it where it has no checkpoint yet."""
    if (out / "checkpoint.npz").is_file():
        return ["--resume"]
    return ["--batches", str(total), "--checkpoint-every", str(every)]


def sigkill_after(proc, wait) -> bool:
    """wait(proc), then SIGKILL proc and close its pipes; whether it was still alive when killed."""
    try:
        wait(proc)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    return alive


def kill_when(out: Path, total: int, every: int, place: str, tally: Counter) -> None:
    """Run (or resume) the training, watch the folder until AIMED[place] holds, SIGKILL it there and tally the kill."""
    before = progress(out)

    def until_aimed(proc):
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not AIMED[place](out):
            time.sleep(0.002)

    alive = sigkill_after(refimpl(out, *resume_or_start(out, total, every), slow=True), until_aimed)
    assert alive, f"the run ended before a kill {place}"
    tally[where_it_landed(out, before, total)] += 1


def kill_and_resume(out: Path, total: int, every: int, kills: int, rng, tally: Counter, aim=()) -> None:
    """``kills`` kills at random moments, then one aimed kill for each place in ``aim`` that none of them hit."""
    startup = 1.0  # seconds to the first line, updated from each attempt
    done = 0
    while done < kills:
        before = progress(out)
        started = time.monotonic()

        def random_moment(proc):
            nonlocal startup
            if rng.random() < 0.25:
                time.sleep(rng.uniform(0, startup))
            else:
                first = proc.stdout.readline()
                assert first, proc.stderr.read()
                startup = time.monotonic() - started
                time.sleep(rng.uniform(0, TRAINING_WINDOW))

        if sigkill_after(refimpl(out, *resume_or_start(out, total, every), slow=True), random_moment):
            done += 1
            tally[where_it_landed(out, before, total)] += 1
    for place in aim:
        if tally[place] == 0:
            kill_when(out, total, every, place, tally)
    proc = refimpl(out, *resume_or_start(out, total, every))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


@pytest.mark.slow
def test_thirty_kills_at_random_moments_end_where_an_uninterrupted_run_ends(tmp_path):
    rng = numpy.random.default_rng(11)
    tally = Counter()
    for every, total, kills in ((1, 60, 15), (10, 120, 15)):
        reference = tmp_path / f"reference-{every}"
        proc = refimpl(reference, "--batches", str(total), "--checkpoint-every", str(every))
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        out = tmp_path / f"killed-{every}"
        kill_and_resume(out, total, every, kills, rng, tally, aim=AIMED if every == 10 else ())
        assert_same_run(out, reference)
        assert read_log(out / "log.csv")["step"] == list(range(1, total + 1))
        leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-"))
        assert leftovers == []
    print(f"\n{sum(tally.values())} kills: " + "; ".join(f"{n} {place}" for place, n in tally.most_common()))
    assert 30 <= sum(tally.values()) <= 30 + len(AIMED)
    assert tally["inside a checkpoint write"] > 0 and tally["inside a log row write"] > 0
