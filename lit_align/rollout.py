"""Sampling G completions per prompt (a KV-cache decoding loop that drops finished rows, or Hugging
Face ``generate`` where the loop cannot run the model), in chunks of rows, with exactly the sampling
settings lit-align passes (never the checkpoint's); masks and log-probs; grouping rows by length for
the training forward.

No Lightning here. The model is any ``transformers`` causal LM; prompts arrive left-padded.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, fields

import torch

from lit_align.core import settings as S
from lit_align.losses import entropy_from_logits, token_logprobs


@dataclass
class Rollout:
    """G completions for each of B prompts, row ``i * G + g`` holding prompt i's g-th sample."""

    prompt_ids: torch.Tensor  # (B*G, P) left-padded
    prompt_mask: torch.Tensor  # (B*G, P)
    completion_ids: torch.Tensor  # (B*G, T)
    completion_mask: torch.Tensor  # (B*G, T) 1 up to and including the first EOS
    old_logp: torch.Tensor  # (B*G, T) log-probs of the sampled tokens at sampling time
    entropy: torch.Tensor  # (B*G, T) entropy of the sampling distribution
    completions: list[str]  # decoded completions (see completion_texts: special tokens dropped by default)
    sampler: str = (
        "decode"  # what sampled it: "decode" (rollout.decode), "hf-generate" (HF generate + a scoring forward), "vllm"
    )
    # (B*G, T) vLLM's log-probs of the sampled tokens, 0 at given (prefix) positions; None on the HF path
    sampler_logp: torch.Tensor | None = None
    # (B*G, T) 1 at completion positions whose token was given (a prefix, see generate's prefix_ids) rather
    # than sampled, 0 elsewhere (after the first EOS too); None when no row has a prefix
    prefix_mask: torch.Tensor | None = None
    # mixed groups (a demonstration beside the samples of its prompt): the prompt index of each row, (N,) long
    # (None: row // G, groups of G consecutive rows), and which rows the policy did not sample, (N,) bool
    # (None: none); an off-policy row's old_logp is its behaviour log-prob (0: probability 1, a demonstration)
    group_ids: torch.Tensor | None = None
    off_policy: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def take(self, rows: torch.Tensor) -> Rollout:
        """The rows ``rows`` (a LongTensor of row indices, in the order wanted) of this rollout: every per-row
        field (tensors whose first dimension is the row count, the completion texts) cut, the rest kept."""
        return Rollout(**{f.name: take_rows(getattr(self, f.name), rows, len(self.completions)) for f in fields(self)})


def take_rows(value, rows: torch.Tensor, n: int):
    """``value`` cut to ``rows`` where it has one entry per row (``n`` of them): a tensor whose first dimension is
    ``n``, a list of ``n`` items, a :class:`Rollout` of ``n`` rows; anything else is returned as it is."""
    if isinstance(value, Rollout):
        return value.take(rows)
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
        return value[rows.to(value.device)]
    if isinstance(value, list) and len(value) == n:
        return [value[i] for i in rows.tolist()]
    return value


def completion_mask(completion_ids: torch.Tensor, eos_token_ids: list[int] | int | None) -> torch.Tensor:
    """1 for each token up to and including the first EOS of its row, 0 after it."""
    if eos_token_ids is None:
        return torch.ones_like(completion_ids)
    eos = torch.as_tensor(eos_token_ids, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos)
    # number of EOS strictly before position t; a token counts while none came before it
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).long()


