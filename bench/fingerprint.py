"""Fingerprints of every output the project writes, for refactors that must keep them byte for byte.

Runs the tiny merges (toy seeds, synthetic Llama checkpoints for every benchmarked method), the specialists
demo and its comparison specs (short budgets), the digits specs (short budgets), `export` and `rebuild` of an
evolved model, and hashes every file they leave. Run-to-run noise is dropped before hashing: wall-clock
timings (`timing.json`, `timing` and `elapsed_s` fields), nothing else. Compare two manifests to see which
outputs changed:

    .venv/bin/python bench/fingerprint.py --out /tmp/fp-before.json   # before the change
    .venv/bin/python bench/fingerprint.py --out /tmp/fp-after.json --compare /tmp/fp-before.json

Work files go to `out/fingerprint/` (reused between calls: the built seeds are cached).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_RUN = False
TIMING_KEYS = {"timing", "elapsed_s", "wall_time_s", "passes_per_s"}
MERGE_METHODS = ("linear", "slerp", "ties", "dare_ties", "task_arithmetic")
SPECIALIST_SPECS = (
    "spec.yaml",
    "compare/evomerge_ps.yaml",
    "compare/evomerge_ps_linear.yaml",
    "compare/no_attraction.yaml",
    "compare/no_split_point.yaml",
    "compare/sweep.yaml",
)
DIGITS_SPECS = (
    "scratch/m2n2.yaml",
    "scratch/m2n2_segment.yaml",
    "scratch/cma_es.yaml",
    "scratch/cma_es_diagonal.yaml",
    "scratch/map_elites.yaml",
    "scratch/no_crossover.yaml",
    "pretrained/m2n2.yaml",
    "pretrained/sweep.yaml",
    "pretrained/ga.yaml",
)


def _drop_timing(node):
    if isinstance(node, dict):
        return {k: _drop_timing(v) for k, v in node.items() if k not in TIMING_KEYS}
    if isinstance(node, list):
        return [_drop_timing(v) for v in node]
    return node


def file_digest(path: Path) -> str:
    """The file's hash, with timings dropped and this checkout's absolute path written `<ROOT>` (so manifests
    made in two checkouts compare)."""
    if path.name == "timing.json":
        return "(timing)"
    if path.suffix == ".json":
        data = json.loads(path.read_text().replace(str(ROOT), "<ROOT>"))
        return hashlib.sha256(json.dumps(_drop_timing(data), sort_keys=True).encode()).hexdigest()[:16]
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        digest = hashlib.sha256()
        if "__meta__" in arrays:  # a checkpoint or archive: a JSON tree and its arrays
            meta = json.loads(arrays.pop("__meta__").tobytes().decode().replace(str(ROOT), "<ROOT>"))
            digest.update(json.dumps(_drop_timing(meta), sort_keys=True).encode())
        for key in sorted(arrays):
            value = arrays[key]
            raw = (
                str(value).replace(str(ROOT), "<ROOT>").encode()
                if value.dtype.kind == "U"
                else value.tobytes()
            )
            digest.update(key.encode() + raw + str(value.dtype).encode())
        return digest.hexdigest()[:16]
    return hashlib.sha256(path.read_bytes().replace(str(ROOT).encode(), b"<ROOT>")).hexdigest()[:16]


def tree_digests(root: Path, prefix: str) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        out[f"{prefix}/{path.relative_to(root)}"] = file_digest(path)
    return out


def run(cmd: list[str], **kwargs) -> None:
    if NO_RUN:
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, **kwargs)


def short_copy(spec: Path, budget: int) -> Path:
    """The spec with a smaller budget, next to it (relative paths keep resolving)."""
    if NO_RUN:
        return spec
    text = re.sub(r"budget: \d+", f"budget: {budget}", spec.read_text())
    copy = spec.with_name(f".fingerprint-{spec.name}")
    copy.write_text(text)
    return copy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="manifest to write (JSON)")
    parser.add_argument("--compare", type=Path, help="an earlier manifest: print what differs, exit 1 if any")
    parser.add_argument("--skip", default="", help="comma-separated groups to skip: merge,specialists,digits")
    parser.add_argument("--no-run", action="store_true", help="hash the outputs already in out/fingerprint")
    args = parser.parse_args(argv)
    global NO_RUN
    NO_RUN = args.no_run
    skip = set(filter(None, args.skip.split(",")))
    work = ROOT / "out" / "fingerprint"
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable  # `python -m` runs the code of this checkout (the working directory comes first)
    cli = [py, "-m", "hf_m2n2.cli"]
    manifest: dict[str, str] = {}

    if "merge" not in skip:
        run([py, "-m", "hf_m2n2.demo.toy", "out/seeds"])
        run([*cli, "merge", "examples/tiny_merge/spec.yaml", str(work / "tiny-merged"), "--overwrite", "-q"])
        manifest.update(tree_digests(work / "tiny-merged", "merge/tiny_merge"))
        sys.path.insert(0, str(ROOT / "bench"))
        from merge_bench import method_config
        from synthetic import build_synthetic_llama

        models = build_synthetic_llama(
            work / "synthetic",
            hidden=128,
            intermediate=344,
            layers=2,
            vocab=512,
            shard_bytes=400_000,
            verbose=False,
        )
        for method in MERGE_METHODS:
            config = work / f"{method}.yaml"
            config.write_text(method_config(method, models)[0])
            out = work / f"merged-{method}"
            run([*cli, "merge", str(config), str(out), "--overwrite", "-q", "--random-seed", "3"])
            manifest.update(tree_digests(out, f"merge/{method}"))

    if "specialists" not in skip:
        run([py, "-m", "hf_m2n2.demo.specialists", "examples/specialists/build"])
        for name in SPECIALIST_SPECS:
            spec = ROOT / "examples/specialists" / name
            copy = spec if name == "spec.yaml" else short_copy(spec, 16)
            out = work / "specialists" / name.replace("/", "-").removesuffix(".yaml")
            try:
                run([*cli, "evolve", str(copy), "--out", str(out), "--overwrite", "-q"])
            finally:
                if copy != spec:
                    copy.unlink(missing_ok=True)
            manifest.update(tree_digests(out, f"specialists/{out.name}"))
        demo = work / "specialists" / "spec"
        run([*cli, "export", str(demo), str(work / "exported"), "--overwrite", "-q"])
        manifest.update(tree_digests(work / "exported", "specialists/export"))
        run(
            [*cli, "rebuild", str(demo / "model" / "recipe.json"), str(work / "rebuilt"), "--overwrite", "-q"]
        )
        manifest.update(tree_digests(work / "rebuilt", "specialists/rebuild"))
        evomerge = work / "specialists" / "compare-evomerge_ps"
        run([*cli, "export", str(evomerge), str(work / "exported-ps"), "--overwrite", "-q"])
        manifest.update(tree_digests(work / "exported-ps", "specialists/export-ps"))

    if "digits" not in skip:
        for name in DIGITS_SPECS:
            copy = short_copy(ROOT / "examples/digits" / name, 300)
            out = work / "digits" / name.replace("/", "-").removesuffix(".yaml")
            try:
                run([*cli, "evolve", str(copy), "--out", str(out), "--overwrite", "-q"])
            finally:
                if not NO_RUN:
                    copy.unlink()
            manifest.update(tree_digests(out, f"digits/{out.name}"))

    args.out.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"{len(manifest)} files fingerprinted into {args.out}")
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    changed = sorted(k for k in set(before) | set(manifest) if before.get(k) != manifest.get(k))
    for key in changed:
        print(f"DIFFERS {key}: {before.get(key, '(absent)')} -> {manifest.get(key, '(absent)')}")
    print("identical" if not changed else f"{len(changed)} files differ")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
