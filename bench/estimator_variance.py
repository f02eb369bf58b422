"""Per-gate variance of l. 29's three gradient estimators (ARM, DisARM, REINFORCE-LOO; ``Hyper.estimator``,
interpretation (o)) at fixed trained states of the README's small run, on the real model and batch.

The states: the run ``refimpl train --image-size 16 --tau 4 --seed 0`` (synthetic dSprites 16x16,
n = 10, batch 64, float32, the default ARM estimator) after 600 batches ("open": hit since
~batch 300, all 10 gates open, sigmoid(k gamma) ~ 0.93-0.97) and after 1,800 batches
("mid": narrowing, 8 gates open, four logits within 0.25 of 0). ``--make-states`` trains
that run in memory (exactly the steps ``refimpl train`` takes: ``Run.build``,
``Run.next_batch``, ``train_step``; gamma at both states equals that of the run's log.csv,
e.g. bench/results/estimators/training/runs/estimatorarm-seed0) and stores, for each
state, the model's parameters and
BatchNorm statistics, lambda, the next batch of the run's stream and a fixed eps, in
``bench/results/estimators/states/<name>.npz`` (the float32 values, loaded into a float64
model here).

At a state, with x, eps and so z = mu + sigma eps fixed, everything the estimators see is the
per-image error e_b(nu) of the decoder (training-mode BatchNorm, as l. 12-13) under each of the
2^n = 1,024 gate vectors nu. This script decodes all of them once (the real decoder, float64),
and then:

- the exact gradient d/dgamma E_nu[lambda' mean_b e_b(nu)] by enumeration;
- each estimator's mean and per-gate variance exactly (integrated over the 3^n cells of u for
  ARM and DisARM, over all 2^n x 2^n pairs of independent samples for REINFORCE-LOO);
- the per-gate variance over 1,000 draws of u (and u1), each estimator evaluated by refimpl's
  own ``estimator_term`` on the gates of ``gate_masks`` (the draws are shared: ARM and DisARM
  see the same u, REINFORCE-LOO that u and a second u1).

Writes ``bench/results/estimators/variance.md``.

    .venv/bin/python bench/estimator_variance.py --make-states     # ~3 minutes on 2 cores
    .venv/bin/python bench/estimator_variance.py                   # ~1 minute
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refimpl.algorithm1 import ESTIMATORS, effective_lambda, estimator_term, gate_masks, train_step  # noqa: E402
from refimpl.config import new_config  # noqa: E402
from refimpl.model import Architecture, GatedVAE  # noqa: E402
from refimpl.rng import generator  # noqa: E402
from refimpl.training import Run  # noqa: E402

OUT = ROOT / "bench" / "results" / "estimators"
RUN = {"image_size": 16, "seed": 0, "hyper": {"tau": 4.0}}  # refimpl train --image-size 16 --tau 4 --seed 0
STATES = {"open": 600, "mid": 1800}  # batches trained
DRAWS = 1000
EPS_SEED, U_SEED = 12345, 2024
NAMES = {"arm": "ARM", "disarm": "DisARM", "reinforce_loo": "REINFORCE-LOO"}


# ----------------------------------------------------------------------------------------
# The states


def make_states(out: Path) -> None:
    """Train the README's run in memory and store the model at each of :data:`STATES`."""
    config = new_config(dict(RUN))
    run = Run.build(config)
    (out / "states").mkdir(parents=True, exist_ok=True)
    start = time.time()
    for name, batches in sorted(STATES.items(), key=lambda kv: kv[1]):
        while run.state.step < batches:
            train_step(run.state, run.next_batch(), run.train_rng)
        state = run.state
        arrays = {f"model/{k}": numpy.array(v) for k, v in state.model.state_dict().items()}
        arrays["lambda"] = numpy.array(state.lam)
        stream = run.batch_order.state_dict()
        arrays["x"] = numpy.array(run.next_batch())  # the batch the run's next step will see ...
        run.batch_order.load_state_dict(stream)  # ... and will still see: the run goes on exactly as `refimpl train`
        arrays["eps"] = generator(EPS_SEED).standard_normal((config.batch_size, config.latent))
        meta = {"run": RUN, "batches": batches, "config": config.to_dict(), "architecture": run.arch.to_dict(),
                "hyper": run.hyper.as_dict(), "open_gates": int(state.model.open_gates())}
        arrays["meta"] = numpy.asarray(json.dumps(meta))
        numpy.savez_compressed(out / "states" / f"{name}.npz", **arrays)
        print(f"{name}: {batches} batches, {meta['open_gates']} open gates, gamma "
              f"{numpy.round(numpy.array(state.model.params['gamma']), 3).tolist()} ({time.time() - start:.0f} s)")


