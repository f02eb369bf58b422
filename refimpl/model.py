"""The paper's convolutional VAE (Section 4) with a global gate vector on the latent code.

Encoder f_enc (x -> (mu, s), s = log-variance or log-std, see ``encoder_output`` in
``algorithm1.Hyper``) and decoder g_dec (z -> x'), built from refimpl.layers.

Section 4 fixes kernel sizes, strides, leaky ReLU 0.02, BatchNorm momentum 0.8, the
128-unit hidden layer and the final sigmoid. It gives no channel widths, paddings or
order of activation vs BatchNorm beyond "fed through a leaky ReLU activation and a
BatchNorm layer"; our choices (all in :class:`Architecture`, all configurable):

64x64xC (dSprites C=1; Shapes3D, Cars3D, CIFAR-100 C=3)
  encoder: [conv 4x4/2 pad 1 -> 32 ch, 32x32] [conv 3x3/2 pad 1 -> 32 ch, 16x16]
           [conv 3x3/2 pad 1 -> 64 ch, 8x8] [conv 3x3/2 pad 1 -> 64 ch, 4x4],
           each conv -> leaky ReLU -> BatchNorm; flatten (1024); linear 128; leaky ReLU; linear 2n
  decoder: linear n->128; leaky ReLU; linear 128->1024; leaky ReLU; reshape (64, 4, 4);
           4 blocks of BatchNorm -> nearest x2 upsample -> conv 3x3/1 pad 1
           (channels 64, 32, 32, C; 8, 16, 32, 64 px), leaky ReLU between blocks, sigmoid last
28x28x1 (MNIST)
  encoder: conv 4x4/2 pad 1 -> 32 ch 14x14; conv 3x3/2 pad 1 -> 64 ch 7x7; conv 2x2/2 pad 0 -> 64 ch 3x3
  decoder: reshape (64, 3, 3); blocks: up 6 -> conv 2x2 pad 1 -> 7 (64 ch); up 14 -> conv 3x3 pad 1 (32 ch);
           up 28 -> conv 3x3 pad 1 (1 ch)

Gates: ``gamma`` (n,) is a model parameter; nu = 1[u < sigmoid(k gamma)] in training
(Algorithm 1), and at inference a gate is closed iff sigmoid(k gamma) <= 0.5, i.e.
gamma <= 0 (Section 2.2); open gates pass exactly 1 (interpretation (j)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy

from .execution import default_paths
from .layers import BatchNorm, Conv2d, Flatten, Layer, LeakyReLU, Linear, Reshape, Sequential, Sigmoid, Upsample
from .layers.im2col import conv_output_size
from .layers.upsample_conv2d import UpsampleConv2d
from .optionspec import OptionError
from .rng import generator


@dataclass(frozen=True)
class ConvSpec:
    """One convolution: output channels, square kernel, stride, padding."""

    channels: int
    kernel: int
    stride: int
    padding: int


@dataclass(frozen=True)
class Architecture:
    """Layer sizes of encoder and decoder; the decoder's last block outputs ``image_shape[0]`` channels."""

    image_shape: tuple  # (C, H, W)
    encoder_convs: tuple  # ConvSpec, stride 2
    decoder_convs: tuple  # ConvSpec, stride 1, each after a x2 upsample; last has C channels
    hidden: int = 128
    leaky_slope: float = 0.02
    bn_momentum: float = 0.8  # Keras convention: running = 0.8 running + 0.2 batch
    bn_eps: float = 1e-3  # Keras default; PyTorch's is 1e-5
    bn_running_var: str = "biased"
    init: str = "torch"

    def encoder_feature_shape(self):
        """(channels, height, width) after the last encoder conv."""
        c, h, w = self.image_shape
        for spec in self.encoder_convs:
            h = conv_output_size(h, spec.kernel, spec.stride, spec.padding)
            w = conv_output_size(w, spec.kernel, spec.stride, spec.padding)
            c = spec.channels
            if h < 1 or w < 1:
                raise ValueError(f"architecture: image_shape {self.image_shape} is too small for encoder convs {self.encoder_convs}")
        return c, h, w

    def decoder_output_shape(self):
        c, h, w = self.encoder_feature_shape()
        for spec in self.decoder_convs:
            h = conv_output_size(2 * h, spec.kernel, spec.stride, spec.padding)
            w = conv_output_size(2 * w, spec.kernel, spec.stride, spec.padding)
            c = spec.channels
        return c, h, w

    def to_dict(self) -> dict:
        """JSON-able fields (stored in config.json, checkpoints, traces and exports)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Architecture":
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        d["encoder_convs"] = tuple(ConvSpec(**s) for s in d["encoder_convs"])
        d["decoder_convs"] = tuple(ConvSpec(**s) for s in d["decoder_convs"])
        return cls(**d).validate()

    def validate(self):
        if self.decoder_output_shape() != tuple(self.image_shape):
            raise ValueError(f"architecture: decoder produces images of shape {self.decoder_output_shape()}, "
                             f"expected image_shape {tuple(self.image_shape)}")
        return self


PAPER_WIDTHS = (32, 32, 64, 64)  # encoder conv widths at 64x64 (not in the paper; our choice)


def build_architecture(image_shape, channels=None, hidden: int = 128) -> Architecture:
    """The paper's encoder/decoder (module docstring) for square images of side S.

    S = 64: Section 4's network. S = 28: the MNIST network. Other S = 4 * 2^m (8, 16, 32,
    128): the same pattern with m stride-2 convs (4x4 first, then 3x3) down to 4x4 and m
    upsample + 3x3 conv blocks back. ``channels``: the encoder conv widths (length m, or 3
    for S = 28); the decoder mirrors them, as the paper's (enc 32,32,64,64 -> dec
    64,32,32,C). Default widths: the last m of 32,32,64,64.
    """
    c, h, w = (int(s) for s in image_shape)
    if h != w:
        raise OptionError(f"image_shape={tuple(image_shape)}: expected square images")
    if h == 28:
        enc_k, dec_k = [(4, 2, 1), (3, 2, 1), (2, 2, 0)], [(2, 1, 1), (3, 1, 1), (3, 1, 1)]
    elif h >= 8 and h % 4 == 0 and (h // 4) & (h // 4 - 1) == 0:
        m = (h // 4).bit_length() - 1
        enc_k, dec_k = [(4, 2, 1)] + [(3, 2, 1)] * (m - 1), [(3, 1, 1)] * m
    else:
        raise OptionError(f"image size {h}: expected 28 (MNIST) or 4 * 2^m >= 8 (8, 16, 32, 64, ...)")
    m = len(enc_k)
    if channels is None:
        channels = PAPER_WIDTHS[-m:] if m <= 4 else (PAPER_WIDTHS[0],) * (m - 4) + PAPER_WIDTHS
    channels = tuple(int(ch) for ch in channels)
    if len(channels) != m or min(channels) < 1:
        raise OptionError(f"channels={','.join(map(str, channels))}: expected {m} positive widths for {h}x{h} images")
    if hidden < 1:
        raise OptionError(f"hidden={hidden}: expected >= 1")
    dec_channels = tuple(reversed(channels))[1:] + (c,)
    return Architecture(
        (c, h, w),
        encoder_convs=tuple(ConvSpec(ch, *k) for ch, k in zip(channels, enc_k)),
        decoder_convs=tuple(ConvSpec(ch, *k) for ch, k in zip(dec_channels, dec_k)),
        hidden=int(hidden),
    ).validate()


def paper_architecture(image_shape) -> Architecture:
    """Section 4's architecture for ``image_shape`` (C, 64, 64) or (1, 28, 28), with our channel widths."""
    image_shape = tuple(int(s) for s in image_shape)
    if not (len(image_shape) == 3 and (image_shape[1:] == (64, 64) or image_shape == (1, 28, 28))):
        raise ValueError(f"image_shape={image_shape}: the paper's architectures take (C, 64, 64) or (1, 28, 28) "
                         "images")
    return build_architecture(image_shape)


