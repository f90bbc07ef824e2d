"""The M2N2 paper's small-scale task: 64-256-10 ReLU MLPs on scikit-learn's bundled 8x8 digits.

As in the released reference code: the images are in file order, the first 80% (1,437) train and the last 20%
(360) test, raw pixel values (0-16, no scaling); a model is one flat float32 vector of 19,210 parameters laid
out as `W1 (64x256, row-major), b1 (256), W2 (256x10, row-major), b2 (10)`. A candidate's per-example score is
1 when it classifies that training image correctly.

The functions here are the Python fitness that `hf-m2n2 evolve` calls (`evaluate: {kind: python, callable:
hf_m2n2.demo.tasks.digits:train_scores, ...}`); each takes the candidate's parameter vector.

Example:
    >>> import torch
    >>> params = torch.zeros(NUM_PARAMS)
    >>> train_scores(params).shape
    (1437,)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

INPUT_DIM = 64
HIDDEN_DIM = 256
OUTPUT_DIM = 10
NUM_PARAMS = (INPUT_DIM + 1) * HIDDEN_DIM + (HIDDEN_DIM + 1) * OUTPUT_DIM
TRAIN_FRACTION = 0.8

_W1_END = INPUT_DIM * HIDDEN_DIM
_B1_END = _W1_END + HIDDEN_DIM
_W2_END = _B1_END + HIDDEN_DIM * OUTPUT_DIM


@dataclass(frozen=True)
class DigitsData:
    """The split: float32 images (n x 64) and int64 labels (n)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@functools.lru_cache(maxsize=1)
def load_data() -> DigitsData:
    """Load the digits in file order and split them 80/20 (1,437 train, 360 test), raw pixel values.

    Returns:
        The cached split (the tensors must not be modified).
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    cut = int(len(images) * TRAIN_FRACTION)
    x = torch.tensor(images, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.int64)
    return DigitsData(x[:cut].contiguous(), y[:cut].contiguous(), x[cut:].contiguous(), y[cut:].contiguous())


def _as_params(params: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(params)
    if tensor.shape != (NUM_PARAMS,):
        raise ValueError(
            f"expected a parameter vector of {NUM_PARAMS} values, got shape {tuple(tensor.shape)}"
        )
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def logits_t(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The MLP's logits, transposed: (10 x n) for images x (n x 64).

    The output layer is computed as W2^T H^T because MKL runs the skinny (10 x 256) @ (256 x n) product ~4x
    faster than (n x 256) @ (256 x 10); the values are the same.

    Args:
        params: a flat vector of NUM_PARAMS float32 values.
        x: images, (n x 64) float32.

    Returns:
        The logits, shape (10, n).
    """
    w1 = params[:_W1_END].view(INPUT_DIM, HIDDEN_DIM)
    b1 = params[_W1_END:_B1_END]
    w2 = params[_B1_END:_W2_END].view(HIDDEN_DIM, OUTPUT_DIM)
    b2 = params[_W2_END:]
    hidden = torch.addmm(b1, x, w1).relu_()
    return torch.mm(w2.t(), hidden.t()).add_(b2[:, None])


def _predict(params: torch.Tensor | np.ndarray, x: torch.Tensor) -> torch.Tensor:
    # max(0).indices is the first maximal index like argmax(0), and ~10x faster on this (10 x n) layout
    return logits_t(_as_params(params), x).max(0).indices


def train_scores(params: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-example scores on the 1,437 training images: 1.0 where the model is right, else 0.0.

    Args:
        params: the candidate's flat parameter vector (NUM_PARAMS values).

    Returns:
        A float32 array of shape (1437,).
    """
    data = load_data()
    with torch.no_grad():
        correct = _predict(params, data.x_train) == data.y_train
    return correct.numpy().astype(np.float32)


def test_accuracy(params: torch.Tensor | np.ndarray) -> float:
    """Accuracy on the 360 test images (for logging; not counted as a forward pass).

    Args:
        params: the flat parameter vector.

    Returns:
        The fraction of test images classified correctly.
    """
    data = load_data()
    with torch.no_grad():
        correct = _predict(params, data.x_test) == data.y_test
    return float(correct.to(torch.float32).mean())


def parity_groups() -> np.ndarray:
    """Per-training-example group ids for MAP-Elites' descriptors: 0 = odd digit, 1 = even digit.

    Returns:
        An int64 array of shape (1437,); the descriptors are (accuracy on odd, accuracy on even) as in the paper.
    """
    return (load_data().y_train.numpy() % 2 == 0).astype(np.int64)


def pretrained_seeds(
    seed: int = 42, steps: int = 10, lr: float = 3e-3, std: float = 0.01
) -> list[np.ndarray]:
    """The paper's pretrained seeds: one MLP trained on the digits 0-4, one on 5-9.

    Each starts from N(0, std^2) and takes `steps` full-batch Adam steps (default betas and eps) on the mean
    cross-entropy over its half of the training images.

    Args:
        seed: seed of the two initial vectors (a torch generator; nothing global).
        steps: Adam steps.
        lr: Adam learning rate.
        std: standard deviation of the initial parameters.

    Returns:
        Two float32 parameter vectors: [model trained on 0-4, model trained on 5-9].
    """
    data = load_data()
    generator = torch.Generator().manual_seed(seed)
    inits = [torch.randn(NUM_PARAMS, generator=generator) * std for _ in range(2)]
    low = data.y_train < 5
    out = []
    for init, mask in zip(inits, (low, ~low)):
        out.append(_train(init, data.x_train[mask], data.y_train[mask], steps, lr).numpy())
    return out


def _train(init: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    params = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([params], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_t(params, x).t(), y)
        loss.backward()
        optimizer.step()
    return params.detach().clone()