def load_state(path: Path):
    """(model in float64, hyper dict, lambda', x, eps, meta) from a stored state."""
    from refimpl.algorithm1 import Hyper

    z = numpy.load(path, allow_pickle=False)
    meta = json.loads(str(z["meta"][()]))
    arch = Architecture.from_dict(meta["architecture"])
    hyper = Hyper(**{k: tuple(v) if k == "betas" else v for k, v in meta["hyper"].items()})
    n = meta["config"]["latent"]
    model = GatedVAE(arch, n, rng=generator(0), dtype=numpy.float64)
    model.load_state_dict({k[len("model/"):]: z[k].astype(numpy.float64) for k in z.files if k.startswith("model/")})
    lam_eff = effective_lambda(float(z["lambda"]), hyper)
    return model, hyper, lam_eff, z["x"].astype(numpy.float64), z["eps"], meta


# ----------------------------------------------------------------------------------------
# Errors under every gate vector, and the exact moments of each estimator


def gate_vectors(n: int) -> numpy.ndarray:
    """All 2^n gate vectors, row i holding the binary digits of i (nu_j = bit j)."""
    return ((numpy.arange(2**n)[:, None] >> numpy.arange(n)) & 1).astype(numpy.float64)


def error_table(model: GatedVAE, hyper, x, eps) -> numpy.ndarray:
    """e[i, b]: image b's error (l. 12-13) decoded from z * nu_i, training-mode BatchNorm, running stats untouched."""
    from refimpl.algorithm1 import per_image_error

    n = model.n_latent
    model.set_batchnorm_update(False)
    try:
        encoded = model.encoder.forward(x, cache=False)
        mu, s = encoded[:, :n], encoded[:, n:]
        sigma = numpy.exp(0.5 * s) if hyper.encoder_output == "logvar" else numpy.exp(s)
        z = mu + sigma * eps
        return numpy.stack([per_image_error(model.decoder.forward(z * nu, cache=False), x, hyper.error)
                            for nu in gate_vectors(n)])
    finally:
        model.set_batchnorm_update(True)


def index_of(nu: numpy.ndarray) -> numpy.ndarray:
    return (nu @ (2 ** numpy.arange(nu.shape[-1]))).astype(int)


def exact_gradient(F: numpy.ndarray, gamma, k) -> numpy.ndarray:
    """d/dgamma sum_nu P(nu) F(nu), nu ~ prod Ber(sigmoid(k gamma)): sum_nu P(nu) F(nu) k (nu - p)."""
    p = 1.0 / (1.0 + numpy.exp(-k * gamma))
    nus = gate_vectors(len(gamma))
    prob = numpy.prod(numpy.where(nus == 1, p, 1 - p), axis=1)
    return ((prob * F)[:, None] * k * (nus - p)).sum(axis=0)


