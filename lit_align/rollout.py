"""Sampling G completions per prompt with Hugging Face ``generate``, plus masks and log-probs.

No Lightning here. The model is any ``transformers`` causal LM; prompts arrive left-padded.
"""
from __future__ import annotations

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
) -> Rollout:
    """Sample ``num_generations`` completions for each prompt (or one greedy one).

    Log-probs and entropies come from the raw logits ``generate`` returns (one forward pass, KV
    cache), divided by ``temperature``: the same distribution the training loss uses, so the
    PPO ratio starts at 1 for a strictly on-policy update. The model's train/eval mode is
    restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        if not greedy and num_generations > 1:
            prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
        eos_ids = _eos_ids(model, tokenizer)
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0],
            eos_token_id=eos_ids,
            synced_gpus=synced_gpus,
        )
        if greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
        completion_ids = out.sequences[:, prompt_ids.shape[1]:]
        logits = torch.stack(out.logits, dim=1)[:, : completion_ids.shape[1]]
        t = 1.0 if greedy else temperature
        mask = completion_mask(completion_ids, eos_ids)
        old_logp = token_logprobs(logits, completion_ids, t) * mask
        entropy = entropy_from_logits(logits, t) * mask
        texts = tokenizer.batch_decode(completion_ids * mask + (1 - mask) * kwargs["pad_token_id"], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, old_logp, entropy, texts)
