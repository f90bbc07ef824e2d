"""The digits world's seeds of different initializations, aligned or zipped (`hf_m2n2.align`).

The M2N2 reference's "pretrained" seeds (`digits.pretrained_seeds`: two 64-256-10 MLPs from different random
initializations, trained on the digits 0-4 and 5-9) live in different permutations of their 256 hidden units:
SLERP and crossover then mix unrelated units. Aligning B's hidden units to A's is exact (B computes the same
function) and free; ZipIt! merges them by their features on the training images (unlabeled: every image, no
label is read).

Used as a dense genome's seeds callable, e.g. `seeds: {kind: python, callable:
hf_m2n2.demo.tasks.digits_align:aligned_seeds, kwargs: {method: permute}}`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hf_m2n2.demo.tasks import digits

METHODS = ("none", "permute", "weight_matching")


def as_module(params: np.ndarray | torch.Tensor) -> nn.Sequential:
    """A flat digits vector as `Linear(64, 256) -> ReLU -> Linear(256, 10)` (the same function)."""
    p = torch.as_tensor(np.asarray(params, dtype=np.float32))
    a, b, c = digits._W1_END, digits._B1_END, digits._W2_END
    model = nn.Sequential(
        nn.Linear(digits.INPUT_DIM, digits.HIDDEN_DIM), nn.ReLU(), nn.Linear(digits.HIDDEN_DIM, 10)
    )
    with torch.no_grad():
        model[0].weight.copy_(p[:a].view(digits.INPUT_DIM, digits.HIDDEN_DIM).t())
        model[0].bias.copy_(p[a:b])
        model[2].weight.copy_(p[b:c].view(digits.HIDDEN_DIM, digits.OUTPUT_DIM).t())
        model[2].bias.copy_(p[c:])
    return model.eval()


def as_vector(state: dict[str, torch.Tensor]) -> np.ndarray:
    """The flat digits vector of an `as_module` state dict."""
    parts = [state["0.weight"].t(), state["0.bias"], state["2.weight"].t(), state["2.bias"]]
    return torch.cat([t.reshape(-1) for t in parts]).to(torch.float32).numpy()


def _graph():
    from hf_m2n2.align.graphs import classifier_graph

    return classifier_graph(as_module(np.zeros(digits.NUM_PARAMS)))


def _features(models: list[nn.Module]):
    from hf_m2n2.align.calibration import collect

    images = digits.load_data().x_train
    return collect(models, _graph(), [images])["space0"]


def align(reference: np.ndarray, other: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """`other` with its hidden units permuted to match `reference`'s (`permute`: features on the training
    images; `weight_matching`: weights only); the same function as `other`."""
    from hf_m2n2.align.apply import as_numpy_state, permute_state
    from hf_m2n2.align.matchers import permute, weight_matching

    if method == "none":
        return np.asarray(other, dtype=np.float32)
    graph = _graph()
    models = [as_module(reference), as_module(other)]
    states = [m.state_dict() for m in models]
    if method == "permute":
        match = permute(_features(models).correlation(), digits.HIDDEN_DIM)
    elif method == "weight_matching":
        match = weight_matching(graph, [as_numpy_state(s) for s in states], seed=seed)["space0"]
    else:
        raise ValueError(f"unknown alignment {method!r} (use one of {', '.join(METHODS)})")
    n = digits.HIDDEN_DIM
    perm = np.argmax(match.unmerge[n:], axis=0)  # merged unit u holds B's unit perm[u]
    return as_vector(permute_state(graph, states[1], {"space0": perm}))


def zipped(first: np.ndarray, second: np.ndarray, *, alpha: float = 0.3, beta: float = 0.125) -> np.ndarray:
    """The one-shot ZipIt! merge of two digits vectors (features on the training images)."""
    from hf_m2n2.align.apply import merge_states
    from hf_m2n2.align.matchers import zipit

    models = [as_module(first), as_module(second)]
    match = zipit(_features(models).correlation(), digits.HIDDEN_DIM, alpha=alpha, beta=beta)
    return as_vector(merge_states(_graph(), [m.state_dict() for m in models], {"space0": match.pair()}))


def aligned_seeds(
    method: str = "permute", reference: int = 0, zip_seed: bool = False, seed: int = 42
) -> list[np.ndarray]:
    """The reference's pretrained seeds with the other seed aligned to seed `reference` (and, with `zip_seed`, their
    ZipIt! merge as a third initial genome)."""
    seeds = digits.pretrained_seeds(seed=seed)
    ref = seeds[reference]
    out = [ref if k == reference else align(ref, s, method) for k, s in enumerate(seeds)]
    return out + ([zipped(*out)] if zip_seed else [])
