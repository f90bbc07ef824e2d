"""Synthetic Llama-shaped checkpoints for merge benchmarks.

`build_synthetic_llama` writes one base model and `n_models - 1` fine-tunes as ordinary Hugging Face Hub-layout
directories (``config.json`` + ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), bf16, with
the tensor names of ``LlamaForCausalLM.state_dict()``. Each fine-tune is ``base + delta`` where ``delta`` is nonzero
on about ``density`` of the elements (small Gaussian values), so task-vector methods (TIES, DARE, task arithmetic)
have something meaningful to work on.

The build streams: tensors are generated one at a time and accumulated per shard only (all models are written in
lockstep, so at most one shard per model is in memory). No model is ever instantiated. Every tensor is generated
from its own generator seeded by (seed, model, tensor name), so the output is deterministic and independent of the
shard size. A marker file records the parameters; a later call with the same parameters and complete files on disk
returns immediately.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

MARKER = "synthetic_llama.json"
BASE_STD = 0.02  # weight-matrix init scale (Llama's initializer_range)
NORM_STD = 0.02  # RMSNorm weights: 1 + NORM_STD * N(0, 1)
DELTA_STD = 0.004  # fine-tune delta magnitude on its nonzero elements (weight matrices)
NORM_DELTA_STD = 0.05  # ... on RMSNorm weights (bf16's ulp at 1.0 is 0.0078: smaller deltas would round away)
BYTES_PER_PARAM = 2  # bf16
MARKER_VERSION = 1


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int


def default_heads(hidden: int) -> int:
    """Head count for a given width: head_dim 64 up to hidden 1024, 128 above (as in common Llama sizes)."""
    head_dim = 64 if hidden <= 1024 else 128
    if hidden % head_dim:
        raise ValueError(f"hidden={hidden} is not a multiple of head_dim={head_dim}")
    return hidden // head_dim


def tensor_shapes(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in LlamaForCausalLM.state_dict() order (untied lm_head)."""
    h, i = shape.hidden, shape.intermediate
    kv = shape.kv_heads * (h // shape.heads)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for n in range(shape.layers):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return out


def param_count(shape: LlamaShape) -> int:
    return sum(_numel(s) for _, s in tensor_shapes(shape))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[str]]:
    """Split tensors into shards of at most `shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = _numel(shape) * BYTES_PER_PARAM
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_filename(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def model_names(n_models: int) -> list[str]:
    return ["base"] + [f"ft{k}" for k in range(1, n_models)]


def _generator(seed: int, model: str, tensor: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{model}/{tensor}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def base_tensor(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The base model's tensor (bf16): N(0, BASE_STD), or 1 + N(0, NORM_STD) for RMSNorm weights."""
    t = torch.randn(shape, generator=_generator(seed, "base", name))
    if name.endswith("norm.weight"):
        t.mul_(NORM_STD).add_(1.0)
    else:
        t.mul_(BASE_STD)
    return t.to(torch.bfloat16)


def add_sparse_delta(base: torch.Tensor, seed: int, model: str, name: str, density: float) -> torch.Tensor:
    """base + delta, delta ~ DELTA_STD * N(0, 1) on a random `density` fraction of the elements, else 0."""
    g = _generator(seed, model, name)
    out = base.float()
    mask = torch.rand(base.shape, generator=g) < density
    std = NORM_DELTA_STD if name.endswith("norm.weight") else DELTA_STD
    out[mask] += torch.randn(int(mask.sum()), generator=g).mul_(std)
    return out.to(torch.bfloat16)


