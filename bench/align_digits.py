"""Models of different initializations on the digits world: one-shot merges after alignment, and M2N2 from
aligned seeds.

    python bench/align_digits.py [--pairs 42 43 44] [--runs 3] [--out out/align_digits]

Part 1, one-shot merges of the M2N2 reference's pretrained seed pairs (`digits.pretrained_seeds(seed)`: two
64-256-10 MLPs from different random initializations, trained 10 Adam steps on the digits 0-4 and 5-9): plain
averaging, averaging after weight matching or after a permutation alignment, ZipIt! (alpha and beta chosen on a
validation split, the last 20% of the training images; never on the test split), ZipIt! with beta = 0, and the
ensemble (softmax average). Test accuracy, 10-way (joint) and per task (the 0-4 images among the classes 0-4, the
5-9 images among 5-9).

Part 2, M2N2 at 10,000 forward passes from the raw pretrained seeds against the same seeds with B aligned to A
(permute; weight matching), and with their ZipIt! merge added to the initial archive; `--runs` run seeds each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
GRID = [(alpha, beta) for alpha in (0.3, 0.6, 1.0) for beta in (0.0, 0.125, 0.5)]


def accuracies(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Joint (10-way) and per-task (0-4 among 0-4, 5-9 among 5-9) accuracy of (10 x n) logits."""
    joint = float((logits.argmax(0) == labels).float().mean())
    low = labels < 5
    task_a = float((logits[:5, low].argmax(0) == labels[low]).float().mean())
    task_b = float((logits[5:, ~low].argmax(0) + 5 == labels[~low]).float().mean())
    return {"joint": joint, "0-4": task_a, "5-9": task_b}


def one_shot(pair_seed: int) -> dict[str, dict[str, float]]:
    """Part 1 for one seed pair: every method's test accuracies (ZipIt!'s settings chosen on validation)."""
    from hf_m2n2.demo.tasks import digits
    from hf_m2n2.demo.tasks import digits_align as da

    data = digits.load_data()
    a, b = digits.pretrained_seeds(seed=pair_seed)
    cut = int(len(data.y_train) * 0.8)
    x_val, y_val = data.x_train[cut:], data.y_train[cut:]

    def logits(v, x):
        with torch.no_grad():
            return digits.logits_t(torch.as_tensor(v), x)

    def validation(v) -> float:
        return accuracies(logits(v, x_val), y_val)["joint"]

    best = max(GRID, key=lambda ab: (validation(da.zipped(a, b, alpha=ab[0], beta=ab[1])), -ab[0], -ab[1]))
    merged = {
        "seed A (0-4)": a,
        "seed B (5-9)": b,
        "averaging": (a + b) / 2,
        "weight matching + averaging": (a + da.align(a, b, "weight_matching")) / 2,
        "permutation + averaging": (a + da.align(a, b, "permute")) / 2,
        f"ZipIt! (alpha {best[0]}, beta {best[1]}: best on validation)": da.zipped(
            a, b, alpha=best[0], beta=best[1]
        ),
        "ZipIt! with beta = 0 (alpha 0.3)": da.zipped(a, b, alpha=0.3, beta=0.0),
    }
    out = {name: accuracies(logits(v, data.x_test), data.y_test) for name, v in merged.items()}
    with torch.no_grad():
        probs = torch.softmax(logits(a, data.x_test), 0) + torch.softmax(logits(b, data.x_test), 0)
    out["ensemble (softmax average)"] = accuracies(probs, data.y_test)
    return out


def m2n2_runs(out: Path, runs: int) -> dict[str, list[float]]:
    """Part 2: the final test accuracy of each M2N2 run, per seed variant."""
    import yaml

    from hf_m2n2.evolve.runs import start_runs

    base = yaml.safe_load((ROOT / "examples" / "digits" / "pretrained" / "m2n2.yaml").read_text())
    variants = {
        "raw seeds": {"callable": "hf_m2n2.demo.tasks.digits:pretrained_seeds"},
        "B permutation-aligned": {
            "callable": "hf_m2n2.demo.tasks.digits_align:aligned_seeds",
            "kwargs": {"method": "permute"},
        },
        "B weight-matched": {
            "callable": "hf_m2n2.demo.tasks.digits_align:aligned_seeds",
            "kwargs": {"method": "weight_matching"},
        },
        "permutation-aligned + their ZipIt! merge": {
            "callable": "hf_m2n2.demo.tasks.digits_align:aligned_seeds",
            "kwargs": {"method": "permute", "zip_seed": True},
        },
    }
    results = {}
    for name, seeds in variants.items():
        spec = dict(base, name=name)
        spec["genome"] = dict(base["genome"], seeds={"kind": "python", **seeds})
        folder = out / name.replace(" ", "_").replace("!", "").replace("+", "and")
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "runs" / f"run-{runs - 1}" / "summary.json").is_file():
            (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            start_runs(folder / "spec.yaml", folder / "runs", runs=runs, overwrite=True, progress=False)
        results[name] = [
            json.loads((folder / "runs" / f"run-{r}" / "summary.json").read_text())["test"]
            for r in range(runs)
        ]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "align_digits")
    parser.add_argument("--skip-m2n2", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tables = {seed: one_shot(seed) for seed in args.pairs}
    methods = list(next(iter(tables.values())))
    print(
        "| method (test accuracy; mean over pairs "
        + ", ".join(map(str, args.pairs))
        + ") | joint | 0-4 | 5-9 |"
    )
    print("|---|---|---|---|")
    for method in methods:
        label = method if "ZipIt! (" not in method else "ZipIt! (alpha, beta best on validation, per pair)"
        cells = []
        for column in ("joint", "0-4", "5-9"):
            values = [
                tables[s][m][column]
                for s in args.pairs
                for m in tables[s]
                if m.split(" (")[0] == method.split(" (")[0]
            ]
            cells.append(f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    for seed in args.pairs:
        print(f"pair {seed}: " + ", ".join(f"{m}: {v['joint']:.3f}" for m, v in tables[seed].items()))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"one_shot": {str(s): t for s, t in tables.items()}}
    if not args.skip_m2n2:
        runs = m2n2_runs(args.out, args.runs)
        print()
        print(f"| M2N2 at 10,000 passes ({args.runs} runs, test accuracy) | mean | min-max |")
        print("|---|---|---|")
        for name, values in runs.items():
            print(f"| {name} | {np.mean(values):.4f} | {min(values):.4f}-{max(values):.4f} |")
        summary["m2n2"] = runs
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
