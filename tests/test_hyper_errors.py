"""Invalid hyperparameters, latent sizes, image shapes and architectures raise a ValueError naming the culprit."""

import math
import re

import numpy as np
import pytest

from refimpl.algorithm1 import Hyper, init_state, train_step
from refimpl.model import Architecture, ConvSpec, GatedVAE, paper_architecture
from refimpl.rng import generator

NAN, INF = math.nan, math.inf


def tiny_arch():
    """(1, 8, 8) images, 2 encoder convs (8 -> 4 -> 2 px), 2 decoder blocks (2 -> 4 -> 8 px)."""
    return Architecture((1, 8, 8), encoder_convs=(ConvSpec(3, 4, 2, 1), ConvSpec(4, 3, 2, 1)),
                        decoder_convs=(ConvSpec(3, 3, 1, 1), ConvSpec(1, 3, 1, 1)), hidden=8).validate()


def raises_naming(name, **kwargs):
    kwargs.setdefault("tau", 1.0)
    with pytest.raises(ValueError, match=rf"\b{re.escape(name)}\b") as info:
        Hyper(**kwargs)
    return str(info.value)


@pytest.mark.parametrize("name, value", [
    ("tau", -1e-9), ("tau", -5.0),
    ("k", 0.0), ("k", -1.0),
    ("alpha", 0.0), ("alpha", 1.0), ("alpha", -0.1), ("alpha", 1.5),
    ("lambda_min", 0.0), ("lambda_min", -1e-5),
    ("lr", 0.0), ("lr", -1e-3),
    ("adam_eps", 0.0),
])
def test_out_of_range_values(name, value):
    message = raises_naming(name, **{name: value})
    assert repr(value) in message or str(value) in message


def test_lambda_min_above_lambda_max():
    message = raises_naming("lambda_max", lambda_min=6.0, lambda_max=5.0)
    assert "lambda_min" in message


def test_equal_lambda_bounds_are_allowed():
    assert Hyper(tau=0.0, lambda_min=2.0, lambda_max=2.0).lambda_max == 2.0


@pytest.mark.parametrize("name", ["tau", "alpha", "k", "lambda_min", "lambda_max", "lr", "adam_eps", "lambda_init"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_values(name, value):
    raises_naming(name, **{name: value})


@pytest.mark.parametrize("value", [NAN, INF])
def test_non_finite_gamma_init(value):
    raises_naming("gamma_init", gamma_init=value)


@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, NAN), (-0.1, 0.999)])
def test_invalid_adam_betas_are_refused_by_init_state(betas):
    model = GatedVAE(tiny_arch(), 2, rng=generator(0))
    with pytest.raises(ValueError, match="betas"):
        init_state(model, Hyper(tau=1.0, betas=betas))


SWITCHES = {  # interpretation switches with choices and their valid readings
    "error": ("sse", "l2"),
    "lambda_update": ("ascent", "descent"),
    "lambda_clamp_grad": ("outward", "zero"),
    "lambda_init_on": ("raw", "effective"),
    "encoder_output": ("logvar", "logstd", "literal"),
    "kl_normalizer": ("open", "all"),
    "hit": ("sticky", "per_step"),
    "e1_batchnorm": ("batch", "batch_update", "running"),
    "gate_samples": ("batch", "per_example"),
    "arm_objective": ("error", "loss"),
    "constraint": ("batch", "per_image"),
    "lambda_optimizer": ("adam", "sgd"),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_unknown_option_strings(name):
    message = raises_naming(name, **{name: "bogus"})
    assert "bogus" in message and all(choice in message for choice in SWITCHES[name])
    for choice in SWITCHES[name]:  # every documented reading is accepted
        assert getattr(Hyper(tau=1.0, **{name: choice}), name) == choice


@pytest.mark.parametrize("n_latent", [0, -3, 2.5])
def test_gated_vae_needs_a_positive_integer_latent_size(n_latent):
    with pytest.raises(ValueError, match="n_latent"):
        GatedVAE(tiny_arch(), n_latent, rng=generator(0))


def test_init_state_needs_a_gated_model():
    model = GatedVAE(tiny_arch(), 2, rng=generator(0), gated=False)
    with pytest.raises(ValueError, match="gated"):
        init_state(model, Hyper(tau=1.0))


@pytest.mark.parametrize("shape", [(2, 1, 8, 9), (2, 3, 8, 8), (2, 1, 16, 16), (1, 8, 8)])
def test_train_step_refuses_images_of_the_wrong_shape(shape):
    state = init_state(GatedVAE(tiny_arch(), 2, rng=generator(0)), Hyper(tau=1.0))
    x = np.zeros(shape, dtype=np.float32)
    with pytest.raises(ValueError) as info:
        train_step(state, x, generator(1))
    message = str(info.value)
    assert str(shape) in message and "(N, 1, 8, 8)" in message
    assert state.step == 0 and state.c_ma is None  # nothing was done


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 28, 28), (64, 64), (1, 64, 32), (2, 1, 64, 64)])
def test_paper_architecture_refuses_other_image_shapes(shape):
    with pytest.raises(ValueError, match="image_shape") as info:
        paper_architecture(shape)
    assert str(tuple(shape)) in str(info.value)


def test_architecture_whose_decoder_misses_the_image_shape():
    arch = Architecture((1, 8, 8), encoder_convs=(ConvSpec(3, 4, 2, 1), ConvSpec(4, 3, 2, 1)),
                        decoder_convs=(ConvSpec(3, 3, 1, 1), ConvSpec(1, 3, 1, 0)), hidden=8)  # last conv: 8 -> 6 px
    with pytest.raises(ValueError, match=r"\(1, 6, 6\).*\(1, 8, 8\)"):
        arch.validate()
    with pytest.raises(ValueError, match="image_shape"):
        GatedVAE(arch, 2, rng=generator(0))
