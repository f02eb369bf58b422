"""Measure the peak memory (max RSS) of loading full-sized datasets and drawing batches.

    python data_scripts/peak_memory.py [--workdir /tmp/refimpl-memory] [--batches 200]

Builds, once, stand-in files of the real sizes and formats in ``--workdir``
(a compressed dSprites npz of 737,280 synthetic sprites, its uncompressed twin, a
gzip-chunked ``3dshapes.h5`` of 480,000 plain-coloured 64x64x3 images and its
uncompressed ``3dshapes.npz`` copy), then, each in a fresh process, opens one with
the loader and draws ``--batches`` shuffled batches of 64 through ``BatchIterator`` +
``get``. Prints each process's peak resident memory (``VmHWM``) and, at the end,
its anonymous (heap) and file-backed resident memory, next to a process that only
imports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_DSPRITES, N_SHAPES3D = 737280, 480000


def write_dsprites(path: Path, compress: bool, chunk: int = 16384) -> None:
    """A full-size dSprites npz written member by member, never holding 3 GB at once."""
    from refimpl.data.dsprites import classes_to_values, index_to_classes
    from refimpl.data.synthetic_dsprites import render_classes

    tmp = path.with_suffix(".tmp")
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(tmp, "w", compression=mode, allowZip64=True) as zf:
        with zf.open("imgs.npy", "w", force_zip64=True) as f:
            numpy.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (N_DSPRITES, 64, 64)})
            for start in range(0, N_DSPRITES, chunk):
                idx = numpy.arange(start, min(start + chunk, N_DSPRITES))
                f.write(render_classes(index_to_classes(idx)).tobytes())
        classes = index_to_classes(numpy.arange(N_DSPRITES))
        for key, arr in (("latents_classes", classes), ("latents_values", classes_to_values(classes))):
            with zf.open(key + ".npy", "w", force_zip64=True) as f:
                numpy.lib.format.write_array(f, arr)
    tmp.replace(path)


def write_shapes3d(path: Path, chunk: int = 4800) -> None:
    """A full-size 3dshapes.h5: images plain colours, gzip-compressed in chunks of 64 images."""
    import h5py

    tmp = path.with_suffix(".tmp")
    rng = numpy.random.default_rng(0)
    with h5py.File(tmp, "w") as f:
        images = f.create_dataset("images", (N_SHAPES3D, 64, 64, 3), numpy.uint8, chunks=(64, 64, 64, 3),
                                  compression="gzip", compression_opts=4)
        for start in range(0, N_SHAPES3D, chunk):
            colours = rng.integers(0, 256, (chunk, 1, 1, 3), dtype=numpy.uint8)
            images[start:start + chunk] = numpy.broadcast_to(colours, (chunk, 64, 64, 3))
        f.create_dataset("labels", data=rng.random((N_SHAPES3D, 6)))
    tmp.replace(path)


def memory_mib() -> dict:
    """Peak and current resident memory of this process from /proc/self/status, in MiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def child(name: str, path: str, batches: int) -> None:
    """Runs in a fresh process: open, draw batches, print JSON with memory and timings."""
    import h5py  # noqa: F401  (imported by every run, so the baselines compare)

    from refimpl.data import BatchIterator, open_dataset
    from refimpl.rng import generator

    t0 = time.perf_counter()
    ds = open_dataset(name, None if path == "-" else path) if name != "none" else None
    t_open = time.perf_counter() - t0
    t_batch = 0.0
    if ds is not None:
        it = BatchIterator(len(ds), 64, generator(0))
        t0 = time.perf_counter()
        for _ in range(batches):
            x = ds.get(next(it))
            assert x.shape[0] == 64 and x.dtype == numpy.float32
        t_batch = (time.perf_counter() - t0) / batches
    print(json.dumps({**memory_mib(), "open_s": t_open, "batch_ms": 1000 * t_batch}))


def measure(name: str, path: str, batches: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, path, str(batches)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/refimpl-memory")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    from refimpl.data.shapes3d import convert_shapes3d

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    files = {
        "dsprites (compressed npz)": ("dsprites", work / "dsprites_compressed.npz", lambda p: write_dsprites(p, True)),
        "dsprites (uncompressed npz, read lazily)": ("dsprites", work / "dsprites_stored.npz",
                                                       lambda p: write_dsprites(p, False)),
        "shapes3d (gzip-chunked h5)": ("shapes3d", work / "3dshapes.h5", write_shapes3d),
        "shapes3d (uncompressed npz, read lazily)": ("shapes3d", work / "3dshapes.npz",
                                                       lambda p: convert_shapes3d(work / "3dshapes.h5", p)),
    }
    for label, (_, path, make) in files.items():
        if not path.exists():
            t0 = time.perf_counter()
            make(path)
            print(f"built {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    rows = [("imports only", measure("none", "-", 0))]
    rows.append(("synthetic-dsprites (no file)", measure("synthetic-dsprites", "-", args.batches)))
    rows += [(label, measure(name, str(path), args.batches)) for label, (name, path, _) in files.items()]
    print("\n| dataset | peak RSS (VmHWM) | at end: heap / file pages | open | per batch of 64 |")
    print("| --- | --- | --- | --- | --- |")
    for label, r in rows:
        print(f"| {label} | {r['VmHWM']:.0f} MiB | {r['RssAnon']:.0f} / {r['RssFile']:.0f} MiB | {r['open_s']:.1f} s "
              f"| {r['batch_ms']:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
