"""Sampling G completions per prompt (a KV-cache decoding loop that drops finished rows, or Hugging
Face ``generate``), plus masks and log-probs; grouping rows by length for the training forward.

No Lightning here. The model is any ``transformers`` causal LM; prompts arrive left-padded.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch

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
    completions: list[str]  # decoded completions (special tokens dropped)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def completion_mask(completion_ids: torch.Tensor, eos_token_ids: list[int] | int | None) -> torch.Tensor:
    """1 for each token up to and including the first EOS of its row, 0 after it."""
    if eos_token_ids is None:
        return torch.ones_like(completion_ids)
    eos = torch.as_tensor(eos_token_ids, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos)
    # number of EOS strictly before position t; a token counts while none came before it
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).long()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


_KEEPS_LOGITS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def accepts_logits_to_keep(model) -> bool:
    """True when ``model``'s forward takes ``logits_to_keep`` (Hugging Face causal LMs: Llama, Qwen,
    Mistral, ...), so a forward can skip the LM head at positions whose logits are not needed. A peft
    wrapper passes it through to the model it wraps, which decides. Looked up once per model."""
    try:
        return _KEEPS_LOGITS[model]
    except (KeyError, TypeError):
        pass
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        ok = "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # no introspectable signature
        ok = False
    try:
        _KEEPS_LOGITS[model] = ok
    except TypeError:  # not weak-referenceable: look it up again next time
        pass
    return ok


def length_groups(attention_mask: torch.Tensor, max_groups: int) -> list[tuple[torch.Tensor, int]] | None:
    """Split a batch's rows into at most ``max_groups`` groups of similar length, each to be run
    only up to its own longest row: ``[(row indices, width), ...]``, or None when one pass over the
    whole batch computes no fewer token positions.

    A row's length is its last attended position + 1 (left padding counts, right padding does not).
    In a causal model the logits at positions below ``width`` do not depend on the columns cut off,
    so running each group on ``[:, :width]`` gives the same logits at every attended position.
    The groups are contiguous in length order and minimise the number of computed positions
    (sum of rows x width), preferring fewer groups on ties.
    """
    B, S = attention_mask.shape
    if max_groups <= 1 or B <= 1:
        return None
    positions = torch.arange(1, S + 1, device=attention_mask.device)
    ends = (attention_mask.ne(0) * positions).amax(-1).clamp(min=1).cpu()
    values, counts = torch.unique(ends, sorted=True, return_counts=True)
    if len(values) == 1 and int(values[0]) == S:
        return None
    cuts = _best_cuts(values.long(), counts.long(), max_groups)
    order = torch.argsort(ends, stable=True).to(attention_mask.device)
    bounds = torch.cumsum(counts, 0).tolist()
    groups, start = [], 0
    for cut in cuts:
        groups.append((order[start : bounds[cut]], int(values[cut])))
        start = bounds[cut]
    return groups


def _best_cuts(values: torch.Tensor, counts: torch.Tensor, max_groups: int) -> list[int]:
    """Indices j of ``values`` (ascending) that close each group, for the partition of the sorted
    values into at most ``max_groups`` contiguous runs minimising sum(count of run) x (last value of run).
    Exact dynamic programme, vectorised over the run's first and last index: O(max_groups) tensor ops."""
    D = len(values)
    C = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # C[j] = rows with value index < j
    j = torch.arange(D)
    # cost[i, j]: one run over value indices i..j (i <= j) = (C[j+1] - C[i]) * values[j]
    cost = (C[1:].unsqueeze(0) - C[:-1].unsqueeze(1)) * values.unsqueeze(0)
    invalid = j.unsqueeze(1) > j.unsqueeze(0)  # i > j
    best = cost[0].clone()  # one run over 0..j
    choices = []  # per extra run: where its last run starts for each j, -1 = keep fewer runs
    big = torch.iinfo(torch.long).max // 4
    for _ in range(1, max_groups):
        prev = torch.cat([best.new_full((1,), big), best[:-1]])  # best for 0..i-1, per i (i = 0: impossible)
        total = (prev.unsqueeze(1) + cost).masked_fill(invalid, big)
        total[0] = big
        split, start = total.min(dim=0)
        better = split < best
        choices.append(torch.where(better, start, torch.full_like(start, -1)))
        best = torch.where(better, split, best)
    cuts, last, runs = [], D - 1, max_groups
    while last >= 0:
        start = int(choices[runs - 2][last]) if runs >= 2 else -1
        if runs >= 2 and start == -1:
            runs -= 1
            continue
        cuts.append(last)
        last, runs = (start - 1, runs - 1) if runs >= 2 else (-1, runs)
    return cuts[::-1]


