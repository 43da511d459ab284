"""Weights for mixing SFT and RL: global mu schedules and per-token SFT weights.

The combined CHORD objective is ``L = (1 - mu) * L_GRPO + mu * L_SFT``. ``mu`` comes from
a :class:`MuSchedule` (selected by class path in a LightningCLI config), and each expert
token's SFT term can be re-weighted by :func:`token_weights`::

    mu_schedule:
      class_path: lit_align.weighting.ReferenceMu
      init_args: {mu_peak: 0.9, mu_valley: 0.05, warmup_steps: 0, decay_steps: 200}

Every schedule returns a value in [0, 1]. Every token weight is detached (no gradient flows
through it) and lies in [0, 1].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Literal, get_args

import torch

__all__ = [
    "MuSchedule",
    "ConstantMu",
    "ReferenceMu",
    "LinearMu",
    "CosineMu",
    "ExponentialMu",
    "AdaptiveMu",
    "TOKEN_WEIGHT_STRATEGIES",
    "token_weights",
]


def _unit(owner: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}.{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _steps(owner: str, name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}.{name} must be an integer >= 0, got {value!r}")
    return value


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return step


# --------------------------------------------------------------------------- schedules


class MuSchedule:
    """Base class: maps the optimizer step (and optionally the batch mean reward) to mu.

    ``schedule(step, mean_reward=None) -> float`` with the result in [0, 1]; mu is the
    weight of the SFT term, ``1 - mu`` that of the RL term. Subclass and override
    ``__call__`` to add a schedule.
    """

    def __call__(self, step: int, mean_reward: float | None = None) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ConstantMu(MuSchedule):
    """Constant mu at every step (CHORD-phi uses ``mu=0.1``).

    Args:
        mu: SFT weight, in [0, 1].
    """

    def __init__(self, mu: float = 0.1) -> None:
        self.mu = _unit("ConstantMu", "mu", mu)

    def __call__(self, step: int, mean_reward: float | None = None) -> float:
        _check_step(step)
        return self.mu


class ReferenceMu(MuSchedule):
    """CHORD-mu exactly as in the reference code (Trinity-RFT ``mix_chord``).

    With step ``s``, ``W = warmup_steps`` and ``D = decay_steps``:

    - ``s < W``: ``mu = (s / W) * mu_peak`` (linear warm-up from 0);
    - ``s >= W + D``: ``mu = mu_valley``;
    - otherwise: ``mu = mu_valley + (mu_peak - mu_valley) * 0.5 * (1 + cos(pi * (s - W) / D))``.

    The defaults are the paper's setting: decay 0.9 -> 0.05 over the first 200 steps, then
    hold. Pitfall kept on purpose: ``warmup_steps = decay_steps = 0`` gives ``mu_valley``
    for the whole run (a warning is raised at construction).

    Args:
        mu_peak: mu at the end of warm-up / start of decay, in [0, 1].
        mu_valley: mu after the decay, in [0, 1].
        warmup_steps: W, integer >= 0.
        decay_steps: D, integer >= 0.
    """

    def __init__(
        self,
        mu_peak: float = 0.9,
        mu_valley: float = 0.05,
        warmup_steps: int = 0,
        decay_steps: int = 200,
    ) -> None:
        self.mu_peak = _unit("ReferenceMu", "mu_peak", mu_peak)
        self.mu_valley = _unit("ReferenceMu", "mu_valley", mu_valley)
        self.warmup_steps = _steps("ReferenceMu", "warmup_steps", warmup_steps)
        self.decay_steps = _steps("ReferenceMu", "decay_steps", decay_steps)
        if self.warmup_steps == 0 and self.decay_steps == 0 and self.mu_peak != self.mu_valley:
            warnings.warn(
                f"ReferenceMu: warmup_steps=0 and decay_steps=0 give mu = mu_valley "
                f"({self.mu_valley}) at every step; mu_peak ({self.mu_peak}) is never used. "
                "This reproduces the reference code; set decay_steps > 0 for a decay, "
                "or use ConstantMu for a fixed mu.",
                UserWarning,
                stacklevel=2,
            )

    def __call__(self, step: int, mean_reward: float | None = None) -> float:
        s, w, d = _check_step(step), self.warmup_steps, self.decay_steps
        if s < w:
            return s / w * self.mu_peak
        if s >= w + d:
            return self.mu_valley
        cos = 0.5 * (1.0 + math.cos(math.pi * (s - w) / d))
        return self.mu_valley + (self.mu_peak - self.mu_valley) * cos


class _Interpolated(MuSchedule):
    """Shared init/validation for schedules from ``mu_start`` to ``mu_end``."""

    def __init__(self, mu_start: float = 0.9, mu_end: float = 0.05, total_steps: int = 200) -> None:
        name = type(self).__name__
        self.mu_start = _unit(name, "mu_start", mu_start)
        self.mu_end = _unit(name, "mu_end", mu_end)
        self.total_steps = _steps(name, "total_steps", total_steps)

    def _frac(self, step: int) -> float:
        s = _check_step(step)
        return 1.0 if s >= self.total_steps else s / self.total_steps


class LinearMu(_Interpolated):
    """Linear from ``mu_start`` (step 0) to ``mu_end`` (step ``total_steps``), then held.

    ``mu = mu_start + (mu_end - mu_start) * min(s, total_steps) / total_steps``.

    Args:
        mu_start: mu at step 0, in [0, 1].
        mu_end: mu from ``total_steps`` on, in [0, 1].
        total_steps: length of the ramp, integer >= 0 (0 = ``mu_end`` throughout).
    """

    def __call__(self, step: int, mean_reward: float | None = None) -> float:
        return self.mu_start + (self.mu_end - self.mu_start) * self._frac(step)


class CosineMu(_Interpolated):
    """Half-cosine from ``mu_start`` (step 0) to ``mu_end`` (step ``total_steps``), then held.

    ``mu = mu_end + (mu_start - mu_end) * 0.5 * (1 + cos(pi * f))``, ``f = min(s, T) / T``.

    Args:
        mu_start: mu at step 0, in [0, 1].
        mu_end: mu from ``total_steps`` on, in [0, 1].
        total_steps: length of the decay, integer >= 0 (0 = ``mu_end`` throughout).
    """

    def __call__(self, step: int, mean_reward: float | None = None) -> float:
        f = self._frac(step)
        return self.mu_end + (self.mu_start - self.mu_end) * 0.5 * (1.0 + math.cos(math.pi * f))


class ExponentialMu(_Interpolated):
    """Geometric interpolation from ``mu_start`` to ``mu_end``, then held.

    ``mu = mu_start * (mu_end / mu_start) ** f``, ``f = min(s, T) / T``: a constant
    multiplicative change per step.

    Args:
        mu_start: mu at step 0, in (0, 1].
        mu_end: mu from ``total_steps`` on, in (0, 1].
        total_steps: length of the decay, integer >= 0 (0 = ``mu_end`` throughout).
    """

    def __init__(self, mu_start: float = 0.9, mu_end: float = 0.05, total_steps: int = 200) -> None:
        super().__init__(mu_start, mu_end, total_steps)
        for name, value in (("mu_start", self.mu_start), ("mu_end", self.mu_end)):
            if value <= 0.0:
                raise ValueError(f"ExponentialMu.{name} must be in (0, 1] (geometric), got {value!r}")

    def __call__(self, step: int, mean_reward: float | None = None) -> float:
        f = self._frac(step)
        if f >= 1.0:
            return self.mu_end
        return self.mu_start * (self.mu_end / self.mu_start) ** f


class AdaptiveMu(MuSchedule):
    """Reward-driven mu (CHORD paper appendix): more imitation while rewards are low.

    ``mu = min(mu_max, max(0, tau - mean_reward))``. Needs the batch mean reward at every
    call; calling without it raises ``ValueError``.

    Args:
        tau: reward threshold (any finite number; on the reward's scale, 0.5 suits
            0/1 rewards).
        mu_max: upper cap on mu, in [0, 1].
    """

    def __init__(self, tau: float = 0.5, mu_max: float = 1.0) -> None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
            raise ValueError(f"AdaptiveMu.tau must be a finite number, got {tau!r}")
        self.tau = float(tau)
        self.mu_max = _unit("AdaptiveMu", "mu_max", mu_max)

    def __call__(self, step: int, mean_reward: float | None = None) -> float:
        _check_step(step)
        if mean_reward is None:
            raise ValueError("AdaptiveMu needs the batch mean reward: call schedule(step, mean_reward=...)")
        r = float(mean_reward)
        if not math.isfinite(r):
            raise ValueError(f"AdaptiveMu: mean_reward must be finite, got {r!r}")
        return min(self.mu_max, max(0.0, self.tau - r))


# --------------------------------------------------------------------------- token weights

# the strategies, written once: CHORD's token_weighting setting takes this Literal
TokenWeighting = Literal["none", "phi", "sft_is", "adaptive", "entropy", "margin", "trapo"]
TRAPO_ALPHA = 0.1  # TRAPO's trust-region threshold: tokens with p >= alpha keep the plain NLL gradient
TOKEN_WEIGHT_STRATEGIES = get_args(TokenWeighting)

_CHUNK_ELEMS = 1 << 24  # logits elements processed at once (float32: 64 MiB)


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str = "cosine", min_ratio: float = 0.1) -> float:
    """The learning-rate multiplier at optimizer step ``step``: linear warm-up ((step + 1) / warmup_steps)
    for the first ``warmup_steps``, then ``constant`` (1), ``linear`` or ``cosine`` decay to ``min_ratio``
    at ``total_steps`` (held after it). 1 after the warm-up when ``total_steps`` <= ``warmup_steps``
    (no known end). The policy modules' ``model.lr_decay`` and the embedded base checkpoint's
    pre-training use it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    frac = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    shape = 1.0 - frac if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return min_ratio + (1.0 - min_ratio) * shape


