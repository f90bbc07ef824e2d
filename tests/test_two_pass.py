"""Streamed (two-pass) merging of non-elementwise methods: statistics over row blocks, then a per-block apply.

The streamed result must equal the one-pass (whole-tensor) result bit for bit for any block size, and a merge
of big tensors must never hand a method more than `chunk_elements` elements of a tensor at once.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from hf_m2n2.methods import get_method
from hf_m2n2.methods import sparsify as sp
from hf_m2n2.methods._common import RandomStream
from hf_m2n2.methods.streaming import Block, Lazy, TensorContext, block_shape

torch.set_num_threads(1)

STREAMED = [
    "slerp",
    "ties",
    "dare_ties",
    "dare_linear",
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
]


def _params(name: str, n_models: int, **overrides: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    method = get_method(name)
    given = {"t": 0.35, "weight": [0.7, 0.5, -0.3], "density": [0.4, 0.55, 0.3], "gamma": [0.05, 0.1, 0.02]}
    given |= {"epsilon": [0.1, 0.15, 0.05]} | overrides
    params = {p.name: given.get(p.name, p.default) for p in method.global_params}
    model_params = [
        {p.name: given[p.name][i] if p.name in given else p.default for p in method.model_params}
        for i in range(n_models)
    ]
    return params, model_params


def _inputs(name: str, shape: tuple[int, ...], dtype: torch.dtype, quantized: bool = False):
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g)
    n_models = 1 if name == "slerp" else 3
    if quantized:  # few distinct magnitudes: many ties at every cut-off, some exact zeros
        base = torch.randint(-8, 8, shape, generator=g) / 8.0
        models = [base + torch.randint(-3, 4, shape, generator=g) / 16.0 for _ in range(n_models)]
    else:
        models = [base + 0.3 * torch.randn(shape, generator=g) for _ in range(n_models)]
    return [m.to(dtype) for m in models], base.to(dtype)


def _whole(name, tensors, base, params, model_params, seed=5) -> torch.Tensor:
    stream = RandomStream(seed) if get_method(name).randomized else None
    return get_method(name).fn(tensors, base, params, model_params, stream)


def _streamed(name, tensors, base, params, model_params, rows_per_block: int, seed=5) -> torch.Tensor:
    """What the merge engine does with a big tensor: statistics over lazily read blocks, then each block."""
    method = get_method(name)
    shape = tuple(base.shape)
    blocks = [(r, min(r + rows_per_block, shape[0])) for r in range(0, shape[0], rows_per_block)]
    stream = RandomStream(seed) if method.randomized else None
    context = TensorContext(shape, params, model_params, stream)
    reads: list[int] = []

    def read(i: int) -> Block:
        lo, hi = blocks[i]
        reads.append(i)
        return Block(context, [x[lo:hi].clone() for x in tensors], base[lo:hi].clone(), i, blocks[i])

    lazies = [Lazy(i, block_shape(shape, rows), lambda i=i: read(i)) for i, rows in enumerate(blocks)]
    stats = method.streamed.statistics(context, lazies)
    # blocks applied out of order, as parallel workers may
    parts = {i: method.streamed.apply(read(i), stats) for i in reversed(range(len(blocks)))}
    return torch.cat([parts[i] for i in range(len(blocks))])


@pytest.mark.parametrize("name", STREAMED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 23), (20, 6, 5)])
def test_streamed_equals_whole_for_any_block_size(
    name: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    tensors, base = _inputs(name, shape, dtype)
    params, model_params = _params(name, len(tensors), rescale=True) if name != "slerp" else _params(name, 1)
    whole = _whole(name, tensors, base, params, model_params)
    for rows in (1, 2, 5, 16, shape[0]):
        streamed = _streamed(name, tensors, base, params, model_params, rows)
        assert streamed.dtype == whole.dtype
        assert torch.equal(streamed.view(-1).view(_int(dtype)), whole.reshape(-1).view(_int(dtype))), (
            f"{name}: {rows} rows per block differ bitwise"
        )


def _int(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "della"])
@pytest.mark.parametrize("rescale", [False, True])
def test_streamed_equals_whole_with_magnitude_ties(name: str, rescale: bool) -> None:
    """Quantized deltas tie at every cut-off (and many are exactly 0): ties are kept in global index order."""
    tensors, base = _inputs(name, (41, 19), torch.bfloat16, quantized=True)
    params, model_params = _params(name, len(tensors), rescale=rescale)
    whole = _whole(name, tensors, base, params, model_params)
    for rows in (1, 3, 7, 40):
        assert torch.equal(_streamed(name, tensors, base, params, model_params, rows), whole), (name, rows)


@pytest.mark.parametrize("density", [0.0, 1e-9, 1.0])
def test_streamed_trivial_densities(density: float) -> None:
    for name in ("ties", "dare_ties", "breadcrumbs", "della_linear"):
        tensors, base = _inputs(name, (9, 4), torch.float32)
        params, model_params = _params(name, 3, density=[density] * 3, epsilon=[0.0] * 3)
        if name == "della_linear" and 0 < density < 1:
            continue
        whole = _whole(name, tensors, base, params, model_params)
        assert torch.equal(_streamed(name, tensors, base, params, model_params, 2), whole)


def _mergekit_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's arithmetic: the cosine as the sum of the products of the normalized tensors, in float32."""
    from hf_m2n2.methods.slerp import slerp_coefficients

    a, b = v0.reshape(-1).float(), v1.reshape(-1).float()
    norm_a, norm_b = float(a.norm()), float(b.norm())
    c0, c1 = slerp_coefficients(t, float(((a / norm_a) * (b / norm_b)).sum()))
    return (c0 * a + c1 * b).to(v0.dtype).reshape(v0.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slerp_agrees_with_mergekit_to_rounding(dtype: torch.dtype) -> None:
    """The one-pass cosine (dot product over the norms) changes mergekit's result only by rounding: at most
    1e-5 of the tensor's largest magnitude in float32; in bfloat16 one rounding step per element, except where
    the two terms nearly cancel (|value| below ~1e-6 of the tensor's scale), which float32 noise in the
    coefficients may move by more steps of their own tiny magnitude."""
    for shape in ((64, 48), (300, 200), (1100, 1000)):  # the last spans two 2**20-element chunks
        tensors, base = _inputs("slerp", shape, dtype)
        out = _whole("slerp", tensors, base, {"t": 0.35}, [{}]).float()
        expected = _mergekit_slerp(0.35, base, tensors[0]).float()
        if dtype == torch.float32:
            assert float((out - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
        else:
            _, exponent = torch.frexp(torch.maximum(out.abs(), expected.abs()))
            step = torch.ldexp(torch.ones_like(out), exponent - 8)  # bf16 keeps 8 significant bits
            noise = 2.0**-20 * float(expected.abs().max())
            assert bool(((out - expected).abs() <= step.clamp_min(noise)).all())
            assert int((out != expected).sum()) < out.numel() // 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_slerp_leaves_its_inputs_alone(dtype: torch.dtype) -> None:
    """The statistics work in place on their float32 copies, never on the inputs (views for wide dtypes)."""
    tensors, base = _inputs("slerp", (64, 48), dtype)
    before = [t.clone() for t in (*tensors, base)]
    _whole("slerp", tensors, base, {"t": 0.35}, [{}])
    assert all(torch.equal(a, b) for a, b in zip(before, (*tensors, base)))


@pytest.mark.parametrize("chunk", [7, 100, 23 * 5])
def test_slerp_chunks_straddle_row_blocks(monkeypatch, chunk: int) -> None:
    """slerp sums over fixed chunks of the flattened tensor; chunks cut across row blocks are joined."""
    from hf_m2n2.methods import slerp

    monkeypatch.setattr(slerp, "_CHUNK", chunk)
    tensors, base = _inputs("slerp", (37, 23), torch.float32)
    params, model_params = _params("slerp", 1)
    whole = _whole("slerp", tensors, base, params, model_params)
    for rows in (1, 2, 5, 16):
        assert torch.equal(_streamed("slerp", tensors, base, params, model_params, rows), whole)


# --- the magnitude select -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_radix_select_across_blocks_matches_kthvalue(dtype: torch.dtype) -> None:
    values = torch.randn(3001, generator=torch.Generator().manual_seed(3)).abs().to(dtype)
    values[::5] = 0.25
    values[::11] = 0.0
    bits = sp.magnitude_bits(values)
    blocks = [Lazy(i, (len(c),), lambda c=c: c) for i, c in enumerate(bits.split(400))]
    ranks = [1, 17, 600, 1500, 2999, 3001]
    for rank, selected in zip(ranks, sp.select(blocks, ranks)):
        expected = torch.kthvalue(values.double(), rank).values.to(dtype)
        assert torch.tensor(selected.bits, dtype=_int(dtype)).view(dtype) == expected
        assert selected.below == int((values < expected).sum())
        assert sum(selected.equal) == int((values == expected).sum())
        assert list(selected.equal) == [int((c == selected.bits).sum()) for c in bits.split(400)]


def test_top_k_ties_are_taken_in_index_order_across_blocks() -> None:
    values = torch.tensor([1.0, 2.0, 2.0, 3.0, 2.0, 2.0, 0.5, 2.0])
    bits = sp.magnitude_bits(values)
    blocks = [Lazy(i, (len(c),), lambda c=c: c) for i, c in enumerate(bits.split(3))]
    keep = sp.top_k_keep(8, 3, lambda ranks: sp.select(blocks, ranks))
    mask = torch.cat([keep.mask(c, i) for i, c in enumerate(bits.split(3))])
    assert mask.tolist() == [False, True, True, True, False, False, False, False]
    assert torch.equal(mask, sp.top_k_mask(values, 3))


# --- random draws ------------------------------------------------------------------------------------------


def test_dare_draws_are_the_streams_values_at_each_elements_position() -> None:
    """Model m's mask is `uniform < density` over values [m * numel, (m + 1) * numel) of the tensor's stream."""
    x = torch.randn(50, 30)
    stream = RandomStream(9)
    first = sp.RANDOM.whole(x, {"density": 0.3}, False, stream)
    assert torch.equal(first != 0, stream.uniform(0, x.numel()).view(x.shape) < 0.3)
    context = TensorContext(tuple(x.shape), {}, [{"density": 0.3}] * 2, stream)
    deltas = [[Lazy(0, tuple(x.shape), lambda: x)]] * 2
    for model, stats in enumerate(sp.RANDOM.statistics(deltas, [{"density": 0.3}] * 2, False, context)):
        expected = stream.uniform(model * x.numel(), x.numel()).view(x.shape) < 0.3
        assert torch.equal(sp.RANDOM.apply(x, 0, stats) != 0, expected)


@pytest.mark.parametrize("name", ["dare_ties", "della_linear", "ties"])
@pytest.mark.parametrize("rescale", [False, True])
def test_random_masks_read_each_block_once_for_every_model(name: str, rescale: bool) -> None:
    """The statistics scan of a random sparsifier reads a block once for all models (none without a rescale);
    magnitude selection still reads per model and per radix pass."""
    tensors, base = _inputs(name, (12, 5), torch.float32)
    params, model_params = _params(name, len(tensors), rescale=rescale)
    method = get_method(name)
    context = TensorContext(tuple(base.shape), params, model_params, RandomStream(3))
    reads: list[int] = []

    def read(i: int) -> Block:
        reads.append(i)
        rows = (4 * i, 4 * i + 4)
        return Block(context, [x[rows[0] : rows[1]] for x in tensors], base[rows[0] : rows[1]], i, rows)

    method.streamed.statistics(context, [Lazy(i, (4, 5), lambda i=i: read(i)) for i in range(3)])
    if name == "ties":
        assert len(reads) > 3 * len(tensors)
    else:
        assert reads == ([0, 1, 2] if rescale else [])


def test_random_stream_values_do_not_depend_on_where_a_draw_starts() -> None:
    stream = RandomStream(2**100 + 3)
    whole = stream.uniform(0, 1000)
    assert whole.dtype == torch.float32 and float(whole.min()) >= 0 and float(whole.max()) < 1
    for start, count in ((0, 1), (1, 7), (7, 9), (8, 8), (13, 500), (999, 1)):
        assert torch.equal(stream.uniform(start, count), whole[start : start + count])
    assert not torch.equal(RandomStream(1).uniform(0, 64), RandomStream(2).uniform(0, 64))
    with pytest.raises(ValueError, match="seed"):
        RandomStream(-1)


def test_dare_rescale_keeps_each_blocks_mask_packed_and_draws_it_once() -> None:
    """With an L1 rescale the statistics scan draws every block's mask and the apply reuses it bit for bit."""
    x = torch.randn(37, 11)
    stream = RandomStream(4)
    blocks = [(0, 10), (10, 20), (20, 37)]
    lazies = [Lazy(i, (hi - lo, 11), lambda lo=lo, hi=hi: x[lo:hi]) for i, (lo, hi) in enumerate(blocks)]
    context = TensorContext(tuple(x.shape), {}, [{"density": 0.4}], stream)
    (stats,) = sp.RANDOM.statistics([lazies], [{"density": 0.4}], True, context)
    assert all(mask.dtype == np.uint8 for mask in stats.masks)
    assert [mask.size for mask in stats.masks] == [14, 14, 24]  # ceil(rows * 11 / 8) bytes
    streamed = torch.cat([sp.RANDOM.apply(x[lo:hi], i, stats) for i, (lo, hi) in enumerate(blocks)])
    assert torch.equal(streamed, sp.random_drop(x, 0.4, True, stream))
    assert torch.equal(streamed != 0, (stream.uniform(0, x.numel()) < 0.4).view(x.shape) & (x != 0))


# --- the merge engine ----------------------------------------------------------------------------------------


def _spec(seeds, method: str):
    from hf_m2n2.spec import parse_spec

    models = [
        {"model": str(seeds["a"]), "parameters": {"weight": 0.7, "density": 0.5, "epsilon": 0.1}},
        {"model": str(seeds["b"]), "parameters": {"weight": 0.4, "density": 0.3, "epsilon": 0.2}},
    ]
    if method == "slerp":
        models = [{"model": str(seeds["base"])}, {"model": str(seeds["a"])}]
    parameters = {"t": 0.3} if method == "slerp" else {"rescale": True}
    return parse_spec(
        {"merge_method": method, "base_model": str(seeds["base"]), "models": models, "parameters": parameters}
        | ({"dtype": "bfloat16"} if method == "dare_ties" else {})
    )


def _record_reads(monkeypatch) -> dict[str, list[int]]:
    """From now on, the element counts of every read of each seed tensor, by tensor name."""
    from hf_m2n2.checkpoint import Checkpoint

    reads: dict[str, list[int]] = {}
    get = Checkpoint.get

    def spy(self, name, rows=None):
        tensor = get(self, name, rows)
        reads.setdefault(name, []).append(tensor.numel())
        return tensor

    monkeypatch.setattr(Checkpoint, "get", spy)
    return reads


@pytest.mark.parametrize("method", ["slerp", "ties", "dare_ties", "della", "breadcrumbs"])
def test_streamed_merge_is_byte_identical_and_bounded(seeds, tmp_path, monkeypatch, method):
    from hf_m2n2.merge import MergeOptions, merge

    spec = _spec(seeds, method)
    merge(spec, tmp_path / "whole", MergeOptions(progress=False))
    reads = _record_reads(monkeypatch)
    for chunk in (2000, 4096):
        reads.clear()
        options = MergeOptions(progress=False, chunk_elements=chunk, memory_budget=1 << 18)
        merge(spec, tmp_path / f"chunked-{chunk}", options)
        # no tensor is ever read whole: its method sees row blocks only
        assert max(n for sizes in reads.values() for n in sizes) <= chunk
        assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (
            tmp_path / f"chunked-{chunk}" / "model.safetensors"
        ).read_bytes()


def test_work_items_blocks_and_order(seeds):
    from hf_m2n2.materialize import work_items
    from hf_m2n2.plan import plan_merge
    from hf_m2n2.seeds import open_seeds

    spec = _spec(seeds, "ties")
    refs = spec.referenced_models()
    opened = open_seeds(refs)
    try:
        recipe = plan_merge(spec, opened, {r: i for i, r in enumerate(refs)})
    finally:
        for seed in opened:
            seed.checkpoint.close()
    items = work_items(recipe, 1000)
    streams = {}
    for position, item in enumerate(items):
        if item.rows is not None:
            assert (item.rows[1] - item.rows[0]) * math.prod(item.task.shape[1:]) <= 1000
        else:
            assert item.statistics or math.prod(item.task.shape) <= 1000
        if item.stream is not None:
            streams.setdefault(id(item.stream), []).append((position, item))
    assert streams, "the embeddings and MLP weights should be streamed"
    for entries in streams.values():
        first_position, first = entries[0]
        assert first.statistics  # before every block of its tensor
        blocks = [item for _, item in entries[1:]]
        assert not any(item.statistics for item in blocks)
        assert sorted(item.block for item in blocks) == list(range(len(first.stream.blocks)))
    assert sum(1 for item in items if item.statistics) == len(streams)
    assert {item.task.name for item in items} == {task.name for task in recipe.tasks}


def test_statistics_error_reaches_the_caller_without_hanging(seeds, tmp_path, monkeypatch):
    from hf_m2n2 import plan
    from hf_m2n2.merge import MergeOptions, merge
    from hf_m2n2.methods import MethodParameterError
    from hf_m2n2.spec import parse_spec

    spec = parse_spec(
        {
            "merge_method": "della",
            "base_model": str(seeds["base"]),
            "models": [
                {"model": str(seeds["a"]), "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.6}}
            ],
        }
    )
    # planning rejects this epsilon before any tensor is read (test_parameter_checks); switched off here so the
    # error is raised where this test wants it, inside a worker's statistics scan
    monkeypatch.setattr(plan, "_raise_problem", lambda *args: None)
    with pytest.raises(MethodParameterError, match="epsilon"):
        merge(spec, tmp_path / "out", MergeOptions(progress=False, chunk_elements=1000))
    assert not (tmp_path / "out").exists()


def test_slerp_reads_each_tensor_once_when_it_fits_the_chunk(seeds, tmp_path, monkeypatch):
    """Slerp's blocks hold only inputs and output, so a tensor of up to `chunk_elements` is one item, read once;
    task-vector methods, whose blocks hold temporaries per model, stream it (statistics scans, then apply)."""
    from safetensors.torch import load_file

    from hf_m2n2.merge import MergeOptions, merge

    sizes = {name: t.numel() for name, t in load_file(seeds["base"] / "model.safetensors").items()}
    biggest = max(sizes, key=sizes.get)
    largest = sizes[biggest]
    reads = _record_reads(monkeypatch)
    options = MergeOptions(progress=False, chunk_elements=largest)
    merge(_spec(seeds, "slerp"), tmp_path / "slerp", options)
    assert all(read == [sizes[name]] * 2 for name, read in reads.items())  # base and model, each whole, once
    reads.clear()
    merge(_spec(seeds, "ties"), tmp_path / "ties", options)
    assert max(reads[biggest]) < largest  # in row blocks
    assert sum(reads[biggest]) > 3 * largest  # base and two models, each read more than once