def _eos_ids(model, tokenizer) -> list[int] | None:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return None
    return [eos] if isinstance(eos, int) else list(eos)


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
) -> Rollout:
    """Sample ``num_generations`` completions for each prompt (or one greedy one).

    Log-probs and entropies come from the raw logits of the sampling forward passes (KV cache),
    divided by ``temperature``: the same distribution the training loss uses, so the PPO ratio
    starts at 1 for a strictly on-policy update. The model's train/eval mode is restored afterwards.

    ``drop_finished``: sample with :func:`decode`, which stops computing a row once it has emitted
    EOS, instead of Hugging Face ``generate``, which carries finished rows to the end of the batch.
    Used only where it samples from the same distribution (see :func:`decode_applies`); otherwise,
    and under ``synced_gpus`` (every rank steps until all are done), ``generate`` runs.
    """
    was_training = model.training
    model.eval()
    try:
        unique_ids, unique_mask, repeats = prompt_ids, prompt_mask, 1
        if not greedy and num_generations > 1:
            repeats = num_generations
            prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
        eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
        settings = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos_ids, do_sample=not greedy)
        if not greedy:
            settings.update(temperature=temperature, top_p=top_p, top_k=top_k)
        t = 1.0 if greedy else temperature
        if drop_finished and not synced_gpus and decode_applies(model, settings):
            completion_ids, old_logp, entropy = decode(model, unique_ids, unique_mask, settings, repeats=repeats)
            mask = completion_mask(completion_ids, eos_ids)
        else:
            out = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, return_dict_in_generate=True,
                output_logits=True, synced_gpus=synced_gpus, **settings,
            )
            completion_ids = out.sequences[:, prompt_ids.shape[1]:]
            logits = torch.stack(out.logits, dim=1)[:, : completion_ids.shape[1]]
            mask = completion_mask(completion_ids, eos_ids)
            old_logp = token_logprobs(logits, completion_ids, t) * mask
            entropy = entropy_from_logits(logits, t) * mask
        texts = tokenizer.batch_decode(completion_ids * mask + (1 - mask) * pad, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, old_logp, entropy, texts)


# generation settings decode() reproduces; any other one away from its default sends generate() to HF
_DECODE_SETTINGS = frozenset({
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "pad_token_id", "bos_token_id",
    "eos_token_id", "max_length", "use_cache", "return_dict_in_generate", "output_logits", "output_scores",
    "output_attentions", "output_hidden_states", "transformers_version", "_from_model_config",
})


