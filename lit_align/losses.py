"""Pure tensor math for SFT and GRPO-style RL. No Lightning, no transformers.

Shapes: B rows, T token positions. ``mask`` is 1 where a token counts, 0 elsewhere.
Each loss returns ``(loss, metrics)``; ``metrics`` holds detached scalars ready to log. The ``*_per_token``
building blocks return (B, T) values (and detached (B, T) metrics) for the caller to aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F

# each option list is written once, as the Literal the modules' signatures use
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AdvantageNorm = Literal["std", "none", "batch-std"]
AdvantageStats = Literal["all", "on_policy"]
KLEstimator = Literal["k1", "k2", "k3"]
PolicyLoss = Literal["clip", "cispo", "sapo"]
ImportanceSamplingLevel = Literal["token", "sequence", "sequence_token"]
AGGREGATIONS, ADVANTAGE_NORMS = get_args(Aggregation), get_args(AdvantageNorm)
ADVANTAGE_STATS, KL_ESTIMATORS = get_args(AdvantageStats), get_args(KLEstimator)
POLICY_LOSSES, IMPORTANCE_SAMPLING_LEVELS = get_args(PolicyLoss), get_args(ImportanceSamplingLevel)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def aggregate_parts(
    values: torch.Tensor | None, mask: torch.Tensor, mode: str = "token-mean", norm: float | None = None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(numerator, denominator) of :func:`aggregate`, so a batch split into parts (micro-batches,
    ranks) can be normalised by the denominator of the whole: the numerators add up over parts.

    token-mean: (sum of masked values, number of tokens); seq-mean-token-mean: (sum over rows of each
    row's token-mean, rows holding a token); seq-mean-token-sum: (sum of masked values, rows holding a
    token); seq-mean-token-sum-norm: (sum of masked values, rows holding a token x ``norm``), Dr.GRPO's
    constant normaliser (``norm`` None: the mask's width T). ``values`` None: the numerator is None
    (counting only)."""
    _check_choice("loss_aggregation", mode, AGGREGATIONS)
    dtype = values.dtype if values is not None else torch.float32
    maskf = mask.to(dtype)
    if mode == "token-mean":
        den = maskf.sum()
        return (None if values is None else (values * maskf).sum()), den
    tokens = maskf.sum(-1)
    rows = (tokens > 0).to(dtype)
    den = rows.sum()
    if mode == "seq-mean-token-sum-norm":
        den = den * float(mask.shape[-1] if norm is None else norm)
    if values is None:
        return None, den
    per_row = (values * maskf).sum(-1)
    if mode == "seq-mean-token-mean":
        per_row = per_row / tokens.clamp(min=1.0)
    return (per_row * rows).sum(), den


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm: float | None = None
) -> torch.Tensor:
    """Reduce per-token ``values`` (B, T) over the tokens where ``mask`` is set.

    token-mean: sum over all tokens / number of tokens (every token counts once; DAPO, TRL's "dapo").
    seq-mean-token-mean: mean over each row's tokens, then mean over rows (GRPO, TRL's "grpo").
    seq-mean-token-sum: sum over each row's tokens, then mean over rows.
    seq-mean-token-sum-norm: sum over each row's tokens divided by the constant ``norm`` (None: T), then
    mean over rows (Dr.GRPO, arXiv 2503.20783: no length normaliser; TRL's "dr_grpo" with ``norm`` =
    max_completion_length; verl's mode of this name divides by the constant without the mean over rows).
    Rows without tokens are ignored by the seq-mean modes; an all-empty mask gives 0.
    """
    num, den = aggregate_parts(values, mask, mode, norm)
    return num / den.clamp(min=1.0)


# the vocabulary-wide computations run over blocks of at most 2**20 values (4 MiB in float32): on
# (8, 128, 151936) logits, fwd + bwd + entropy held 0.37 GiB of temporaries at 2**26, 0.05 GiB at 2**20,
# and ran faster (28 s -> 11 s, one thread: the blocks stay in cache)
_CHUNK_ELEMENTS = 2**20