def check_prefix(
    prefix_ids: torch.Tensor, prefix_mask: torch.Tensor | None, rows: int, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given completion prefixes, one per output row: ``prefix_ids`` (rows, L), right-padded, ``prefix_mask``
    (rows, L) 1 on each row's prefix tokens (None: every column is). Returns (prefix ids (rows, L), long,
    0 on padding, whatever it held, e.g. -100; prefix lengths (rows,), long). Raises ValueError for a shape that does not fit or a mask that is not
    right-padded (a 0 before a 1), or, given ``vocab_size``, a given token id outside [0, vocab_size)."""
    if not torch.is_tensor(prefix_ids) or (prefix_mask is not None and not torch.is_tensor(prefix_mask)):
        raise ValueError(
            f"prefix_ids / prefix_mask must be tensors, got {type(prefix_ids).__name__} / {type(prefix_mask).__name__}"
        )
    if prefix_ids.dim() != 2 or prefix_ids.shape[0] != rows:
        raise ValueError(f"prefix_ids: one row per output row, (rows={rows}, L), got {tuple(prefix_ids.shape)}")
    if prefix_mask is None:
        prefix_mask = torch.ones_like(prefix_ids)
    if prefix_mask.shape != prefix_ids.shape:
        raise ValueError(
            f"prefix_mask {tuple(prefix_mask.shape)} must have prefix_ids' shape {tuple(prefix_ids.shape)}"
        )
    given = prefix_mask.ne(0)
    lengths = given.sum(-1)
    columns = torch.arange(given.shape[1], device=given.device)
    if not torch.equal(given, columns.unsqueeze(0) < lengths.unsqueeze(1)):
        raise ValueError("prefix_mask must be right-padded: each row's prefix tokens first, then 0s")
    if vocab_size is not None:
        bad = given & ((prefix_ids < 0) | (prefix_ids >= vocab_size))
        if bool(bad.any()):
            r, c = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"prefix_ids: {int(bad.sum())} given token ids outside the vocabulary [0, {vocab_size}), e.g. row {r}, "
                f"column {c}: {int(prefix_ids[r, c])} (padding columns need prefix_mask 0)"
            )
    return prefix_ids.long() * given, lengths.long()


def vocab_size_of(model) -> int | None:
    """The number of token ids ``model`` embeds (None when it does not say)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    n = getattr(emb, "num_embeddings", None)
    return int(n) if isinstance(n, int) else None


def prefix_positions(prefix_mask: torch.Tensor | None, completion_mask: torch.Tensor) -> torch.Tensor | None:
    """:attr:`Rollout.prefix_mask` of completions (``completion_mask``: (N, T)) that start with the given
    prefixes (``prefix_mask``: (N, L), right-padded, as :func:`generate` takes it): 1 (long) at completion
    position t < the row's prefix length where ``completion_mask`` is 1, so a prefix cut by
    ``max_new_tokens`` or ended by its own EOS is marked only where the completion has it. None when
    ``prefix_mask`` is None or no row has a prefix."""
    return None if prefix_mask is None else _given_positions(prefix_mask.ne(0).sum(-1), completion_mask)


def _given_positions(lengths: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor | None:
    """:func:`prefix_positions` from the prefix lengths (N,)."""
    lengths = lengths.to(completion_mask.device)
    if not bool((lengths > 0).any()):
        return None
    columns = torch.arange(completion_mask.shape[1], device=completion_mask.device)
    return ((columns.unsqueeze(0) < lengths.unsqueeze(1)) & completion_mask.ne(0)).long()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


_FORWARD_ARGS: weakref.WeakKeyDictionary[torch.nn.Module, frozenset] = weakref.WeakKeyDictionary()


def _forward_args(model) -> frozenset:
    """Names of the keyword arguments ``model``'s forward takes; a peft wrapper passes its keywords
    through to the model it wraps, so that model's forward is read. Looked up once per model."""
    try:
        return _FORWARD_ARGS[model]
    except (KeyError, TypeError):
        pass
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        names = frozenset(inspect.signature(inner.forward).parameters)
    except (TypeError, ValueError):  # no introspectable signature
        names = frozenset()
    try:
        _FORWARD_ARGS[model] = names
    except TypeError:  # not weak-referenceable: look it up again next time
        pass
    return names


def accepts_logits_to_keep(model) -> bool:
    """True when ``model``'s forward takes ``logits_to_keep`` (Hugging Face causal LMs: Llama, Qwen,
    Mistral, ...), so a forward can skip the LM head at positions whose logits are not needed."""
    return "logits_to_keep" in _forward_args(model)


def with_cache(model, cache) -> dict:
    """The forward keyword that passes a KV ``cache``: ``cache`` where the model's forward names it so
    (transformers >= 5.2x, where ``past_key_values`` is deprecated and goes in 5.40), else
    ``past_key_values`` (older releases and models that still use that name)."""
    return {"cache": cache} if "cache" in _forward_args(model) else {"past_key_values": cache}


def _eos_ids(model, tokenizer) -> list[int] | None:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return None
    return [eos] if isinstance(eos, int) else list(eos)


# ---------------------------------------------------------------------------------------------- settings
# The generation settings lit-align's sampler applies, on either path (decode, HF generate). Each one
# comes from lit-align's own arguments; a checkpoint's generation config is never read for them.
SETTINGS = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "pad_token_id",
    "eos_token_id",
)

# Generation-config fields that do not change what is sampled (token ids, caching, output format,
# bookkeeping): sampling_overrides never reports them. max_length: max_new_tokens wins over it in HF too.
_NOT_SAMPLING = frozenset(
    {
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "decoder_start_token_id",
        "max_length",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "return_dict_in_generate",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "num_return_sequences",
        "compile_config",
        "disable_compile",
        "prefill_chunk_size",
        "continuous_batching_config",
        "transformers_version",
        "_from_model_config",
    }
)

