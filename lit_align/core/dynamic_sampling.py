"""DAPO's dynamic sampling (arXiv 2503.14476, Sec. 3.2, Eq. 11: ``0 < |{o_i : is_equivalent(a, o_i)}| < G``).

A group whose rewards are all equal has advantage 0 for every member: it adds no gradient, only tokens
to the normaliser. Dynamic sampling drops such groups and samples more prompts until the rollout batch
holds as many groups as it was asked for. The pieces here are pure tensor work over *rounds*, one prompt
batch's rows each::

    {"prompts": prompt batch (B prompts), "rollout": Rollout (N rows), "rewards": (N,) total reward,
     "rows": {name: (N,) tensor a method computed per row}, "metrics": the round's as sampled}

:func:`signal_groups` says which groups carry a signal, :func:`take` cuts a round to some of its groups and
:func:`cat` joins rounds into one (group ids renumbered, widths padded). The loop that decides how many
rounds to sample lives in the module (:meth:`lit_align.modules.policy.PolicyModule.dynamic_round`): it
needs the sampler, the data stream and the ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_align.core import groups
from lit_align.rollout import Rollout


def signal_groups(rewards: torch.Tensor, group_ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(n_groups,) bool: True for each group whose rewards are not all equal over ALL its members.

    ``rewards`` (N,), ``group_ids`` (N,) long in [0, n_groups). Equal means the unbiased std of the group's
    rewards is below 1e-8, the test :func:`lit_align.losses.group_advantages` uses for a zero-std group; a
    group of fewer than 2 members has no spread (False). Over every member, off-policy ones included: a
    group whose samples all fail but whose demonstration succeeds (LUFFY's case) keeps its signal, even
    where the advantage statistics cover the on-policy members only.
    """
    r = rewards.double()
    count = torch.bincount(group_ids, minlength=n_groups).double()
    mean = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, group_ids, r)
    mean = mean / count.clamp(min=1)
    centred = r - mean[group_ids]
    var = torch.zeros_like(mean).index_add_(0, group_ids, centred * centred) / (count - 1).clamp(min=1)
    return (count > 1) & (var.sqrt() >= 1e-8)


def take(r: dict, chosen: torch.Tensor, group_size: int) -> dict:
    """Round ``r`` cut to the groups ``chosen`` (long indices into its prompts, in the order given): prompt
    ``chosen[j]`` becomes prompt j, its rows keep their order within the group. Every per-row value
    (rollout fields, rewards, ``rows``) and per-prompt value (tensors and lists of the prompt batch, its
    ``columns``) follows; the round's ``metrics`` (of all its groups) do not."""
    n_groups = len(r["prompts"]["prompts"])
    rollout = r["rollout"]
    gid = groups.group_ids(rollout, group_size)
    chosen = chosen.to(device=gid.device, dtype=torch.long)
    new_id = torch.full((n_groups,), -1, dtype=torch.long, device=gid.device)
    new_id[chosen] = torch.arange(len(chosen), device=gid.device)
    of_row = new_id[gid]
    rows = torch.nonzero(of_row >= 0).squeeze(-1)
    rows = rows[torch.argsort(of_row[rows].cpu(), stable=True).to(rows.device)]  # group by group, as chosen
    cut = rollout.take(rows)
    if rollout.group_ids is not None:
        cut.group_ids = of_row[rows]
    return {
        "prompts": _take_prompts(r["prompts"], chosen.cpu(), n_groups),
        "rollout": cut,
        "rewards": r["rewards"][rows.to(r["rewards"].device)],
        "rows": {k: v[rows.to(v.device)] for k, v in r["rows"].items()},
    }


def cat(rounds: list[dict], group_size: int, pad_id: int) -> dict:
    """Rounds joined in order: prompts, rows and group ids of the second follow the first's, and so on.
    Prompt tensors are left-padded (``pad_id`` for ids, 0 for masks), completion and demonstration tensors
    right-padded to the widest (0 under mask 0; ``pad_id`` for demonstration ids). A single round is
    returned as is; ``metrics`` are not joined."""
    if len(rounds) == 1:
        return rounds[0]
    rollouts = [r["rollout"] for r in rounds]
    sizes = [len(r["prompts"]["prompts"]) for r in rounds]
    return {
        "prompts": cat_prompts([r["prompts"] for r in rounds], sizes, pad_id),
        "rollout": _cat_rollouts(rollouts, sizes, group_size, pad_id),
        "rewards": torch.cat([r["rewards"] for r in rounds]),
        "rows": {k: torch.cat([r["rows"][k] for r in rounds]) for k in rounds[0]["rows"]},
    }


