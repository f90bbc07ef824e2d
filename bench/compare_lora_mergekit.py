"""Compare `base+adapter` (LoRA) references in hf-m2n2 and mergekit 0.1.5 on the same tiny inputs.

Run from the repo root with the project's venv (mergekit runs as a separate command from its own venv):
    PYTHONPATH=. .venv/bin/python bench/compare_lora_mergekit.py [--mergekit PATH/TO/mergekit-yaml] [--work DIR]
        [--hidden 64 --layers 2]   (a larger base, e.g. --hidden 1024 --layers 24, for memory figures)

Builds a tiny Llama base and peft adapters (with peft itself, B not zero), merges each case with both tools from
the same YAML, and prints per case the max |hf-m2n2 - mergekit| over all tensors and the tensor where it occurs.
mergekit applies the adapter with peft's `merge_and_unload()` into a whole-model copy (`--lora-merge-cache`);
hf-m2n2 applies it tensor by tensor as the tensor is read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

from hf_m2n2.demo.toy import build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def build_adapter(base: Path, out: Path, seed: int, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "modules_to_save" in name:
                    param.add_(torch.randn_like(param))
        peft_model.save_pretrained(str(out))
    return out


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    root_dir = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default=str(root_dir / ".venv-mergekit" / "bin" / "mergekit-yaml"))
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the Llama base")
    parser.add_argument("--layers", type=int, default=2, help="layers of the Llama base")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lora_cmp_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root_dir), "HF_HUB_OFFLINE": "1"}

    size = {"hidden": args.hidden, "layers": args.layers}
    base = build_tiny_llama(work / "base", seed=0, **size)
    other = build_tiny_llama(work / "other", seed=1, base=base)
    base16 = build_tiny_llama(work / "base-bf16", seed=0, dtype="bfloat16", **size)
    plain = build_adapter(base, work / "plain", 10, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    rs = build_adapter(
        base,
        work / "rs",
        11,
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "o_proj", "gate_proj", "embed_tokens"],
        rank_pattern={"layers.0.self_attn.q_proj": 2},
        alpha_pattern={"o_proj": 3},
    )
    head = build_adapter(
        base, work / "head", 12, r=4, lora_alpha=8, target_modules=["k_proj"], modules_to_save=["lm_head"]
    )
    cases = {
        "plain (q,v; alpha/r)": [(f"{base}+{plain}", 1.0)],
        "rsLoRA + rank/alpha patterns + embedding": [(f"{base}+{rs}", 1.0)],
        "modules_to_save lm_head": [(f"{base}+{head}", 1.0)],
        "bf16 base + fp32 adapter": [(f"{base16}+{plain}", 1.0)],
        "0.3 (base+adapter) + 0.7 other": [(f"{base}+{plain}", 0.3), (str(other), 0.7)],
    }
    print(
        f"{'case':44s} {'max |diff|':>11s} {'max |value|':>11s}  tensor                      ours s  mergekit s"
    )
    for i, (title, models) in enumerate(cases.items()):
        dtype = "bfloat16" if "bf16" in title else "float32"
        spec = {
            "merge_method": "linear",
            "dtype": dtype,
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in models],
        }
        case_dir = work / f"case-{i}"
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir()
        (case_dir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        ours_s = run(
            [
                sys.executable,
                "-m",
                "hf_m2n2.cli",
                "merge",
                str(case_dir / "spec.yaml"),
                str(case_dir / "ours"),
                "--quiet",
            ],
            env,
        )
        theirs_s = run(
            [
                args.mergekit,
                str(case_dir / "spec.yaml"),
                str(case_dir / "mergekit"),
                "--lora-merge-cache",
                str(case_dir / "cache"),
                "--no-copy-tokenizer",
            ],
            {**env, "PYTHONPATH": ""},
        )
        ours, theirs = load_dir(case_dir / "ours"), load_dir(case_dir / "mergekit")
        assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))
        worst, worst_name, peak = -1.0, "", 0.0
        for name in theirs:
            diff = (ours[name].double() - theirs[name].double()).abs().max().item()
            peak = max(peak, theirs[name].double().abs().max().item())
            if diff > worst:
                worst, worst_name = diff, name
        worst_name = worst_name if worst > 0 else "-"  # identical everywhere
        print(f"{title:44s} {worst:11.3g} {peak:11.3g}  {worst_name:27s} {ours_s:6.1f}  {theirs_s:10.1f}")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