# the value that switches a generation-config field off (what lit-align samples with when it does not set it)
_OFF = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "length_penalty": 1.0,
    "guidance_scale": 1.0,
}


_RULES = {  # for a value that is not None
    "max_new_tokens": S.integer(1),
    "min_new_tokens": S.integer(0, unit=" (0: off)"),
    "temperature": S.number(0, low_open=True),
    "top_k": S.integer(0, unit=" (0: off)"),
    "top_p": S.number(0, 1, low_open=True, words="in (0, 1] (1: off)"),
    "min_p": S.number(0, 1, high_open=True, words="in [0, 1) (0: off)"),
    "repetition_penalty": S.number(0, low_open=True, words="a finite number > 0 (1: off)"),
}


def check_settings(settings: dict) -> None:
    """Raise a ValueError naming the setting if ``settings`` holds one lit-align's sampler does not
    apply (anything outside :data:`SETTINGS`, e.g. ``no_repeat_ngram_size``) or a value out of range
    (e.g. ``min_p=1.5``). None means off / the default. Nothing falls back to another sampler."""
    for name in settings:
        if name not in SETTINGS:
            raise ValueError(
                f"generation setting {name}={settings[name]!r}: lit-align's sampler does not apply it "
                f"(it applies {', '.join(SETTINGS)}); remove it rather than sample a distribution other than asked"
            )
    S.check(check_settings, {k: v for k, v in settings.items() if v is not None}, _RULES, prefix="")


def sampling_settings(
    model,
    tokenizer,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    greedy: bool = False,
    min_new_tokens: int = 0,
) -> dict:
    """The complete generation settings :func:`generate` samples with: lit-align's arguments, plus the
    end and padding tokens (the checkpoint's ``eos_token_id``, else the tokenizer's; the tokenizer's
    pad token, else the first end token). No other field of ``model.generation_config`` is used.
    ``greedy``: argmax of the raw logits, the sampling arguments unused (they are still checked).
    Raises ValueError naming an argument that is out of range."""
    check_settings(
        dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
        )
    )
    eos_ids = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
    settings = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos_ids, do_sample=not greedy)
    if min_new_tokens:
        settings["min_new_tokens"] = min_new_tokens
    if not greedy:
        settings.update(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty
        )
    return settings


