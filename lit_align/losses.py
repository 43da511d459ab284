"""Pure tensor math for SFT and GRPO-style RL. No Lightning, no transformers.

Shapes: B rows, T token positions. ``mask`` is 1 where a token counts, 0 elsewhere.
Each loss returns ``(loss, metrics)``; ``metrics`` holds detached scalars ready to log.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
ADVANTAGE_NORMS = ("std", "none", "batch-std")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce per-token ``values`` (B, T) over the tokens where ``mask`` is set.

    token-mean: sum over all tokens / number of tokens (every token counts once).
    seq-mean-token-mean: mean over each row's tokens, then mean over rows.
    seq-mean-token-sum: sum over each row's tokens, then mean over rows.
    Rows without tokens are ignored by the seq-mean modes; an all-empty mask gives 0.
    """
    _check_choice("loss_aggregation", mode, AGGREGATIONS)
    mask = mask.to(values.dtype)
    masked = values * mask
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    tokens = mask.sum(-1)
    rows = (tokens > 0).to(values.dtype)
    per_row = masked.sum(-1)
    if mode == "seq-mean-token-mean":
        per_row = per_row / tokens.clamp(min=1.0)
    return (per_row * rows).sum() / rows.sum().clamp(min=1.0)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at ``ids``: (B, T, V), (B, T) -> (B, T).

    Uses logsumexp so the full (B, T, V) log-softmax is never materialised twice.
    """
    if temperature != 1.0:
        logits = logits / temperature
    logits = logits.float()
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy (nats) of softmax(logits / temperature): (B, T, V) -> (B, T)."""
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_nll(
    logp: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    aggregation: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(Weighted) negative log-likelihood of the target tokens: -sum w_t log p_t, aggregated.

    ``weights`` (B, T), when given, multiplies each token's NLL (CHORD's phi); it is used as is,
    so detach it first if it must not carry gradient. Metrics report the unweighted NLL.
    """
    nll = -logp
    loss = aggregate(nll if weights is None else weights * nll, mask, aggregation)
    plain = aggregate(nll.detach(), mask, "token-mean")
    return loss, {"expert_nll": plain}


def group_advantages(
    rewards: torch.Tensor, group_size: int, norm: str = "std", eps: float = 1e-6
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO advantages for ``rewards`` laid out as consecutive groups of ``group_size``.

    std: (r - group mean) / (group std + eps), unbiased std; none: r - group mean (Dr.GRPO);
    batch-std: (r - group mean) / (std over the whole batch + eps).
    A group whose rewards are all equal gets advantage 0; their share is ``frac_reward_zero_std``.
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
        adv = centred / (rewards.float().std() + eps)
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped policy-gradient loss with per-sequence ``advantages`` (B,).

    loss_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) [+ beta * KL_t],
    rho_t = exp(logp_t - old_logp_t). ``clip_ratio`` is the share of tokens where the clipped
    branch is the one taken.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1).to(logp.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    metrics: dict[str, torch.Tensor] = {}
    if beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp from the reference model")
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
        metrics["kl"] = aggregate(kl.detach(), mask, "token-mean")
    loss = aggregate(per_token, mask, aggregation)
    was_clipped = (clipped < unclipped).to(logp.dtype).detach()
    metrics["clip_ratio"] = aggregate(was_clipped, mask, "token-mean")
    return loss, metrics
