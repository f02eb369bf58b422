"""The paper's VAE (Section 4), its gates at inference (end of Section 2.2) and the pruned export."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.layers import BatchNorm, Conv2d, LeakyReLU, Linear, Sigmoid, Upsample
from refimpl.execution import Execution
from refimpl.layers.upsample_conv2d import UpsampleConv2d
from refimpl.model import Architecture, ConvSpec, GatedVAE, paper_architecture, prune
from refimpl.rng import generator

F64 = np.float64
PAPER_SHAPES = [(1, 64, 64), (3, 64, 64), (1, 28, 28)]


def tiny_arch():
    """(1, 8, 8) images, 2 encoder convs (8 -> 4 -> 2 px), 2 decoder blocks (2 -> 4 -> 8 px)."""
    return Architecture((1, 8, 8), encoder_convs=(ConvSpec(3, 4, 2, 1), ConvSpec(4, 3, 2, 1)),
                        decoder_convs=(ConvSpec(3, 3, 1, 1), ConvSpec(1, 3, 1, 1)), hidden=8).validate()


def layers_of(seq, kind):
    return [layer for _, layer in seq.children() if isinstance(layer, kind)]


def decoder_blocks(fused: bool):
    """The resolved setting with the fused decoder blocks on or off (the rest as by default)."""
    return Execution(fused=fused).resolve("numpy")


def test_default_decoder_blocks_follow_the_backend():
    """By default the fused layer on NumPy (faster on the CPU), the pair on CuPy (faster on a GPU)."""
    assert Execution().resolve("numpy").fused and not Execution().resolve("cupy").fused
    assert layers_of(GatedVAE(tiny_arch(), 2, rng=generator(0)).decoder, UpsampleConv2d)
    assert not layers_of(GatedVAE(tiny_arch(), 2, rng=generator(0), paths=decoder_blocks(False)).decoder,
                         UpsampleConv2d)


@pytest.mark.cuda
def test_default_decoder_blocks_on_cupy():
    from refimpl.backend import get_xp

    cp = get_xp("cupy")
    model = GatedVAE(tiny_arch(), 2, rng=generator(0), xp=cp)
    assert model.paths.fused is False and not any(type(layer).__name__ == "UpsampleConv2d"
                                            for _, layer in model.decoder.children())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", PAPER_SHAPES)
def test_paper_architecture_shapes(shape, fused):
    """Encoder: (N, C, H, W) -> (N, 2n); decoder: (N, n) -> (N, C, H, W) with values in (0, 1)."""
    n, batch = 5, 2
    model = GatedVAE(paper_architecture(shape), n, rng=generator(0), paths=decoder_blocks(fused))
    x = generator(1).uniform(0, 1, (batch, *shape)).astype(np.float32)
    encoded = model.encoder.forward(x, cache=False)
    assert encoded.shape == (batch, 2 * n)
    decoded = model.decoder.forward(generator(2).standard_normal((batch, n)).astype(np.float32), cache=False)
    assert decoded.shape == (batch, *shape) and decoded.dtype == np.float32
    assert np.all((decoded > 0) & (decoded < 1))
    assert model.params["gamma"].shape == (n,)
    recon = model.reconstruct(x)
    assert recon.shape == (batch, *shape) and np.all((recon > 0) & (recon < 1))


@pytest.mark.parametrize("shape", PAPER_SHAPES)
def test_paper_architecture_follows_section_4(shape):
    """Section 4: encoder convs with stride 2 and kernels 4,3,3,3 (28x28: 4,3,2), each followed by a leaky ReLU
    (0.02) and BatchNorm (momentum 0.8); linear 128; linear 2n. Decoder: two linear layers, then convs (3x3;
    28x28: 2,3,3) with stride 1, each preceded by BatchNorm and a x2 nearest upsample; final sigmoid."""
    arch = paper_architecture(shape)
    mnist = shape == (1, 28, 28)
    assert [c.kernel for c in arch.encoder_convs] == ([4, 3, 2] if mnist else [4, 3, 3, 3])
    assert all(c.stride == 2 for c in arch.encoder_convs)
    assert [c.kernel for c in arch.decoder_convs] == ([2, 3, 3] if mnist else [3, 3, 3, 3])
    assert all(c.stride == 1 for c in arch.decoder_convs)
    assert arch.hidden == 128 and arch.leaky_slope == 0.02 and arch.bn_momentum == 0.8

    n = 4
    model = GatedVAE(arch, n, rng=generator(0), paths=decoder_blocks(False))
    enc = [type(layer) for _, layer in model.encoder.children()]
    convs = len(arch.encoder_convs)
    assert enc[: 3 * convs] == [Conv2d, LeakyReLU, BatchNorm] * convs
    assert all(layer.slope == 0.02 for layer in layers_of(model.encoder, LeakyReLU))
    assert all(layer.momentum == 0.8 for layer in layers_of(model.encoder, BatchNorm))
    fc = layers_of(model.encoder, Linear)
    assert [lin.params["weight"].shape[0] for lin in fc] == [128, 2 * n]
    # spatial size halves at each stride-2 conv
    size = shape[1]
    out = generator(1).uniform(0, 1, (2, *shape)).astype(np.float32)
    for conv in layers_of(model.encoder, Conv2d):
        out = conv.forward(out, cache=False)
        assert out.shape[2] == size // 2
        size //= 2

    dec = [type(layer) for _, layer in model.decoder.children()]
    assert dec[:2] == [Linear, LeakyReLU] and Linear in dec[2:4]
    blocks = [i for i, t in enumerate(dec) if t is Conv2d]
    assert len(blocks) == len(arch.decoder_convs)
    for i in blocks:
        assert dec[i - 2: i] == [BatchNorm, Upsample]
    assert dec[-1] is Sigmoid and dec.count(Sigmoid) == 1
    assert [type(layer) for layer in [model.decoder.children()[i + 1][1] for i in blocks[:-1]]] == [LeakyReLU] * (len(blocks) - 1)
    assert layers_of(model.decoder, Linear)[0].params["weight"].shape == (128, n)


@pytest.mark.parametrize("shape", [(1, 64, 64), (1, 28, 28)])
def test_fused_and_plain_decoders_agree(shape):
    """fused=True computes the same decoder (same parameter names; equal output given equal parameters)."""
    arch = paper_architecture(shape)
    plain = GatedVAE(arch, 3, rng=generator(0), dtype=F64, paths=decoder_blocks(False))
    fused = GatedVAE(arch, 3, rng=generator(1), dtype=F64, paths=decoder_blocks(True))
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in fused.state_dict().items()}
    fused.load_state_dict(plain.state_dict())
    z = generator(2).standard_normal((2, 3))
    np.testing.assert_allclose(fused.decoder.forward(z, cache=False), plain.decoder.forward(z, cache=False),
                               rtol=1e-12, atol=1e-13)


def trained_looking(model, seed):
    """Non-trivial BatchNorm running statistics and BatchNorm affine parameters, so eval mode is a real test."""
    rng = generator(seed)
    for _, layer in list(model.encoder.children()) + list(model.decoder.children()):
        if isinstance(layer, BatchNorm):
            c = layer.num_features
            layer.buffers["running_mean"][...] = rng.uniform(-0.5, 0.5, c)
            layer.buffers["running_var"][...] = rng.uniform(0.5, 2.0, c)
            layer.params["weight"][...] = rng.uniform(0.5, 1.5, c)
            layer.params["bias"][...] = rng.uniform(-0.2, 0.2, c)
    return model


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("arch_name", ["tiny", "mnist"])
def test_prune_equals_gated_model_in_eval_mode(arch_name, fused):
    """prune keeps the dimensions with gamma > 0 (sigmoid(k gamma) > 0.5) and reconstructs exactly as the gated model."""
    arch = tiny_arch() if arch_name == "tiny" else paper_architecture((1, 28, 28))
    gamma = np.array([0.3, -0.2, 0.0, 1e-3, -1e-3, 0.7, -5.0])
    n = len(gamma)
    model = trained_looking(GatedVAE(arch, n, rng=generator(4), dtype=F64, paths=decoder_blocks(fused)), 5)
    model.params["gamma"][...] = gamma
    pruned = prune(model)
    keep = np.flatnonzero(gamma > 0)
    assert pruned.n_latent == len(keep) == 3 and not pruned.gated and "gamma" not in pruned.params
    x = generator(6).uniform(0, 1, (3, *arch.image_shape))
    gated_rec, pruned_rec = model.reconstruct(x), pruned.reconstruct(x)
    assert np.abs(gated_rec - pruned_rec).max() <= 1e-12
    # the pruned encoder gives the kept rows of (mu, s); the gated model is left as it was
    model.eval()
    pruned.eval()
    enc, enc_pruned = model.encoder.forward(x, cache=False), pruned.encoder.forward(x, cache=False)
    np.testing.assert_allclose(enc_pruned, enc[:, np.concatenate([keep, keep + n])], rtol=1e-13, atol=1e-14)
    assert model.n_latent == n and np.array_equal(model.params["gamma"], gamma)
    # and the export is not trivially equal: dropping an *open* dimension changes the reconstruction
    model.params["gamma"][keep[0]] = -1.0
    assert np.abs(model.reconstruct(x) - pruned_rec).max() > 1e-6


def test_prune_with_every_gate_closed_raises():
    model = GatedVAE(tiny_arch(), 3, rng=generator(0), dtype=F64)
    model.params["gamma"][...] = [-0.1, 0.0, -3.0]
    with pytest.raises(ValueError, match="closed"):
        prune(model)


@given(k=st.floats(0.5, 10.0),
       gamma=st.lists(st.one_of(st.just(0.0), st.floats(1e-8, 5.0), st.floats(-5.0, -1e-8)), min_size=1, max_size=8))
def test_inference_gates_closed_iff_sigmoid_at_most_half(k, gamma):
    """End of Section 2.2: at inference a gate is closed iff sigmoid(k gamma) <= 0.5 (j)."""
    gamma = np.array(gamma)
    model = GatedVAE(tiny_arch(), len(gamma), rng=generator(0), dtype=F64)
    model.params["gamma"][...] = gamma
    sig = np.array([1.0 / (1.0 + math.exp(-k * g)) for g in gamma])
    np.testing.assert_array_equal(model.inference_gates(), (sig > 0.5).astype(F64))
    assert model.open_gates() == int((sig > 0.5).sum())


def test_reconstruct_uses_mu_and_inference_gates():
    """Inference: x' = g_dec(mu * nu) in eval mode, nu the inference gates (z = mu, no noise)."""
    model = trained_looking(GatedVAE(tiny_arch(), 4, rng=generator(1), dtype=F64), 2)
    model.params["gamma"][...] = [0.5, -0.5, 0.2, 0.0]
    x = generator(3).uniform(0, 1, (2, 1, 8, 8))
    got = model.reconstruct(x)
    assert model.training  # reconstruct restores training mode
    model.eval()
    mu = model.encoder.forward(x, cache=False)[:, :4]
    expected = model.decoder.forward(mu * np.array([1.0, 0.0, 1.0, 0.0]), cache=False)
    np.testing.assert_array_equal(got, expected)


def test_ungated_model_passes_every_dimension():
    model = GatedVAE(tiny_arch(), 3, rng=generator(0), dtype=F64, gated=False)
    assert "gamma" not in model.parameters()
    np.testing.assert_array_equal(model.inference_gates(), np.ones(3))
