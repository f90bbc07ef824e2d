"""Tiny specialists: an offline, deterministic demo of merging two skills into one model.

`build_specialists(ROOT)` trains, on one CPU thread, a small Llama-architecture base with the byte-level tokenizer of
`hf_m2n2.demo.toy`, then two specialists fine-tuned from it on two synthetic skills, and writes lm-eval custom tasks
for each skill with a fitness split and a separate held-out test split:

- `add`: two-digit addition, `"37+48="` -> `"85"`;
- `rev`: reverse a lowercase word and uppercase it, `"merge="` -> `"EGREM"`.

The base is pretrained briefly on a mix of both skills (it is mediocre at addition); each specialist is then
fine-tuned on its own skill only and forgets most of the other, so neither seed is good at both while the two stay
in one linearly connected basin: weight-space merges of them recover both skills. The held-out problems of both
splits never appear in training.

Layout of ROOT (every part is rebuilt only when missing, incomplete, or built with other parameters):

```
ROOT/base/  ROOT/add/  ROOT/rev/      Hub-layout checkpoints (model.safetensors, config.json, tokenizer, README.md)
ROOT/tasks/*.yaml                     lm-eval tasks specialists_{add,rev}_{fit,test} (absolute data paths)
ROOT/tasks/data/*.jsonl               {"prompt": ..., "answer": ...} per line
```

Command line: `python -m hf_m2n2.demo.specialists ROOT [--report]` (or the old `python -m hf_m2n2.specialists`).

Reproducibility: one torch thread and fixed seeds give the same bytes on one machine, but float rounding also
depends on which CPU kernels run (torch's AVX2 / AVX-512 vectorized kernels, MKL's per-ISA GEMM branches), and
training amplifies a last-bit difference into other specialists. The command line therefore selects, before torch
loads, torch's unvectorized kernels (`ATEN_CPU_CAPABILITY=default`) and MKL's SSE2-only reproducible branch
(`MKL_CBWR=COMPATIBLE`), the same code on every x86-64 CPU; the cache key records the kernels in effect.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import string
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_m2n2.demo import build_cache
from hf_m2n2.demo.build_cache import MARKER, PORTABLE_KERNELS, digest, pin_portable_kernels  # noqa: F401 (re-exported)

BUILD_VERSION = 1
SKILLS = ("add", "rev")
TASK_PREFIX = "specialists"
_SEQ_LEN = 16  # longest example: "abcdef=FEDCBA\n" (14 tokens)
ATTENTION = "sdpa"  # explicit, so that a change of transformers' default does not change the build


@dataclass(frozen=True)
class SpecialistsConfig:
    """Build parameters (all of them enter the cache key).

    Attributes:
        seed: seed of the initialization, the training data and the evaluation splits.
        hidden, layers, intermediate, heads: the Llama architecture.
        batch_size: training batch size.
        base_steps, base_lr: pretraining of the base on both skills (AdamW, warmup then linear decay).
        finetune_steps, finetune_lr: fine-tuning of each specialist on its own skill.
        fitness_size, test_size: examples per skill in the fitness and held-out test splits.
        max_gen_toks: generation budget of the lm-eval tasks.
    """

    seed: int = 1
    hidden: int = 64
    layers: int = 2
    intermediate: int = 128
    heads: int = 4
    batch_size: int = 64
    base_steps: int = 1200
    base_lr: float = 3e-3
    finetune_steps: int = 500
    finetune_lr: float = 2e-3
    fitness_size: int = 50
    test_size: int = 200
    max_gen_toks: int = 8


@dataclass(frozen=True)
class Specialists:
    """Where a build lives.

    Attributes:
        root: the build folder.
        base: the base checkpoint.
        models: skill name -> specialist checkpoint (`add`, `rev`).
        tasks_dir: lm-eval `include_path` holding the task YAMLs.
        fitness_tasks: lm-eval task names of the fitness split, one per skill.
        test_tasks: lm-eval task names of the held-out split, one per skill.
    """

    root: Path
    base: Path
    models: dict[str, Path]
    tasks_dir: Path
    fitness_tasks: list[str]
    test_tasks: list[str]


# ---------------------------------------------------------------------- skills and data


def _add_example(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}=", str(a + b)


def _rev_example(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"{word}=", word[::-1].upper()


SKILL_EXAMPLES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add_example,
    "rev": _rev_example,
}
SKILL_DESCRIPTIONS = {
    "add": "two-digit addition (37+48=85)",
    "rev": "reversing and uppercasing a word (merge=EGREM)",
}


def task_name(skill: str, split: str) -> str:
    """The lm-eval task name of a skill's split, e.g. `specialists_add_fit`."""
    return f"{TASK_PREFIX}_{skill}_{split}"


