"""dnnmod: decompose CNNs into per-class modules and reuse them."""

__version__ = "0.1.0"
