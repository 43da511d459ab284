"""Mixed groups: a prompt's demonstration(s) as members of its GRPO group, beside the policy's samples.

A prompt batch paired with its demonstrations (``data`` pairing: ``prompts["demo_ids"]`` (B, k, D),
``prompts["demo_mask"]``, ``prompts["demonstrations"]``) gives :func:`demonstration_rows`, a
:class:`~lit_align.rollout.Rollout` of B x k off-policy rows; :func:`mix` joins them with the sampled rows
so that each prompt's group is contiguous (its samples, then its demonstrations) and every row carries
its prompt index (``group_ids``) and whether the policy sampled it (``off_policy``). Advantages over such
groups come from :func:`lit_align.losses.group_advantages_by_id`; the RL term gives off-policy tokens the
shaped objective (:func:`lit_align.core.terms.rl_term`). :func:`demonstration_labelled` gives the same
demonstrations as labelled rows (prompt + demonstration, labels on the demonstration) for the SFT term.
"""

from __future__ import annotations

import torch

from lit_align.rollout import Rollout


def demonstration_rows(prompts: dict, k: int | None = None) -> Rollout:
    """The first ``k`` (default all) demonstrations of each prompt as off-policy Rollout rows (B * k, in
    prompt order), behaviour log-prob 0 (probability 1: no log-probs exist for a human or closed-model trace)
    and entropy 0 (nothing was sampled).

    Raises:
        ValueError: the batch carries no demonstrations (the data module pairs them when the method asks:
            ``MixedDataModule.pair_demonstrations``), or fewer than ``k`` per prompt.
    """
    if "demo_ids" not in prompts:
        raise ValueError(
            "this method needs each prompt's demonstration: the prompt batch carries none (lit_align.MixedDataModule "
            "pairs them with data.pair_by when the module asks at set-up; give data.expert_data or a prompt file "
            "with a response column)"
        )
    ids, mask = prompts["demo_ids"], prompts["demo_mask"]  # (B, K, D)
    B, K, D = ids.shape
    k = K if k is None else k
    if k > K:
        raise ValueError(f"{k} demonstrations per prompt asked, the batch carries {K}")
    ids, mask = ids[:, :k].reshape(B * k, D), mask[:, :k].reshape(B * k, D)
    width = int(mask.sum(-1).max()) if mask.numel() else 0
    ids, mask = ids[:, :width], mask[:, :width]
    texts = [t for row in prompts["demonstrations"] for t in row[:k]]
    zeros = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    return Rollout(
        prompts["prompt_ids"].repeat_interleave(k, dim=0),
        prompts["prompt_mask"].repeat_interleave(k, dim=0),
        ids,
        mask,
        zeros,
        zeros.clone(),
        texts,
        "demonstration",
        group_ids=torch.arange(B, device=ids.device).repeat_interleave(k),
        off_policy=torch.ones(B * k, dtype=torch.bool, device=ids.device),
    )


def demonstration_labelled(prompts: dict, k: int | None = None, pad_id: int = 0) -> dict:
    """The first ``k`` (default all) demonstrations of each prompt as labelled rows for the SFT term (B * k, in
    prompt order): ``input_ids`` the prompt's real tokens then the demonstration's, right-padded with
    ``pad_id``; ``attention_mask`` 1 on real tokens; ``labels`` the demonstration's tokens, -100 on the prompt
    and the padding. For a pad id equal to the data module's, these are the rows
    :meth:`lit_align.MixedDataModule.collate_expert` builds for the same prompt and response (a method that
    trains a prompt's own demonstration with SFT: HPT).

    Raises:
        ValueError: as :func:`demonstration_rows` (no demonstrations, or fewer than ``k`` per prompt).
    """
    demos = demonstration_rows(prompts, k)
    seqs, labels = [], []
    for p, pm, d, dm in zip(demos.prompt_ids, demos.prompt_mask, demos.completion_ids, demos.completion_mask):
        prompt, demo = p[pm.bool()], d[dm.bool()]
        seqs.append(torch.cat([prompt, demo]))
        labels.append(torch.cat([torch.full_like(prompt, -100), demo]))
    width = max((len(s) for s in seqs), default=0)
    device = demos.completion_ids.device

    def pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    return {
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([torch.ones_like(s) for s in seqs], 0),
        "labels": pad(labels, -100),
    }


def group_ids(rollout: Rollout, group_size: int) -> torch.Tensor:
    """(N,) the prompt index of each row: the rollout's own, or row // group_size."""
    if rollout.group_ids is not None:
        return rollout.group_ids
    return torch.arange(len(rollout.completions), device=rollout.completion_ids.device) // group_size


def off_policy(rollout: Rollout) -> torch.Tensor:
    """(N,) True where the policy did not sample the row."""
    if rollout.off_policy is not None:
        return rollout.off_policy
    return torch.zeros(len(rollout.completions), dtype=torch.bool, device=rollout.completion_ids.device)


def mix(sampled: Rollout, group_size: int, members: Rollout) -> Rollout:
    """``sampled`` (groups of ``group_size`` consecutive rows, prompt i's at i * group_size ...) and
    ``members`` (rows with ``group_ids``) as one Rollout whose groups are contiguous: prompt i's samples,
    then its members. Completion widths are padded to the wider (pad id 0 under mask 0)."""
    g_sampled = group_ids(sampled, group_size)
    g_members = group_ids(members, 1)
    order_ids = torch.cat([g_sampled, g_members])
    # a stable sort by prompt keeps the samples first, then the members, within each group
    order = torch.argsort(order_ids.cpu(), stable=True).to(order_ids.device)
    width = max(sampled.completion_ids.shape[1], members.completion_ids.shape[1])

    def cat(a: torch.Tensor, b: torch.Tensor, value=0) -> torch.Tensor:
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
        return torch.cat([pad(a), pad(b.to(a.dtype))])[order]

    P = max(sampled.prompt_ids.shape[1], members.prompt_ids.shape[1])

    def left(t: torch.Tensor, value=0) -> torch.Tensor:  # prompts are left-padded
        return torch.nn.functional.pad(t, (P - t.shape[1], 0), value=value)

    texts = sampled.completions + members.completions
    logp_of = lambda r: r.sampler_logp if r.sampler_logp is not None else torch.zeros_like(r.old_logp)  # noqa: E731
    return Rollout(
        torch.cat([left(sampled.prompt_ids), left(members.prompt_ids)])[order],
        torch.cat([left(sampled.prompt_mask), left(members.prompt_mask)])[order],
        cat(sampled.completion_ids, members.completion_ids),
        cat(sampled.completion_mask, members.completion_mask),
        cat(sampled.old_logp, members.old_logp),
        cat(sampled.entropy, members.entropy),
        [texts[i] for i in order.tolist()],
        sampled.sampler,
        sampler_logp=None if sampled.sampler_logp is None else cat(logp_of(sampled), logp_of(members)),
        prefix_mask=None
        if sampled.prefix_mask is None and members.prefix_mask is None
        else cat(_or_zeros(sampled.prefix_mask, sampled), _or_zeros(members.prefix_mask, members)),
        group_ids=order_ids[order],
        off_policy=torch.cat([off_policy(sampled), off_policy(members)])[order],
    )


def _or_zeros(mask: torch.Tensor | None, rollout: Rollout) -> torch.Tensor:
    return mask if mask is not None else torch.zeros_like(rollout.completion_mask)