def exact_moments(estimator: str, F: numpy.ndarray, gamma, k):
    """(mean, variance) per gate of the estimator, exactly, for batch-mean objective F(nu) (one u per batch)."""
    n = len(gamma)
    p = 1.0 / (1.0 + numpy.exp(-k * gamma))
    if estimator == "reinforce_loo":  # all pairs of independent samples
        nus = gate_vectors(n)
        prob = numpy.prod(numpy.where(nus == 1, p, 1 - p), axis=1)
        g = k * 0.5 * (F[:, None, None] - F[None, :, None]) * (nus[:, None, :] - nus[None, :, :])  # (a, b, n)
        w = prob[:, None, None] * prob[None, :, None]
        mean = (w * g).sum(axis=(0, 1))
        return mean, (w * g * g).sum(axis=(0, 1)) - mean**2
    # ARM, DisARM: on each axis the thresholds sigmoid(-k gamma_j) and sigmoid(k gamma_j) cut [0, 1] into three
    # intervals on which (nu1_j, nu2_j) are fixed; per interval: length, mean and mean square of u - 1/2
    lo, hi = numpy.minimum(1 - p, p), numpy.maximum(1 - p, p)
    cuts = numpy.stack([numpy.zeros(n), lo, hi, numpy.ones(n)], axis=1)  # (n, 4)
    a, b = cuts[:, :3], cuts[:, 1:]  # (n, 3)
    length = b - a
    centre = (a + b) / 2
    m1 = numpy.where(length > 0, centre - 0.5, 0.0)
    m2 = numpy.where(length > 0, ((b - 0.5) ** 3 - (a - 0.5) ** 3) / (3 * numpy.where(length > 0, length, 1)), 0.0)
    nu1_of = (centre > (1 - p)[:, None]).astype(float)  # 1[u > sigmoid(-k gamma)]
    nu2_of = (centre < p[:, None]).astype(float)  # 1[u < sigmoid(k gamma)]
    mean, second = numpy.zeros(n), numpy.zeros(n)
    for cell in itertools.product(range(3), repeat=n):
        cell = numpy.array(cell)
        rows = numpy.arange(n)
        volume = length[rows, cell].prod()
        if volume == 0:
            continue
        nu1, nu2 = nu1_of[rows, cell], nu2_of[rows, cell]
        dF = F[index_of(nu1)] - F[index_of(nu2)]
        if estimator == "arm":
            mean += volume * k * dF * m1[rows, cell]
            second += volume * (k * dF) ** 2 * m2[rows, cell]
        else:
            g = k * 0.5 * dF * (nu1 - nu2) / (1 + numpy.exp(-k * numpy.abs(gamma)))
            mean += volume * g
            second += volume * g * g
    return mean, second - mean**2


def sampled_terms(estimator: str, table, lam_eff, gamma, k, us, u1s) -> numpy.ndarray:
    """refimpl's estimator_term for each draw (u, u1): (draws, n); F looked up in the error table."""
    out = []
    for u, u1 in zip(us, u1s):
        nu1, nu2 = gate_masks(u[None], gamma, k, u1[None] if estimator == "reinforce_loo" else None)
        f1, f2 = lam_eff * table[index_of(nu1)[0]], lam_eff * table[index_of(nu2)[0]]
        out.append(estimator_term(estimator, u[None], nu1, nu2, gamma, f1, f2, k))
    return numpy.array(out)


# ----------------------------------------------------------------------------------------


def analyse(name: str, path: Path) -> dict:
    model, hyper, lam_eff, x, eps, meta = load_state(path)
    gamma, k = numpy.array(model.params["gamma"]), hyper.k
    n = len(gamma)
    start = time.time()
    table = error_table(model, hyper, x, eps)  # (2^n, B)
    F = lam_eff * table.mean(axis=1)
    grad = exact_gradient(F, gamma, k)
    rng = generator(U_SEED)
    us, u1s = rng.uniform(0, 1, (DRAWS, n)), rng.uniform(0, 1, (DRAWS, n))
    result = {"name": name, "k": k, "batches": meta["batches"], "open_gates": meta["open_gates"], "gamma": gamma,
              "p": 1 / (1 + numpy.exp(-k * gamma)), "lambda_eff": lam_eff, "grad": grad, "E_all_open": table[-1].mean(),
              "estimators": {}}
    for est in ESTIMATORS:
        mean, var = exact_moments(est, F, gamma, k)
        samples = sampled_terms(est, table, lam_eff, gamma, k, us, u1s)
        result["estimators"][est] = {"mean": mean, "var": var, "sample_mean": samples.mean(axis=0),
                                     "sample_var": samples.var(axis=0, ddof=1),
                                     "bias": numpy.abs(mean - grad).max()}
    result["seconds"] = time.time() - start
    return result


