"""A catalogue of porting bugs: mistakes a transcription of Algorithm 1 typically makes, each
with the Algorithm 1 line it concerns and the first tensor ``refimpl compare`` flags when a
trace of the buggy port is compared with refimpl's.

This table is the one place the bugs are listed. ``bench/torch_algorithm1.py --plant NAME``
and ``bench/jax_algorithm1.py --plant NAME`` plant each of them in the PyTorch and JAX
transcriptions (``--plant list`` prints this table);
``tests/test_porting_bugs.py`` replays golden traces with every plant and requires
``compare``'s first divergence to match ``first_tensor``; and :mod:`refimpl.compare` prints
the entries whose ``first_tensor`` matches the first diverging tensor as likely causes
(:func:`likely_causes`).

``first_tensor`` is a trace key without its ``stepKKKK/`` prefix, as a shell-style pattern
(:mod:`fnmatch`): ``grad/decoder.*`` is the first decoder gradient in backpropagation
order (the last decoder layer's). It is the tensor of the line where the bug lives, or the
first tensor that line feeds in Algorithm 1's order (:data:`refimpl.trace.STEP_KEYS`).
``shows_when`` says what a trace needs for the bug to show at all: a step that samples
gates, a clamped lambda', a step after the first, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class PortingBug:
    name: str  # the --plant name
    line: str  # Algorithm 1 line(s), or the section that defines the convention
    description: str
    first_tensor: str  # pattern of the trace key (without the step prefix) compare flags first
    shows_when: str = "any trace"
    # l. 29's estimators (Hyper.estimator, interpretation (o)) under which the bug can happen; None: every one
    estimators: tuple | None = None

    def applies_to(self, estimator: str | None) -> bool:
        return self.estimators is None or estimator is None or estimator in self.estimators


# In Algorithm 1's order of the first tensor each bug changes.
CATALOGUE = (
    PortingBug("lambda-init-wrong-side", "Sec. 4, l. 21",
               "lambda = 1 put on the other side of the softplus (lambda_init_on flipped, interpretation (d)); "
               "the port initialises lambda itself instead of taking the trace's",
               "param/lambda", "a trace that starts a run (step 0)"),
    PortingBug("u-per-image", "l. 4",
               "one u per image instead of one per batch (gate_samples=batch, interpretation (i))",
               "input/u", "a step that samples gates"),
    PortingBug("nu-swapped", "l. 5-6",
               "nu1 and nu2 swapped: the E2 pass (and the KL) use 1[u > sigmoid(-k gamma)]",
               "value/nu1", "a step that samples gates with nu1 != nu2"),
    PortingBug("loo-antithetic", "l. 5 (o)",
               "REINFORCE-LOO's second sample taken as l. 5's antithetic twin 1[u > sigmoid(-k gamma)] instead of "
               "the independent 1[u1 < sigmoid(k gamma)]: the baseline is then not independent of the sample and the "
               "term is DisARM's without sigmoid(|k gamma|), biased by the factor 1/sigmoid(|k gamma|) "
               "(estimator=reinforce_loo)",
               "value/nu1", "estimator=reinforce_loo, a step that samples gates", ("reinforce_loo",)),
    PortingBug("leaky-slope", "l. 11 (Sec. 4)",
               "LeakyReLU with torch's default slope 0.01 instead of the paper's 0.02",
               "value/mu"),
    PortingBug("exp-s", "l. 11",
               "sigma = exp(s) although s is log sigma^2 (should be exp(s/2), interpretation (e))",
               "value/z"),
    PortingBug("e1-eval-mode", "l. 12",
               "the E1 decoder pass with BatchNorm in eval mode (running statistics) instead of batch statistics "
               "(e1_batchnorm=batch, interpretation (h))",
               "value/x1", "a step that samples gates"),
    PortingBug("batch-sum", "l. 12-13",
               "E1 and E2 summed over the batch instead of averaged (interpretation (i))",
               "value/E1"),
    PortingBug("e1-updates-bn", "l. 12",
               "the E1 decoder pass also updates BatchNorm's running statistics (e1_batchnorm=batch, "
               "interpretation (h))",
               "buffer_after/decoder.bn1.running_mean", "a step that samples gates"),
    PortingBug("bn-unbiased-var", "l. 11-13 (Sec. 4)",
               "BatchNorm's running variance blends in the unbiased batch variance (torch's default) instead of "
               "the biased one (Keras, interpretation (m))",
               "buffer_after/*.running_var"),
    PortingBug("bn-torch-momentum", "l. 11-13 (Sec. 4)",
               "the paper's BatchNorm momentum 0.8 passed to torch as is (torch's momentum weighs the new batch: "
               "it should be 1 - 0.8)",
               "buffer_after/*"),
    PortingBug("c-ma-from-zero", "l. 16",
               "C_ma starts at 0 (C_ma = (1 - alpha) C on the first step) instead of at the first C",
               "value/C_ma"),
    PortingBug("loss-uses-c", "l. 20, 22",
               "C instead of C' (whose value is C_ma) in the loss",
               "value/C_prime", "a step after the first (C_ma != C)"),
    PortingBug("detach-wrong-side", "l. 20",
               "the wrong side of l. 20 detached: C' = StopGradient(C) + (C_ma - C), so dC'/dC = dC_ma/dC - 1",
               "grad/decoder.*"),
    PortingBug("no-stop-gradient", "l. 20",
               "no StopGradient: C' = C_ma differentiated, dC'/dC = 1 - alpha instead of 1",
               "grad/decoder.*", "a step after the first (C_ma depends on earlier C)"),
    PortingBug("no-lambda-clamp", "l. 21",
               "lambda' = softplus(lambda)^2 without the clamp to [lambda_min, lambda_max]",
               "value/lambda_eff", "softplus(lambda)^2 outside [lambda_min, lambda_max]"),
    PortingBug("clamp-limits-swapped", "l. 21",
               "clamp(softplus(lambda)^2, lambda_max, lambda_min): the limits swapped (torch then returns "
               "lambda_min everywhere)",
               "value/lambda_eff"),
    PortingBug("kl-without-mu2", "l. 22 (Eq. 15)",
               "KL_elem without the mu^2 term",
               "value/kl_elem"),
    PortingBug("kl-over-n", "l. 22",
               "the KL term divided by n instead of ||nu2||_0 (kl_normalizer=open, interpretation (f))",
               "value/kl", "a step that samples gates with a closed gate in nu2"),
    PortingBug("kl-on-nu1", "l. 22",
               "the KL term masked (and normalised) with nu1 instead of nu2",
               "value/kl", "a step that samples gates with nu1 != nu2"),
    PortingBug("l0-when-violated", "l. 23",
               "the L0 term added when C > 0 instead of C <= 0",
               "value/l0_added"),
    PortingBug("l0-without-k", "l. 24",
               "the L0 term sum_j sigmoid(gamma_j) without the scale k",
               "value/gates_l1"),
    PortingBug("hit-every-step", "l. 25",
               "hit set on every step, not only when C <= 0",
               "value/hit", "a step with C > 0 before the first hit"),
    PortingBug("arm-sign", "l. 29",
               "the ARM term's sign flipped (E2 - E1 instead of E1 - E2)",
               "arm/gamma", "a step that samples gates with nu1 != nu2"),
    PortingBug("arm-without-k", "l. 29",
               "the ARM term without the factor k of the chain rule",
               "arm/gamma", "a step that samples gates with nu1 != nu2"),
    PortingBug("arm-without-lambda", "l. 29",
               "the ARM term without the factor lambda'",
               "arm/gamma", "a step that samples gates with nu1 != nu2"),
    PortingBug("disarm-sign", "l. 29 (o)",
               "DisARM's sign taken from the wrong gate: (-1)^nu1 instead of (-1)^nu2 (Dong et al.'s b~ = "
               "1[u < sigmoid(k gamma)] is nu2), which negates the term (estimator=disarm)",
               "arm/gamma", "estimator=disarm, a step that samples gates with nu1 != nu2", ("disarm",)),
    PortingBug("adam-no-bias-correction", "l. 31",
               "Adam without bias correction of m and v",
               "param_after/*"),
    PortingBug("lambda-minimised", "l. 31",
               "lambda minimised like the other parameters instead of maximised (interpretation (b))",
               "param_after/lambda"),
    PortingBug("adam-steps", "l. 31",
               "the other convention for Adam's step count of gamma (adam_steps flipped, interpretation (n)): "
               "torch.optim.Adam counts gamma's steps from its first gradient (first hit), TF/Keras and optax from "
               "the run's first step",
               "param_after/gamma", "a first hit after the first step (gamma's first gradient)"),
)

BY_NAME = {bug.name: bug for bug in CATALOGUE}
NAMES = tuple(BY_NAME)

# Not in the catalogue: bugs a trace cannot show. The inference gate rule (gamma >= 0 instead of
# gamma > 0, Sec. 2.2) only matters at inference, which a training trace does not record.


def likely_causes(tensor: str, estimator: str | None = None) -> list:
    """The catalogue entries whose ``first_tensor`` matches ``tensor`` (a trace key, with or without
    its ``stepKKKK/`` prefix), in catalogue order; with ``estimator`` (the trace's ``hyper.estimator``),
    only the bugs that can happen under it."""
    head, _, rest = tensor.partition("/")
    if head.startswith("step") and head[4:].isdigit():
        tensor = rest
    return [bug for bug in CATALOGUE if fnmatchcase(tensor, bug.first_tensor) and bug.applies_to(estimator)]


def render_markdown() -> str:
    """The catalogue as a Markdown table: docs/porting.md's copy sits between ``<!-- porting-bugs:begin -->``
    and ``<!-- porting-bugs:end -->`` (``python -m refimpl.porting_bugs`` prints it)."""
    lines = ["| porting bug (`--plant`) | what the port does | first tensor `refimpl compare` flags | "
             "Algorithm 1 line | shows when |",
             "|---|---|---|---|---|"]
    def cell(text):
        return text.replace("|", "\\|")

    for bug in CATALOGUE:
        lines.append(f"| `{bug.name}` | {cell(bug.description)} | `{bug.first_tensor}` | {bug.line} | "
                     f"{cell(bug.shows_when)} |")
    return "\n".join(lines)


def render_list() -> str:
    """Plain-text listing for ``bench/torch_algorithm1.py --plant list`` (and the JAX script's)."""
    width = max(len(b.name) for b in CATALOGUE)
    tw = max(len(b.first_tensor) for b in CATALOGUE)
    return "\n".join(f"{b.name:<{width}}  {b.line:<18} {b.first_tensor:<{tw}}  {b.description}" for b in CATALOGUE)


if __name__ == "__main__":
    print(render_markdown())