def _generation_config(model, settings: dict):
    """The model's generation config with ``settings`` on top: what HF generate would use."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.update(**settings)
    return config


def decode_applies(model, settings: dict) -> bool:
    """True when :func:`decode` samples as HF ``generate`` would with ``settings`` on this model: a
    decoder-only model with a plain dynamic KV cache (no sliding-window or recurrent layers) and no
    generation setting beyond max/min_new_tokens, do_sample, temperature, top_k, top_p and the special
    tokens (a checkpoint's repetition_penalty, bad_words_ids, ... keep HF generate)."""
    from transformers import DynamicCache, GenerationConfig
    from transformers.cache_utils import DynamicLayer

    if getattr(model.config, "is_encoder_decoder", False):
        return False
    default = GenerationConfig().to_dict()
    for name, value in _generation_config(model, settings).to_dict().items():
        if name not in _DECODE_SETTINGS and (name not in default or default[name] != value):
            return False
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a cache this loop does not know
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def decode(
    model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: dict, compact_at: float = 0.25,
    repeats: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or greedily pick) completions token by token with a KV cache, as HF ``generate`` does
    for ``settings`` (see :func:`decode_applies`), but stop computing rows that have emitted EOS.

    Each step takes the next-token logits in float32, applies HF's own processors in HF's order
    (EOS masked while fewer than min_new_tokens; then temperature, top-k, top-p when sampling) and
    draws from their softmax (argmax when greedy). A finished row is fed padding, as in HF, until
    finished rows make up ``compact_at`` of the rows still in the cache; then they are dropped from
    it (so the cache is copied a few times, not every step). Until rows are dropped, the random
    draws are HF's, token for token. ``repeats``: sample each prompt that many times (rows
    ``i * repeats ... (i + 1) * repeats - 1`` of the result are prompt i's): the prompt is run through
    the model once and its KV cache copied, where ``generate`` on repeated prompts computes the same
    keys and values ``repeats`` times. Returns (completion ids (B, T), log-probs and entropies of the
    raw logits / temperature (B, T), 0 after EOS), B = prompts x repeats, T = steps until every row
    finished or max_new_tokens.
    """
    from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    config = _generation_config(model, settings)
    sample = bool(config.do_sample)
    temperature = config.temperature if sample and config.temperature is not None else 1.0
    warpers = LogitsProcessorList()
    if sample and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if sample and config.top_k:
        warpers.append(TopKLogitsWarper(top_k=config.top_k))
    if sample and config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p))
    eos = config.eos_token_id
    eos = torch.as_tensor([] if eos is None else eos, dtype=torch.long, device=prompt_ids.device).reshape(-1)
    B, T, device = prompt_ids.shape[0] * repeats, config.max_new_tokens, prompt_ids.device
    ids = torch.full((B, T), config.pad_token_id, dtype=torch.long, device=device)
    logp = torch.zeros(B, T, dtype=torch.float32, device=device)
    entropy = torch.zeros(B, T, dtype=torch.float32, device=device)
    rows = torch.arange(B, device=device)  # the batch row of each row in the cache
    alive = torch.ones(B, dtype=torch.bool, device=device)  # per row in the cache: still generating
    mask = prompt_mask
    cache = DynamicCache(config=model.config)
    keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                past_key_values=cache, use_cache=True, **keep_last)
    logits = out.logits[:, -1].float()
    if repeats > 1:  # one prefill per prompt; the rows that sample it share copies of its cache
        cache.batch_repeat_interleave(repeats)
        logits, mask = logits.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)
    steps = 0
    for step in range(T):
        scores = logits
        if eos.numel() and config.min_new_tokens and step < config.min_new_tokens:
            scores = scores.index_fill(-1, eos, float("-inf"))
        if sample:
            token = torch.multinomial(torch.softmax(warpers(None, scores), dim=-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(-1)
        token = torch.where(alive, token, torch.full_like(token, config.pad_token_id))
        live = rows[alive]
        ids[live, step] = token[alive]
        logp[live, step] = token_logprobs(logits[alive], token[alive], temperature)
        entropy[live, step] = entropy_from_logits(logits[alive], temperature)
        steps = step + 1
        if eos.numel():
            alive = alive & ~torch.isin(token, eos)
        if steps == T or not bool(alive.any()):
            break
        finished = int((~alive).sum())
        if finished and finished >= compact_at * len(rows):
            kept = alive.nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            rows, mask, token, alive = rows[kept], mask[kept], token[kept], alive[kept]
        position = mask.sum(-1, keepdim=True)  # tokens attended so far: the new token's position
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position,
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
    return ids[:, :steps], logp[:, :steps], entropy[:, :steps]
