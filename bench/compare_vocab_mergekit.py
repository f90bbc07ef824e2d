"""Compare `hf-m2n2 merge` with `mergekit-yaml` (0.1.5) on the same tiny local Llamas, tensor by tensor, for the
planning cases of issue 14: gradient positions outside the layers, vocabulary alignment (union / model sources,
tokens only some seeds have, padding) and per-token embedding sources.

Run from the repo root with the project's venv; mergekit runs from its own venv (never the project's):
    python bench/compare_vocab_mergekit.py --mergekit-yaml .venv-mergekit/bin/mergekit-yaml [--work DIR]

Per case it prints the tensors compared, those only one side wrote, the largest |ours - mergekit| relative to
max|mergekit| over any tensor (and which), and whether the output vocabularies agree. Rows of token-indexed
tensors are compared by token (a union's new tokens may get other ids); padding rows by position.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_m2n2.demo.toy import build_tiny_llama  # noqa: E402

IM = ["<|im_start|>", "<|im_end|>"]
EMBEDS = ("model.embed_tokens.weight", "lm_head.weight")


def build_seeds(root: Path) -> dict[str, str]:
    """A base, two plain fine-tunes and two ChatML fine-tunes (two extra tokens) of it."""
    paths = {}
    base = root / "base"
    if not (base / "config.json").exists():
        build_tiny_llama(base, seed=0)
    paths["base"] = str(base)
    for name, seed, extra in [("a", 1, []), ("b", 2, []), ("chat", 6, IM), ("chat2", 7, IM)]:
        if not (root / name / "config.json").exists():
            build_tiny_llama(root / name, seed=seed, base=base, extra_tokens=extra)
        paths[name] = str(root / name)
    return paths


def cases(p: dict[str, str]) -> dict[str, dict]:
    def models(*names, **params):
        return [{"model": p[n], "parameters": dict(params)} for n in names]

    ties_models = [
        {"model": p["a"], "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
        {"model": p["b"], "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
    ]
    return {
        # mergekit's examples/ties.yml shape: an unfiltered gradient reaches the final norm and lm_head
        "ties_gradient": {
            "merge_method": "ties",
            "base_model": p["base"],
            "models": ties_models,
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        "ties_slices": {
            "merge_method": "ties",
            "base_model": p["base"],
            "slices": [
                {"sources": [{"model": p[n], "layer_range": [i, i + 1]} for n in ("base", "a", "b")]}
                for i in (0, 1)
            ],
            "parameters": {"density": [1, 0.1], "weight": [0.2, 0.9]},
            "dtype": "float32",
        },
        "slerp_gradient_union": {
            "merge_method": "slerp",
            "base_model": p["base"],
            "models": [{"model": p["base"]}, {"model": p["chat"]}],
            "parameters": {"t": [0.2, 0.8]},
            "tokenizer_source": "union",
            "dtype": "float32",
        },
        "linear_union_one_owner": {
            "merge_method": "linear",
            "models": models("base", "a", "chat", weight=1.0),
            "tokenizer_source": "union",
            "dtype": "float32",
        },
        "linear_union_two_owners_with_base": {
            "merge_method": "linear",
            "base_model": p["base"],
            "models": models("base", "chat", "chat2", weight=1.0),
            "tokenizer_source": "union",
            "dtype": "float32",
        },
        "task_arithmetic_source_model": {
            "merge_method": "task_arithmetic",
            "base_model": p["base"],
            "models": models("a", "chat", weight=0.5),
            "tokenizer_source": p["chat"],
            "dtype": "float32",
        },
        "linear_pad_to_64": {
            "merge_method": "linear",
            "models": models("base", "chat", weight=1.0),
            "tokenizer": {"source": "union", "pad_to_multiple_of": 64},
            "dtype": "float32",
        },
        "linear_token_sources": {
            "merge_method": "linear",
            "models": models("base", "chat", weight=1.0),
            "tokenizer": {
                "source": "union",
                "tokens": {
                    IM[0]: {"source": {"kind": "model_token", "model": p["base"], "token": "<s>"}},
                    IM[1]: {"source": {"kind": "zero"}, "force": True},
                    "<|tool|>": {"source": {"kind": "model_token", "model": p["chat"], "token_id": 5}},
                    "</s>": {"source": p["chat"], "force": True},
                },
            },
            "dtype": "float32",
        },
    }


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def vocab(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).get_vocab()


def compare(ours_dir: Path, mk_dir: Path) -> dict:
    ours, mk = load(ours_dir), load(mk_dir)
    v_ours, v_mk = vocab(ours_dir), vocab(mk_dir)
    worst, worst_name = 0.0, ""
    for name in sorted(ours.keys() & mk.keys()):
        a, b = ours[name].float(), mk[name].float()
        if name in EMBEDS and a.shape[0] != b.shape[0]:
            return {"error": f"{name}: {a.shape[0]} rows (ours) vs {b.shape[0]} (mergekit)"}
        if name in EMBEDS:
            tokens = sorted(v_ours.keys() & v_mk.keys())
            pad = list(range(len(v_ours), a.shape[0]))
            a = torch.cat([a[[v_ours[t] for t in tokens]], a[pad]])
            b = torch.cat([b[[v_mk[t] for t in tokens]], b[pad]])
        rel = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        if rel > worst or not worst_name:
            worst, worst_name = rel, name
    return {
        "tensors": len(ours.keys() & mk.keys()),
        "only_ours": sorted(ours.keys() - mk.keys()),
        "only_mergekit": sorted(mk.keys() - ours.keys()),
        "max_rel": worst,
        "worst": worst_name,
        "same_vocab": v_ours.keys() == v_mk.keys(),
        "same_ids": v_ours == v_mk,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-yaml", default=".venv-mergekit/bin/mergekit-yaml")
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from hf_m2n2.merge import MergeOptions, merge
    from hf_m2n2.spec import parse_spec

    root = Path(args.work or tempfile.mkdtemp(prefix="compare_vocab_"))
    seeds = build_seeds(root / "seeds")
    results = {}
    for name, spec in cases(seeds).items():
        case = root / name
        case.mkdir(parents=True, exist_ok=True)
        (case / "config.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        try:
            merge(parse_spec(spec), case / "ours", MergeOptions(progress=False, overwrite=True, workers=1))
        except Exception as exc:  # report the case and go on with the others
            results[name] = {"error": f"hf-m2n2: {type(exc).__name__}: {exc}"}
            print(f"{name:36s} {json.dumps(results[name])}", flush=True)
            continue
        run = subprocess.run(
            [args.mergekit_yaml, str(case / "config.yaml"), str(case / "mergekit"), "--quiet"],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if run.returncode != 0:
            results[name] = {"error": "mergekit-yaml failed: " + run.stderr.strip().splitlines()[-1]}
        else:
            results[name] = compare(case / "ours", case / "mergekit")
        print(f"{name:36s} {json.dumps(results[name])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