def build_encoder(arch: Architecture, n_latent: int, *, rng, xp, dtype, paths) -> Sequential:
    """x: (N, C, H, W) -> (N, 2n): columns [:n] are mu, [n:] the log-scale output s.

    Its backward returns None: the first convolution computes no gradient for the image.
    ``paths``: the layers' twins (:class:`refimpl.execution.FastPaths`).
    """
    layers, in_ch = [], arch.image_shape[0]
    for i, spec in enumerate(arch.encoder_convs, start=1):
        layers += [
            (f"conv{i}", Conv2d(in_ch, spec.channels, spec.kernel, spec.stride, spec.padding, rng=rng, xp=xp,
                                dtype=dtype, init=arch.init, input_grad=i > 1, paths=paths)),  # no dx for the image
            (f"act{i}", LeakyReLU(arch.leaky_slope, paths=paths)),
            (f"bn{i}", BatchNorm(spec.channels, arch.bn_momentum, arch.bn_eps, arch.bn_running_var, xp=xp, dtype=dtype,
                                 paths=paths)),
        ]
        in_ch = spec.channels
    flat = math.prod(arch.encoder_feature_shape())
    layers += [
        ("flatten", Flatten()),
        ("fc1", Linear(flat, arch.hidden, rng=rng, xp=xp, dtype=dtype, init=arch.init)),
        ("act_fc1", LeakyReLU(arch.leaky_slope, paths=paths)),
        ("fc2", Linear(arch.hidden, 2 * n_latent, rng=rng, xp=xp, dtype=dtype, init=arch.init)),
    ]
    return Sequential(*layers)


