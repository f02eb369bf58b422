"""Hand-written layers with forward and backward passes (see layer.py for the protocol)."""

from .activations import LeakyReLU, Sigmoid, sigmoid
from .batchnorm import BatchNorm
from .conv2d import Conv2d
from .layer import Layer
from .linear import Linear
from .reshape import Flatten, Reshape
from .sequential import Sequential
from .upsample import Upsample
from .upsample_conv2d import UpsampleConv2d

__all__ = ["BatchNorm", "Conv2d", "Flatten", "Layer", "LeakyReLU", "Linear", "Reshape", "Sequential", "Sigmoid",
           "Upsample", "UpsampleConv2d", "sigmoid"]
