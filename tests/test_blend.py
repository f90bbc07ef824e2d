"""The Blend genome: crossover computed from Gram prefix sums equals dense SLERP on the flattened vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_m2n2.blend import Blend, SeedLayout, crossover, gram_prefix, iter_blend, select_tensors
from hf_m2n2.checkpoint import Checkpoint


def _dense_slerp(x, y, t, eps=1e-6):
    cos = float(np.clip(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), -1, 1))
    omega = np.arccos(cos)
    if abs(np.sin(omega)) < eps:
        return (1 - t) * x + t * y
    return (np.sin((1 - t) * omega) * x + np.sin(t * omega) * y) / np.sin(omega)


def _dense_crossover(x, y, w, split_at, scope, tensor_bounds):
    """Reference: M2N2 crossover on flat float64 vectors (t = w before split_at, 1 - w after)."""
    n = len(x)
    if scope == "global":
        regions = [(0, n)]
    elif scope == "segment":
        regions = [(0, split_at), (split_at, n)]
    else:
        regions = list(zip(tensor_bounds[:-1], tensor_bounds[1:]))
    out = np.empty_like(x)
    for lo, hi in regions:
        xs, ys = x[lo:hi], y[lo:hi]
        if scope == "global":
            xs_full, ys_full = x, y
        else:
            xs_full, ys_full = xs, ys
        cos = float(np.clip(xs_full @ ys_full / (np.linalg.norm(xs_full) * np.linalg.norm(ys_full)), -1, 1))
        omega = np.arccos(cos)
        for a, b in ((lo, min(hi, split_at)), (max(lo, split_at), hi)):
            if a >= b:
                continue
            t = w if a < split_at else 1 - w
            if abs(np.sin(omega)) < 1e-6:
                out[a:b] = (1 - t) * x[a:b] + t * y[a:b]
            else:
                out[a:b] = (np.sin((1 - t) * omega) * x[a:b] + np.sin(t * omega) * y[a:b]) / np.sin(omega)
    return out


@pytest.fixture(scope="module")
def small_model(seeds):
    ckpts = [Checkpoint(seeds["a"]), Checkpoint(seeds["b"])]
    names = select_tensors(ckpts[0].names, exclude=["lm_head.weight"])
    layout = SeedLayout([(n, ckpts[0].info(n).shape) for n in names], block_size=1000)
    read = lambda k, name: ckpts[k].get(name)  # noqa: E731
    gram = gram_prefix(layout, read, 2)
    flat = [
        np.concatenate([read(k, t.name).double().reshape(-1).numpy() for t in layout.tensors])
        for k in range(2)
    ]
    return layout, read, gram, flat


def _materialize(blend, layout, read):
    return np.concatenate([t.double().reshape(-1).numpy() for _, t in iter_blend(blend, layout, read, 2)])


@pytest.mark.parametrize("scope", ["global", "segment", "tensor"])
def test_crossover_chain_equals_dense_slerp(small_model, scope):
    layout, read, gram, (a, b) = small_model
    tensor_bounds = [int(layout.block_starts[i]) for i in layout.tensor_boundaries]
    rng = np.random.default_rng(0)
    blends = [Blend.seed(0, 2, layout.num_blocks), Blend.seed(1, 2, layout.num_blocks)]
    dense = [a, b]
    for _ in range(5):
        i, j = rng.choice(len(blends), size=2, replace=False)
        w = float(rng.uniform())
        split = layout.snap(rng.uniform(0, layout.num_params))
        blends.append(crossover(blends[i], blends[j], w, split, gram, layout, scope))
        split_at = int(layout.block_starts[split])
        dense.append(_dense_crossover(dense[i], dense[j], w, split_at, scope, tensor_bounds))
    got = _materialize(blends[-1], layout, read)
    np.testing.assert_allclose(got, dense[-1], rtol=1e-5, atol=1e-6)
    assert blends[-1].nbytes < 64 * 1024


def test_seed_blend_materializes_the_seed(small_model):
    layout, read, _, (a, _) = small_model
    np.testing.assert_array_equal(_materialize(Blend.seed(0, 2, layout.num_blocks), layout, read), a)


def test_no_split_is_plain_slerp_and_w_endpoints(small_model):
    layout, read, gram, (a, b) = small_model
    x, y = Blend.seed(0, 2, layout.num_blocks), Blend.seed(1, 2, layout.num_blocks)
    child = crossover(x, y, 0.3, layout.snap(layout.num_params / 2), gram, layout, use_split=False)
    np.testing.assert_allclose(
        _materialize(child, layout, read), _dense_slerp(a, b, 0.3), rtol=1e-5, atol=1e-6
    )
    assert len(child.coefs) == 1  # one segment: no split point
    same = crossover(x, x, 0.7, 5, gram, layout)  # parallel vectors: the lerp fallback gives the parent back
    np.testing.assert_allclose(_materialize(same, layout, read), a, rtol=1e-6, atol=1e-7)


def test_split_points_snap_to_block_and_tensor_boundaries():
    layout = SeedLayout([("a", (10,)), ("b", (2, 7))], block_size=4)
    assert layout.block_starts.tolist() == [0, 4, 8, 10, 14, 18, 22, 24]
    assert layout.tensor_boundaries.tolist() == [0, 3, 7]
    assert layout.snap(9.2) == 3 and layout.snap(11) == 3 and layout.snap(13) == 4 and layout.snap(24) == 7


def test_member_size_does_not_grow_with_model_size():
    """A 7B-sized synthetic layout (no weights allocated): members stay kilobytes after many crossovers."""
    hidden, inter, layers, vocab = 4096, 11008, 32, 32000
    tensors = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [(p + n, (hidden, hidden)) for n in ("q", "k", "v", "o")]
        tensors += [(p + "gate", (inter, hidden)), (p + "up", (inter, hidden)), (p + "down", (hidden, inter))]
        tensors += [(p + "in_norm", (hidden,)), (p + "post_norm", (hidden,))]
    tensors += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    layout = SeedLayout(tensors, block_size=1 << 20)
    assert layout.num_params > 6.7e9
    rng = np.random.default_rng(1)
    gram = np.cumsum(
        np.concatenate([np.zeros((1, 2, 2)), np.tile(np.eye(2) + 0.5, (layout.num_blocks, 1, 1))]), 0
    )
    archive = [Blend.seed(0, 2, layout.num_blocks), Blend.seed(1, 2, layout.num_blocks)]
    for _ in range(200):
        i, j = rng.choice(len(archive), size=2, replace=False)
        child = crossover(
            archive[i],
            archive[j],
            rng.uniform(),
            layout.snap(rng.uniform(0, layout.num_params)),
            gram,
            layout,
        )
        archive = (archive + [child])[-20:]
    assert max(m.nbytes for m in archive) <= 64 * 1024


def test_blend_materializes_into_existing_tensor(small_model):
    layout, read, _, _ = small_model
    blend = Blend(np.array([0, 3, layout.num_blocks]), np.array([[0.25, 0.75], [1.0, -1.0]]))
    t = layout.tensors[0]
    from hf_m2n2.blend import blend_tensor

    out = torch.zeros(t.shape, dtype=torch.bfloat16)
    blend_tensor(blend, t, layout, [read(0, t.name), read(1, t.name)], out=out)
    expected = blend_tensor(blend, t, layout, [read(0, t.name), read(1, t.name)])
    assert torch.equal(out, expected.to(torch.bfloat16))
