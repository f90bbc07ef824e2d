"""Atomic checkpoints of nested state: numpy arrays in an uncompressed .npz, everything else as JSON inside it.

A state is a tree of dicts (string keys), lists, numpy arrays, numbers, strings, booleans and None. Arrays are
stored as npz members; the tree, with `{"__array__": key}` in their place, as a JSON member. The file is written
to a temporary name in the same directory, fsynced, and renamed over the previous checkpoint, so a crash at any
moment leaves either the old or the new checkpoint, never a torn one. Nothing is pickled or unpickled.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from hf_m2n2.errors import CheckpointError
from hf_m2n2.outdir import atomic_write_bytes

_META = "__meta__"
_ARRAY = "__array__"


def pack(state: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """Split a state tree into a JSON-able tree and its arrays.

    Args:
        state: the tree.

    Returns:
        (tree with array references, {reference: array}).

    Raises:
        TypeError: a value of an unsupported type.
    """
    arrays: dict[str, np.ndarray] = {}

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, np.ndarray):
            key = f"a{len(arrays)}"
            arrays[key] = node
            return {_ARRAY: key}
        if isinstance(node, dict):
            if _ARRAY in node or not all(isinstance(k, str) for k in node):
                raise TypeError(f"{where}: dict keys must be strings other than {_ARRAY!r}")
            return {k: walk(v, f"{where}.{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, np.generic):
            return node.item()
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"{where}: cannot checkpoint a {type(node).__name__}")

    return walk(state, "state"), arrays


def unpack(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Inverse of `pack` (tuples come back as lists)."""
    if isinstance(tree, dict):
        if set(tree) == {_ARRAY}:
            return arrays[tree[_ARRAY]]
        return {k: unpack(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack(v, arrays) for v in tree]
    return tree


def save_state(path: str | os.PathLike[str], state: Any) -> None:
    """Save a state tree atomically (see the module docstring).

    Args:
        path: the .npz file.
        state: the tree.
    """
    tree, arrays = pack(state)
    arrays[_META] = np.frombuffer(json.dumps(tree).encode(), dtype=np.uint8)
    atomic_write_bytes(path, lambda handle: np.savez(handle, **arrays))


def load_state(path: str | os.PathLike[str]) -> Any:
    """Load a state tree written by `save_state` (no pickles are loaded).

    Args:
        path: the .npz file.

    Returns:
        The tree, arrays as numpy arrays.

    Raises:
        FileNotFoundError: there is no such file.
        CheckpointError: the file is damaged (truncated, emptied, altered) or not a checkpoint.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        tree = json.loads(arrays.pop(_META).tobytes().decode())
        return unpack(tree, arrays)
    except FileNotFoundError:
        raise
    except (
        Exception
    ) as exc:  # zip, npy, JSON and layout errors alike; numpy's own text may advise allow_pickle
        raise CheckpointError(
            f"{path} is damaged ({_damage(exc)}): restore it, or start the run again with --overwrite"
        ) from None


def _damage(exc: Exception) -> str:
    text = str(exc).lower()
    if isinstance(exc, ValueError) and "pickle" in text:
        return "not an hf-m2n2 checkpoint"
    if isinstance(exc, EOFError) or "truncated" in text or "empty" in text or "not a zip file" in text:
        return "truncated or not a checkpoint"
    return "corrupted"