def build_decoder(arch: Architecture, n_latent: int, *, rng, xp, dtype, paths) -> Sequential:
    """z: (N, n) -> x': (N, C, H, W) in (0, 1).

    ``paths.fused`` computes each "x2 nearest upsample, 3x3/1 pad 1 conv" pair as one
    :class:`UpsampleConv2d` on the low-resolution input, the pair's fast twin (same parameters
    and names, tested equal to the plain pair to rounding); other kernels always use the plain pair.
    """
    feature = arch.encoder_feature_shape()
    layers = [
        ("fc1", Linear(n_latent, arch.hidden, rng=rng, xp=xp, dtype=dtype, init=arch.init)),
        ("act_fc1", LeakyReLU(arch.leaky_slope, paths=paths)),
        ("fc2", Linear(arch.hidden, math.prod(feature), rng=rng, xp=xp, dtype=dtype, init=arch.init)),
        ("act_fc2", LeakyReLU(arch.leaky_slope, paths=paths)),
        ("reshape", Reshape(feature)),
    ]
    in_ch, last = feature[0], len(arch.decoder_convs)
    for i, spec in enumerate(arch.decoder_convs, start=1):
        layers.append((f"bn{i}", BatchNorm(in_ch, arch.bn_momentum, arch.bn_eps, arch.bn_running_var, xp=xp,
                                           dtype=dtype, paths=paths)))
        if paths.fused and (spec.kernel, spec.stride, spec.padding) == (3, 1, 1):
            layers.append((f"conv{i}", UpsampleConv2d(in_ch, spec.channels, rng=rng, xp=xp, dtype=dtype, init=arch.init,
                                                      paths=paths)))
        else:
            layers.append((f"up{i}", Upsample(2)))
            layers.append((f"conv{i}", Conv2d(in_ch, spec.channels, spec.kernel, spec.stride, spec.padding, rng=rng,
                                              xp=xp, dtype=dtype, init=arch.init, paths=paths)))
        layers.append((f"act{i}", Sigmoid() if i == last else LeakyReLU(arch.leaky_slope, paths=paths)))
        in_ch = spec.channels
    return Sequential(*layers)