def heldout_examples(config: SpecialistsConfig) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """The fitness and test examples of each skill: distinct prompts, disjoint splits, deterministic.

    Args:
        config: the build parameters (seed and split sizes).

    Returns:
        `{skill: {"fit": [(prompt, answer), ...], "test": [...]}}`.
    """
    out: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for index, skill in enumerate(SKILLS):
        rng = random.Random(f"heldout-{config.seed}-{index}")
        seen: dict[str, str] = {}
        while len(seen) < config.fitness_size + config.test_size:
            prompt, answer = SKILL_EXAMPLES[skill](rng)
            seen.setdefault(prompt, answer)
        pairs = list(seen.items())
        out[skill] = {"fit": pairs[: config.fitness_size], "test": pairs[config.fitness_size :]}
    return out


def heldout_prompts(config: SpecialistsConfig) -> set[str]:
    """Every prompt of the fitness and test splits of both skills: what training never shows."""
    held = heldout_examples(config)
    return {prompt for splits in held.values() for pairs in splits.values() for prompt, _ in pairs}


def _training_batches(
    skills: Sequence[str], excluded: set[str], batch_size: int, seed: str
) -> Iterator[list[tuple[str, str]]]:
    """Endless batches of training examples drawn uniformly from `skills`, never a held-out prompt."""
    rng = random.Random(seed)
    while True:
        batch = []
        while len(batch) < batch_size:
            prompt, answer = SKILL_EXAMPLES[rng.choice(skills)](rng)
            if prompt not in excluded:
                batch.append((prompt, answer))
        yield batch


# ---------------------------------------------------------------------- training


def _encode(pairs: Sequence[tuple[str, str]], char_ids: dict[str, int], pad_id: int) -> tuple[Any, Any]:
    """Token ids (right-padded) and the mask of positions whose next token is part of the answer (+ newline)."""
    import torch

    ids = torch.full((len(pairs), _SEQ_LEN), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), _SEQ_LEN - 1), dtype=torch.bool)
    for row, (prompt, answer) in enumerate(pairs):
        tokens = [char_ids[c] for c in prompt + answer + "\n"]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, len(prompt) - 1 : len(tokens) - 1] = True
    return ids, mask


def _train(
    model: Any,
    batches: Iterator[list[tuple[str, str]]],
    steps: int,
    lr: float,
    char_ids: dict[str, int],
    pad_id: int,
) -> None:
    """AdamW with 20 warmup steps (5 when fine-tuning) and linear decay; loss on answer tokens only."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = 20 if steps > 100 else 5
    train_on_answers(model, batches, steps, lambda pairs: _encode(pairs, char_ids, pad_id), optimizer, warmup)


def train_on_answers(
    model: Any,
    batches: Iterator[list[tuple[str, str]]],
    steps: int,
    encode: Any,
    optimizer: Any,
    warmup: int,
) -> list[float]:
    """`steps` optimizer steps of next-token loss on the answer tokens only (`encode(pairs) -> (ids, mask)`),
    with `warmup` linear warmup steps then linear decay; returns the losses. The model is left in eval mode."""
    import torch
    import torch.nn.functional as F

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1.0 - step / steps)
    )
    losses = []
    model.train()
    for _ in range(steps):
        ids, mask = encode(next(batches))
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits[mask], ids[:, 1:][mask])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _char_ids(tokenizer: Any) -> dict[str, int]:
    alphabet = string.digits + string.ascii_letters + "+=\n"
    return {c: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(c))[0] for c in alphabet}


# ---------------------------------------------------------------------- cache keys and atomic parts


def _part_keys(config: SpecialistsConfig, root: Path) -> dict[str, str]:
    """Cache keys: a part's key covers exactly what its bytes depend on (a specialist's includes its base's)."""
    from importlib.metadata import version

    env = {"version": BUILD_VERSION, "torch": version("torch"), "transformers": version("transformers")}
    params = dataclasses.asdict(config)
    data = {name: params[name] for name in ("seed", "fitness_size", "test_size")}
    base_names = ("hidden", "layers", "intermediate", "heads", "batch_size", "base_steps", "base_lr")
    trained = {name: params[name] for name in base_names}
    base = digest({**env, **data, "part": "base", "kernels": kernels_in_effect(), **trained})
    finetune = {name: params[name] for name in ("batch_size", "finetune_steps", "finetune_lr")}
    keys = {
        "base": base,
        "tasks": digest({**env, **data, "part": "tasks", "root": str(root), "tok": config.max_gen_toks}),
    }
    for skill in SKILLS:
        keys[skill] = digest({"part": skill, "base": base, **finetune})
    return keys


def kernels_in_effect() -> dict[str, str]:
    """What decides the build's rounding besides the library versions (`build_cache.kernels_in_effect`), and the
    attention implementation."""
    return {**build_cache.kernels_in_effect(), "attention": ATTENTION}