def sampling_overrides(model, settings: dict) -> dict[str, tuple]:
    """The fields of the checkpoint's generation config (``model.generation_config``, e.g. a Qwen
    instruct model's ``temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05``) that lit-align's
    sampler does not follow, with ``settings`` (from :func:`sampling_settings`) being what it samples
    with: ``{name: (checkpoint value, value sampled with)}``. A field lit-align does not set is sampled
    with its "off" value (top_k 0, typical_p 1.0, no_repeat_ngram_size 0, ...; None where there is
    none, e.g. ``bad_words_ids``). Fields that do not change the distribution (token ids, caching,
    output flags, max_length) are never listed; nor is a field whose value equals what is used.
    Meant for one start-up log line."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    overridden = {}
    for name, old in config.to_dict().items():
        if name in _NOT_SAMPLING or old is None or name.startswith("_"):
            continue
        new = settings[name] if name in settings else _OFF.get(name)
        if old != new:
            overridden[name] = (old, new)
    return overridden


# ---------------------------------------------------------------------------------------------- generate
def decode_supports(model) -> bool:
    """True when :func:`decode` can sample from ``model``: a decoder-only model whose KV cache is a plain
    ``DynamicCache`` of full-attention layers (rows can be copied and dropped). Sliding-window, chunked
    or recurrent caches and encoder-decoder models are sampled with HF ``generate`` instead."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if getattr(model.config, "is_encoder_decoder", False):
        return False
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a cache this loop does not know
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def _all_reduce_max(value: int, device) -> int:
    """The largest ``value`` over all ranks (torch.distributed's default group)."""
    import torch.distributed as dist

    t = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _chunks(rows: int, group: int, size: int) -> list[tuple[int, list[int]]]:
    """Split rows ``0 .. rows - 1`` (row r samples prompt r // group) into consecutive runs of ``size``
    rows (the last may be shorter): ``[(first prompt, rows per prompt in the run), ...]``."""
    out = []
    for lo in range(0, rows, size):
        hi = min(lo + size, rows)
        first, last = lo // group, (hi - 1) // group
        out.append((first, [min(hi, (p + 1) * group) - max(lo, p * group) for p in range(first, last + 1)]))
    return out


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    num_generations: int = 8,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    synced_gpus: bool = False,
    drop_finished: bool = True,
    generation_batch_size: int | None = None,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    min_new_tokens: int = 0,
    skip_special_tokens: bool = True,
    prefix_ids: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
) -> Rollout:
    """Sample ``num_generations`` (G) completions for each of the B left-padded prompts (``prompt_ids``,
    ``prompt_mask``: (B, P)), or one greedy one (argmax of the raw logits; the sampling arguments unused).

    Sampling exactly as configured: the distribution is shaped by these arguments only, in Hugging
    Face's order: ``repetition_penalty`` (over prompt and completion so far; 1: off), EOS masked while
    fewer than ``min_new_tokens`` tokens, then ``temperature``, ``top_k`` (0: off), ``top_p`` (1: off),
    ``min_p`` (0: off). The checkpoint's generation config (a Qwen instruct model ships temperature 0.7,
    top_p 0.8, top_k 20, repetition_penalty 1.05) is ignored except for its end token; see
    :func:`sampling_overrides` for what that overrides. Out-of-range values raise ValueError naming them.

    ``old_logp`` and ``entropy`` come from the RAW logits / ``temperature`` (1 when greedy): the
    distribution the training forward computes, so the first strictly on-policy update has ratio
    exactly 1 whatever the penalty. ``repetition_penalty``, ``top_k``, ``top_p``, ``min_p`` (and
    ``min_new_tokens``) shape the proposal only, as in TRL: the loss treats the samples as draws
    from the temperature-scaled policy.

    Samplers: :func:`decode` (``Rollout.sampler == "decode"``), a KV-cache loop that runs each prompt
    through the model once for its G rows and stops computing rows that emitted EOS, wherever
    :func:`decode_supports` the model and ``drop_finished``; otherwise HF ``generate`` (``"hf-generate"``,
    with a generation config built from these settings alone, no per-step logits kept), then one
    forward per chunk over prompt + completion for the log-probs (logits at completion positions only
    where the model takes ``logits_to_keep``). Encoder-decoder models raise ValueError.

    ``generation_batch_size``: at most this many rows (prompts x G) are decoded at once (their KV
    cache, logits and, on the HF path, scoring forward); None: all B x G. The rows, in order (row
    ``i * G + g`` is prompt i's g-th sample), are cut into consecutive chunks of exactly that many
    (the last may be shorter): whole prompts when it is a multiple of G, otherwise a prompt's rows may
    straddle two chunks and its prefill then runs once in each (at most one extra prompt prefill per
    chunk). Within a chunk each prompt is prefilled once and its KV cache copied to its rows. Chunks
    run one after another with the same random stream; None gives exactly the single-chunk result.

    ``synced_gpus`` (FSDP2: every forward is a collective): every rank runs the same number of chunks
    (the largest count over ranks; a rank with fewer runs stand-in chunks whose output is dropped) and,
    within a chunk, the same number of forward steps, until no rank has a row still generating (one
    all-reduce of an int per step over torch.distributed's default group).

    ``skip_special_tokens``: how the completion texts are decoded (see :func:`completion_texts`).

    ``prefix_ids``, ``prefix_mask`` (B*G, L), right-padded, one row per OUTPUT row (row ``i * G + g``:
    prompt i's g-th sample; B rows when greedy): completions that start with GIVEN tokens (Prefix-RFT's
    demonstration prefixes, UFT's hints). Row r's completion is its prefix tokens (``prefix_mask`` 1),
    then the policy's samples; a row whose mask is all 0 samples freely. ``max_new_tokens`` bounds the
    whole completion, so a longer prefix is cut to it; an EOS inside the prefix ends the completion there
    (``completion_mask`` as usual). The prefix is fed to the model token by token at the completion
    positions it occupies, in the same forwards that sample the other rows (:func:`decode`; on the HF
    path a logits processor forces it in ``generate``): each step's draw is made for every row and, in a
    row whose prefix covers that position, replaced by the given token. So the loop runs no more steps
    than the longest completion, as without prefixes, and ``old_logp`` / ``entropy`` at prefix positions
    are the policy's log-prob of the given token and the entropy there at the sampling temperature, from
    the logits of that same forward (decode) or of the scoring forward (HF generate), as at sampled
    positions. ``Rollout.prefix_mask`` marks the given positions (:func:`prefix_positions`); None when
    no row has a prefix. Without ``prefix_ids`` nothing changes, random draws included.

    Returns one :class:`Rollout` with B x G rows (row ``i * G + g``: prompt i's g-th sample); its
    completion width T is the longest chunk's, shorter completions padded with the pad id, mask 0,
    log-prob 0 and entropy 0 (all float32, nats). The model's train/eval mode is restored afterwards.
    """
    settings = sampling_settings(
        model, tokenizer, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, greedy, min_new_tokens
    )
    if generation_batch_size is not None and not (S.is_integer(generation_batch_size) and generation_batch_size >= 1):
        raise ValueError(f"generation_batch_size={generation_batch_size!r} must be None (all rows) or an integer >= 1")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model: lit-align samples decoder-only causal LMs"
        )
    G = num_generations if not greedy else 1
    sampler = "decode" if drop_finished and decode_supports(model) else "hf-generate"
    pad, t = settings["pad_token_id"], 1.0 if greedy else temperature
    rows = prompt_ids.shape[0] * G
    given = None  # (prefix ids, lengths) per output row, cut to max_new_tokens
    if prefix_ids is None and prefix_mask is not None:
        raise ValueError("prefix_mask is given without prefix_ids: pass the prefix tokens too, or neither")
    if prefix_ids is not None:
        given_ids, lengths = check_prefix(prefix_ids, prefix_mask, rows, vocab_size_of(model))
        if bool((lengths > 0).any()):
            given = given_ids[:, :max_new_tokens].to(prompt_ids.device), lengths.clamp(max=max_new_tokens)
    chunks = (
        _chunks(rows, G, rows if generation_batch_size is None else min(generation_batch_size, rows)) if rows else []
    )
    n_chunks = _all_reduce_max(len(chunks), prompt_ids.device) if synced_gpus else len(chunks)
    was_training = model.training
    model.eval()
    try:
        pieces, lo = [], 0
        for c in range(n_chunks):
            if c < len(chunks):
                first, counts = chunks[c]
                ids, mask = prompt_ids[first : first + len(counts)], prompt_mask[first : first + len(counts)]
                hi = lo + sum(counts)
                prefix = None if given is None else (given[0][lo:hi], given[1][lo:hi])
                pieces.append(_sample_chunk(sampler, model, ids, mask, counts, settings, t, synced_gpus, prefix=prefix))
                lo = hi
            else:  # this rank's stand-in for a chunk other ranks still run: the same collectives, no output
                if rows:
                    ids, mask = prompt_ids[:1], prompt_mask[:1]
                else:
                    ids = torch.full((1, 1), pad, dtype=torch.long, device=prompt_ids.device)
                    mask = torch.ones_like(ids)
                _sample_chunk(sampler, model, ids, mask, [1], settings, t, synced_gpus, idle=True)
    finally:
        model.train(was_training)
    width = max((p[0].shape[1] for p in pieces), default=0)

    def padded(k: int, value) -> torch.Tensor:
        parts = [torch.nn.functional.pad(p[k], (0, width - p[k].shape[1]), value=value) for p in pieces]
        return torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.float32 if k > 1 else torch.long)

    completion_ids, mask, old_logp, entropy = padded(0, pad), padded(1, 0), padded(2, 0.0), padded(3, 0.0)
    texts = (
        completion_texts(tokenizer, completion_ids, mask, settings["eos_token_id"], skip_special_tokens, pad)
        if rows
        else []
    )
    return Rollout(
        prompt_ids.repeat_interleave(G, dim=0),
        prompt_mask.repeat_interleave(G, dim=0),
        completion_ids,
        mask,
        old_logp,
        entropy,
        texts,
        sampler,
        prefix_mask=None if given is None else _given_positions(given[1], mask),
    )


