"""A fixed rollout with mixed prompt and completion lengths, for tests that compare forward paths
(length groups, logits_to_keep) on the same batch."""

import torch

from lit_align.rollout import Rollout

PROMPT_LENS = [3, 5, 4, 5, 2, 5, 3, 4]
COMPLETION_LENS = [9, 1, 4, 9, 2, 6, 3, 7]  # 4 length groups of differing widths, one row of a single token


def mixed_length_rollout(vocab: int, pad: int, seed: int = 0, dtype: torch.dtype | None = None) -> Rollout:
    """Left-padded prompts and right-padded completions of PROMPT_LENS / COMPLETION_LENS tokens, random
    ids in [3, vocab), sampling-time log-probs in (-3, 0] on completion tokens (``dtype``: torch's default
    when None)."""
    g = torch.Generator().manual_seed(seed)
    P, T = max(PROMPT_LENS), max(COMPLETION_LENS)
    rows = len(PROMPT_LENS)
    prompt_mask = torch.tensor([[0] * (P - n) + [1] * n for n in PROMPT_LENS])
    prompt_ids = torch.randint(3, vocab, (rows, P), generator=g) * prompt_mask + pad * (1 - prompt_mask)
    completion_mask = torch.tensor([[1] * n + [0] * (T - n) for n in COMPLETION_LENS])
    completion_ids = torch.randint(3, vocab, (rows, T), generator=g) * completion_mask + pad * (1 - completion_mask)
    old_logp = (-torch.rand(rows, T, generator=g, dtype=dtype) * 3) * completion_mask
    return Rollout(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        old_logp,
        torch.zeros(rows, T, dtype=dtype),
        [""] * rows,
    )
