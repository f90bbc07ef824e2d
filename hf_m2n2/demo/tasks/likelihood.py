"""A Python fitness for causal LMs: per-example likelihood of fixed token sequences (no dataset, no lm-eval).

`evaluate: {kind: python, callable: "hf_m2n2.demo.tasks.likelihood:token_likelihood", kwargs: {sequences: [...]}}`
scores each sequence by exp(-mean next-token negative log-likelihood), a number in (0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def token_likelihood(model, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """exp(-mean NLL) of each token sequence under `model` (a causal LM), one score per sequence.

    Example:
        >>> token_likelihood(model, [[1, 5, 6, 7], [1, 9, 9]])  # doctest: +SKIP
        array([0.0042, 0.0039])
    """
    import torch

    scores = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([list(seq)], device=next(model.parameters()).device)
            loss = model(input_ids=ids, labels=ids).loss
            scores.append(float(torch.exp(-loss)))
    return np.array(scores)


def mean_likelihood(model, sequences: Sequence[Sequence[int]]) -> float:
    """The mean of `token_likelihood` (a held-out figure for logs)."""
    return float(token_likelihood(model, sequences).mean())


def sequence_halves(sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Group ids of the sequences: 0 for the first half, 1 for the rest (two objectives, or two MAP-Elites axes)."""
    half = (len(sequences) + 1) // 2
    return np.array([0 if i < half else 1 for i in range(len(sequences))], dtype=np.int64)
