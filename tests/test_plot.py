"""refimpl.plot: Figure 1 of a run folder (PNG, panels, notes for old logs and missing data),
errors for what is not a run, the install hint without matplotlib, and the decimation."""

import shutil
import sys

import numpy
import pytest
from PIL import Image

from refimpl import figures as figure_helpers
from refimpl import plot, runread, training
from refimpl.cli import main as cli_main
from refimpl.data import DatasetNotFoundError
from refimpl.config import RunConfig
from refimpl.runlog import read_log
from refimpl.training import Run

STEPS = 5
FILES = ["checkpoint.npz", "config.json", "log.csv", "plot.png", "sessions.jsonl", "summary.json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny real run: 16x16 synthetic dSprites, n = 3, 5 batches (about a second)."""
    out = tmp_path_factory.mktemp("plot") / "r"
    config = RunConfig(dataset="synthetic-dsprites", latent=3, image_size=16, holdout=100, hyper={"tau": 1.0})
    Run.create(config, out).train(STEPS, progress=False)
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    """A private copy of the tiny run (tests rewrite its log)."""
    return shutil.copytree(trained, tmp_path / "r")


@pytest.fixture
def captured(monkeypatch):
    """The figures plot_run saves: title, every axes' line data and legend labels."""
    figures = []
    save = figure_helpers.save_figure

    def spy(fig, path):
        figures.append({
            "title": fig._suptitle.get_text() if fig._suptitle else "",
            "axes": [{"lines": [(l.get_xdata(), l.get_ydata(), l.get_label()) for l in ax.get_lines()],
                      "title": ax.get_title(), "images": len(ax.get_images()),
                      "texts": [t.get_text() for t in ax.texts]} for ax in fig.axes],
        })
        return save(fig, path)

    monkeypatch.setattr(plot, "save_figure", spy)
    return figures


def ema(values, factor):
    """The last value of m <- factor m + (1 - factor) v, started at the first value."""
    m = values[0]
    for v in values[1:]:
        m = factor * m + (1 - factor) * v
    return m


def rewrite_log(path, keep):
    """Rewrite log.csv with only the columns for which keep(name) is true."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cols = [i for i, c in enumerate(header) if keep(c)]
    path.write_text("\n".join(",".join(line.split(",")[i] for i in cols) for line in lines) + "\n")


FULL_HEIGHT = 1602  # 12 x 13.35 inches at 120 dpi: Figure 1, the gates, the reconstructions


def assert_png(path, height=FULL_HEIGHT):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] == 1440 and abs(im.size[1] - height) <= 1  # 120 dpi; +-1 for rounding
        pixels = numpy.asarray(im.convert("L"))
    assert 20_000 < path.stat().st_size < 2_000_000
    assert pixels.std() > 10  # not a blank canvas


# ----------------------------------------------------------------------------------------


def test_plot_run_draws_figure1_gates_and_reconstructions(run_dir, captured):
    notes = []
    path = plot.plot_run(run_dir, notes=notes)
    assert path == run_dir / "plot.png"
    assert notes == []
    assert sorted(p.name for p in run_dir.iterdir()) == FILES  # no temporary left behind
    assert_png(path)

    (fig,) = captured
    assert fig["title"] == f"r: synthetic-dsprites 1x16x16, n = 3, tau = 1, {STEPS} batches, 3/3 gates open"
    assert len(fig["axes"]) == 6  # Figure 1's four panels, the gates, the reconstructions
    e2, l1, lam, hit, gates, recon = fig["axes"]
    log = read_log(run_dir / "log.csv")
    assert list(e2["lines"][0][1]) == log["E2"]
    assert e2["lines"][1][1][-1] == pytest.approx(ema(log["E2"], 0.99))
    assert e2["lines"][2][1][0] == 1.0  # tau, the red line
    assert list(l1["lines"][0][1]) == log["gates_l1"]
    assert list(lam["lines"][0][1]) == log["lambda_eff"]
    assert list(hit["lines"][0][0]) == list(range(1, STEPS + 1))
    # one line per gate: sigmoid(k gamma_j), k = 7; gamma stays > 0 in 5 batches without a hit
    assert [l[2] for l in gates["lines"]] == ["gate 0 (open)", "gate 1 (open)", "gate 2 (open)"]
    for j, (_, y, _) in enumerate(gates["lines"]):
        assert y == pytest.approx(1 / (1 + numpy.exp(-7.0 * numpy.array(log[f"gamma_{j}"]))))
    assert recon["images"] == 1 and recon["title"].startswith("8 held-out images (top)")


def test_old_log_without_gamma_columns_still_plots_and_says_so(run_dir, captured, capsys):
    rewrite_log(run_dir / "log.csv", lambda c: not c.startswith("gamma_"))
    assert not [c for c in read_log(run_dir / "log.csv") if c.startswith("gamma_")]
    notes = []
    path = plot.plot_run(run_dir, notes=notes)
    assert_png(path, height=1260)  # the gate row shrinks to its note
    assert notes == ["per-gate panel missing: this log predates gamma logging (no gamma_j columns)"]
    gates = captured[0]["axes"][4]
    assert gates["lines"] == [] and gates["texts"] == notes
    assert captured[0]["title"].endswith("3/3 gates open")  # from the log's open_gates column

    # without a notes list, and through the command line: one line on stderr
    assert cli_main(["plot", str(run_dir), "--count", "0"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["refimpl plot: note: " + notes[0]]


def test_dataset_that_cannot_be_opened_leaves_out_only_the_reconstructions(run_dir, captured, monkeypatch):
    def missing(name, path=None, **opts):
        raise DatasetNotFoundError("dSprites file not found: data/x.npz; download it with: python data_scripts/x")

    monkeypatch.setattr(training, "open_dataset", missing)
    notes = []
    assert_png(plot.plot_run(run_dir, notes=notes), height=1350)  # the image row shrinks to its note
    assert len(notes) == 1 and notes[0].startswith("reconstructions not drawn: the dataset cannot be opened")
    assert "data/x.npz" in notes[0]
    recon = captured[0]["axes"][5]
    assert recon["images"] == 0 and recon["texts"] == notes
    assert len(captured[0]["axes"][4]["lines"]) == 3  # the gate panel is still drawn


def test_long_log_is_decimated_after_smoothing_the_full_series(run_dir, captured, monkeypatch):
    rows = 12_000
    header = (run_dir / "log.csv").read_text().splitlines()[0].split(",")
    rng = numpy.random.default_rng(0)
    data = {c: numpy.zeros(rows) for c in header}
    data["step"] = numpy.arange(1, rows + 1)
    data["E2"] = 2.0 + rng.exponential(1.0, rows)
    data["E2"][7_777] = 500.0  # a spike the decimation must keep
    data["lambda_eff"] = numpy.full(rows, 0.5)
    data["gamma_1"] = numpy.linspace(0.42, -1.0, rows)  # gate 1 closes
    data["gamma_0"] = data["gamma_2"] = numpy.full(rows, 0.42)
    data["open_gates"] = 2.0 + (data["gamma_1"] > 0)
    numpy.savetxt(run_dir / "log.csv", numpy.stack([data[c] for c in header], 1), delimiter=",",
                  header=",".join(header), comments="", fmt="%.17g")
    monkeypatch.setattr(plot, "MAX_POINTS", 1000)
    plot.plot_run(run_dir, recon_count=0)
    fig = captured[0]
    assert fig["title"].endswith("12000 batches, 2/3 gates open")
    assert len(fig["axes"]) == 5  # recon_count=0: no image row
    for ax in fig["axes"]:
        for x, y, label in ax["lines"]:
            if len(x) == 2:
                continue  # tau's axhline
            assert len(x) <= 1000 and x[0] == 1 and x[-1] == rows
    e2_raw, e2_ma = fig["axes"][0]["lines"][:2]
    assert e2_raw[1].max() == 500.0
    assert e2_ma[1][-1] == pytest.approx(ema(data["E2"], 0.99), rel=1e-12)
    assert [l[2] for l in fig["axes"][4]["lines"]] == ["gate 0 (open)", "gate 1 (closed)", "gate 2 (open)"]


def test_non_finite_last_row_still_plots(run_dir, captured):
    # a diverging run logs its non-finite step before it stops
    log = run_dir / "log.csv"
    lines = log.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[-1].split(",")
    for name in ("E2", "gates_l1", "lambda_eff", "loss"):
        cells[header.index(name)] = "nan"
    log.write_text("\n".join(lines[:-1] + [",".join(cells)]) + "\n")
    assert_png(plot.plot_run(run_dir, recon_count=0), height=1281)
    e2_raw = captured[0]["axes"][0]["lines"][0][1]
    assert len(e2_raw) == STEPS and numpy.isnan(e2_raw[-1]) and numpy.isfinite(e2_raw[:-1]).all()


def test_decimate_keeps_ends_extremes_and_the_cap():
    n = 400_000
    y = numpy.sin(numpy.arange(n) / 5000.0)
    y[123_457], y[300_001] = 9.0, -9.0
    idx = plot.decimate(y, 5000)
    assert idx[0] == 0 and idx[-1] == n - 1
    assert len(idx) <= 5000 and len(idx) > 4000
    assert numpy.all(numpy.diff(idx) > 0)
    assert 123_457 in idx and 300_001 in idx
    assert list(plot.decimate(y[:5000], 5000)) == list(range(5000))  # short series: every point
    assert list(plot.decimate([3.0], 5000)) == [0]
    with_nan = y.copy()
    with_nan[-10] = numpy.nan  # a non-finite last step is kept, so the line breaks there
    assert n - 10 in plot.decimate(with_nan, 5000)
    with pytest.raises(ValueError, match="cap=3"):
        plot.decimate(y, 3)


def test_smooth_is_the_running_moving_average():
    values = [4.0, 0.0, 2.0]
    assert list(plot.smooth(values, 0.5)) == [4.0, 2.0, 2.0]
    assert plot.smooth(values, 0.99)[-1] == pytest.approx(ema(values, 0.99))


def test_not_a_run_folder_or_no_log_is_one_clear_error(run_dir, tmp_path, capsys):
    assert issubclass(runread.RunReadError, OSError)  # reported in one line (exit 1) wherever OSError is
    with pytest.raises(runread.RunReadError, match="no such run folder"):
        plot.plot_run(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(runread.RunReadError, match=r"empty: not a refimpl run folder \(no config.json or checkpoint.npz\)"):
        plot.plot_run(empty)
    log = run_dir / "log.csv"
    header = log.read_text().splitlines()[0]
    log.write_text(header + "\n")
    with pytest.raises(runread.RunReadError, match=r"log.csv: the log is empty"):
        plot.plot_run(run_dir)
    log.write_text("")
    with pytest.raises(runread.RunReadError, match=r"log.csv: the log is empty"):
        plot.plot_run(run_dir)
    log.write_text(header + "\n1,2\n")  # a torn row
    with pytest.raises(runread.RunReadError, match=r"log.csv: not a readable training log"):
        plot.plot_run(run_dir)
    log.unlink()
    with pytest.raises(FileNotFoundError, match=r"log.csv: no such file"):
        plot.plot_run(run_dir / "checkpoint.npz")  # RUN may also name the checkpoint
    assert not (run_dir / "plot.png").exists()

    assert cli_main(["plot", str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("refimpl plot: error: ") and "not a refimpl run folder" in err


def test_without_matplotlib_one_line_install_hint(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert figure_helpers.pyplot() is None
    with pytest.raises(figure_helpers.PlottingUnavailable) as info:
        plot.plot_run(run_dir)
    assert isinstance(info.value, RuntimeError)
    assert str(info.value) == "matplotlib is not installed: pip install 'refimpl[plots]'"
    assert cli_main(["plot", str(run_dir)]) == 1
    assert capsys.readouterr().err == "refimpl plot: error: matplotlib is not installed: pip install 'refimpl[plots]'\n"
    assert not (run_dir / "plot.png").exists()


def test_command_line_options(run_dir, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    plot.add_arguments(parser)
    args = parser.parse_args(["RUN"])
    assert (args.run, args.out, args.count, args.backend) == ("RUN", None, 8, None)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["RUN", "--count", "-1"])
    assert exit_info.value.code == 2
    capsys.readouterr()

    out = tmp_path / "figs" / "one.png"
    out.parent.mkdir()
    args = parser.parse_args([str(run_dir), "--out", str(out), "--count", "3", "--backend", "numpy"])
    assert plot.run(args) == 0
    assert capsys.readouterr().out == f"Figure 1 of {run_dir}: {out}\n"
    assert_png(out)
    assert not (run_dir / "plot.png").exists()
    with pytest.raises(ValueError, match="recon_count=-2"):
        plot.plot_run(run_dir, recon_count=-2)