class GatedVAE(Layer):
    """Encoder, decoder and (optionally) the gate logits ``gamma`` (n,).

    Parameter names: ``encoder.*``, ``decoder.*``, ``gamma``. A model without gates
    (``gated=False``) is a plain VAE: the baseline of Table 1 and the pruned export.
    ``paths``: the twins its layers take (:class:`refimpl.execution.FastPaths`, resolved once
    for the run; ``paths.fused``: decoder blocks as one ``UpsampleConv2d`` or ``Upsample``
    then ``Conv2d``, same parameters and outputs). None: the default setting's for ``xp``.
    """

    def __init__(self, arch: Architecture, n_latent: int, *, rng, xp=numpy, dtype=numpy.float32, gated=True,
                 gamma_init=0.42, paths=None):
        super().__init__()
        if int(n_latent) != n_latent or n_latent < 1:
            raise ValueError(f"n_latent={n_latent!r}: expected an integer >= 1")
        arch.validate()
        self.paths = paths or default_paths(xp)
        self.arch, self.n_latent, self.gated = arch, int(n_latent), gated
        self.xp, self.dtype = xp, numpy.dtype(dtype)
        self.encoder = build_encoder(arch, self.n_latent, rng=rng, xp=xp, dtype=dtype, paths=self.paths)
        self.decoder = build_decoder(arch, self.n_latent, rng=rng, xp=xp, dtype=dtype, paths=self.paths)
        if gated:
            self.params["gamma"] = xp.full((self.n_latent,), gamma_init, dtype=dtype)
            self.grads["gamma"] = xp.zeros((self.n_latent,), dtype=dtype)

    def children(self):
        return [("encoder", self.encoder), ("decoder", self.decoder)]

    def check_images(self, x):
        """Raise a ValueError unless x: (N, C, H, W) matches the architecture."""
        expected = tuple(self.arch.image_shape)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(x.shape)} do not fit this model: expected (N, {expected[0]}, "
                             f"{expected[1]}, {expected[2]})")

    def inference_gates(self):
        """nu at inference: 1 where sigmoid(k gamma) > 0.5 (gamma > 0), else 0; all ones without gates. (n,)"""
        if not self.gated:
            return self.xp.ones((self.n_latent,), dtype=self.dtype)
        return (self.params["gamma"] > 0).astype(self.dtype)

    def open_gates(self) -> int:
        return int(self.inference_gates().sum())

    def set_batchnorm_update(self, update: bool) -> None:
        """Turn running-statistics updates of every BatchNorm on or off (interpretation (h))."""
        for _, layer in self.decoder.children() + self.encoder.children():
            if isinstance(layer, BatchNorm):
                layer.update_running = update

    def reconstruct(self, x, gates=None):
        """Eval-mode reconstruction x' = g_dec(mu * nu), nu = ``gates`` (n,) or the inference gates. x: (N, C, H, W)."""
        self.check_images(x)
        gates = self.inference_gates() if gates is None else gates
        was_training = self.training
        self.eval()
        try:
            mu = self.encoder.forward(x, cache=False)[:, : self.n_latent]
            return self.decoder.forward(mu * gates, cache=False)
        finally:
            self.train(was_training)


def prune(model: GatedVAE) -> GatedVAE:
    """A plain VAE with only the open latent dimensions (gamma > 0).

    Removes the closed dimensions' rows from the encoder's last linear layer (both
    the mu and the log-scale halves) and their columns from the decoder's first
    linear layer. In eval mode its reconstructions equal the gated model's, since a
    closed dimension only ever multiplies zero into the decoder.
    """
    xp = model.xp
    keep = xp.nonzero(model.inference_gates() > 0)[0]
    n_open = int(keep.shape[0])
    if n_open == 0:
        raise ValueError("prune: every gate is closed (gamma <= 0 everywhere); nothing is left to export")
    # Built with throwaway weights (seed 0), all overwritten below.
    pruned = GatedVAE(model.arch, n_open, rng=generator(0), xp=xp, dtype=model.dtype, gated=False, paths=model.paths)
    state = {name: value.copy() for name, value in model.state_dict().items() if name != "gamma"}
    n = model.n_latent
    rows = xp.concatenate([keep, keep + n])
    state["encoder.fc2.weight"] = state["encoder.fc2.weight"][rows]
    state["encoder.fc2.bias"] = state["encoder.fc2.bias"][rows]
    state["decoder.fc1.weight"] = state["decoder.fc1.weight"][:, keep]
    pruned.load_state_dict(state)
    return pruned