def _model_tensors(
    shapes: list[tuple[str, tuple[int, ...]]], models: list[str], seed: int, density: float
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """Yield (name, [tensor per model]) one tensor name at a time."""
    for name, shape in shapes:
        base = base_tensor(seed, name, shape)
        yield name, [base] + [add_sparse_delta(base, seed, m, name, density) for m in models[1:]]


def _write_config(model_dir: Path, shape: LlamaShape) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    config.dtype = "bfloat16"
    config.to_json_file(str(model_dir / "config.json"))


def _marker_params(shape: LlamaShape, n_models: int, shard_bytes: int, density: float, seed: int) -> dict:
    return {
        "version": MARKER_VERSION,
        "shape": asdict(shape),
        "n_models": n_models,
        "shard_bytes": shard_bytes,
        "density": density,
        "seed": seed,
        "base_std": BASE_STD,
        "delta_std": DELTA_STD,
        "norm_delta_std": NORM_DELTA_STD,
    }


def is_complete(out_dir: Path, params: dict) -> bool:
    """True when the marker matches `params` and every model dir has its index and all shards it lists."""
    marker = out_dir / MARKER
    try:
        if json.loads(marker.read_text())["params"] != params:
            return False
    except (OSError, ValueError, KeyError):
        return False
    for model in model_names(params["n_models"]):
        d = out_dir / model
        try:
            index = json.loads((d / "model.safetensors.index.json").read_text())
        except (OSError, ValueError):
            return False
        if not (d / "config.json").is_file():
            return False
        if not all((d / f).is_file() for f in set(index["weight_map"].values())):
            return False
    return True


def build_synthetic_llama(
    out_dir: str | Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    n_models: int = 3,
    shard_bytes: int,
    density: float = 0.1,
    seed: int = 0,
    heads: int | None = None,
    kv_heads: int | None = None,
    verbose: bool = True,
) -> list[Path]:
    """Write base + (n_models - 1) sparse-delta fine-tunes under `out_dir`; return [base_dir, ft1_dir, ...].

    Skips the build when `out_dir` already holds a complete build with the same parameters.
    """
    if n_models < 1:
        raise ValueError("n_models must be >= 1")
    out_dir = Path(out_dir)
    heads = heads or default_heads(hidden)
    shape = LlamaShape(hidden, intermediate, layers, vocab, heads, kv_heads or heads)
    models = model_names(n_models)
    dirs = [out_dir / m for m in models]
    params = _marker_params(shape, n_models, shard_bytes, density, seed)
    if is_complete(out_dir, params):
        return dirs

    t0 = time.perf_counter()
    (out_dir / MARKER).unlink(missing_ok=True)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        _write_config(d, shape)

    shapes = tensor_shapes(shape)
    shards = plan_shards(shapes, shard_bytes)
    shard_of = {name: k for k, names in enumerate(shards) for name in names}
    weight_map = {name: shard_filename(shard_of[name], len(shards)) for name, _ in shapes}
    total_size = param_count(shape) * BYTES_PER_PARAM
    if verbose:
        print(
            f"building {n_models} synthetic Llama models ({param_count(shape) / 1e6:.1f}M params, "
            f"{total_size / 1e9:.2f} GB each, {len(shards)} shards) in {out_dir} ...",
            flush=True,
        )

    pending: list[dict[str, torch.Tensor]] = [{} for _ in models]
    current = 0
    for name, tensors in _model_tensors(shapes, models, seed, density):
        if shard_of[name] != current:
            _flush(dirs, pending, shard_filename(current, len(shards)))
            current = shard_of[name]
        for acc, t in zip(pending, tensors):
            acc[name] = t
    _flush(dirs, pending, shard_filename(current, len(shards)))

    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / MARKER).write_text(
        json.dumps({"params": params, "models": models, "param_count": param_count(shape)}, indent=2) + "\n"
    )
    if verbose:
        print(f"built in {time.perf_counter() - t0:.1f}s", flush=True)
    return dirs


def _flush(dirs: list[Path], pending: list[dict[str, torch.Tensor]], filename: str) -> None:
    for d, acc in zip(dirs, pending):
        save_file(acc, str(d / filename), metadata={"format": "pt"})
        acc.clear()
