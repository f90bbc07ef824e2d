"""`hf-m2n2 merge` of two causal LMs from different initializations: `merge_method: permute | weight_matching |
zipit` (an hf-m2n2 extension of mergekit's methods; mergekit has none of them).

The FFN intermediate units of every layer are aligned (`weight_matching`: from the weights alone; `permute`: by
the correlation of the two models' features on the spec's `calibration:` text) or zipped (`zipit`, with
`parameters: {alpha, beta}`), then the two models are merged unit by unit (`hf_m2n2.align.apply.merge_states`);
every other tensor is averaged. The output is an ordinary checkpoint of the first model's architecture, with its
configs and tokenizer, `merge_config.yaml` and a card listing the matching statistics per layer.

Example:

```yaml
merge_method: zipit
models:
  - model: org/model-a
  - model: org/model-b
parameters: {alpha: 0.3, beta: 0.125}
calibration: {data: texts.jsonl, samples: 64, max_length: 128}
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hf_m2n2.errors import SpecError

ALIGN_METHODS = {
    "permute": "Git Re-Basin / permutation alignment by feature correlation (https://arxiv.org/abs/2209.04836)",
    "weight_matching": "Git Re-Basin weight matching (https://arxiv.org/abs/2209.04836)",
    "zipit": "ZipIt! Merging Models from Different Tasks without Training (https://arxiv.org/abs/2305.03053)",
}
_ZIPIT_PARAMETERS = ("alpha", "beta")


def is_align_method(spec: Any) -> bool:
    return spec.merge_method in ALIGN_METHODS


def check_align_spec(spec: Any) -> None:
    """The checks of an align merge spec that need no models; a `calibration:` on another method is refused.

    Raises:
        SpecError: naming the YAML path.
    """
    method = spec.merge_method
    if method not in ALIGN_METHODS:
        if spec.calibration is not None:
            raise SpecError(
                "calibration",
                f"only used by the feature-matching merge methods (permute, zipit), not {method}",
            )
        return
    if spec.slices is not None or spec.models is None or len(spec.models) != 2:
        raise SpecError("models", f"{method} merges exactly two models, listed under models:")
    for key in ("base_model", "tokenizer", "tokenizer_source", "components", "variant"):
        if getattr(spec, key) is not None:
            raise SpecError(key, f"not used by {method}")
    for i, model in enumerate(spec.models):
        if model.parameters:
            raise SpecError(f"models[{i}].parameters", f"{method} takes no per-model parameters")
    allowed = _ZIPIT_PARAMETERS if method == "zipit" else ()
    for key, value in (spec.parameters or {}).items():
        if key not in allowed:
            raise SpecError(
                f"parameters.{key}", f"not a parameter of {method} ({', '.join(allowed) or 'none'})"
            )
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SpecError(f"parameters.{key}", "expected a number")
    alpha = (spec.parameters or {}).get("alpha", 0.3)
    if method == "zipit" and not 0 < alpha <= 1:
        raise SpecError("parameters.alpha", f"must lie in (0, 1], got {alpha}")
    if method == "zipit" and (spec.parameters or {}).get("beta", 0.125) < 0:
        raise SpecError("parameters.beta", "must be >= 0")
    if method == "weight_matching" and spec.calibration is not None:
        raise SpecError("calibration", "weight_matching is data-free: leave calibration out")
    if method != "weight_matching" and spec.calibration is None:
        raise SpecError("calibration", f"{method} matches features: give calibration: {{data: FILE}}")


def calibration_texts(calibration: Any, spec_dir: Path | None) -> list[str]:
    """The first `samples` texts of the calibration file (`.jsonl` with a `text` field, else one per line).

    Raises:
        SpecError: at `calibration.data`: missing, unreadable or empty.
    """
    path = Path(calibration.data)
    path = path if path.is_absolute() or spec_dir is None else spec_dir / path
    if not path.is_file():
        raise SpecError("calibration.data", f"not found: {path}")
    texts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise SpecError("calibration.data", f'{path}:{number}: expected {{"text": ...}}') from None
        else:
            texts.append(line)
        if len(texts) == calibration.samples:
            break
    if not texts:
        raise SpecError("calibration.data", f"{path}: no text")
    return texts


def plan_align(spec: Any, seeds: list[Any]) -> Any:
    """Every check of an align merge over opened seeds (causal LMs with FFN spaces, one shape each): the space
    graph.

    Raises:
        SpecError, HfM2n2Error: one line naming the problem.
    """
    from hf_m2n2.align.graphs import decoder_ffn_graph
    from hf_m2n2.errors import HfM2n2Error

    check_align_spec(spec)
    for i, seed in enumerate(seeds):
        if seed.kind != "causal_lm":
            raise SpecError(
                f"models[{i}]", f"{spec.merge_method} merges causal LMs; {seed.name} is a {seed.kind}"
            )
    graph = decoder_ffn_graph(seeds[0].config, seeds[0].checkpoint.names)
    first, second = seeds
    for name in first.checkpoint.names:
        if name not in second.checkpoint:
            raise HfM2n2Error(f"tensor {name!r} is missing in {second.name}")
        if first.checkpoint.info(name).shape != second.checkpoint.info(name).shape:
            raise HfM2n2Error(
                f"tensor {name!r} has shape {list(second.checkpoint.info(name).shape)} in {second.name}, "
                f"{list(first.checkpoint.info(name).shape)} in {first.name}: the models' spaces differ in size"
            )
    limit = first.config.get("max_position_embeddings")
    if spec.calibration is not None and limit is not None and spec.calibration.max_length > int(limit):
        raise SpecError(
            "calibration.max_length",
            f"{spec.calibration.max_length} tokens do not fit {first.name} ({limit} positions)",
        )
    return graph


def align_merge(
    spec: Any, seeds: list[Any], out_dir: Path, options: Any, spec_text: str | None, spec_dir
) -> Any:
    """Merge two causal LMs unit by unit after matching their FFN units; written atomically into `out_dir`."""
    from safetensors.torch import save_file

    from hf_m2n2.align.apply import as_numpy_state, merge_states
    from hf_m2n2.align.matchers import weight_matching
    from hf_m2n2.card import CardModel, merge_card_info, write_card
    from hf_m2n2.outdir import (
        atomic_output_dir,
        copy_generation_config,
        copy_tokenizer_files,
        set_config_dtype,
    )
    from hf_m2n2.plan import torch_dtype

    graph = plan_align(spec, seeds)
    texts = calibration_texts(spec.calibration, spec_dir) if spec.calibration is not None else []
    states = [{n: s.checkpoint.get(n) for n in s.checkpoint.names} for s in seeds]
    if spec.merge_method == "weight_matching":
        matches = weight_matching(graph, [as_numpy_state(st) for st in states], seed=options.random_seed)
    else:
        matches = _feature_matches(spec, seeds, graph, texts)
    merged = merge_states(graph, states, {name: m.pair() for name, m in matches.items()})
    dtype = torch_dtype(spec.out_dtype or spec.dtype or "float32")
    merged = {name: t.to(dtype).contiguous() if t.is_floating_point() else t for name, t in merged.items()}
    notes = [_stats_note(name, match.stats) for name, match in matches.items()]
    with atomic_output_dir(out_dir, options.overwrite) as tmp:
        save_file(merged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = dict(
            seeds[0].config
        )  # the first model's configs and tokenizer, as a causal LM merge writes them
        set_config_dtype(config, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_generation_config(seeds[0].model.path, tmp)
        copy_tokenizer_files(seeds[0].model.path, tmp)
        (tmp / "merge_config.yaml").write_text(spec_text or spec.to_yaml())
        info = merge_card_info(
            model_name=out_dir.name,
            method=spec.merge_method,
            paper=ALIGN_METHODS[spec.merge_method],
            models=[CardModel(s.model, "merged") for s in seeds],
            config_yaml=spec.to_yaml(),
            notes=[
                "Aligned units: each layer's FFN intermediate units; every other tensor is averaged.",
                *notes,
            ],
        )
        write_card(tmp, info)
    total = sum(t.numel() * t.element_size() for t in merged.values())
    return len(merged), total, notes


def _feature_matches(spec: Any, seeds: list[Any], graph: Any, texts: list[str]) -> dict[str, Any]:
    """Per space, `permute` or `zipit` on the two models' feature correlations over the calibration texts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_m2n2.align.calibration import collect
    from hf_m2n2.align.matchers import ZIPIT_ALPHA, ZIPIT_BETA, permute, zipit

    models = [
        AutoModelForCausalLM.from_pretrained(str(s.model.path), dtype=torch.float32).eval() for s in seeds
    ]
    tokenizer = AutoTokenizer.from_pretrained(str(seeds[0].model.path))
    length = spec.calibration.max_length
    batches = [
        tokenizer(text, return_tensors="pt", truncation=True, max_length=length)["input_ids"]
        for text in texts
    ]
    stats = collect(models, graph, batches, forward=lambda model, ids: model(input_ids=ids))
    params = spec.parameters or {}
    matches = {}
    for space in graph.spaces:
        corr = stats[space.name].correlation()
        if spec.merge_method == "permute":
            matches[space.name] = permute(corr, space.size)
        else:
            alpha, beta = float(params.get("alpha", ZIPIT_ALPHA)), float(params.get("beta", ZIPIT_BETA))
            matches[space.name] = zipit(corr, space.size, alpha=alpha, beta=beta)
    return matches


def _stats_note(space: str, stats: dict[str, Any]) -> str:
    shown = ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items() if k != "method"
    )
    return f"{space}: {stats.get('method')}" + (f" ({shown})" if shown else "")
