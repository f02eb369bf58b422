"""The experiment scripts in a tiny configuration: the CSV columns and numbers they write
agree with the runs' own logs and checkpoints, the PNGs exist, reruns reuse finished runs."""

import csv
import importlib.util
import subprocess
import sys

import pytest

from refimpl.atomic import write_csv, write_json
from refimpl.evaluate import image_grid, save_image
from refimpl import figures
from refimpl.experiments import common, figure1, figure2, figure3, table1
from refimpl.runlog import moving_average, read_log
from refimpl.training import Run

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY = ["--image-size", "8", "--channels", "2", "--batch-size", "8", "--quiet", "--checkpoint-every", "3"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_figure1(tmp_path):
    out = tmp_path / "f1"
    result = figure1.run([*TINY, "--batches", "6", "--latent", "3", "--tau", "40", "--out", str(out)])
    rows = read_csv(out / "figure1.csv")
    log = read_log(out / "runs" / "run" / "log.csv")
    assert list(rows[0]) == ["step", "E2", "tau", "gates_l1", "lambda_eff", "hit_fraction", "open_gates"]
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert [float(r["E2"]) for r in rows] == log["E2"] and {float(r["tau"]) for r in rows} == {40.0}
    if HAVE_MATPLOTLIB:  # plots are an optional extra; the CSV above is always written
        assert (out / "figure1.png").stat().st_size > 0
    else:
        assert not (out / "figure1.png").exists()
    assert result["summary"]["open_gates"] == int(rows[-1]["open_gates"])
    # a second call reuses the finished run: same log, nothing retrained
    before = (out / "runs" / "run" / "log.csv").read_text()
    figure1.run([*TINY, "--batches", "6", "--latent", "3", "--tau", "40", "--out", str(out)])
    assert (out / "runs" / "run" / "log.csv").read_text() == before


def test_figure2(tmp_path):
    out = tmp_path / "f2"
    result = figure2.run([*TINY, "--blas-threads", "0", "--batches", "4", "--latent", "3", "--taus", "5,40", "--jobs", "1",
                          "--eval-images", "8", "--out", str(out)])
    rows = read_csv(out / "figure2.csv")
    assert [float(r["tau"]) for r in rows] == [5.0, 40.0]
    for r in rows:
        run = Run.load(out / "runs" / f"tau{float(r['tau']):g}", for_training=False)
        assert int(r["open_gates"]) == run.model.open_gates() and run.hyper.tau == float(r["tau"])
        assert int(r["batches"]) == 4 and len(r["gates"]) == 3
        assert float(r["train_E2_ma95"]) == pytest.approx(moving_average(read_log(run.out / "log.csv")["E2"]))
    from PIL import Image

    grid = Image.open(out / "figure2_reconstructions.png")  # the original and one reconstruction per tau
    scale = 96 // 8
    assert grid.size == (scale * (3 * 10 + 2), scale * (10 + 2) + 28)  # + the labels' strip
    if HAVE_MATPLOTLIB:  # plots are an optional extra; the CSV above is always written
        assert (out / "figure2.png").stat().st_size > 0
    else:
        assert not (out / "figure2.png").exists()
    assert result["rows"][0]["image_index"] == int(rows[0]["image_index"])


def test_figure3_in_two_processes(tmp_path):
    out = tmp_path / "f3"
    figure3.run([*TINY, "--batches", "4", "--latent", "3", "--low-tau", "5", "--high-tau", "40", "--jobs", "2",
                 "--count", "4", "--eval-images", "8", "--out", str(out)])
    rows = read_csv(out / "figure3.csv")
    assert [float(r["tau"]) for r in rows] == [5.0, 40.0]
    from PIL import Image

    image = Image.open(out / "figure3.png")  # originals, low tau, high tau
    assert image.size == (16 * (4 * 10 + 2), 16 * (3 * 10 + 2))
    for r in rows:
        assert read_log(out / "runs" / f"tau{float(r['tau']):g}" / "log.csv")["step"] == [1, 2, 3, 4]


def test_table1(tmp_path):
    out = tmp_path / "t1"
    table1.run([*TINY, "--blas-threads", "0", "--batches", "4", "--latents", "1,2", "--jobs", "1", "--out", str(out)])
    rows = read_csv(out / "table1.csv")
    assert [int(r["n"]) for r in rows] == [1, 2] and [int(r["gated_n"]) for r in rows] == [2, 4]
    for r in rows:
        n = int(r["n"])
        base = read_log(out / "runs" / f"baseline-n{n}" / "log.csv")
        assert len(base["step"]) == 4 and set(base["tau"]) == {0.0}
        tau = moving_average(base["E2"], 0.95)
        assert float(r["baseline_error_ma95"]) == pytest.approx(tau, rel=1e-12)
        gated = read_log(out / "runs" / f"gated-n{2 * n}" / "log.csv")
        assert gated["step"] == list(range(1, 9)) and gated["tau"][0] == pytest.approx(tau, rel=1e-12)
        for m in (4, 6, 8):
            assert int(r[f"open_gates_{m}"]) == gated["open_gates"][m - 1]
    if HAVE_MATPLOTLIB:  # plots are an optional extra; the CSV above is always written
        assert (out / "table1.png").stat().st_size > 0
    else:
        assert not (out / "table1.png").exists()


def test_experiment_errors_are_one_line(tmp_path):
    out = tmp_path / "f1"
    assert figure1.main([*TINY, "--batches", "2", "--latent", "3", "--tau", "40", "--out", str(out)]) == 0
    proc = subprocess.run([sys.executable, "-m", "refimpl.experiments.figure1", *TINY, "--batches", "2", "--latent",
                           "3", "--tau", "20", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds a run with other settings (tau=20.0 (the run has 40.0))" in lines[0]


def test_result_files_are_written_atomically(tmp_path):
    """CSV (columns in order of first appearance), JSON and PNG go through atomic_write: a failed write
    leaves the old file and no temporary beside it."""
    path = write_csv(tmp_path / "r.csv", [{"tau": 1.0, "gates": 3}, {"tau": 2.0, "extra": "x"}])
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["tau", "gates", "extra"], ["1.0", "3", ""], ["2.0", "", "x"]]
    assert write_json(tmp_path / "r.json", {"a": [1, 2]}).read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}'
    png = save_image(image_grid([[[[[0.0, 1.0]]]]]), tmp_path / "g.png")
    old = png.read_bytes()
    assert old.startswith(b"\x89PNG")

    class Broken:
        def save(self, f, format):
            f.write(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_image(Broken(), png)
    assert png.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "r.csv", "r.json"]


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib (extra 'plots') not installed")
def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
    import matplotlib.pyplot as plt

    fig = figures.pyplot().figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    path = figures.save_figure(fig, tmp_path / "sub" / "f.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert not plt.fignum_exists(fig.number)
