"""vae-dist: distributed, high-throughput training of convolutional VAEs on images."""

__version__ = "0.1.0"
