"""Run one sd-mecha merge of SDXL sgm single files (the other side of bench/pipeline_merge_bench.py).

Runs in sd-mecha's own virtual environment (it pins its own dependencies); imports only sd_mecha and torch:

    .venv-sdmecha/bin/python bench/sdmecha_merge.py RECIPE OUT.safetensors A B [C] [--alpha X] [--k X]

Recipes (A, B, C are single files in the sdxl-sgm layout; sd-mecha computes in float32, writes float16):
  weighted_sum    lerp(A, B, alpha)                              (sd_mecha.weighted_sum)
  add_difference  A + alpha (B - C)                              (sd_mecha.add_difference)
  ties            A + alpha ties_sum(B - A, C - A, k, vote_sgn)  (subtract -> ties_sum -> add_difference by
                  hand: sd_mecha.add_difference_ties raises AttributeError in 1.1.8); k is the fraction kept,
                  vote_sgn=True elects the sign of the summed deltas (TIES' and mergekit's rule) rather than
                  of the count of signs
  slerp           slerp(A, B, alpha) of each whole tensor, rescaled by lerp(|A|, |B|, alpha)  (sd_mecha.slerp)
"""

from __future__ import annotations

import argparse
import sys
import time

RECIPES = ("weighted_sum", "add_difference", "ties", "slerp")
CONFIG = "sdxl-sgm"


class Quiet:
    """A tqdm stand-in that shows nothing (sd-mecha takes the progress-bar class as an argument)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> Quiet:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass


def recipe(name: str, inputs: list[str], alpha: float, k: float):
    """The sd-mecha recipe node of `name` over `inputs`."""
    import sd_mecha
    from sd_mecha.extensions.builtin.merge_methods import linear

    models = [sd_mecha.model(path, CONFIG) for path in inputs]
    if name == "weighted_sum":
        return sd_mecha.weighted_sum(models[0], models[1], alpha=alpha)
    if name == "add_difference":
        return sd_mecha.add_difference(models[0], models[1], models[2], alpha=alpha)
    if name == "ties":
        base, *others = models
        deltas = [sd_mecha.subtract(m, base) for m in others]
        merged = sd_mecha.ties_sum(*deltas, k=k, vote_sgn=True)
        # the merge method itself: the add_difference wrapper compares merge spaces of a node that has none yet
        return linear.add_difference(base, merged, alpha=alpha)
    if name == "slerp":
        return sd_mecha.slerp(models[0], models[1], alpha=alpha)
    raise SystemExit(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=RECIPES)
    parser.add_argument("out")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--alpha", type=float, required=True)
    parser.add_argument("--k", type=float, default=1.0)
    parser.add_argument("--threads", type=int, help="sd-mecha's merge threads (default: its own choice)")
    args = parser.parse_args(argv)
    import sd_mecha
    import torch

    node = recipe(args.recipe, args.inputs, args.alpha, args.k)
    options = {} if args.threads is None else {"threads": args.threads}
    start = time.perf_counter()
    sd_mecha.merge(
        node, output=args.out, merge_dtype=torch.float32, output_dtype=torch.float16, tqdm=Quiet, **options
    )
    print(f"sd-mecha {args.recipe}: merged in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
