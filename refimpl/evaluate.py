"""What is done with a trained run: held-out error, reconstruction images, the pruned export.

Everything here uses inference mode (Section 2.2, interpretation (j)): BatchNorm with
running statistics, z = mu, and gates nu = 1[gamma > 0] (``GatedVAE.inference_gates``).
The error is Algorithm 1's E with ``error="sse"``: the sum of squared pixel errors per
image, averaged over the held-out images (the paper's "MSE" scale).

Exported models (``refimpl export``) are :func:`refimpl.model.prune` of the gated model:
a plain VAE with only the open dimensions, saved as ``model.npz`` (the state dict,
PyTorch names) and ``model.json`` (architecture, latent size, which of the original
dimensions were kept, and the run's configuration); :func:`load_export` rebuilds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy
from safetensors import numpy as safetensors_numpy

from . import checkpoint as ckpt
from . import memory
from .algorithm1 import per_image_error
from .atomic import atomic_write, write_json
from .backend import backend_name, get_dtype, get_xp, to_device, to_host
from .data import eval_batches
from .model import Architecture, GatedVAE, prune
from .rng import generator
from .branch import read_history
from .runlog import moving_average
from .training import Run

EXPORT_FORMAT = "refimpl-export-1"


def heldout_indices(run: Run, limit: int | None = None):
    """The run's held-out indices (its seed's split), the first ``limit`` of them if given."""
    held = run.split[1]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit={limit}: expected a positive number of images")
        held = held[:limit]
    return held


def evaluate(run: Run, limit: int | None = None, batch_size: int = 250) -> dict:
    """Held-out reconstruction error with inference gates and with every gate open, and the gates."""
    model, xp = run.model, run.xp
    held = heldout_indices(run, limit)
    gates = model.inference_gates()
    ones = xp.ones_like(gates)
    sums = {"gated": 0.0, "open": 0.0}
    for idx in eval_batches(held, batch_size):
        x = run.images(idx)
        sums["gated"] += float(per_image_error(model.reconstruct(x, gates), x, "sse").sum())
        sums["open"] += float(per_image_error(model.reconstruct(x, ones), x, "sse").sum())
    gates_host = to_host(gates).astype(int)
    result = {
        "run": str(run.out), "step": run.state.step, "dataset": run.config.dataset,
        "image_shape": list(run.arch.image_shape), "heldout_images": int(held.size),
        "n_latent": run.config.latent, "open_gates": int(gates_host.sum()), "gates": gates_host.tolist(),
        "tau": run.hyper.tau,
        "heldout_sse": sums["gated"] / held.size,
        "heldout_sse_all_gates_open": sums["open"] / held.size,
    }
    if run.has_log():
        e2 = read_history(run.out).get("E2", [])  # a branch's with its parents' rows
        if e2:
            result["train_E2_ma95"] = moving_average(e2, 0.95)
    return result


# ----------------------------------------------------------------------------------------
# Images


def image_grid(rows, scale: int = 1, pad: int = 2, background: float = 0.5, labels=None, row_labels=None,
               title=None):
    """A Pillow image of ``rows``: each a host array (N, C, H, W) in [0, 1], C = 1 or 3, drawn
    left to right, rows top to bottom, ``pad`` pixels apart, every pixel ``scale`` x ``scale``.

    ``labels``: one text per column (lines split on newlines), printed under the grid in
    Pillow's default font. ``row_labels``: one text per row, printed left of it; ``title``:
    a line above the grid (:func:`_annotate`). Sizes that cannot fit in memory are refused
    first (:class:`refimpl.memory.NotEnoughMemory`).
    """
    from PIL import Image, ImageDraw

    rows = [numpy.asarray(r) for r in rows]
    if not rows or any(r.ndim != 4 for r in rows):
        raise ValueError("image_grid: expected a non-empty list of (N, C, H, W) arrays")
    c, h, w = rows[0].shape[1:]
    if c not in (1, 3) or any(r.shape[1:] != (c, h, w) for r in rows):
        raise ValueError(f"image_grid: every row must be (N, {c}, {h}, {w}) with 1 or 3 channels")
    cols = max(r.shape[0] for r in rows)
    height, width = len(rows) * (h + pad) + pad, cols * (w + pad) + pad
    memory.check(memory.grid_bytes(height, width, c, scale), f"a {width * scale}x{height * scale} image",
                 "ask for a smaller --scale or fewer images")
    canvas = numpy.full((height, width, c), background)
    for i, r in enumerate(rows):
        for j, img in enumerate(numpy.clip(r.astype(numpy.float64), 0.0, 1.0)):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top:top + h, left:left + w] = img.transpose(1, 2, 0)
    pixels = (canvas * 255 + 0.5).astype(numpy.uint8)
    image = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if labels:
        lines = max(len(str(t).split("\n")) for t in labels)
        labelled = Image.new(image.mode, (image.width, image.height + 12 * lines + 4), 255 if c == 1 else (255,) * 3)
        labelled.paste(image, (0, 0))
        draw = ImageDraw.Draw(labelled)
        for j, text in enumerate(labels):
            draw.multiline_text(((pad + j * (w + pad)) * scale, image.height + 2), str(text),
                                fill=0 if c == 1 else (0,) * 3, spacing=2)
        image = labelled
    if row_labels or title:
        image = _annotate(image, [(pad + i * (h + pad) + h / 2) * scale for i in range(len(rows))],
                          row_labels or [], title, font_px=max(10, min(16, h * scale // 6)))
    return image


def _annotate(image, row_centres, row_labels, title, font_px: int, gap: int = 6):
    """``image`` in the bottom-right corner of a white canvas, with ``row_labels[i]`` left of the
    row centred at height ``row_centres[i]`` (pixels) and ``title`` above, in Pillow's default
    font at ``font_px``."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=font_px)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))

    def size(text):
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    labels_width = max((size(t)[0] for t in row_labels), default=-gap) + 2 * gap
    top = size(title)[1] + 2 * gap if title else 0
    width = max(labels_width + image.width, size(title)[0] + 2 * gap if title else 0)
    ink, white = (0, 255) if image.mode == "L" else ((0,) * 3, (255,) * 3)
    canvas = Image.new(image.mode, (width, top + image.height), white)
    left = width - image.width  # the grid flush right, under a title wider than it
    canvas.paste(image, (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, gap), title, fill=ink, font=font)
    for centre, text in zip(row_centres, row_labels):
        draw.text((left - gap, top + centre), text, fill=ink, font=font, anchor="rm")
    return canvas