def completion_texts(
    tokenizer,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    eos_token_ids,
    skip_special_tokens: bool = True,
    pad_token_id: int | None = None,
) -> list[str]:
    """The text of each completion (``completion_ids``, ``completion_mask``: (N, T)), from its tokens
    up to and including its first EOS. ``skip_special_tokens`` (TRL's behaviour): special tokens are
    dropped (the masked positions decoded as ``pad_token_id``, a special token). False: every token the
    model sampled is kept (an added ``<answer>`` token, ...) except the end token that stopped the
    completion, as vLLM leaves its stop token out of the text."""
    if skip_special_tokens and pad_token_id is not None:
        mask = completion_mask.to(completion_ids.dtype)
        return tokenizer.batch_decode(completion_ids * mask + (1 - mask) * pad_token_id, skip_special_tokens=True)
    eos = set(torch.as_tensor(eos_token_ids).reshape(-1).tolist()) if eos_token_ids is not None else set()
    rows = []
    for ids, n in zip(completion_ids.tolist(), completion_mask.sum(-1).tolist()):
        ids = ids[: int(n)]
        if not skip_special_tokens and ids and ids[-1] in eos:
            ids = ids[:-1]
        rows.append(ids)
    return tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)


def completion_id_lists(rollout) -> list[list[int]] | None:
    """Each completion's token ids up to and including its first EOS (what TRL passes to reward
    functions as ``completion_ids``); None for an object without ``completion_ids``."""
    ids = getattr(rollout, "completion_ids", None)
    if ids is None:
        return None
    return [row[: int(n)] for row, n in zip(ids.tolist(), rollout.completion_mask.sum(-1).tolist())]


