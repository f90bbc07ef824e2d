"""Vocabulary alignment: embedding and output-head rows matched by token across seeds with different tokenizers.

WizardMath-7B has 32001 embedding rows where Llama-2 has 32000; merging row i with row i is only right when
both tokenizers give token i the same id. Rows are matched by token string against the output tokenizer
(`tokenizer_source`: base, union, or a model). As in mergekit 0.1.5 (`PermutedVocabulary`), before the merge a
seed that lacks a token gets a default row: the row from `tokenizer.tokens` when configured, else the one seed's
that has it, else the base's, else the mean of the seeds that have it (zero when none has it); rows added by
`pad_to_multiple_of` hold each seed's mean embedding. A token only one seed has (a ChatML fine-tune's
`<|im_start|>`) therefore comes out equal to that seed's row instead of shrunk by the seeds that lack it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hf_m2n2.errors import CheckpointError, SpecError, first_line
from hf_m2n2.seeds import Seed
from hf_m2n2.spec import ModelTokenEmbedding, TokenEmbeddingConfig, ZeroEmbedding, model_ref_string

if TYPE_CHECKING:
    from hf_m2n2.recipe import TensorTask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenRow:
    """A configured token's default row (`tokenizer.tokens`): seed `seed`'s original row `row` (`row` None: its
    row for this token), zeros when `zero`, the automatic default when neither; given to every seed when
    `force`, else to those lacking the token."""

    token: str
    seed: int | None
    row: int | None
    force: bool
    zero: bool = False


@dataclass
class VocabPlan:
    """Output vocabulary: `rows` embedding rows, the first `tokens` of them tokens (the rest padding);
    `row_maps[k][i]` is seed k's row for output token i (-1: none).

    Attributes:
        base: the base seed (its row is the default of a token some seeds lack), or None.
        tokenizer_seed: the seed whose tokenizer files the output copies (None: `union_tokenizer` is saved).
        union_tokenizer: a tokenizer built for the output (the union, or a tokenizer with `tokens` added).
        token_rows: output token id -> its configured default row.
    """

    rows: int
    row_maps: dict[int, torch.Tensor]
    base: int | None
    tokenizer_seed: int | None = None
    union_tokenizer: Any = None
    notes: list[str] = field(default_factory=list)
    tokens: int = 0
    token_rows: dict[int, TokenRow] = field(default_factory=dict)


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
        raise CheckpointError(
            f"{seed.name}: cannot load its tokenizer ({type(exc).__name__}: {first_line(exc)})"
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
    tokens: dict[str, TokenEmbeddingConfig] | None = None,
) -> VocabPlan | None:
    """Decide the output vocabulary and how each seed's rows map onto it.

    Args:
        source: `base`, `union`, a model reference, or None (align only if the seeds' row counts differ).
        users: seeds whose embeddings take part in the merge.
        base: the base seed, reference: the seed whose config the output keeps.
        pad_to_multiple_of: round the row count up (padding rows hold the mean embedding).
        tokens: `tokenizer.tokens`: per-token embedding sources; new tokens are added to the vocabulary.

    Returns:
        None when no alignment is needed (no source given and every seed has the same row count).

    Raises:
        SpecError: a source or token entry names a model that is not merged, or a token it does not have.
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
    built = None
    if source == "base":
        out_tok, tok_seed = tokenizers[owner], owner
    elif source == "union":
        out_tok, tok_seed = _union(tokenizers, owner, {k: rows.get(k) for k in tokenizers}), None
        built = out_tok
    else:
        if source not in seed_index:
            raise SpecError("tokenizer_source", f"{source!r} is not one of the merged models")
        tok_seed = seed_index[source]
        if tok_seed not in tokenizers:
            tokenizers[tok_seed] = load_tokenizer(seeds[tok_seed], trust_remote_code)
        out_tok = tokenizers[tok_seed]
    new_tokens = [t for t in tokens or {} if t not in out_tok.get_vocab()]
    if new_tokens:
        built = copy.deepcopy(out_tok) if built is None else built
        built.add_tokens(new_tokens)
        out_tok, tok_seed = built, None
    vocab = out_tok.get_vocab()
    n_tokens = max(len(vocab), max(vocab.values(), default=-1) + 1)
    n_rows = n_tokens + (-n_tokens % pad_to_multiple_of if pad_to_multiple_of else 0)
    plan = VocabPlan(n_rows, {}, base if base in users else None, tok_seed, built, tokens=n_tokens)
    id_to_token = {i: t for t, i in vocab.items()}
    for k in users:
        plan.row_maps[k] = _row_map(id_to_token, tokenizers[k].get_vocab(), n_tokens, rows[k] or 0)
        missing = int((plan.row_maps[k] < 0).sum())
        if missing:
            note = (
                f"{seeds[k].name} lacks {missing} of the output vocabulary's {n_tokens} tokens: their rows are "
                "taken from the one model that has them, else the base, else the mean of those that have them"
            )
            log.warning(note)
            plan.notes.append(note)
    for token, cfg in (tokens or {}).items():
        plan.token_rows[vocab[token]] = _token_row(
            token, cfg, seeds, seed_index, users, tokenizers, plan, vocab
        )
    return plan


def check_token_sources(vocab: VocabPlan, tasks: Sequence[TensorTask]) -> None:
    """A `tokenizer.tokens` row taken from a model must come from a model that every token-indexed tensor is
    merged from (with slices, the embeddings come from the first slice, lm_head from the last): checked when the
    merge is planned, so `validate` and `merge` refuse it before anything is written.

    Raises:
        SpecError: naming the entry and the tensor.
    """
    for task in tasks:
        if not task.align_rows:
            continue
        merged_from = {source.seed for source in task.sources}
        for cfg in vocab.token_rows.values():
            if cfg.seed is not None and cfg.seed not in merged_from:
                raise SpecError(
                    f"tokenizer.tokens.{cfg.token}.source",
                    f"its row comes from a model that is not merged into {task.name!r}",
                )


def _token_row(
    token: str,
    cfg: TokenEmbeddingConfig,
    seeds: list[Seed],
    seed_index: dict[str, int],
    users: list[int],
    tokenizers: dict[int, Any],
    plan: VocabPlan,
    vocab: dict[str, int],
) -> TokenRow:
    """Resolve one `tokenizer.tokens` entry to a default row (checked here, so a bad entry fails before writing)."""
    where = f"tokenizer.tokens.{token}.source"
    if cfg.source is None:  # the automatic default (mergekit 0.1.5 fails on an entry without a source)
        return TokenRow(token, None, None, cfg.force)
    if isinstance(cfg.source, ZeroEmbedding):
        return TokenRow(token, None, None, cfg.force, zero=True)
    ref = cfg.source.model if isinstance(cfg.source, ModelTokenEmbedding) else cfg.source
    seed = seed_index.get(model_ref_string(ref))
    if seed not in users:
        path = f"{where}.model" if isinstance(cfg.source, ModelTokenEmbedding) else where
        raise SpecError(path, f"{model_ref_string(ref)!r} is not one of the merged models")
    if not isinstance(cfg.source, ModelTokenEmbedding):
        if plan.row_maps[seed][vocab[token]] < 0:
            raise SpecError(where, f"{seeds[seed].name} has no token {token!r}")
        return TokenRow(token, seed, None, cfg.force)
    row = cfg.source.token_id
    if row is None:
        row = tokenizers[seed].get_vocab().get(cfg.source.token, -1)
        if row < 0:
            raise SpecError(f"{where}.token", f"{seeds[seed].name} has no token {cfg.source.token!r}")
    if row >= (embedding_rows(seeds[seed]) or 0):
        raise SpecError(
            f"{where}.token_id", f"{row} is beyond {seeds[seed].name}'s {embedding_rows(seeds[seed])} rows"
        )
    return TokenRow(token, seed, row, cfg.force)


def _row_map(
    id_to_token: dict[int, str], seed_vocab: dict[str, int], n_rows: int, seed_rows: int
) -> torch.Tensor:
    out = torch.full((n_rows,), -1, dtype=torch.long)
    for i in range(n_rows):
        token = id_to_token.get(i)
        j = seed_vocab.get(token, -1) if token is not None else (i if i < seed_rows else -1)
        out[i] = j if j < seed_rows else -1
    return out


def _union(tokenizers: dict[int, Any], owner: int, rows: dict[int, int | None]):
    """The owner's tokenizer plus every other seed's tokens it lacks: plain tokens first, then added tokens (with
    their settings, e.g. `special`), in seed order, as mergekit's union does; tokens beyond a seed's embedding
    rows are skipped."""
    tok = copy.deepcopy(tokenizers[owner])
    known = set(tok.get_vocab())
    plain: list[str] = []
    added: list[Any] = []
    for k, other in tokenizers.items():
        if k == owner:
            continue
        specials = other.added_tokens_decoder
        limit = rows.get(k) or len(other.get_vocab())
        for token, i in sorted(other.get_vocab().items(), key=lambda kv: kv[1]):
            if token in known or i >= limit:
                continue
            known.add(token)
            if i in specials and specials[i].content == token:
                added.append(specials[i])
            else:
                plain.append(token)
    if plain:
        tok.add_tokens(plain)
    if added:
        tok.add_tokens(added)
    return tok


def align_embeddings(
    seed_ids: Sequence[int],
    tensors: Sequence[torch.Tensor],
    vocab: VocabPlan,
    base: int | None,
) -> list[torch.Tensor]:
    """Each seed's token-indexed tensor re-ordered to the output vocabulary, the rows it lacks filled as mergekit
    0.1.5 fills them (see the module docstring), padding rows set to its mean embedding.

    Default rows are computed only for the tokens some seed lacks (or forced ones): the extra memory is a few rows.

    Args:
        seed_ids: the seed of each tensor (the sources of one output tensor).
        base: the base seed of this tensor, if any (its row is the default where it has the token).
    """
    n, total = vocab.tokens, vocab.rows
    aligned, has = [], []
    for k, tensor in zip(seed_ids, tensors):
        row_map = vocab.row_maps[k].to(tensor.device)
        has.append(row_map >= 0)
        if total > n:
            row_map = torch.cat([row_map, row_map.new_full((total - n,), -1)])
        aligned.append(tensor.index_select(0, row_map.clamp(min=0)))
    forced = torch.zeros(n, dtype=torch.bool, device=has[0].device)
    for out_row, cfg in vocab.token_rows.items():
        forced[out_row] = cfg.force
    need = (~torch.stack(has).all(0) | forced).nonzero().squeeze(1)
    if need.numel():
        default = _default_rows(need, list(seed_ids), tensors, aligned, has, vocab, base)
        for rows, present in zip(aligned, has):
            fill = ~present[need] | forced[need]
            rows[need[fill]] = default[fill]
    if total > n:
        for rows in aligned:
            rows[n:] = rows[:n].mean(0)
    return aligned


def _default_rows(
    need: torch.Tensor,
    seed_ids: list[int],
    tensors: Sequence[torch.Tensor],
    aligned: list[torch.Tensor],
    has: list[torch.Tensor],
    vocab: VocabPlan,
    base: int | None,
) -> torch.Tensor:
    """The default row of each output token in `need`: its configured source, else the one seed's that has it,
    else the base's, else the mean of the seeds that have it (zeros when none has it)."""
    subs = []
    for rows, present in zip(aligned, has):
        sub = rows[need]
        sub[~present[need]] = 0
        subs.append(sub)
    default = subs[0].clone()
    for sub in subs[1:]:
        default += sub  # rows a seed lacks are zero: the sum runs over the seeds that have the token
    count = torch.stack([h[need] for h in has]).sum(0).clamp(min=1)
    default /= count.to(default.dtype).view(-1, *([1] * (default.dim() - 1)))
    if base in seed_ids:
        at = seed_ids.index(base)
        own = has[at][need]
        default[own] = subs[at][own]
    position = {row: i for i, row in enumerate(need.tolist())}
    for out_row, cfg in vocab.token_rows.items():
        if out_row not in position:
            continue
        i = position[out_row]
        if cfg.zero:
            default[i] = 0
        if cfg.seed is None:
            continue
        at = seed_ids.index(cfg.seed)  # one of them: check_token_sources refused the plan otherwise
        default[i] = aligned[at][out_row] if cfg.row is None else tensors[at][cfg.row]
    return default