def _pad(t: torch.Tensor, width: int, left: bool, value) -> torch.Tensor:
    """``t`` (..., w) padded on its last dimension to ``width``."""
    extra = width - t.shape[-1]
    if extra <= 0:
        return t
    return F.pad(t, (extra, 0) if left else (0, extra), value=value)


def _cat_padded(parts: list[torch.Tensor], left: bool = False, value=0) -> torch.Tensor:
    width = max(p.shape[-1] for p in parts)
    return torch.cat([_pad(p, width, left, value) for p in parts])


def _cat_rollouts(parts: list[Rollout], sizes: list[int], group_size: int, pad_id: int) -> Rollout:
    first = parts[0]

    def optional(name: str, default) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        if all(v is None for v in values):
            return None
        return _cat_padded([v if v is not None else default(p) for v, p in zip(values, parts)])

    group_ids = None
    if any(p.group_ids is not None for p in parts):
        offsets = [sum(sizes[:i]) for i in range(len(parts))]
        group_ids = torch.cat([groups.group_ids(p, group_size) + o for p, o in zip(parts, offsets)])
    return Rollout(
        _cat_padded([p.prompt_ids for p in parts], left=True, value=pad_id),
        _cat_padded([p.prompt_mask for p in parts], left=True),
        _cat_padded([p.completion_ids for p in parts]),
        _cat_padded([p.completion_mask for p in parts]),
        _cat_padded([p.old_logp for p in parts]),
        _cat_padded([p.entropy for p in parts]),
        [t for p in parts for t in p.completions],
        first.sampler,
        sampler_logp=optional("sampler_logp", lambda p: torch.zeros_like(p.old_logp)),
        prefix_mask=optional("prefix_mask", lambda p: torch.zeros_like(p.completion_mask)),
        group_ids=group_ids,
        off_policy=None
        if all(p.off_policy is None for p in parts)
        else torch.cat([groups.off_policy(p) for p in parts]),
    )


# ----------------------------------------------------------------------------- prompt batches
def _take_prompts(batch: dict, chosen: torch.Tensor, n: int) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n:
            out[k] = v[chosen.to(v.device)]
        elif isinstance(v, list) and len(v) == n:
            out[k] = [v[i] for i in chosen.tolist()]
        elif isinstance(v, dict):
            out[k] = _take_prompts(v, chosen, n)
        else:
            out[k] = v
    return out


def cat_prompts(batches: list[dict], sizes: list[int], pad_id: int) -> dict:
    """Prompt batches (``sizes[i]`` prompts in ``batches[i]``) one after another: per-prompt lists joined (a key
    a batch lacks filled with None), per-prompt tensors joined with ``prompt_*`` left-padded (``*_ids`` with
    ``pad_id``, the rest 0) and the others right-padded, nested dicts likewise; a value that is not per prompt
    (the repeat index) is the first batch's. Rounds of dynamic sampling, and ranks' buffered batches merged."""
    out = {}
    for k in dict.fromkeys(k for b in batches for k in b):
        values = [b.get(k) for b in batches]
        v = next(x for x in values if x is not None)
        if isinstance(v, dict):
            out[k] = cat_prompts([x if x is not None else {} for x in values], sizes, pad_id)
        elif isinstance(v, list) and all(x is None or len(x) == n for x, n in zip(values, sizes)):
            out[k] = [y for x, n in zip(values, sizes) for y in (x if x is not None else [None] * n)]
        elif (
            torch.is_tensor(v)
            and v.dim() > 0
            and all(torch.is_tensor(x) and len(x) == n for x, n in zip(values, sizes))
        ):
            # prompts are left-padded (their last token next to the completion), demonstrations right-padded
            out[k] = _cat_padded(values, left=k.startswith("prompt_"), value=pad_id if k.endswith("_ids") else 0)
        else:
            out[k] = v  # not per prompt (the training batch's repeat index): the first round's
    return out