def _sample_chunk(
    sampler: str,
    model,
    prompt_ids,
    prompt_mask,
    counts: list[int],
    settings: dict,
    temperature: float,
    synced: bool,
    idle: bool = False,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """One chunk: ``counts[i]`` samples of prompt i. (completion ids, mask, log-probs, entropies), each
    (sum(counts), T). ``idle``: a stand-in chunk (see :func:`generate`); its output is meaningless.
    ``prefix``: (ids (sum(counts), L), lengths (sum(counts),)) of the rows' given prefixes, or None."""
    repeats = counts[0] if len(set(counts)) == 1 else torch.tensor(counts)
    eos = settings["eos_token_id"]
    given = {} if prefix is None else dict(prefix_ids=prefix[0], prefix_lengths=prefix[1])
    if sampler == "decode":
        ids, logp, entropy = decode(
            model, prompt_ids, prompt_mask, settings, repeats=repeats, synced=synced, idle=idle, **given
        )
        return ids, completion_mask(ids, eos), logp, entropy
    index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(prompt_ids.device)
    prompt_ids, prompt_mask = prompt_ids[index], prompt_mask[index]
    ids = hf_generate(model, prompt_ids, prompt_mask, settings, synced=synced, **given)
    mask = completion_mask(ids, eos)
    logp, entropy = score_completions(model, prompt_ids, prompt_mask, ids, mask, temperature)
    return ids, mask, logp, entropy


def hf_generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: dict,
    synced: bool = False,
    prefix_ids: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF ``generate`` with ``settings`` (see :data:`SETTINGS`) and nothing else: the model's own
    generation config is swapped out for the call, so none of its fields (a checkpoint's top_k,
    repetition_penalty, ...) apply; no scores or logits are kept. ``synced``: HF's ``synced_gpus``.
    ``prefix_ids`` (B, L), ``prefix_lengths`` (B,): row b's first ``prefix_lengths[b]`` completion tokens
    are given, not sampled (a logits processor, last in HF's list, leaves only the given token
    possible; the draw is still made, as in :func:`decode`). Returns the completion ids (B, T), padded
    with ``pad_token_id`` after EOS."""
    from transformers import GenerationConfig

    check_settings(settings)
    config = GenerationConfig(**{**_OFF_FOR_HF, **{k: v for k, v in settings.items() if v is not None}})
    if not config.do_sample:  # HF warns about sampling fields set while greedy
        for name in ("temperature", "top_k", "top_p", "min_p"):
            setattr(config, name, None)
    if config.min_p == 0.0:
        config.min_p = None
    processors = {}
    if prefix_ids is not None and bool((prefix_lengths > 0).any()):
        processors["logits_processor"] = _given_prefix(prefix_ids, prefix_lengths, prompt_ids.shape[1])
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = inner.generation_config
    inner.generation_config = config  # what HF merges missing fields from: nothing of the checkpoint's
    try:
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=config,
            synced_gpus=synced,
            **processors,
        )
    finally:
        inner.generation_config = before
    return out[:, prompt_ids.shape[1] :]


def _given_prefix(prefix_ids: torch.Tensor, lengths: torch.Tensor, prompt_width: int):
    """A ``LogitsProcessorList`` whose one processor, at completion position t (the step's input width
    minus ``prompt_width``), leaves in each row with ``lengths > t`` only its given token
    ``prefix_ids[row, t]`` possible (score 0, every other -inf): sampling, greedy and every warper then
    pick it. Rows without a prefix there are untouched."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class GivenPrefix(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            t = input_ids.shape[1] - prompt_width
            if t >= prefix_ids.shape[1]:
                return scores
            rows = (lengths > t).to(scores.device)
            forced = torch.full_like(scores, float("-inf")).scatter_(1, prefix_ids[:, t : t + 1].to(scores.device), 0.0)
            return torch.where(rows.unsqueeze(1), forced, scores)

    return LogitsProcessorList([GivenPrefix()])


# explicit "off" values where HF's global defaults are not off (top_k 50) or not set
_OFF_FOR_HF = dict(
    do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, num_beams=1, use_cache=True
)


def score_completions(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``completion_ids`` (B, T) and entropies (nats) under softmax(raw logits /
    ``temperature``), float32, 0 where ``completion_mask`` is 0: one forward over prompt + completion
    (B, P + T), with logits at the T completion positions only where the model takes ``logits_to_keep``
    (the transient logits are (B, T, V), as in one training micro-batch of B rows)."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    T = completion_ids.shape[1]
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    if accepts_logits_to_keep(model):
        logits = model(**kwargs, logits_to_keep=T + 1).logits[:, :-1]
    else:
        logits = model(**kwargs).logits[:, prompt_ids.shape[1] - 1 : -1]
    m = completion_mask.to(torch.float32)
    return token_logprobs(logits, completion_ids, temperature) * m, entropy_from_logits(logits, temperature) * m


def decode(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: dict,
    compact_at: float = 0.25,
    repeats: int | torch.Tensor = 1,
    synced: bool = False,
    idle: bool = False,
    prefix_ids: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or greedily pick) completions token by token with a KV cache, as HF ``generate`` does
    for ``settings`` (only those: :data:`SETTINGS`; anything else, or a value out of range, raises
    ValueError naming it), but stop computing rows that have emitted EOS. The model's own generation
    config is not read.

    Each step takes the next-token logits in float32 and applies HF's own processors in HF's order:
    ``RepetitionPenaltyLogitsProcessor`` over the prompt (left padding ignored, as in HF) and the
    tokens so far, EOS masked while fewer than ``min_new_tokens``; then, when sampling, temperature,
    top-k, top-p, min-p; and draws from their softmax (argmax when not sampling). The log-probs and
    entropies returned are those of the RAW logits / temperature, not of the processed scores. A
    finished row is fed padding, as in HF, until finished rows make up ``compact_at`` of the rows
    still in the cache; then they are dropped from it (so the cache is copied a few times, not every
    step). Until rows are dropped, the random draws are HF's, token for token.

    ``repeats``: an int r samples each prompt r times (rows ``i * r ... (i + 1) * r - 1`` of the result
    are prompt i's); a 1-D tensor of counts samples prompt i ``repeats[i]`` times, rows in prompt
    order. Each prompt is run through the model once and its KV cache copied to its rows, where
    ``generate`` on repeated prompts computes the same keys and values r times.

    ``synced``: every rank steps until no rank has a row still generating (one all-reduce of an int per
    step over torch.distributed's default group); a rank whose rows have all finished keeps running
    forwards on one of them, fed padding, recording nothing (and drawing no random numbers).
    ``idle`` (with ``synced``): rows start finished: a rank's stand-in that only runs the forwards.

    ``prefix_ids`` (N, L) and ``prefix_lengths`` (N,), one per output row: row n's first
    ``prefix_lengths[n]`` completion tokens are given (``prefix_ids[n, :length]``; cut to
    ``max_new_tokens``), not sampled. At each step the draw is made for every row as without prefixes
    (so other rows' draws do not change until rows are dropped), and a row still inside its prefix
    takes its given token instead; the forward that feeds that token computes the next position's
    logits as for sampled tokens, so the log-prob and entropy recorded at a given position are those
    of the same raw logits / temperature. An EOS in the prefix finishes the row there.

    Returns (completion ids (N, T), log-probs and entropies of the raw logits / temperature (N, T),
    float32, nats, 0 after EOS), N = prompts x repeats (or sum(repeats)), T = steps until every row
    finished or max_new_tokens (0 when ``idle``).
    """
    from transformers import (
        DynamicCache,
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    check_settings(settings)
    sample = bool(settings.get("do_sample"))
    temperature = settings.get("temperature") if sample and settings.get("temperature") is not None else 1.0
    warpers = LogitsProcessorList()
    if sample and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if sample and settings.get("top_k"):
        warpers.append(TopKLogitsWarper(top_k=settings["top_k"]))
    if sample and settings.get("top_p") is not None and settings["top_p"] < 1.0:
        warpers.append(TopPLogitsWarper(top_p=settings["top_p"]))
    if sample and settings.get("min_p"):
        warpers.append(MinPLogitsWarper(min_p=settings["min_p"]))
    penalty = settings.get("repetition_penalty")
    penalise = RepetitionPenaltyLogitsProcessor(float(penalty)) if penalty is not None and penalty != 1.0 else None
    min_new = settings.get("min_new_tokens") or 0
    pad = settings.get("pad_token_id")
    eos = settings.get("eos_token_id")
    eos = torch.as_tensor([] if eos is None else eos, dtype=torch.long, device=prompt_ids.device).reshape(-1)
    if pad is None:
        pad = int(eos[0]) if eos.numel() else 0
    device, T = prompt_ids.device, settings["max_new_tokens"]
    index = None
    if torch.is_tensor(repeats):
        counts = repeats.reshape(-1).long()
        if counts.numel() != prompt_ids.shape[0] or bool((counts < 1).any()):
            raise ValueError(f"repeats: one count >= 1 per prompt ({prompt_ids.shape[0]}), got {counts.tolist()}")
        index = torch.repeat_interleave(torch.arange(len(counts)), counts.cpu()).to(device)
        B = len(index)
    else:
        B = prompt_ids.shape[0] * repeats
    given = None  # (ids (B, L <= T), lengths (B,)) of the rows' given prefixes
    if prefix_ids is not None and not idle:
        if prefix_ids.dim() != 2 or prefix_ids.shape[0] != B or prefix_lengths.shape != (B,):
            raise ValueError(
                f"prefix_ids (rows={B}, L) and prefix_lengths ({B},), one per output row, got "
                f"{tuple(prefix_ids.shape)} and {tuple(prefix_lengths.shape)}"
            )
        if bool((prefix_lengths > 0).any()):
            given = prefix_ids[:, :T].long().to(device), prefix_lengths.long().to(device)
    ids = torch.full((B, T), pad, dtype=torch.long, device=device)
    logp = torch.zeros(B, T, dtype=torch.float32, device=device)
    entropy = torch.zeros(B, T, dtype=torch.float32, device=device)
    rows = torch.arange(B, device=device)  # the batch row of each row in the cache
    alive = torch.full((B,), not idle, dtype=torch.bool, device=device)  # per row in the cache: still generating
    mask = prompt_mask
    cache = DynamicCache(config=model.config)
    keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=prompt_ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=True,
        **with_cache(model, cache),
        **keep_last,
    )
    logits = out.logits[:, -1].float()
    history = prompt_ids
    if index is not None:  # one prefill per prompt; the rows that sample it share copies of its cache
        cache.batch_select_indices(index)
        logits, mask, history = logits[index], mask[index], history[index]
    elif repeats > 1:
        cache.batch_repeat_interleave(repeats)
        logits, mask = logits.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)
        history = history.repeat_interleave(repeats, 0)
    ignored = (mask != 0).int().argmax(dim=1)  # left padding: not penalised, as in HF
    steps = 0
    token = torch.full((len(rows),), pad, dtype=torch.long, device=device)
    for step in range(T):
        if not idle and (not synced or bool(alive.any())):
            scores = logits
            if penalise is not None:
                penalise.prompt_ignore_length = ignored
                scores = penalise(history, scores)
            if eos.numel() and min_new and step < min_new:
                scores = scores.index_fill(-1, eos, float("-inf"))
            if sample:
                token = torch.multinomial(torch.softmax(warpers(history, scores), dim=-1), num_samples=1).squeeze(1)
            else:
                token = scores.argmax(-1)
            if given is not None and step < given[0].shape[1]:  # rows inside their prefix: the given token
                token = torch.where(given[1][rows] > step, given[0][rows, step], token)
            token = torch.where(alive, token, torch.full_like(token, pad))
            live = rows[alive]
            ids[live, step] = token[alive]
            logp[live, step] = token_logprobs(logits[alive], token[alive], temperature)
            entropy[live, step] = entropy_from_logits(logits[alive], temperature)
            steps = step + 1
            if eos.numel():
                alive = alive & ~torch.isin(token, eos)
        more = step + 1 < T and bool(alive.any())
        if synced:
            more = bool(_all_reduce_max(int(more), device))
        if not more:
            break
        finished = int((~alive).sum())
        kept = None
        if not bool(alive.any()):  # synced, and this rank is done: one row keeps the forwards going
            kept = torch.zeros(1, dtype=torch.long, device=device) if len(rows) > 1 else None
            token = torch.full((len(rows),), pad, dtype=torch.long, device=device)
        elif finished and finished >= compact_at * len(rows):
            kept = alive.nonzero().squeeze(1)
        if kept is not None:
            cache.batch_select_indices(kept)
            rows, mask, token, alive, ignored = rows[kept], mask[kept], token[kept], alive[kept], ignored[kept]
            history = history[kept]
        if penalise is not None:
            history = torch.cat([history, token.unsqueeze(1)], dim=1)
        position = mask.sum(-1, keepdim=True)  # tokens attended so far: the new token's position
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = model(
            input_ids=token.unsqueeze(1),
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **with_cache(model, cache),
        )
        logits = out.logits[:, -1].float()
    return ids[:, :steps], logp[:, :steps], entropy[:, :steps]