def _blocks(B: int, T: int, V: int):
    """(row slice, position slice) blocks covering (B, T), each of at most ``_CHUNK_ELEMENTS / V``
    positions: whole rows at a time where they fit, else pieces of one row."""
    per = max(1, _CHUNK_ELEMENTS // max(V, 1))
    if T == 0 or B == 0:
        return
    if T <= per:
        step = per // T
        for i in range(0, B, step):
            yield slice(i, min(i + step, B)), slice(0, T)
    else:
        for i in range(B):
            for j in range(0, T, per):
                yield slice(i, i + 1), slice(j, min(j + per, T))


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(logits / T)[ids] over blocks of positions: no full-size temporary beyond the
    gradient of ``logits`` itself (written block by block in backward). With ``consume``, that
    gradient is written into ``logits``' own storage: no second (B, T, V) tensor at all."""

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, ids: torch.Tensor, temperature: float, consume: bool = False
    ) -> torch.Tensor:
        B, T, V = logits.shape
        acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 logits
        out = torch.empty(B, T, dtype=acc, device=logits.device)
        lse = torch.empty_like(out)
        for rb, tb in _blocks(B, T, V):
            x = logits[rb, tb]
            if temperature != 1.0:
                x = x / temperature
            x = x.to(acc)
            lse[rb, tb] = torch.logsumexp(x, dim=-1)
            out[rb, tb] = x.gather(-1, ids[rb, tb].unsqueeze(-1)).squeeze(-1) - lse[rb, tb]
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature = temperature
        ctx.consume = consume
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, ids, lse = ctx.saved_tensors
        t = ctx.temperature
        B, T, V = logits.shape
        # consume: each block's gradient needs only that block's logits, so it overwrites them; the
        # in-place write bumps the tensor's version, so any other backward still reading these logits
        # fails with autograd's "modified by an inplace operation" instead of reading gradients
        grad = logits.detach() if ctx.consume else torch.empty_like(logits)
        for rb, tb in _blocks(B, T, V):
            x = logits[rb, tb]
            if t != 1.0:
                x = x / t
            g = grad_out[rb, tb].to(lse.dtype).unsqueeze(-1)
            block = -(torch.exp(x.to(lse.dtype) - lse[rb, tb].unsqueeze(-1)) * g)
            block.scatter_add_(-1, ids[rb, tb].unsqueeze(-1), g)
            if t != 1.0:
                block = block / t
            grad[rb, tb] = block.to(grad.dtype)
        return grad, None, None, None


class _NoCtx:
    """A stand-in for autograd's ctx when :class:`_SelectiveLogSoftmax` runs without a graph."""

    def save_for_backward(self, *tensors) -> None:
        pass


