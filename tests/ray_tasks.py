"""Evaluation callables for the Ray executor's tests, imported by the Ray workers (the executor passes them this
folder on `PYTHONPATH`)."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from hf_m2n2.demo.tasks.digits import train_scores


def breaks_some(params) -> np.ndarray:
    """The digits fitness, except that about one candidate in five breaks the evaluator (raises), the same ones
    wherever they are evaluated."""
    vector = np.asarray(params, dtype=np.float32)
    if hashlib.sha256(vector.tobytes()).digest()[0] < 52:
        raise RuntimeError("this candidate breaks the evaluator")
    return train_scores(vector)


def slow_train_scores(params) -> np.ndarray:
    """The digits fitness after 20 ms of waiting: long enough for a test to kill a worker mid-evaluation."""
    time.sleep(0.02)
    return train_scores(params)
