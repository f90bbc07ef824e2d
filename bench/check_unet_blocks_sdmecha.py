"""Compare `hf_m2n2.unet_blocks` with sd-mecha's supermerger block assignment, key by key.

Two steps, two virtual environments (sd-mecha pins its own dependencies):

1. ``dump`` (in the sd-mecha venv; imports only sd_mecha, torch): runs sd-mecha's own conversion
   ``convert(literal({block: index}, "<family>-supermerger_blocks"), "<family>-ldm|sgm")`` through
   ``sd_mecha.merge`` and records, for every key of the original checkpoint layout, the block whose value
   came out. The assignment is observed by running sd-mecha, not read from its source.
2. ``compare`` (in the project venv): converts every UNet key of that dump to its diffusers name with
   diffusers' ``convert_ldm_unet_checkpoint`` (stand-in values: the original key itself), asks
   ``unet_block_of`` for the block of each diffusers key, and prints the agreement per family.

Usage::

    .venv-sdmecha/bin/python bench/check_unet_blocks_sdmecha.py dump /tmp/sdmecha_blocks.json
    .venv/bin/python bench/check_unet_blocks_sdmecha.py compare /tmp/sdmecha_blocks.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

# sd-mecha's block config -> the full-checkpoint config its conversion targets.
FAMILIES = {"sd1": ("sd1-supermerger_blocks", "sd1-ldm"), "sdxl": ("sdxl-supermerger_blocks", "sdxl-sgm")}
UNET_PREFIX = "model.diffusion_model."


def dump(path: Path) -> None:
    """Run sd-mecha's blocks -> checkpoint conversion with one distinct value per block; write key -> block."""
    import sd_mecha
    import torch
    from sd_mecha.extensions import model_configs
    from sdmecha_merge import Quiet  # bench/, this script's folder

    result: dict[str, dict] = {}
    for family, (blocks_config, target_config) in FAMILIES.items():
        blocks = list(model_configs.resolve(blocks_config).keys())
        values = {name: torch.tensor(float(index)) for index, name in enumerate(blocks)}
        recipe = sd_mecha.convert(sd_mecha.literal(values, blocks_config), target_config)
        out: dict[str, torch.Tensor] = {}
        sd_mecha.merge(
            recipe,
            output=out,
            merge_dtype=torch.float64,
            output_dtype=torch.float64,
            threads=1,
            check_finite_output=False,
            tqdm=Quiet,
        )
        assignment = {key: blocks[int(value.item())] for key, value in out.items()}
        result[family] = {"blocks": blocks, "keys": assignment}
        print(f"{family}: {len(assignment)} keys, blocks {blocks}", file=sys.stderr)
    path.write_text(json.dumps(result, indent=1, sort_keys=True))


def _config(family: str) -> dict:
    """The diffusers UNet config of the released model of a family."""
    from hf_m2n2.pipeline_families import RELEASED_UNET_CONFIGS

    return RELEASED_UNET_CONFIGS[family]


def _keys(config: dict) -> list[str]:
    """The UNet's state-dict keys (built on the meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return list(UNet2DConditionModel.from_config(config).state_dict())


def compare(path: Path) -> int:
    """Print, per family, how many UNet keys get the same block from sd-mecha and from unet_block_of."""
    # This checkout's hf_m2n2 and tests, not an installed copy.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from hf_m2n2.unet_blocks import unet_block_map, unet_block_names

    dumped = json.loads(path.read_text())
    failures = 0
    for family, dump_of_family in dumped.items():
        assignment = dump_of_family["keys"]
        config = _config(family)
        # Stand-in values: each original key carries its own name through diffusers' conversion.
        original = {key: key for key in assignment if key.startswith(UNET_PREFIX)}
        converted = convert_ldm_unet_checkpoint(original, config)
        ours = unet_block_map(config, converted)
        model_keys = _keys(config)
        names = unet_block_names(config)
        # sd-mecha's vocabulary has VAE for SDXL (first_stage_model.*), which is no UNet block.
        vocabulary = [block for block in dump_of_family["blocks"] if block != "VAE"]
        differ = {
            key: (assignment[source], ours[key])
            for key, source in converted.items()
            if assignment[source] != ours[key]
        }
        unconverted = sorted(set(original) - set(converted.values()))
        other_blocks = Counter(
            (key.split(".")[0], block) for key, block in assignment.items() if not key.startswith(UNET_PREFIX)
        )
        print(
            f"{family}: {len(converted) - len(differ)}/{len(converted)} diffusers UNet keys agree "
            f"(original UNet keys {len(original)}, not converted by diffusers {len(unconverted)}; "
            f"converted = the diffusers model's keys: {set(converted) == set(model_keys)})"
        )
        print(f"  unet_block_names == sd-mecha's blocks without VAE: {names == vocabulary}")
        failures += names != vocabulary or set(converted) != set(model_keys)
        for key, (theirs, mine) in sorted(differ.items()):
            print(f"  differ: {key}: sd-mecha {theirs}, unet_block_of {mine}")
        for key in unconverted:
            print(f"  not a diffusers UNet key: {key} (sd-mecha {assignment[key]})")
        for (top, block), count in sorted(other_blocks.items()):
            print(f"  non-UNet keys: {top}.* -> {block} ({count} keys)")
        failures += len(differ)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["dump", "compare"])
    parser.add_argument("json", type=Path)
    args = parser.parse_args()
    if args.step == "dump":
        dump(args.json)
        return 0
    return compare(args.json)


if __name__ == "__main__":
    sys.exit(main())
