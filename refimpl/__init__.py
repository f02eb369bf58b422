"""refimpl: a NumPy/CuPy reference implementation of De Boom et al.,
"Dynamic Narrowing of VAE Bottlenecks Using GECO and L0 Regularization"."""

__version__ = "0.1.0"
