"""bench/pipeline_merge_bench.py and its seeds: the synthetic SDXL pipeline loads and generates with diffusers, its
sgm single file holds the same UNet (read back through diffusers' own single-file loader), the comparison counts
float16 ulps against the other tool and against each recipe's formula, and (with sd-mecha's venv) both tools'
weighted sums of the seeds agree within one ulp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import pipeline_merge_bench as bench  # noqa: E402
import sdxl_synthetic as synthetic  # noqa: E402

# SDXL's family and block layout (text_time embedding, 2048-wide cross-attention, 64-wide heads, two resnets per
# block) with one transformer layer per attention: its keys are a subset of SDXL base's (sd-mecha drops keys its
# sdxl-sgm config does not list, so layers_per_block must stay 2); ~11M parameters.
TINY_SDXL = {**synthetic.unet_config(32), "transformer_layers_per_block": [1, 1, 1]}
SDMECHA_PYTHON = bench.find_sdmecha_python(None)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> synthetic.SdxlSeeds:
    root = tmp_path_factory.mktemp("sdxl") / "data"
    return synthetic.build_sdxl_seeds(root, 0.0, config=TINY_SDXL, log=lambda *_: None)


def _unet(seeds: synthetic.SdxlSeeds, i: int) -> dict[str, torch.Tensor]:
    return load_file(seeds.unet_files(i)[0])


def test_seed_is_an_sdxl_pipeline_that_generates(seeds):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    pipe = DiffusionPipeline.from_pretrained(str(seeds.folders[0]))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    folder = _unet(seeds, 0)
    assert all(torch.equal(p.half(), folder[n]) for n, p in pipe.unet.state_dict().items())
    pipe.to(torch.float32)
    image = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert json.loads((seeds.folders[1] / "unet" / "config.json").read_text()) == TINY_SDXL


def test_sgm_file_is_the_same_unet_through_diffusers_single_file_loader(seeds):
    from diffusers import UNet2DConditionModel

    for i in (0, 2):
        unet = UNet2DConditionModel.from_single_file(
            str(seeds.sgm_files[i]), config=str(seeds.folders[i]), subfolder="unet", torch_dtype=torch.float16
        )
        folder = _unet(seeds, i)
        loaded = unet.state_dict()
        assert set(loaded) == set(folder)
        assert all(torch.equal(loaded[n], folder[n]) for n in folder)


def test_fine_tunes_are_the_base_plus_small_noise(seeds):
    base, ft1, ft2 = (_unet(seeds, i) for i in range(3))
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    delta1, delta2 = (ft[name].float() - base[name].float() for ft in (ft1, ft2))
    assert abs(float(base[name].float().std()) - synthetic.WEIGHT_STD) < 0.05 * synthetic.WEIGHT_STD
    assert abs(float(delta1.std()) - synthetic.DELTA_STD) < 0.05 * synthetic.DELTA_STD
    assert abs(float(torch.corrcoef(torch.stack([delta1.flatten(), delta2.flatten()]))[0, 1])) < 0.05
    norm = "mid_block.resnets.0.norm1.weight"
    assert abs(float(base[norm].float().mean()) - 1.0) < 0.01


def test_ulp_stats():
    a = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.float16)
    b = a.clone()
    b[0] = torch.nextafter(a[0], torch.tensor(2.0, dtype=torch.float16))  # one ulp up
    b[1] = -2.0 - 3 * 2.0**-9  # float16's ulp in [2, 4) is 2^-9: three ulps down
    b[2] = -0.0  # the other zero: one step on the ordered scale
    assert bench.ulp_stats(a, b) == (3, 1, 3)
    assert bench.ulp_stats(a, a) == (0, 0, 0)


def _write_outputs(seeds, tmp_path: Path, nudge: dict[str, tuple[int, float]]) -> tuple[Path, Path]:
    """An hf-m2n2-like output folder holding the exact weighted sum, and an sd-mecha-like sgm file holding the same
    values with `nudge` (name -> (flat index, added value)) applied."""
    x = [_unet(seeds, i) for i in bench.RECIPES["weighted_sum"].inputs]
    exact = {n: torch.lerp(x[0][n].double(), x[1][n].double(), bench.ALPHA).half() for n in x[0]}
    ours = tmp_path / "ours"
    (ours / "unet").mkdir(parents=True)
    save_file(exact, str(ours / "unet" / "diffusion_pytorch_model.safetensors"))
    theirs = {}
    for name, tensor in exact.items():
        t = tensor.clone()
        if name in nudge:
            index, value = nudge[name]
            t.view(-1)[index] += value
        theirs[seeds.key_map[name]] = t
    save_file(theirs, str(tmp_path / "sdmecha.safetensors"))
    return ours, tmp_path / "sdmecha.safetensors"


def test_compare_outputs_maps_sgm_keys_and_counts_ulps_against_the_formula(seeds, tmp_path):
    name = "conv_in.weight"
    x = _unet(seeds, 1)[name].view(-1)
    value = float(torch.lerp(x[0].double(), _unet(seeds, 2)[name].view(-1)[0].double(), bench.ALPHA).half())
    ulp = 2.0 ** (torch.frexp(torch.tensor(value)).exponent.item() - 11)
    ours, theirs = _write_outputs(seeds, tmp_path, {name: (0, 3 * ulp)})
    inputs = [seeds.unet_files(i)[0] for i in bench.RECIPES["weighted_sum"].inputs]
    d = bench.compare_outputs(ours, theirs, seeds.key_map, inputs, "weighted_sum")
    assert d.n_tensors == len(seeds.key_map) and not (d.missing_in_ours or d.missing_in_sdmecha)
    assert (d.n_diff, d.n_diff_gt_1ulp, d.max_ulp, d.max_abs_tensor) == (1, 1, 3, name)
    # the formula in float32 rounds to float16 within one ulp of the float64 value written as "ours"
    assert d.reference["hf-m2n2 vs exact"][0] == 0 and d.reference["sd-mecha vs exact"] == [1, 3]
    assert d.formula_tensors == len(seeds.key_map)


def test_ties_formula_is_sdmecha_rule_and_marks_sign_ties():
    base = torch.zeros(4)
    models = [torch.tensor([0.5, -0.1, 0.2, 0.0]), torch.tensor([0.4, 0.3, -0.2, 0.1])]
    # k 0.3 of 4: each keeps |delta| >= its 2nd smallest; signs elected by the sum of the kept deltas; the mean
    # of the agreeing ones; element 2's kept deltas cancel: no sign, the base
    merged = bench._ties_sdmecha([base, *models])
    torch.testing.assert_close(merged, torch.tensor([0.45, 0.3, 0.0, 0.0]))
    assert bench.ties_tie_positions([base, *models])[2]


@pytest.mark.skipif(SDMECHA_PYTHON is None, reason="sd-mecha's venv (.venv-sdmecha) not found")
def test_both_tools_weighted_sum_agree_within_one_ulp(seeds, tmp_path):
    import yaml

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(bench.hf_spec("weighted_sum", seeds.folders)))
    ours = tmp_path / "ours"
    cli = "import sys; from hf_m2n2.cli import main; sys.exit(main())"
    run = subprocess.run(
        [sys.executable, "-c", cli, "merge", str(spec), str(ours), "-q"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    theirs = tmp_path / "sdmecha.safetensors"
    args = bench.sdmecha_args("weighted_sum", seeds.sgm_files)
    run = subprocess.run(
        [SDMECHA_PYTHON, str(BENCH / "sdmecha_merge.py"), "weighted_sum", str(theirs), *args],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    inputs = [seeds.unet_files(i)[0] for i in bench.RECIPES["weighted_sum"].inputs]
    d = bench.compare_outputs(ours, theirs, seeds.key_map, inputs, "weighted_sum")
    assert d.n_tensors == len(seeds.key_map) and d.n_elements == seeds.params
    assert d.n_diff_gt_1ulp == 0
    assert set(d.reference) == {"hf-m2n2 vs exact", "sd-mecha vs exact"}
    assert all(n_far == 0 for n_far, _ in d.reference.values())
