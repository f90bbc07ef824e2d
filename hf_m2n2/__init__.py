"""hf-m2n2: evolve merged models with M2N2."""

__version__ = "0.1.0"
