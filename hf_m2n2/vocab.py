"""Vocabulary alignment: embedding and output-head rows matched by token across seeds with different tokenizers.

WizardMath-7B has 32001 embedding rows where Llama-2 has 32000; merging row i with row i is only right when
both tokenizers give token i the same id. Rows are matched by token string against the output tokenizer
(`tokenizer_source`: base, union, or a model); rows a seed lacks are taken from the base or zeroed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_m2n2.errors import CheckpointError, SpecError
from hf_m2n2.seeds import Seed

log = logging.getLogger(__name__)


@dataclass
class VocabPlan:
    """Output vocabulary: `rows` embedding rows; `row_maps[k][i]` is seed k's row for output row i (-1: none)."""

    rows: int
    row_maps: dict[int, torch.Tensor]
    fill_seed: int | None
    tokenizer_seed: int | None = None
    union_tokenizer: Any = None
    notes: list[str] = field(default_factory=list)


def embedding_rows(seed: Seed) -> int | None:
    for name in seed.arch.embed_names:
        if name in seed.checkpoint:
            return seed.checkpoint.info(name).shape[0]
    return None


def load_tokenizer(seed: Seed, trust_remote_code: bool = False):
    """The seed's tokenizer; its custom code (`auto_map`) runs only with `trust_remote_code` (never a prompt).

    Raises:
        CheckpointError: one line, naming the seed (and the opt-in when the tokenizer needs its own code).
    """
    from transformers import AutoTokenizer

    from hf_m2n2.custom_code import is_custom_code_error, refusal

    try:
        return AutoTokenizer.from_pretrained(str(seed.model.path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        if is_custom_code_error(exc):
            raise refusal(seed.model.path, seed.name) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{seed.name}: cannot load its tokenizer ({type(exc).__name__}: {first})"
        ) from exc


def plan_vocab(
    source: str | None,
    seeds: list[Seed],
    seed_index: dict[str, int],
    users: list[int],
    base: int | None,
    reference: int,
    pad_to_multiple_of: int | None = None,
    trust_remote_code: bool = False,
) -> VocabPlan | None:
    """Decide the output vocabulary and how each seed's rows map onto it.

    Args:
        source: `base`, `union`, a model reference, or None (align only if the seeds' row counts differ).
        users: seeds whose embeddings take part in the merge.
        base: the base seed (gaps are filled from it), reference: the seed whose config the output keeps.

    Returns:
        None when no alignment is needed (no source given and every seed has the same row count).
    """
    rows = {k: embedding_rows(seeds[k]) for k in users}
    if source is None:
        if len({r for r in rows.values() if r is not None}) <= 1:
            return None
        detail = ", ".join(f"{seeds[k].name}: {r}" for k, r in rows.items())
        log.warning("embedding row counts differ (%s); aligning rows by token to the base tokenizer", detail)
        source = "base"
    owner = base if base is not None else reference
    tokenizers = {k: load_tokenizer(seeds[k], trust_remote_code) for k in dict.fromkeys([owner, *users])}
    union = None
    if source == "base":
        out_tok, tok_seed = tokenizers[owner], owner
    elif source == "union":
        out_tok, tok_seed = _union(tokenizers, owner), None
        union = out_tok
    else:
        if source not in seed_index:
            raise SpecError("tokenizer_source", f"{source!r} is not one of the merged models")
        tok_seed = seed_index[source]
        if tok_seed not in tokenizers:
            tokenizers[tok_seed] = load_tokenizer(seeds[tok_seed], trust_remote_code)
        out_tok = tokenizers[tok_seed]
    id_to_token = {i: t for t, i in out_tok.get_vocab().items()}
    n_rows = max(len(id_to_token), (embedding_rows(seeds[tok_seed]) or 0) if tok_seed is not None else 0)
    if pad_to_multiple_of:
        n_rows += -n_rows % pad_to_multiple_of
    plan = VocabPlan(n_rows, {}, owner if owner in users else None, tok_seed, union)
    for k in users:
        plan.row_maps[k] = _row_map(id_to_token, tokenizers[k].get_vocab(), n_rows, rows[k] or 0)
        missing = int((plan.row_maps[k][: len(id_to_token)] < 0).sum())
        if missing:
            fill = f"taken from {seeds[plan.fill_seed].name}" if plan.fill_seed not in (None, k) else "zeroed"
            note = f"{seeds[k].name} lacks {missing} of the output vocabulary's {len(id_to_token)} tokens: rows {fill}"
            log.warning(note)
            plan.notes.append(note)
    return plan


def _row_map(
    id_to_token: dict[int, str], seed_vocab: dict[str, int], n_rows: int, seed_rows: int
) -> torch.Tensor:
    out = torch.full((n_rows,), -1, dtype=torch.long)
    for i in range(n_rows):
        token = id_to_token.get(i)
        j = seed_vocab.get(token, -1) if token is not None else (i if i < seed_rows else -1)
        out[i] = j if j < seed_rows else -1
    return out


def _union(tokenizers: dict[int, Any], owner: int):
    import copy

    tok = copy.deepcopy(tokenizers[owner])
    known = set(tok.get_vocab())
    extra: list[str] = []
    for k, other in tokenizers.items():
        if k == owner:
            continue
        for token, _ in sorted(other.get_vocab().items(), key=lambda kv: kv[1]):
            if token not in known:
                known.add(token)
                extra.append(token)
    if extra:
        tok.add_tokens(extra)
    return tok


def align_rows(tensor: torch.Tensor, row_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder rows to the output vocabulary; returns (aligned tensor with missing rows zeroed, missing mask)."""
    missing = row_map < 0
    out = tensor.index_select(0, row_map.clamp(min=0))
    if missing.any():
        out[missing] = 0
    return out, missing