# ---------------------------------------------------------------------- parts


def _card(name: str, description: str) -> str:
    return (
        "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        f"tags:\n- hf-m2n2\n- synthetic\n---\n# {name}\n\n{description}\n"
    )


def _save(model: Any, tokenizer: Any, out: Path, name: str, description: str) -> None:
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(_card(name, description))


def _build_base(config: SpecialistsConfig, out: Path, excluded: set[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_m2n2.demo.toy import byte_tokenizer, tiny_llama_config

    tokenizer = byte_tokenizer()
    torch.manual_seed(config.seed)
    model_config = tiny_llama_config(
        len(tokenizer),
        hidden=config.hidden,
        layers=config.layers,
        intermediate=config.intermediate,
        heads=config.heads,
    )
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation=ATTENTION)
    batches = _training_batches(SKILLS, excluded, config.batch_size, f"base-{config.seed}")
    _train(model, batches, config.base_steps, config.base_lr, _char_ids(tokenizer), tokenizer.pad_token_id)
    _save(
        model,
        tokenizer,
        out,
        "specialists-base",
        "Tiny Llama pretrained briefly on a mix of two synthetic skills.",
    )


def _build_specialist(
    config: SpecialistsConfig, skill: str, base: Path, out: Path, excluded: set[str]
) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=False)
    model = LlamaForCausalLM.from_pretrained(
        str(base), dtype=torch.float32, attn_implementation=ATTENTION, trust_remote_code=False
    )
    torch.manual_seed(config.seed)
    batches = _training_batches([skill], excluded, config.batch_size, f"{skill}-{config.seed}")
    _train(
        model,
        batches,
        config.finetune_steps,
        config.finetune_lr,
        _char_ids(tokenizer),
        tokenizer.pad_token_id,
    )
    _save(
        model,
        tokenizer,
        out,
        f"specialists-{skill}",
        f"Fine-tuned from the specialists base on {SKILL_DESCRIPTIONS[skill]}.",
    )


def _task_yaml(name: str, data_file: Path, max_gen_toks: int) -> str:
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n"
        '  until: ["\\n"]\n'
        f"  max_gen_toks: {max_gen_toks}\n"
        "  do_sample: false\n"
        "metric_list:\n"
        "  - metric: exact_match\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )


def _build_tasks(config: SpecialistsConfig, final: Path, out: Path) -> None:
    """JSONL data and task YAMLs; the YAMLs name the data by absolute path under `final` (where `out` will be)."""
    (out / "data").mkdir()
    for skill, splits in heldout_examples(config).items():
        for split, pairs in splits.items():
            name = task_name(skill, split)
            rows = "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs)
            (out / "data" / f"{name}.jsonl").write_text(rows)
            yaml_text = _task_yaml(name, final / "data" / f"{name}.jsonl", config.max_gen_toks)
            (out / f"{name}.yaml").write_text(yaml_text)


def build_specialists(
    root: str | os.PathLike[str],
    config: SpecialistsConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
    skills: Sequence[str] = SKILLS,
) -> Specialists:
    """Build (or reuse) the base, the two specialists and the lm-eval tasks under `root`.

    Every part is keyed by a hash of its build parameters, the torch/transformers versions and `kernels_in_effect()`;
    a part already built with the same key is kept, anything else is rebuilt atomically. Training uses one torch
    thread and fixed seeds: the same machine produces the same bytes every time. Other machines produce the same
    bytes only under `PORTABLE_KERNELS`, which the command line selects (`pin_portable_kernels`); a caller that has
    already loaded torch gets its process's kernels.

    Args:
        root: the build folder (created if needed).
        config: build parameters; default `SpecialistsConfig()` (about a minute on one core).
        log: called with one line per part built or reused (e.g. `print`).
        skills: the specialists to build (the base and both skills' tasks are always built).

    Returns:
        The paths of the checkpoints (of `skills`) and tasks.

    Example:
        >>> built = build_specialists("specialists-build", log=print)  # doctest: +SKIP
        base: built in 31.2 s
        ...
        >>> built.fitness_tasks  # doctest: +SKIP
        ['specialists_add_fit', 'specialists_rev_fit']
    """
    config = config or SpecialistsConfig()
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    keys = _part_keys(config, root)
    params = dataclasses.asdict(config)
    say = log or (lambda line: None)
    excluded = heldout_prompts(config)
    base = root / "base"
    steps: list[tuple[str, Path, Callable[[Path], None]]] = [
        ("tasks", root / "tasks", lambda out: _build_tasks(config, root / "tasks", out)),
        ("base", base, lambda out: _build_base(config, out, excluded)),
    ]
    for skill in skills:
        steps.append(
            (skill, root / skill, lambda out, s=skill: _build_specialist(config, s, base, out, excluded))
        )
    build_cache.build_parts(steps, keys, params, kernels_in_effect(), say)
    return Specialists(
        root=root,
        base=base,
        models={skill: root / skill for skill in skills},
        tasks_dir=root / "tasks",
        fitness_tasks=[task_name(skill, "fit") for skill in SKILLS],
        test_tasks=[task_name(skill, "test") for skill in SKILLS],
    )