def _over_vocab(logits: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` ((N, V) -> (N,), in float32, or float64 for float64 logits) to logits (..., V) in row
    chunks."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    rows = max(1, _CHUNK_ELEMS // max(1, flat.shape[1]))
    acc = torch.promote_types(logits.dtype, torch.float32)
    return torch.cat([fn(chunk.to(acc)) for chunk in flat.split(rows)]).reshape(logits.shape[:-1])


def _norm_entropy(x: torch.Tensor) -> torch.Tensor:
    v = x.shape[-1]
    if v < 2:
        return x.new_zeros(x.shape[0])
    return torch.special.entr(torch.softmax(x, dim=-1)).sum(-1) / math.log(v)


def _max_prob(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1).amax(-1)


def token_weights(
    strategy: str,
    logp: torch.Tensor,
    logits: torch.Tensor | None = None,
    reward: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token weights for the SFT term over expert tokens: ``-sum w_t * log p_t``.

    All weights are detached (no gradient flows through them) and clamped to [0, 1].
    Padding is not handled here: mask the result (or the loss) as usual.

    Strategies (``p = exp(logp)``, the model's probability of the expert token):

    - ``"none"``: 1 (plain SFT).
    - ``"phi"``: ``p * (1 - p)`` (CHORD-phi); the gradient of ``-phi * log p`` is
      ``-(1 - p) * grad p``.
    - ``"sft_is"``: ``p`` (importance-style, ``sg(p) * log p``).
    - ``"adaptive"``: ``p * clamp(|reward|, 0, 1)``; needs ``reward`` (a scalar batch
      mean, or a ``(B,)`` tensor with one reward per row).
    - ``"entropy"``: ``H(softmax(logits)) / log(V)``, the normalised entropy of the model's
      distribution (1 = uniform, 0 = certain); needs ``logits``.
    - ``"margin"``: ``clamp(max_v softmax(logits)_v - p, 0, 1)``, how far the model's top
      choice beats the expert token (0 when the expert token is the top choice); needs
      ``logits``.
    - ``"trapo"``: ``min(1, p / alpha)``, alpha = :data:`TRAPO_ALPHA` (TRAPO's trust-region SFT): the
      gradient of ``-w * log p`` is ``-grad p / max(p, alpha)`` instead of ``-grad p / p``, so an expert
      token the policy finds unlikely (p < alpha) no longer gets an unbounded push.

    Args:
        strategy: one of :data:`TOKEN_WEIGHT_STRATEGIES`.
        logp: ``(B, T)`` log-probabilities the model gives the expert tokens.
        logits: ``(B, T, V)`` model logits at those positions (entropy, margin).
        reward: scalar or ``(B,)`` rewards (adaptive).

    Returns:
        ``(B, T)`` weights, dtype of ``logp``, ``requires_grad=False``.
    """
    if strategy not in TOKEN_WEIGHT_STRATEGIES:
        raise ValueError(f"token weight strategy must be one of {TOKEN_WEIGHT_STRATEGIES}, got {strategy!r}")
    if strategy in ("entropy", "margin"):
        if logits is None:
            raise ValueError(
                f"token weight strategy {strategy!r} needs logits of shape (B, T, V); "
                f"strategies without logits: ('none', 'phi', 'sft_is', 'adaptive')"
            )
        if logits.dim() != logp.dim() + 1 or logits.shape[:-1] != logp.shape:
            raise ValueError(
                f"token weight strategy {strategy!r}: logits shape {tuple(logits.shape)} "
                f"must be logp shape {tuple(logp.shape)} + (V,)"
            )
    if strategy == "adaptive" and reward is None:
        raise ValueError(
            "token weight strategy 'adaptive' needs reward (scalar or (B,) tensor); "
            "strategies without reward: ('none', 'phi', 'sft_is', 'entropy', 'margin')"
        )

    with torch.no_grad():
        p = logp.detach().to(torch.promote_types(logp.dtype, torch.float32)).exp().clamp(0.0, 1.0)
        if strategy == "none":
            w = torch.ones_like(p)
        elif strategy == "phi":
            w = p * (1.0 - p)
        elif strategy == "sft_is":
            w = p
        elif strategy == "adaptive":
            r = torch.as_tensor(reward).detach().to(device=p.device, dtype=p.dtype)
            if r.dim() == 1 and p.dim() >= 1 and r.shape[0] == p.shape[0]:
                r = r.reshape(r.shape[0], *([1] * (p.dim() - 1)))
            elif r.numel() != 1:
                raise ValueError(
                    f"token weight strategy 'adaptive': reward must be a scalar or shape "
                    f"({p.shape[0] if p.dim() else 1},), got shape {tuple(r.shape)}"
                )
            else:
                r = r.reshape(())
            w = p * r.abs().clamp(0.0, 1.0)
        elif strategy == "entropy":
            w = _over_vocab(logits, _norm_entropy)
        elif strategy == "trapo":
            w = p / TRAPO_ALPHA
        else:  # margin
            w = _over_vocab(logits, _max_prob) - p
        w = w.clamp(0.0, 1.0)
    return w.to(logp.dtype)
