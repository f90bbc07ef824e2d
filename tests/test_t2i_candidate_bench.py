"""bench/t2i_candidate_bench.py on a small SDXL-family UNet: it writes real candidates through the evolve path
(checked per segment against the formula, a wrong one is caught), reports the figures it promises, and deletes its
data when asked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import sdxl_synthetic as synthetic  # noqa: E402
import t2i_candidate_bench as bench  # noqa: E402

# SDXL's family and block layout with one transformer layer per attention block (~11M parameters)
TINY_SDXL = {**synthetic.unet_config(32), "transformer_layers_per_block": [1, 1, 1]}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "unet.json"
    path.write_text(json.dumps(TINY_SDXL))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The bench's --work: seeds built once (by the first test), deleted by the last."""
    return tmp_path_factory.mktemp("work")


def test_random_blend_has_the_asked_segments_of_convex_coefficients():
    from hf_m2n2.blend import SeedLayout

    layout = SeedLayout([("a", (100, 10)), ("b", (37,))], 64)
    blend = bench.random_blend(layout, 3, 5, seed=0)
    assert len(blend.coefs) == 5 and blend.coefs.shape == (5, 3)
    assert blend.breakpoints[0] == 0 and blend.breakpoints[-1] == layout.num_blocks
    assert np.all(np.diff(blend.breakpoints) > 0)
    assert np.allclose(blend.coefs.sum(axis=1), 1.0) and np.all(blend.coefs >= 0)
    assert np.array_equal(bench.random_blend(layout, 3, 5, seed=0).coefs, blend.coefs)  # seeded
    assert len(bench.random_blend(layout, 2, 100, seed=1).coefs) == layout.num_blocks  # at most one per block


def _run(config_file: Path, work: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    argv = ["--config", str(config_file), "--work", str(work), "--repeats", "2", "--segments", "6"]
    result = bench.main([*argv, "--block-size", "4096", "--bandwidth-mb", "32", "--json", str(out), *extra])
    assert json.loads(out.read_text()) == result
    return result


def _check_figures(result: dict, k: int, resident: bool) -> None:
    assert (result["seeds"], result["resident"], result["dtype"]) == (k, resident, "bfloat16")
    assert len(result["candidate_s"]) == 2 and result["candidate_median_s"] > 0
    assert result["segments_checked"] >= 1
    assert result["live_unet_gb"] == pytest.approx(result["params"] * 2 / 1e9)
    bound = (k + 1) * result["live_unet_gb"] / result["copy_bandwidth_gbps"]
    assert result["bound_s"] == pytest.approx(bound)
    assert result["fraction_of_bound"] == pytest.approx(bound / result["candidate_median_s"])


def test_bench_reads_seeds_per_candidate_by_default(config_file, work, tmp_path):
    result = _run(config_file, work, tmp_path)
    _check_figures(result, 2, False)
    assert (result["gram_s"], result["resident_load_s"], result["unet_step_s"]) == (None, None, [])


def test_check_segments_catches_a_candidate_that_was_not_written(work):
    import torch

    from hf_m2n2.blend_ops import BlendTarget, SeedTensors, evolved_layout
    from hf_m2n2.live_pipeline import LivePipeline
    from hf_m2n2.seeds import close_seeds, open_seeds

    data = work / "t2i_sdxl" / "custom"  # the bench's seeds (same parameters: reused as they are)
    built = synthetic.build_sdxl_seeds(data, 0.0, config=TINY_SDXL, sgm=False, log=lambda *_: None)
    assert built.sgm_files == [] and not (data / "sgm").exists()
    seeds = open_seeds([str(f) for f in built.folders[:2]])
    try:
        names = [n for n in seeds[0].checkpoint.names if n.startswith("unet/")]
        layout = evolved_layout(seeds, names, 4096)
        live = LivePipeline(seeds[0], dtype=torch.bfloat16)
        tensors = SeedTensors(seeds, names, torch.bfloat16, "cpu")
        written, other = (bench.random_blend(layout, 2, 4, seed=s) for s in (0, 1))
        BlendTarget(layout, tensors, live).write(written)
        assert bench.check_segments(written, layout, live, tensors) >= 1
        with pytest.raises(AssertionError, match="not the segment's blend"):
            bench.check_segments(other, layout, live, tensors)
    finally:
        close_seeds(seeds)


def test_bench_with_resident_seeds_on_the_device_and_its_options(config_file, work, tmp_path):
    extra = [
        "--seeds",
        "3",
        "--resident",
        "--gram",
        "--unet-steps",
        "1",
        "--resolution",
        "64",
        "--delete-data",
    ]
    result = _run(config_file, work, tmp_path, *extra)
    _check_figures(result, 3, True)
    assert result["gram_s"] > 0 and result["resident_load_s"] > 0 and len(result["unet_step_s"]) == 1
    assert not (work / "t2i_sdxl" / "custom").exists()