def reconstruction_grid(originals, recons, scale: int = 1, per_row: int = 16, title=None):
    """Originals (N, C, H, W) over their reconstructions, ``per_row`` to a row: row pairs top to
    bottom, each row labelled, ``title`` above."""
    rows = []
    for i in range(0, len(originals), per_row):
        rows += [originals[i:i + per_row], recons[i:i + per_row]]
    return image_grid(rows, scale=scale, row_labels=["original", "reconstruction"] * (len(rows) // 2), title=title)


def save_image(image, path) -> Path:
    """Write a Pillow image as PNG to ``path``, atomically."""
    path = Path(path)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return path


def spread_indices(indices, count: int):
    """``count`` entries of ``indices`` spread evenly over it (first and last included)."""
    if count < 1:
        raise ValueError(f"count={count}: expected >= 1")
    idx = numpy.asarray(indices)
    count = min(count, idx.size)
    return idx[numpy.linspace(0, idx.size - 1, count).round().astype(int)]


def reconstructions(run: Run, indices):
    """(originals, reconstructions) as host arrays (N, C, H, W) for dataset ``indices``."""
    x = run.images(numpy.asarray(indices, dtype=numpy.int64))
    return to_host(x), to_host(run.model.reconstruct(x))


# ----------------------------------------------------------------------------------------
# Export


def export(run: Run, out_dir) -> tuple[Path, Path, Path]:
    """Write the pruned model to ``out_dir``: ``model.npz`` and ``model.safetensors`` (the same state dict,
    PyTorch names; safetensors loads directly in PyTorch, JAX and others) and ``model.json``; returns the paths."""
    out_dir = Path(out_dir)
    pruned = prune(run.model)
    kept = [int(i) for i in numpy.nonzero(to_host(run.model.inference_gates()) > 0)[0]]
    arrays = {k: to_host(v).copy() for k, v in pruned.state_dict().items()}
    meta = {
        "format": EXPORT_FORMAT, "n_latent": pruned.n_latent, "kept_dimensions": kept,
        "original_n_latent": run.config.latent, "architecture": pruned.arch.to_dict(),
        "encoder_output": run.hyper.encoder_output, "dtype": run.config.dtype, "step": run.state.step,
        "config": run.config.to_dict(),
    }
    npz, safetensors, js = out_dir / "model.npz", out_dir / "model.safetensors", out_dir / "model.json"
    atomic_write(npz, lambda f: numpy.savez(f, **arrays))
    blob = safetensors_numpy.save(arrays, metadata={"format": EXPORT_FORMAT, "n_latent": str(pruned.n_latent),
                                                    "kept_dimensions": ",".join(map(str, kept)),
                                                    "description": "refimpl export; architecture etc. in model.json"})
    atomic_write(safetensors, lambda f: f.write(blob))
    write_json(js, meta)
    return npz, safetensors, js


def load_export(path, backend: str | None = None) -> tuple[GatedVAE, dict]:
    """The exported plain VAE in folder ``path`` (model.npz + model.json) and its metadata."""
    path = Path(path)
    js, npz = path / "model.json", path / "model.npz"
    if not js.is_file() or not npz.is_file():
        raise ckpt.CheckpointError(f"{path}: expected model.json and model.npz from 'refimpl export'")
    meta = json.loads(js.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ckpt.CheckpointError(f"{js}: format {meta.get('format')!r}, expected {EXPORT_FORMAT}")
    xp, dtype = get_xp(backend_name(backend)), get_dtype(meta["dtype"])
    model = GatedVAE(Architecture.from_dict(meta["architecture"]), meta["n_latent"], rng=generator(0), xp=xp, dtype=dtype,
                     gated=False)
    with numpy.load(npz, allow_pickle=False) as z:
        model.load_state_dict({k: to_device(z[k], xp, dtype) for k in z.files})
    model.eval()
    return model, meta
