"""LiveModel: weights written in place give the same model as loading the source, resident or offloaded."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_m2n2.checkpoint import Checkpoint
from hf_m2n2.live import LiveModel

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def reference_b(seeds):
    return _logits(AutoModelForCausalLM.from_pretrained(str(seeds["b"])).eval())


def _write_all(live, seed_dir):
    ckpt = Checkpoint(seed_dir)
    for name in ckpt.names:
        live.write(name, ckpt.get(name))


def test_resident_model_is_filled_without_random_init(seeds):
    live = LiveModel(seeds["a"])
    assert torch.equal(
        _logits(live.model), _logits(AutoModelForCausalLM.from_pretrained(str(seeds["a"])).eval())
    )


def test_in_place_writes_replace_the_model(seeds, reference_b):
    live = LiveModel(seeds["a"])
    params_before = {n: p.data_ptr() for n, p in live.model.named_parameters()}
    _write_all(live, seeds["b"])
    assert torch.equal(_logits(live.model), reference_b)
    assert {n: p.data_ptr() for n, p in live.model.named_parameters()} == params_before  # in place


def test_disk_and_cpu_offload_with_small_memory_budget(seeds, reference_b, tmp_path):
    live = LiveModel(seeds["a"], max_memory={"cpu": "300KB"}, offload_folder=tmp_path / "offload")
    assert set(live.device_map.values()) == {"cpu", "disk"}
    _write_all(live, seeds["b"])
    assert torch.equal(_logits(live.model), reference_b)