def fmt(v) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def markdown(results: list) -> str:
    lines = ["# Variance of l. 29's gradient estimators at fixed trained states", "",
             "Written by `bench/estimator_variance.py` (see its docstring). Model and batch: the README's run "
             "`refimpl train --image-size 16 --tau 4 --seed 0` (synthetic dSprites 16x16, n = 10, batch 64, "
             "trained with ARM) at the stored states `bench/results/estimators/states/<state>.npz`, in float64, "
             f"z fixed (eps seed {EPS_SEED}); one u per batch. Per gate j: sigmoid(k gamma_j), the exact gradient "
             "d/dgamma_j E[lambda' E2] (enumerating the 1,024 gate vectors), and for each estimator the variance "
             "of its value for gamma_j, exact (over u, or u and u1) and over 1,000 draws (shared draws, seed "
             f"{U_SEED}). For scale, the L0 term's gradient k sigmoid(k gamma_j)(1 - sigmoid(k gamma_j)) (l. 24, "
             "added on steps that meet the constraint) is the deterministic push towards closing that the estimated "
             "gradient works against. Every estimator is unbiased: the largest |exact mean - gradient| is given "
             "under each table.", ""]
    for r in results:
        lines += [f"## State `{r['name']}`: after {r['batches']} batches, {r['open_gates']} gates open, "
                  f"lambda' = {r['lambda_eff']:.4f}", ""]
        head = "| gate | sigmoid(k gamma) | gradient | L0 term's gradient |" + "".join(
            f" var {NAMES[e]} exact | var {NAMES[e]} 1,000 draws |" for e in ESTIMATORS) + " DisARM / ARM | LOO / ARM |"
        lines += [head, "|" + "---|" * (4 + 2 * len(ESTIMATORS) + 2)]
        ests = r["estimators"]
        for j in range(len(r["gamma"])):
            l0 = r["k"] * r["p"][j] * (1 - r["p"][j])
            row = f"| {j} | {r['p'][j]:.3f} | {fmt(r['grad'][j])} | {fmt(l0)} |"
            for e in ESTIMATORS:
                row += f" {fmt(ests[e]['var'][j])} | {fmt(ests[e]['sample_var'][j])} |"
            arm = ests["arm"]["var"][j]
            ratio = (lambda v: f"{v / arm:.3f}" if arm > 0 else "-")
            row += f" {ratio(ests['disarm']['var'][j])} | {ratio(ests['reinforce_loo']['var'][j])} |"
            lines.append(row)
        total = {e: ests[e]["var"].sum() for e in ESTIMATORS}
        sums = ", ".join(f"{NAMES[e]} {fmt(total[e])}" for e in ESTIMATORS)
        biases = ", ".join(f"{NAMES[e]} {ests[e]['bias']:.1e}" for e in ESTIMATORS)
        lines += ["", f"Summed over the gates (exact): {sums}; DisARM / ARM {total['disarm'] / total['arm']:.3f}, "
                      f"REINFORCE-LOO / ARM {total['reinforce_loo'] / total['arm']:.3f}. Largest |exact mean - "
                      f"gradient|: {biases}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-states", action="store_true", help="train the run and store the states first")
    parser.add_argument("--out", type=Path, default=OUT, help=f"results folder (default: {OUT})")
    args = parser.parse_args(argv)
    if args.make_states:
        make_states(args.out)
    results = []
    for name in STATES:
        r = analyse(name, args.out / "states" / f"{name}.npz")
        print(f"{name}: {r['open_gates']} open, gradient {numpy.round(r['grad'], 4).tolist()}, "
              + ", ".join(f"{e} var sum {r['estimators'][e]['var'].sum():.4g}" for e in ESTIMATORS)
              + f" ({r['seconds']:.0f} s)")
        results.append(r)
    (args.out / "variance.md").write_text(markdown(results) + "\n")
    print(f"wrote {args.out / 'variance.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
