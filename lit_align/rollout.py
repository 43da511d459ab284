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