def token_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, consume: bool = False
) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at ``ids``: (B, T, V), (B, T) -> (B, T), in float32
    (float64 for float64 logits). Also (N, V), (N,) -> (N,).

    A selective log-softmax over blocks of positions (at most 2**20 values each): neither the
    log-softmax nor a float32 copy of ``logits`` is materialised at full size, in forward or backward,
    so a forward holds one (B, T, V) logits tensor and, in backward, its gradient.

    ``consume=True``: the backward writes the gradient into ``logits``' own storage (and returns it),
    so a backward through a (B, T, V) logits tensor holds that one tensor, not two. Only for logits
    that nothing else reads after this backward (a model's output used by this loss alone; reading
    them in the forward, e.g. for metrics, is fine); another backward through the same logits then
    raises autograd's in-place error rather than computing a wrong gradient.
    """
    if logits.dim() == 2:
        return token_logprobs(logits.unsqueeze(0), ids.unsqueeze(0), temperature, consume).squeeze(0)
    if logits.requires_grad and torch.is_grad_enabled():
        return _SelectiveLogSoftmax.apply(logits, ids, float(temperature), bool(consume))
    with torch.no_grad():
        return _SelectiveLogSoftmax.forward(_NoCtx(), logits, ids, float(temperature))


def chunked(fn, logits: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """``fn(logits_block, *others_blocks)`` -> per-position values, over blocks of positions of a
    (B, T, V) ``logits`` (``others`` (B, T, ...) are cut alike), without a graph: (B, T), float32 (float64 for float64 logits)."""
    if logits.dim() == 2:
        return chunked(fn, logits.unsqueeze(0), *(o.unsqueeze(0) for o in others)).squeeze(0)
    B, T, V = logits.shape
    out = torch.empty(B, T, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    with torch.no_grad():
        for rb, tb in _blocks(B, T, V):
            out[rb, tb] = fn(logits[rb, tb].detach(), *(o[rb, tb] for o in others))
    return out


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy (nats) of softmax(logits / temperature): (B, T, V) -> (B, T), float32.

    Differentiable when ``logits`` carries a graph (AMFT's entropy term); otherwise computed over
    chunks of positions (see :func:`chunked`), so no full-size temporaries.
    """

    def entropy(x: torch.Tensor) -> torch.Tensor:
        if temperature != 1.0:
            x = x / temperature
        logp = F.log_softmax(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    if logits.requires_grad and torch.is_grad_enabled():
        return entropy(logits)
    return chunked(entropy, logits)


def masked_nll(
    logp: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    aggregation: str = "token-mean",
    norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(Weighted) negative log-likelihood of the target tokens: -sum w_t log p_t, aggregated (``norm``:
    seq-mean-token-sum-norm's constant).

    ``weights`` (B, T), when given, multiplies each token's NLL (CHORD's phi); it is used as is,
    so detach it first if it must not carry gradient. Metrics report the unweighted NLL.
    """
    loss = aggregate(weighted_nll_per_token(logp, weights), mask, aggregation, norm)
    plain = aggregate(-logp.detach(), mask, "token-mean")
    return loss, {"expert_nll": plain}


def weighted_nll_per_token(logp: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token (weighted) negative log-likelihood -w_t log p_t: ``logp`` (B, T) -> (B, T), nats.

    ``weights`` (B, T) (or anything broadcasting to it) multiplies each token's NLL: CHORD's phi_t, SRFT's
    w_SFT, an SFT coefficient. It is used as is, so the caller detaches it when it must not carry gradient
    (the gradient is then -w_t d log p_t). None: the plain NLL -log p_t.
    """
    nll = -logp
    return nll if weights is None else weights * nll


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    norm: str = "std",
    eps: float = 1e-6,
    batch_std: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO advantages for ``rewards`` laid out as consecutive groups of ``group_size``.

    std: (r - group mean) / (group std + eps), unbiased std; none: r - group mean (Dr.GRPO);
    batch-std: (r - group mean) / (std over the whole batch + eps).
    A group whose rewards are all equal gets advantage 0; their share is ``frac_reward_zero_std``.

    ``batch_std(rewards)``: the unbiased std of the whole batch's rewards given this part of them, (N,) ->
    0-dim; under data parallelism the global batch's over every rank (``Ranks.std``: each rank holds whole
    groups, the batch std spans them all). None: the std of ``rewards`` alone (one process).
    """
    _check_choice("advantage_norm", norm, ADVANTAGE_NORMS)
    if group_size < 2:
        raise ValueError(f"num_generations={group_size} must be >= 2 for group advantages")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True)
    centred = grouped - mean
    if norm == "std":
        adv = centred / (std + eps)
    elif norm == "batch-std":
        adv = centred / ((batch_std or torch.std)(rewards.float()) + eps)
    else:
        adv = centred
    zero_std = std.squeeze(-1) < 1e-8
    adv = adv.masked_fill(zero_std.unsqueeze(-1), 0.0)
    metrics = {
        "reward_mean": rewards.float().mean(),
        "reward_std": std.mean(),
        "frac_reward_zero_std": zero_std.float().mean(),
    }
    return adv.reshape(-1), metrics


def _group_stats(
    values: torch.Tensor, group: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group (mean, unbiased std, count) of ``values`` (N,) whose group index is ``group`` (N,) long in
    [0, n_groups): each (n_groups,). A group with no value has mean 0 and std 0; one value, std 0 (the
    unbiased std of fewer than 2 values is undefined: no spread to normalise by)."""
    count = torch.bincount(group, minlength=n_groups)
    mean = values.new_zeros(n_groups)
    std = values.new_zeros(n_groups)
    # each group's members side by side, in batch order (stable sort), then one (groups, k) block per
    # distinct size k: contiguous equal groups give exactly group_advantages' view(-1, G) rows, so the same
    # mean / std kernels run on the same numbers (bit-identical advantages), and unequal sizes stay vectorised
    order = torch.argsort(group, stable=True)
    start = torch.cumsum(count, 0) - count
    for k in torch.unique(count).tolist():
        if k == 0:
            continue
        rows = torch.nonzero(count == k).squeeze(-1)
        block = values[order[start[rows].unsqueeze(-1) + torch.arange(k, device=values.device)]]
        mean[rows] = block.mean(-1)
        if k > 1:
            std[rows] = block.std(-1)
    return mean, std, count


def group_advantages_by_id(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    on_policy: torch.Tensor | None = None,
    norm: str = "std",
    stats: str = "all",
    eps: float = 1e-6,
    batch_std: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Group-relative advantages for groups named by ``group_ids``: rows of one prompt in any order, groups of
    any size (G samples plus one or more off-policy members: LUFFY / SRFT demonstrations, HPT).

    ``rewards`` (B,), ``group_ids`` (B,) integer, ``on_policy`` (B,) bool (None: every row on-policy).
    Returns advantages (B,) in float32 (float64 for float64 rewards) and scalar metrics.

    A_i = (r_i - mean_g) / (std_g + eps), std_g the unbiased std, taken over the group's members in the
    statistics: ``stats="all"`` every member (the mixed group of the LUFFY paper); ``stats="on_policy"`` the
    on-policy members only (LUFFY's official "split" estimator, HPT), and EVERY member, off-policy ones too,
    gets its advantage against those statistics. ``norm``: "std" as above, "none" r_i - mean_g (Dr.GRPO),
    "batch-std" (r_i - mean_g) / (std over the rewards in the statistics, whole batch, + eps).

    With contiguous ids (arange(B) // G) and every row on-policy this equals :func:`group_advantages`
    bit for bit, metrics included, for every ``norm``.

    Degenerate statistics (zero std, or fewer than 2 members in the statistics, whose unbiased std is
    undefined and counts as 0): the members in the statistics get advantage 0 (identical rewards: no
    signal, as in :func:`group_advantages`); a member outside them (``stats="on_policy"``: the
    demonstration) gets r_i - mean_g, not divided by a zero std, so a demonstration that succeeds where
    every rollout failed keeps its signal (LUFFY's point). A group with no member in the statistics has no
    baseline: all its advantages are 0. Under "batch-std" a batch std below 1e-8 (or of fewer than 2
    rewards) divides by 1. ``batch_std``: as in :func:`group_advantages`, given the rewards in the
    statistics (every rank's under data parallelism: ``Ranks.std``, NaN for fewer than 2); None: this
    batch's alone.

    LUFFY's official compute_grpo_outcome_advantage_split (ElliottYan/LUFFY, luffy/verl/verl/mix_src/
    mix_core_alg.py) differs in those corners only: a zero on-policy std is replaced by 1 (so
    (r - mean) / (1 + eps) for every member; identical on-policy rewards give 0 there too); a group with
    ONE on-policy member takes mean 0 and std 1 (every member's advantage is its raw reward, here
    r_i - r_on and 0 for the on-policy member); a group with none fails (KeyError). LUFFY's released
    training script (exp_scripts/train.sh) uses neither the split nor the std: adv_estimator=grpo (the
    mixed group, ``stats="all"``) with grpo_use_std=False (``norm="none"``).

    Metrics (scalars, over the groups): ``reward_mean`` the mean reward over the rows in the statistics
    (0 when there are none); ``reward_std`` the mean over groups of std_g (0 where undefined);
    ``frac_reward_zero_std`` the share of groups whose statistics have zero or undefined std.

    Errors: ValueError for an unknown ``norm`` / ``stats``, shapes that are not all (B,), non-integer ids.
    """
    _check_choice("advantage_norm", norm, ADVANTAGE_NORMS)
    _check_choice("advantage_stats", stats, ADVANTAGE_STATS)
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be integers, got {group_ids.dtype}")
    if on_policy is not None and on_policy.shape != rewards.shape:
        raise ValueError(f"on_policy {tuple(on_policy.shape)} must be (B,) like rewards {tuple(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    ids, group = torch.unique(group_ids, return_inverse=True)
    if stats == "all" or on_policy is None:
        in_stats = torch.ones_like(group, dtype=torch.bool)
    else:
        in_stats = on_policy.to(torch.bool)
    members = torch.nonzero(in_stats).squeeze(-1)
    population = r[members]
    mean, std, count = _group_stats(population, group[members], ids.numel())
    zero_std = std < 1e-8
    centred = r - mean[group]
    one = torch.ones((), dtype=r.dtype, device=r.device)
    if norm == "std":
        adv = centred / torch.where(zero_std, one, std + eps)[group]
    elif norm == "batch-std":
        if batch_std is None:
            spread = population.std() if population.numel() > 1 else torch.zeros_like(one)
        else:  # every rank's statistics: fewer than 2 rewards in all (NaN) have no spread either
            spread = torch.nan_to_num(batch_std(population).to(r.dtype), nan=0.0)
        adv = centred / torch.where(spread < 1e-8, one, spread + eps)
    else:
        adv = centred
    # members of degenerate statistics sit exactly at the mean: 0, not a rounding residue of r - mean
    adv = adv.masked_fill((zero_std[group] & in_stats) | (count == 0)[group], 0.0)
    metrics = {
        "reward_mean": population.mean() if population.numel() else torch.zeros_like(one),
        "reward_std": std.mean(),
        "frac_reward_zero_std": zero_std.to(r.dtype).mean(),
    }
    return adv, metrics


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, with log r = ref_logp - logp.

    k1: -log r;  k2: 0.5 (log r)^2;  k3: r - 1 - log r (unbiased, always >= 0).
    """
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    return torch.exp(log_ratio) - 1.0 - log_ratio


def importance_log_weights(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor | None = None, level: str = "token"
) -> torch.Tensor:
    """log rho per token (B, T) from ``logp`` (with graph) and ``old_logp`` (B, T) (the sampling policy's).

    token: log rho_t = logp_t - old_logp_t (PPO, GRPO).
    sequence: every token of a row gets the row's log s = mean over its ``mask`` tokens of (logp_t -
    old_logp_t), the length-normalised sequence ratio of GSPO (arXiv 2507.18071, eq. 7); TRL's
    ``importance_sampling_level="sequence"``. The gradient flows through the mean.
    sequence_token: GSPO-token (eq. 13), log s_t = sg[log s] + logp_t - sg[logp_t]: the value of the
    sequence ratio, the gradient of each token's own log-prob (ms-swift's ``sequence_token``).
    ``mask`` (B, T) is required for the sequence levels (rows without tokens get log s = 0).
    """
    _check_choice("importance_sampling_level", level, IMPORTANCE_SAMPLING_LEVELS)
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if mask is None:
        raise ValueError(f"importance_sampling_level={level!r} needs the token mask of each sequence")
    m = mask.to(log_ratio.dtype)
    seq = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    if level == "sequence":
        return seq.expand_as(log_ratio)
    return seq.detach() + logp - logp.detach()


def surrogate_per_token(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    importance_sampling_level: str = "token",
    policy_loss: str = "clip",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy-gradient loss (B, T) with per-sequence ``advantages`` (B,), rho the importance
    weight of :func:`importance_log_weights` at ``importance_sampling_level`` (``mask`` (B, T): each row's
    tokens, needed by the sequence levels):

    clip (PPO / GRPO): loss_t = -min(rho'_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A), rho' = rho, or
        min(rho, ``delta``) with two-sided clipping (INTELLECT-2, arXiv 2505.07291; TRL's ``delta``).
    cispo (MiniMax-M1, arXiv 2506.13585): loss_t = -sg[min(rho_t, eps_high)] A logp_t: the importance
        weight is capped at ``epsilon_high`` itself (TRL's convention, 5.0 in ScaleRL) and detached, so
        every token keeps a gradient.
    sapo (arXiv 2511.20347): loss_t = -(4 / tau) sigmoid(tau (rho_t - 1)) A, tau = ``sapo_temperature_pos``
        for A > 0, ``sapo_temperature_neg`` otherwise: a soft gate in place of the hard clip (TRL's form).

    Then times ``token_mask`` (B, T) (0 / 1: the tokens that keep the policy loss, e.g. the top-entropy
    ones; the others still count in the normaliser, as TRL does), times the detached ``is_weights`` (B, T)
    (the truncated importance-sampling correction of a sampler whose numerics differ from the trainer's,
    as TRL applies it before the KL term), plus beta * KL_t (:func:`kl_penalty`).

    Metrics, per token (detached): ``clip_ratio`` 1 where the clipped branch is the one taken (clip) or the
    weight was capped (cispo); ``kl`` the KL estimate (beta > 0).
    """
    _check_choice("policy_loss", policy_loss, POLICY_LOSSES)
    ratio = torch.exp(importance_log_weights(logp, old_logp, mask, importance_sampling_level))
    adv = advantages.unsqueeze(-1).to(logp.dtype)
    metrics: dict[str, torch.Tensor] = {}
    if policy_loss == "clip":
        unclipped = (ratio if delta is None else ratio.clamp(max=delta)) * adv
        clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high) * adv
        per_token = -torch.minimum(unclipped, clipped)
        metrics["clip_ratio"] = (clipped < unclipped).to(logp.dtype).detach()
    elif policy_loss == "cispo":
        capped = ratio.clamp(max=epsilon_high).detach()
        per_token = -capped * adv * logp
        metrics["clip_ratio"] = (ratio > epsilon_high).to(logp.dtype).detach()
    else:
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg).to(logp.dtype)
        per_token = -(torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau) * adv
    if token_mask is not None:
        per_token = per_token * token_mask.detach().to(per_token.dtype)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    if beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp from the reference model")
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
        metrics["kl"] = kl.detach()
    return per_token, metrics


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """(B, T) bool: the tokens of each row (where ``mask`` is set) whose ``entropy`` is at or above the row's
    (1 - ``quantile``) quantile (linear interpolation, as torch.quantile), i.e. roughly the highest-entropy
    ``quantile`` share of each completion's tokens ("Beyond the 80/20 Rule", arXiv 2506.01939: 0.2).
    ``quantile`` 1 keeps every token; 0 keeps each row's highest-entropy token(s).

    Per completion, so the tokens kept do not depend on how rows fall into micro-batches or ranks. TRL's
    ``top_entropy_quantile`` takes the quantile over all tokens of a micro-batch on all processes instead:
    the two agree for a micro-batch of one completion.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile={quantile} must be in [0, 1]")
    m = mask.to(torch.bool)
    if quantile >= 1.0:
        return m
    e = entropy.detach().to(torch.float64)
    n = m.sum(-1)  # (B,)
    s = torch.where(m, e, torch.full_like(e, math.inf)).sort(-1).values  # each row's values, ascending
    pos = (1.0 - quantile) * (n - 1).clamp(min=0).to(torch.float64)
    lo = pos.floor().long().clamp(max=max(e.shape[-1] - 1, 0))
    hi = pos.ceil().long().clamp(max=max(e.shape[-1] - 1, 0))
    a, b = s.gather(-1, lo.unsqueeze(-1)), s.gather(-1, hi.unsqueeze(-1))
    threshold = torch.lerp(a, b, (pos - lo).unsqueeze(-1)).squeeze(-1)
    threshold = torch.where(hi == lo, a.squeeze(-1), threshold)  # no inf * 0 in rows without tokens
    return m & (e >= threshold.unsqueeze(-1))


def shaped_off_policy_per_token(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    gamma: float = 0.1,
    behaviour_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LUFFY's policy-shaped off-policy objective (arXiv 2504.14945) on demonstration tokens, per token (B, T):

    loss_t = -A * f(r_t),  f(r) = r / (r + gamma),  r_t = p_t / pi_beta(t),  p_t = exp(logp_t),

    with the behaviour probability pi_beta = 1 when ``behaviour_logp`` is None (a human or closed-model trace
    has no log-probs: the "ratio" is p_t itself) and exp(``behaviour_logp``) otherwise (detached). NO
    clipping. f carries the gradient (d f / d p = gamma / (p + gamma)^2, so d loss / d logp_t =
    -A gamma r_t / (r_t + gamma)^2): low-probability expert tokens, which a plain ratio p_t would barely
    move, get most of the push; tokens the policy already predicts get little.

    ``logp`` (B, T) with graph, log-probs of the demonstration's tokens at the temperature the caller chose
    (the sampling one, as for the rollouts); ``advantages`` (B,) per sequence, broadcast over tokens;
    ``gamma`` > 0 (0.1 in the paper). Metrics, per token (B, T), detached: ``off_policy_weight`` = f(r_t)
    (what train/off_policy_weight_mean reports, in (0, 1)).

    LUFFY's official code (ElliottYan/LUFFY, luffy/verl/verl/mix_src/mix_core_alg.py,
    compute_token_on_off_policy_loss, off_policy_reshape="p_div_p_0.1") computes exp(log_prob), then
    off_ratio / (off_ratio + 0.1) without a detach: the same f, gradient included, as here. It differs when
    target probabilities are given: the ratio is then exp(log_prob) / (target_probs + 1e-6) and is NOT
    reshaped (the reshape applies only without target_probs); here f shapes the ratio in both cases. Its
    off_max_clip / off_min_clip clamps are off by default and absent here.

    Errors: ValueError for gamma <= 0 (f would be constant or singular) or advantages that are not (B,).
    """
    if not gamma > 0.0:
        raise ValueError(f"gamma={gamma} must be > 0 for the shaping p / (p + gamma)")
    if advantages.dim() != 1 or advantages.shape[0] != logp.shape[0]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (B,) for logp {tuple(logp.shape)}")
    log_ratio = logp if behaviour_logp is None else logp - behaviour_logp.detach().to(logp.dtype)
    # r / (r + gamma) = sigmoid(log r - log gamma): the same value and gradient, but no inf / inf when a
    # tiny behaviour probability makes r overflow
    weight = torch.sigmoid(log_ratio - math.log(gamma))
    per_token = -advantages.unsqueeze(-1).to(logp.dtype) * weight
    return per_token, {"off_policy_weight": weight.detach()}


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    aggregation: str = "token-mean",
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    norm: float | None = None,
    **objective,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`surrogate_per_token` aggregated over ``mask`` (B, T) (``norm``: seq-mean-token-sum-norm's
    constant); ``objective``: its keyword settings (policy_loss, importance_sampling_level, delta, ...).
    Metrics as token-means (``clip_ratio``: the share of tokens where the clipped branch is the one taken)."""
    per_token, per = surrogate_per_token(
        logp, old_logp, advantages, epsilon_low, epsilon_high, ref_logp, beta, kl_estimator, mask=mask, **objective
    )
    loss = aggregate(per_token, mask, aggregation, norm)
    return loss, {k: aggregate(v, mask, "token-mean") for k, v in per.items()}