# ---------------------------------------------------------------------- held-out report


def _interpolate(a: dict[str, Any], b: dict[str, Any], t: float, method: str) -> dict[str, Any]:
    from hf_m2n2.methods.slerp import slerp_tensors

    if method == "linear":
        return {name: (1 - t) * a[name] + t * b[name] for name in a}
    return {name: slerp_tensors(t, a[name], b[name]) for name in a}


def specialists_report(
    built: Specialists, *, points: Sequence[float] = (0.3, 0.5, 0.7), batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """Held-out scores (lm-eval, greedy exact match) of the base, the specialists and merges of the two.

    Merges: linear averages and per-tensor SLERP at `t` (weight t on `rev`, 1 - t on `add`), and task arithmetic
    `base + (add - base) + (rev - base)`. All candidates are written in place into one resident model.

    Args:
        built: the result of `build_specialists`.
        points: interpolation weights of the merges.
        batch_size: HFLM batch size.

    Returns:
        `{candidate: {"add": score, "rev": score, "mean": score}}`.

    Example:
        >>> specialists_report(build_specialists("specialists-build"))["linear 0.5"]  # doctest: +SKIP
        {'add': 0.53, 'rev': 0.99, 'mean': 0.76}
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from hf_m2n2.evaluate.lm_eval import LmEvalConfig, LmEvalEvaluator

    def state(path: Path) -> dict[str, Any]:
        return {
            k: v.clone()
            for k, v in LlamaForCausalLM.from_pretrained(str(path), trust_remote_code=False)
            .state_dict()
            .items()
        }

    weights = {"base": state(built.base), **{skill: state(path) for skill, path in built.models.items()}}
    model = LlamaForCausalLM.from_pretrained(str(built.base), dtype=torch.float32, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(built.base), trust_remote_code=False)
    config = LmEvalConfig(
        kind="lm_eval",
        tasks=built.test_tasks,
        include_path=str(built.tasks_dir),
        metric="exact_match",
        batch_size=batch_size,
    )
    evaluator = LmEvalEvaluator(config, model, tokenizer)
    candidates: dict[str, dict[str, Any]] = {
        "base": weights["base"],
        "add": weights["add"],
        "rev": weights["rev"],
        "task arithmetic": {
            k: weights["add"][k] + weights["rev"][k] - weights["base"][k] for k in weights["base"]
        },
    }
    for method in ("linear", "slerp"):
        for t in points:
            candidates[f"{method} {t:g}"] = _interpolate(weights["add"], weights["rev"], t, method)
    table: dict[str, dict[str, float]] = {}
    for label, tensors in candidates.items():
        model.load_state_dict(tensors)
        result = evaluator.evaluate("fitness")
        means = result.entry_means()
        table[label] = {skill: means[task_name(skill, "test")] for skill in SKILLS}
        table[label]["mean"] = result.mean
    return table


def _format_table(table: dict[str, dict[str, float]]) -> str:
    lines = [f"{'model':<16} {'add':>6} {'rev':>6} {'mean':>6}"]
    lines += [
        f"{label:<16} {row['add']:>6.3f} {row['rev']:>6.3f} {row['mean']:>6.3f}"
        for label, row in table.items()
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hf_m2n2.demo.specialists ROOT [--report] [--param NAME=VALUE ...]`: build (or reuse) into ROOT.

    The old `python -m hf_m2n2.specialists` runs this too (hence `prog`, kept as it was).
    """
    parser = build_cache.builder_parser(
        "python -m hf_m2n2.specialists", "Build the tiny specialists demo offline (cached)."
    )
    parser.add_argument(
        "--report", action="store_true", help="score base, specialists and merges on the test split"
    )
    args = parser.parse_args(argv)
    config = build_cache.config_from_overrides(SpecialistsConfig, args.param, parser)
    pin_portable_kernels()
    start = time.perf_counter()
    built = build_specialists(args.root, config, log=print)
    print(f"built in {time.perf_counter() - start:.1f} s: {built.root}")
    if args.report:
        start = time.perf_counter()
        with build_cache.one_thread():
            table = specialists_report(built)
        print(_format_table(table))
        (built.root / "report.json").write_text(json.dumps(table, indent=1) + "\n")
        print(f"report in {time.perf_counter() - start:.1f} s: {built.root / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
