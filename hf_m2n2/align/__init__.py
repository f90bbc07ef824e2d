"""Aligning models of different initializations (ZipIt!, permutation alignment): permutation spaces as data,
calibration statistics, matchers and partial zips (see `hf_m2n2.align.spaces`)."""
