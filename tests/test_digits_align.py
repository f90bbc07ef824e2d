"""The digits world's seeds of different initializations, aligned (the same functions, B's hidden units reordered
to A's) and zipped: what `hf_m2n2.demo.tasks.digits_align` gives M2N2 as initial genomes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_m2n2.demo.tasks import digits
from hf_m2n2.demo.tasks import digits_align as da

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair():
    return digits.pretrained_seeds(seed=42)


def test_the_module_view_is_the_flat_vector(pair):
    x = digits.load_data().x_test
    with torch.no_grad():
        assert torch.allclose(
            da.as_module(pair[0])(x).t(), digits.logits_t(torch.as_tensor(pair[0]), x), atol=1e-5
        )
    assert np.array_equal(da.as_vector(da.as_module(pair[0]).state_dict()), pair[0])


@pytest.mark.parametrize("method", ["permute", "weight_matching"])
def test_alignment_keeps_b_s_function_and_makes_averaging_work(pair, method):
    a, b = pair
    aligned = da.align(a, b, method)
    x = digits.load_data().x_test
    with torch.no_grad():
        same = digits.logits_t(torch.as_tensor(aligned), x), digits.logits_t(torch.as_tensor(b), x)
    assert torch.allclose(*same, atol=1e-4) and not np.array_equal(aligned, b)
    assert sorted(aligned[digits._W1_END : digits._B1_END]) == sorted(b[digits._W1_END : digits._B1_END])
    assert digits.test_accuracy((a + aligned) / 2) > digits.test_accuracy((a + b) / 2) + 0.05


def test_aligned_seeds_with_their_zip():
    seeds = da.aligned_seeds("permute", zip_seed=True)
    assert len(seeds) == 3 and all(s.shape == (digits.NUM_PARAMS,) and s.dtype == np.float32 for s in seeds)
    assert np.array_equal(seeds[0], digits.pretrained_seeds(seed=42)[0])
    assert digits.test_accuracy(seeds[2]) > max(digits.test_accuracy(s) for s in seeds[:2])
    with pytest.raises(ValueError, match="unknown alignment 'sort'"):
        da.align(seeds[0], seeds[1], "sort")
