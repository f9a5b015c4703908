"""expertmesh: train Mixture-of-Experts transformers across many processes."""

__version__ = "0.1.0"
