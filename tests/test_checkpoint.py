"""Lazy reading and the streaming sharded writer, checked against the safetensors library itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from hf_m2n2.checkpoint import Checkpoint
from hf_m2n2.errors import CheckpointError, OutputError
from hf_m2n2.writer import PlannedTensor, ShardedSafetensorsWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 33, generator=g),
        "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(5, dtype=torch.int64),
        "d.half": torch.randn(3, 3, generator=g).to(torch.float16),
    }


def test_writer_out_of_order_sharded_roundtrip(tmp_path):
    tensors = _tensors()
    planned = [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, planned, max_shard_bytes=4096)
    for name in reversed(list(tensors)):  # any order, as threads finish
        writer.write(name, tensors[name])
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(set(index["weight_map"].values())) == 2
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])
            assert f.metadata() == {"format": "pt"}
    ckpt = Checkpoint(tmp_path)
    assert sorted(ckpt.names) == sorted(tensors)
    assert ckpt.info("b.bias").dtype == torch.bfloat16 and ckpt.info("a.weight").shape == (64, 33)
    assert torch.equal(ckpt.get("d.half"), tensors["d.half"])


def test_single_shard_has_no_index(tmp_path):
    tensors = _tensors()
    writer = ShardedSafetensorsWriter(
        tmp_path,
        [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()],
        max_shard_bytes=10**9,
    )
    for name, t in tensors.items():
        writer.write(name, t)
    writer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_writer_refuses_unplanned_and_missing(tmp_path):
    writer = ShardedSafetensorsWriter(
        tmp_path, [PlannedTensor("x", (2,), torch.float32)], max_shard_bytes=100
    )
    with pytest.raises(OutputError, match="not planned"):
        writer.write("y", torch.zeros(2))
    with pytest.raises(OutputError, match="planned 8"):
        writer.write("x", torch.zeros(3))
    with pytest.raises(OutputError, match="never written"):
        writer.finish()
    writer.abort()


def test_reader_is_lazy_and_reports_missing(tmp_path, seeds):
    ckpt = Checkpoint(seeds["a"])
    assert "model.norm.weight" in ckpt and ckpt.info("model.norm.weight").nbytes == 64 * 4
    with pytest.raises(CheckpointError, match="'nope' not found"):
        ckpt.get("nope")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("direct", [True, False])
def test_writer_rows_in_any_order_direct_or_buffered(tmp_path, monkeypatch, direct):
    """Direct I/O writes whole aligned blocks: pieces of rows at odd offsets, in any order and from several
    threads, must still give exactly the bytes the safetensors library reads back (and page-cache writes too)."""
    from concurrent.futures import ThreadPoolExecutor

    from hf_m2n2 import writer as writer_module

    if not direct:
        monkeypatch.delattr(writer_module.os, "O_DIRECT", raising=False)
    g = torch.Generator().manual_seed(1)
    tensors = {
        "big": torch.randn(1001, 37, generator=g).to(torch.bfloat16),  # blocks straddle 4 KiB boundaries
        "odd": torch.randn(3, 5, generator=g),
        "empty": torch.zeros(0, 4),
        "tail": torch.randn(777, 13, generator=g).to(torch.float16),
    }
    planned = [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, planned, max_shard_bytes=60_000)
    files = {type(f).__name__ for f in writer._files.values()}
    if direct and files != {"_DirectFile"}:
        pytest.skip("this file system does not support direct I/O")
    assert files == ({"_DirectFile"} if direct else {"_BufferedFile"})
    pieces = [(n, t, 0) for n, t in tensors.items() if t.shape[0] < 100]
    for name in ("big", "tail"):
        t = tensors[name]
        pieces += [(name, t[start : start + 97], start) for start in range(0, t.shape[0], 97)]
    order = torch.randperm(len(pieces), generator=g).tolist()
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda i: writer.write(pieces[i][0], pieces[i][1], pieces[i][2]), order))
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])
