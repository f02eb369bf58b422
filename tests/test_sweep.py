"""Sweeps on Dask (refimpl/sweep.py): a LocalCluster gives what one process gives, a real scheduler and
workers survive a worker's death with the run resumed bit for bit, Table 1 as a task graph, signals,
and the one-line errors."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from refimpl.cli import main as cli_main
from refimpl.config import RunConfig, Schedule
from refimpl.figures import pyplot
from refimpl.experiments import figure2, table1
from refimpl.sweep import Cluster, Sweep, grid_runs, parse_grid, run_name, run_spec
from refimpl.training import Run
from test_training import assert_same_checkpoint  # every array bit for bit, the meta but its timing

distributed = pytest.importorskip("distributed")

TINY = ["--image-size", "8", "--channels", "2", "--batch-size", "8", "--holdout", "16"]
TINY_CONFIG = dict(image_size=8, channels=(2,), batch_size=8, holdout=16)
BIN = Path(sys.executable).parent


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_parsing_and_run_names():
    assert parse_grid("tau=3,6,10") == ("tau", (3.0, 6.0, 10.0))
    assert parse_grid("seed=0,1") == ("seed", (0, 1))
    assert parse_grid("error=sse,l2") == ("error", ("sse", "l2"))
    assert parse_grid("channels=4,8;8,16") == ("channels", ((4, 8), (8, 16)))
    points = grid_runs([("tau", (3.0, 6.0)), ("seed", (0, 1))])
    assert points == [{"tau": 3.0, "seed": 0}, {"tau": 3.0, "seed": 1}, {"tau": 6.0, "seed": 0},
                      {"tau": 6.0, "seed": 1}]
    assert run_name(points[1]) == "tau3-seed1"
    from refimpl.optionspec import OptionError

    for bad in ("frobnicate=1", "tau", "error=mse", "seed=x"):
        with pytest.raises(OptionError, match="--grid"):
            parse_grid(bad)


def test_local_cluster_sweep_equals_one_process(tmp_path):
    """A 2-run Figure 2 sweep on a LocalCluster of 2 workers writes the CSV the runs give one after another."""
    opts = [*TINY, "--latent", "3", "--batches", "30", "--checkpoint-every", "10", "--taus", "5,40",
            "--eval-images", "16", "--quiet"]
    figure2.run([*opts, "--jobs", "1", "--blas-threads", "0", "--out", str(tmp_path / "here")])
    figure2.run([*opts, "--jobs", "2", "--out", str(tmp_path / "cluster")])
    here, cluster = read_csv(tmp_path / "here" / "figure2.csv"), read_csv(tmp_path / "cluster" / "figure2.csv")
    assert here == cluster and len(here) == 2
    for tau in ("tau5", "tau40"):
        assert_same_checkpoint(tmp_path / "here" / "runs" / tau / "checkpoint.npz",
                               tmp_path / "cluster" / "runs" / tau / "checkpoint.npz")


def test_refimpl_sweep_grid_csv(tmp_path, capsys):
    out = tmp_path / "front"
    assert cli_main(["sweep", "--grid", "tau=5,40", "--grid", "seed=0,1", *TINY, "--latent", "3", "--batches", "6",
                     "--checkpoint-every", "3", "--eval-images", "8", "--blas-threads", "0", "--quiet",
                     "--out", str(out)]) == 0
    rows = read_csv(out / "sweep.csv")
    assert [(r["tau"], r["seed"]) for r in rows] == [("5.0", "0"), ("5.0", "1"), ("40.0", "0"), ("40.0", "1")]
    for r in rows:
        run = Run.load(r["run"], for_training=False)
        assert run.config.seed == int(r["seed"]) and run.hyper.tau == float(r["tau"]) and run.state.step == 6
        assert int(r["open_gates"]) == run.model.open_gates() and float(r["heldout_sse"]) > 0
        assert (Path(r["run"]) / "plot.png").is_file() == (pyplot() is not None)  # as refimpl train draws it
    assert "4 runs" in capsys.readouterr().out
    # again: every run is reused, nothing retrained
    before = {r["run"]: (Path(r["run"]) / "log.csv").read_text() for r in rows}
    assert cli_main(["sweep", "--grid", "tau=5,40", "--grid", "seed=0,1", *TINY, "--latent", "3", "--batches", "6",
                     "--checkpoint-every", "3", "--eval-images", "8", "--blas-threads", "0", "--quiet",
                     "--out", str(out)]) == 0
    assert {r: (Path(r) / "log.csv").read_text() for r in before} == before


def test_a_dask_sweep_shows_its_runs_from_the_start(tmp_path, capsys):
    """Not --quiet: the status board's first line before any run ends, then a line per finished run."""
    out = tmp_path / "shown"
    assert cli_main(["sweep", "--grid", "tau=5,40", *TINY, "--latent", "3", "--batches", "4", "--eval-images", "0",
                     "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()  # not a terminal: summary lines, no escape codes
    assert err[0] == "sweep: 0/2 runs done, 0 running, 2 waiting; 0/8 batches; ETA ?"
    assert sorted(line.split(":")[0] for line in err if line.startswith("done ")) == [
        f"done {out / 'runs' / name}" for name in ("tau40", "tau5")]
    assert not any("\x1b" in line for line in err)


def test_table1_gated_runs_start_after_their_baselines(tmp_path):
    out = tmp_path / "t1"
    table1.run([*TINY, "--latents", "2,3", "--batches", "12", "--checkpoint-every", "4", "--jobs", "2", "--quiet",
                "--out", str(out)])
    for n in (2, 3):
        baseline_done = (out / "runs" / f"baseline-n{n}" / "summary.json").stat().st_mtime
        gated_started = (out / "runs" / f"gated-n{2 * n}" / "config.json").stat().st_mtime
        assert gated_started >= baseline_done
        gated = Run.load(out / "runs" / f"gated-n{2 * n}", for_training=False)
        assert gated.hyper.tau == pytest.approx(table1.baseline_tau({"out": str(out / "runs" / f"baseline-n{n}")}))


def test_gpu_runs_ask_for_a_gpu_resource(tmp_path, monkeypatch):
    submitted = []

    class FakeClient:
        def submit(self, *args, **kwargs):
            submitted.append(kwargs)
            return None

    sweep = Sweep(tmp_path, Cluster(jobs=2))
    sweep.client = FakeClient()
    given = {"hyper": {"tau": 1.0}}
    sweep.submit(run_spec(tmp_path / "a", given, Schedule(1, 1), backend="cupy"))
    sweep.submit(run_spec(tmp_path / "b", given, Schedule(1, 1), backend="numpy"))
    assert submitted[0]["resources"] == {"GPU": 1} and submitted[1]["resources"] is None


def test_error_lines(tmp_path, capsys):
    code = cli_main(["sweep", "--grid", "tau=5", *TINY, "--batches", "2", "--scheduler", "tcp://127.0.0.1:9",
                     "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err[0]
    # a worker without the dataset: one line naming the file
    code = cli_main(["sweep", "--grid", "tau=5", "--dataset", "mnist", "--data", str(tmp_path / "nothing"), "--batches", "2",
                     "--jobs", "2", "--quiet", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "MNIST file not found" in err[0] and str(tmp_path / "nothing") in err[0]
    # an option that cannot work is refused before anything runs
    assert cli_main(["sweep", "--grid", "image_size=24", "--out", str(tmp_path / "x")]) == 2
    assert "image_size=24" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_worker_that_cannot_see_the_folder_says_which(tmp_path):
    from refimpl.sweep import RunFolderNotVisible, worker_task

    with distributed.Client(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as client:
        future = client.submit(worker_task, {}, str(tmp_path / "elsewhere"))
        with pytest.raises(RunFolderNotVisible, match=r"worker .* cannot see the sweep folder .*elsewhere"):
            future.result()


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in _children(k)]


def _log_rows(run_dir: Path) -> int:
    log = run_dir / "log.csv"
    return max(0, len(log.read_text().splitlines()) - 1) if log.exists() else 0


def test_sigterm_to_the_client_stops_every_run_with_its_checkpoint(tmp_path):
    out = tmp_path / "s"
    proc = subprocess.Popen([str(BIN / "refimpl"), "sweep", "--grid", "tau=5,40", "--image-size", "16", "--latent",
                             "4", "--batches", "100000", "--checkpoint-every", "1000", "--jobs", "2", "--quiet",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and min(_log_rows(out / "runs" / t) for t in ("tau5", "tau40")) < 20:
            time.sleep(0.2)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    last = err.strip().splitlines()[-1]
    assert "interrupted: SIGTERM: 2 run(s) in progress saved their checkpoints" in last and "same command" in last
    for tau in ("tau5", "tau40"):
        run = Run.load(out / "runs" / tau, for_training=False)
        assert 20 <= run.state.step < 100000 and run.state.step == _log_rows(out / "runs" / tau)
    deadline = time.monotonic() + 15  # the workers and multiprocessing's resource tracker exit with the client
    while [p for p in workers if Path(f"/proc/{p}").exists()] and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()]
    assert not alive, f"processes the sweep started still running: {alive}"
    assert not (out / ".stop").exists()


def test_the_local_cluster_drops_no_worker_for_missed_heartbeats(tmp_path, monkeypatch):
    """A pause (kill -STOP) longer than Dask's worker-ttl must not make the scheduler restart the workers: the
    sweep's LocalCluster has no TTL, whatever the configuration says."""
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL", "1s")
    import dask
    dask.config.refresh()
    try:
        with Sweep(tmp_path / "s", Cluster(jobs=1, quiet=True)) as sweep:
            assert sweep._local_cluster.scheduler.worker_ttl is None
    finally:
        monkeypatch.delenv("DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL")
        dask.config.refresh()


@pytest.mark.slow
def test_a_paused_sweep_keeps_its_workers(tmp_path):
    """kill -STOP / -CONT of the whole sweep (the way to time something beside it) loses no worker: the same
    worker processes go on training the same runs. (A pause longer than Dask's default worker-ttl, 5 minutes,
    restarted them before the sweep turned the TTL off: 400 s, 2026-12-07; too long for a test.)"""
    out = tmp_path / "s"
    env = dict(os.environ)
    proc = subprocess.Popen([str(BIN / "refimpl"), "sweep", "--grid", "tau=5,40", "--image-size", "16", "--latent",
                             "4", "--batches", "100000", "--checkpoint-every", "1000", "--jobs", "2", "--quiet",
                             "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    runs = [out / "runs" / t for t in ("tau5", "tau40")]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and min(_log_rows(r) for r in runs) < 20:
            time.sleep(0.2)
        workers = sorted(_children(proc.pid))
        os.killpg(proc.pid, signal.SIGSTOP)
        time.sleep(12)  # Dask's TTL is at least 10 heartbeats (5 s)
        os.killpg(proc.pid, signal.SIGCONT)
        before = [_log_rows(r) for r in runs]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(_log_rows(r) > b + 20 for r, b in zip(runs, before)):
            time.sleep(0.2)
        after = [_log_rows(r) for r in runs]
        assert sorted(_children(proc.pid)) == workers  # no worker dropped, none restarted
        assert all(a > b + 20 for a, b in zip(after, before))  # and the runs go on from where they were
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 128 + signal.SIGTERM


@pytest.mark.slow
def test_real_scheduler_survives_a_killed_worker_and_the_run_resumes_bit_for_bit(tmp_path):
    """`dask scheduler` and two `dask worker` processes; one worker is SIGKILLed mid-run: Dask gives the run
    to the other worker, which resumes it from its checkpoint; the end state equals an uninterrupted run's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    scheduler_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(scheduler_file)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        import json

        address = json.loads(scheduler_file.read_text())["address"]
        workers = [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
                                     "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for _ in range(2)]
        procs += workers
        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        out = tmp_path / "s"
        opts = ["--image-size", "16", "--channels", "4,8", "--batch-size", "16", "--latent", "4", "--batches", "600",
                "--checkpoint-every", "10"]
        sweep = subprocess.Popen([str(BIN / "refimpl"), "sweep", "--grid", "tau=5,40", *opts, "--quiet",
                                  "--scheduler", address, "--out", str(out)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        procs.append(sweep)
        while time.monotonic() < deadline + 120 and min(_log_rows(out / "runs" / t) for t in ("tau5", "tau40")) < 25:
            time.sleep(0.1)
        unfinished = [t for t in ("tau5", "tau40") if not (out / "runs" / t / "summary.json").exists()]
        workers[0].kill()  # SIGKILL: its run is mid-way
        assert len(unfinished) == 2, "both runs finished before the kill: make them longer"
        stdout, stderr = sweep.communicate(timeout=300)
        assert sweep.returncode == 0, stderr
        for tau in (5.0, 40.0):
            name = f"tau{tau:g}"
            log = (out / "runs" / name / "log.csv").read_text().splitlines()
            assert [int(line.split(",")[0]) for line in log[1:]] == list(range(1, 601))
            config = RunConfig(latent=4, image_size=16, channels=(4, 8), batch_size=16, hyper={"tau": tau})
            reference = Run.create(config, tmp_path / f"ref-{name}", schedule=Schedule(600, 10))
            reference.train(600, 10, progress=False)
            assert_same_checkpoint(out / "runs" / name / "checkpoint.npz", tmp_path / f"ref-{name}" / "checkpoint.npz")
        assert np.isfinite([float(r["E2_ma95"]) for r in read_csv(out / "sweep.csv")]).all()
    finally:
        for p in procs:
            p.kill()


def test_a_run_starts_from_the_config_the_client_made_and_with_its_execution(tmp_path, monkeypatch):
    """The options of a sweep's or an experiment's run are made into a RunConfig once, by the client (issue 24):
    the worker opens a new run from it; the execution options given travel with the spec."""
    from refimpl import runopen
    from refimpl.config import new_config
    from refimpl.sweep import train_one, with_tau

    given = {**TINY_CONFIG, "latent": 3, "hyper": {"tau": 40.0}}
    spec = run_spec(tmp_path / "run", given, Schedule(2, 2), config=new_config(given), execution={"reference": True})
    spec = with_tau(spec, 30.0)  # Table 1's baseline error, known only later, reaches the config too
    assert spec["config"]["hyper"]["tau"] == spec["given"]["hyper"]["tau"] == 30.0

    def again(given):
        raise AssertionError("new_config ran a second time")

    monkeypatch.setattr(runopen, "new_config", again)
    assert train_one(spec)["step"] == 2
    run = Run.load(tmp_path / "run", for_training=False)
    assert run.config.latent == 3 and run.hyper.tau == 30.0
    monkeypatch.setattr(Run, "train", lambda run, *a, **kw: {"paths": run.paths})
    assert train_one(spec)["paths"].fused is False  # --reference: the plain decoder blocks
