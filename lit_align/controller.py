"""AMFT meta-controllers: a learned SFT weight ``mu`` and its hypergradient.

The training loss is ``L_total = (1 - mu) * L_RL + mu * L_SFT``. ``mu`` is learned so
that one SGD step on ``L_total`` lowers a validation loss ``V`` (held-out expert NLL,
or the negative held-out policy-gradient surrogate when the objective is reward).

With the look-ahead ``theta' = theta - lr * grad L_total(theta; mu)``, the gradients at
``theta`` do not depend on ``mu``, so ``d theta'/d mu = -lr * (g_sft - g_rl)`` and::

    dV/dmu = -lr * <grad V(theta'), g_sft(theta) - g_rl(theta)>

(:func:`lookahead` builds ``theta'``, :func:`hypergradient` evaluates the product).
A controller turns ``dV/dmu`` into an update of its own parameters: call
:meth:`MetaController.apply_meta_gradient` and step an optimizer over
``controller.parameters()``. With ``SGD(lr=eta_mu)`` this moves ``mu`` against
``dV/dmu``, i.e. towards a lower validation loss.

Per-step order a training module should follow::

    opt.zero_grad(); controller.apply_meta_gradient(dV_dmu, stats); opt.step()  # every K steps
    controller.entropy_nudge(controller.eta_entropy * (H_target - H))          # every step
    controller.after_step()                                                    # every step

Controllers are chosen by class path in the LightningCLI YAML, e.g.
``class_path: lit_align.controller.ScalarMu`` with ``init_args: {init_mu: 0.8}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["MetaController", "ScalarMu", "MetaNetwork", "adam_lookahead", "hypergradient", "lookahead"]


def _same_length(**sequences: Sequence) -> None:
    if len({len(v) for v in sequences.values()}) > 1:
        got = ", ".join(str(len(v)) for v in sequences.values())
        raise ValueError(f"{', '.join(sequences)} must have the same length, got {got}")


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


class MetaController(nn.Module):
    """Base class for controllers of the SFT weight ``mu``.

    Args:
        mu_min: lower bound of ``mu`` (``0 <= mu_min < mu_max``).
        mu_max: upper bound of ``mu`` (``mu_max <= 1``).
        eta_entropy: step size ``eta_H`` of the entropy term; the training module calls
            ``entropy_nudge(eta_entropy * (H_target - H))`` every step. 0 disables it.

    Subclasses implement :meth:`forward` and :meth:`entropy_nudge`.
    """

    def __init__(self, mu_min: float = 0.05, mu_max: float = 0.95, eta_entropy: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= mu_min <= 1.0:
            raise ValueError(f"mu_min must be in [0, 1], got {mu_min}")
        if not 0.0 <= mu_max <= 1.0:
            raise ValueError(f"mu_max must be in [0, 1], got {mu_max}")
        if mu_min >= mu_max:
            raise ValueError(f"mu_min must be < mu_max, got mu_min={mu_min}, mu_max={mu_max}")
        if not (math.isfinite(eta_entropy) and eta_entropy >= 0.0):
            raise ValueError(f"eta_entropy must be finite and >= 0, got {eta_entropy}")
        self.mu_min = float(mu_min)
        self.mu_max = float(mu_max)
        self.eta_entropy = float(eta_entropy)

    def forward(self, stats: Mapping[str, float] | None = None) -> Tensor:
        """Return ``mu`` as a 0-dim tensor that back-propagates into the controller.

        Detach it (or use :meth:`mu_value`) when weighting the training loss.
        """
        raise NotImplementedError

    uses_stats = True  # mu depends on the training statistics (ScalarMu: it does not)

    def mu_value(self, stats: Mapping[str, float] | None = None) -> float:
        """Current ``mu`` as a Python float (no autograd graph), within ``[mu_min, mu_max]``.

        The final clip only guards against float32 rounding (0.7 is 0.70000005 in float32).
        """
        with torch.no_grad():
            return min(max(float(self(stats)), self.mu_min), self.mu_max)

    def apply_meta_gradient(self, dV_dmu: float, stats: Mapping[str, float] | None = None) -> None:
        """Accumulate ``dV/dmu * dmu/dphi`` into ``.grad`` of every controller parameter ``phi``.

        Does not zero gradients nor step: pair it with the controller's optimizer.
        """
        _check_finite("dV_dmu", dV_dmu)
        mu = self(stats)
        torch.autograd.backward(mu, torch.tensor(dV_dmu, dtype=mu.dtype, device=mu.device))

    def after_step(self) -> None:
        """Hook called after each controller update (projection onto the bounds)."""

    def entropy_nudge(self, delta: float) -> None:
        """Move ``mu`` by ``delta`` (the entropy term ``eta_H * (H_target - H)``), in bounds."""
        raise NotImplementedError


class ScalarMu(MetaController):
    """A single learned ``mu``: the AMFT paper's controller.

    With ``SGD(lr=eta_mu)`` over its parameters, one meta step followed by
    :meth:`entropy_nudge` and :meth:`after_step` gives exactly::

        mu <- clip(mu - eta_mu * dV/dmu + eta_H * (H_target - H), mu_min, mu_max)

    (a single clip, since the optimizer step itself does not clip). Other optimizers
    work too; :meth:`after_step` keeps ``mu`` within bounds whatever they do.

    Args:
        init_mu: starting SFT weight (0.8 in the paper's code), within ``[mu_min, mu_max]``.
        mu_min: lower bound of ``mu``.
        mu_max: upper bound of ``mu``.
        eta_entropy: step size ``eta_H`` of the entropy term (0 disables it).
    """

    def __init__(
        self, init_mu: float = 0.8, mu_min: float = 0.05, mu_max: float = 0.95, eta_entropy: float = 0.0
    ) -> None:
        super().__init__(mu_min, mu_max, eta_entropy)
        if not mu_min <= init_mu <= mu_max:
            raise ValueError(f"init_mu must be in [mu_min, mu_max] = [{mu_min}, {mu_max}], got {init_mu}")
        self.mu = nn.Parameter(torch.tensor(float(init_mu)))

    uses_stats = False

    def forward(self, stats: Mapping[str, float] | None = None) -> Tensor:
        """Return the ``mu`` parameter; ``stats`` is ignored."""
        return self.mu

    @torch.no_grad()
    def after_step(self) -> None:
        """Clip ``mu`` into ``[mu_min, mu_max]``."""
        self.mu.clamp_(self.mu_min, self.mu_max)

    @torch.no_grad()
    def entropy_nudge(self, delta: float) -> None:
        """Add ``delta`` to ``mu`` and clip into ``[mu_min, mu_max]``."""
        _check_finite("delta", delta)
        self.mu.add_(delta).clamp_(self.mu_min, self.mu_max)


class MetaNetwork(MetaController):
    """The write-up's meta-network: training statistics -> ``(w_sft, w_rl)`` -> ``mu``.

    Inputs are the stats ``sft_loss``, ``rl_loss``, ``entropy`` and ``grad_norm``, each
    log-normalised as ``sign(x) * log1p(|x|)``. An MLP (``4 -> hidden -> tanh -> 2``)
    gives two logits, a softmax gives ``(w_sft, w_rl)``, and
    ``mu = mu_min + (mu_max - mu_min) * w_sft``, so ``mu`` stays in bounds by
    construction. The output layer starts with zero weights and a bias that gives
    ``mu == init_mu`` for any stats; the first meta step therefore trains the output
    layer only, and the hidden layer receives gradient from the second step on.
    The hypergradient reaches every weight by the chain rule through ``mu``.

    Args:
        hidden: width of the hidden layer.
        init_mu: starting SFT weight, strictly inside ``(mu_min, mu_max)``.
        mu_min: lower bound of ``mu``.
        mu_max: upper bound of ``mu``.
        eta_entropy: step size ``eta_H`` of the entropy term (0 disables it).
    """

    STAT_KEYS: tuple[str, ...] = ("sft_loss", "rl_loss", "entropy", "grad_norm")
    _P_EPS = 1e-6  # entropy_nudge keeps w_sft within [eps, 1 - eps] so logits stay finite

    def __init__(
        self,
        hidden: int = 16,
        init_mu: float = 0.8,
        mu_min: float = 0.05,
        mu_max: float = 0.95,
        eta_entropy: float = 0.0,
    ) -> None:
        super().__init__(mu_min, mu_max, eta_entropy)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if not mu_min < init_mu < mu_max:
            raise ValueError(f"init_mu must be strictly inside (mu_min, mu_max) = ({mu_min}, {mu_max}), got {init_mu}")
        self.net = nn.Sequential(nn.Linear(len(self.STAT_KEYS), hidden), nn.Tanh(), nn.Linear(hidden, 2))
        p = (init_mu - mu_min) / (mu_max - mu_min)
        with torch.no_grad():
            self.net[-1].weight.zero_()
            self.net[-1].bias.copy_(torch.tensor([0.5, -0.5]) * math.log(p / (1.0 - p)))
        self._last_gap: float | None = None  # logit_sft - logit_rl at the last forward

    def features(self, stats: Mapping[str, float] | None) -> Tensor:
        """Log-normalised input vector; a missing key raises ``KeyError`` naming it."""
        stats = stats or {}
        values = []
        for key in self.STAT_KEYS:
            if key not in stats:
                raise KeyError(f"MetaNetwork needs stat {key!r} (required: {', '.join(self.STAT_KEYS)})")
            x = float(stats[key])
            _check_finite(f"stats[{key!r}]", x)
            values.append(math.copysign(math.log1p(abs(x)), x))
        weight = self.net[0].weight
        return torch.tensor(values, dtype=weight.dtype, device=weight.device)

    def forward(self, stats: Mapping[str, float] | None = None) -> Tensor:
        """Return ``mu`` for these stats (keys in :attr:`STAT_KEYS`, extra keys ignored)."""
        logits = self.net(self.features(stats))
        self._last_gap = float((logits[0] - logits[1]).detach())
        w_sft = torch.softmax(logits, dim=-1)[0]
        return self.mu_min + (self.mu_max - self.mu_min) * w_sft

    @torch.no_grad()
    def entropy_nudge(self, delta: float) -> None:
        """Shift the output bias so that ``mu`` moves by ``delta``, clipped to the bounds.

        The shift is exact for the stats of the most recent :meth:`forward` (or, before
        any, for a zero hidden contribution). It is a constant shift of the logit gap, so
        for other stats ``mu`` moves by a similar but not identical amount, always in the
        direction of ``delta`` and never out of ``[mu_min, mu_max]``.
        """
        _check_finite("delta", delta)
        if delta == 0.0:
            return
        bias = self.net[-1].bias
        gap = self._last_gap if self._last_gap is not None else float(bias[0] - bias[1])
        p = 1.0 / (1.0 + math.exp(-gap)) if gap >= 0 else math.exp(gap) / (1.0 + math.exp(gap))
        target = min(max(p + delta / (self.mu_max - self.mu_min), self._P_EPS), 1.0 - self._P_EPS)
        shift = math.log(target / (1.0 - target)) - gap
        if shift * delta <= 0.0:  # already saturated in the direction of delta
            return
        bias[0] += 0.5 * shift
        bias[1] -= 0.5 * shift
        self._last_gap = gap + shift


def _upcast(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def hypergradient(
    grad_val_lookahead: Sequence[Tensor | None],
    grad_sft: Sequence[Tensor | None],
    grad_rl: Sequence[Tensor | None],
    lr: float,
) -> float:
    """dV/dmu = -lr * <gV(theta'), g_sft - g_rl> summed over parameters; None entries count as zeros.

    ``grad_val_lookahead`` is the validation-loss gradient at the look-ahead parameters
    (:func:`lookahead`); ``grad_sft`` and ``grad_rl`` are the two training-loss gradients at
    the current parameters, all in the same parameter order. Half-precision gradients are
    upcast to float32 for the product.
    """
    _same_length(grad_val_lookahead=grad_val_lookahead, grad_sft=grad_sft, grad_rl=grad_rl)
    total: Tensor | None = None  # accumulated on the device, one host sync at the end
    for g_v, g_s, g_r in zip(grad_val_lookahead, grad_sft, grad_rl):
        if g_v is None or (g_s is None and g_r is None):
            continue
        if g_s is None:
            diff = -_upcast(g_r)
        elif g_r is None:
            diff = _upcast(g_s)
        else:
            diff = _upcast(g_s) - _upcast(g_r)
        dot = torch.sum(_upcast(g_v) * diff, dtype=torch.float64)
        total = dot if total is None else total + dot.to(total.device)
    return 0.0 if total is None else -lr * float(total)


def lookahead(
    params: Sequence[Tensor],
    grad_sft: Sequence[Tensor | None],
    grad_rl: Sequence[Tensor | None],
    mu: float,
    lr: float,
) -> list[Tensor]:
    """theta' = theta - lr * ((1-mu) * g_rl + mu * g_sft), detached new tensors.

    ``params`` are left untouched; a None gradient counts as zero.
    """
    _same_length(params=params, grad_sft=grad_sft, grad_rl=grad_rl)
    out = []
    with torch.no_grad():
        for p, g_s, g_r in zip(params, grad_sft, grad_rl):
            new = p.detach().clone()
            if g_s is not None:
                new.sub_(g_s, alpha=lr * mu)
            if g_r is not None:
                new.sub_(g_r, alpha=lr * (1.0 - mu))
            out.append(new)
    return out


def adam_lookahead(
    params: Sequence[Tensor],
    grad_sft: Sequence[Tensor | None],
    grad_rl: Sequence[Tensor | None],
    mu: float,
    lr: float,
    states: Sequence[Mapping[str, Tensor]],
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = True,
) -> tuple[list[Tensor], list[Tensor | None], list[Tensor | None]]:
    """The look-ahead as the Adam / AdamW step itself, and its exact derivative in ``mu``.

    With ``g = mu g_sft + (1 - mu) g_rl`` and the optimizer's moments ``m, v`` and step count
    ``t - 1`` before the step (``states[i]``: torch's ``exp_avg``, ``exp_avg_sq``, ``step``; empty
    for a parameter not stepped yet)::

        m' = b1 m + (1 - b1) g        v' = b2 v + (1 - b2) g^2      t = step + 1
        s = sqrt(v' / (1 - b2^t))     theta' = theta (1 - lr wd) - lr m' / (1 - b1^t) / (s + eps)

    (``wd`` decoupled, AdamW; torch's Adam adds ``wd theta`` to ``g`` instead). ``g`` moves with
    ``mu`` along ``d = g_sft - g_rl``, and so do ``m'`` and ``v'``::

        d theta' / d mu = -lr c * d,
        c = (1 - b1) / ((1 - b1^t)(s + eps)) - m' (1 - b2) g / ((1 - b1^t)(1 - b2^t) s (s + eps)^2)

    Returns ``(theta', c * g_sft, c * g_rl)``: :func:`hypergradient` of the latter two gives
    ``dV/dmu`` of the step the optimizer will actually take (gradient clipping aside). Parameters
    and optimizer states are left untouched.
    """
    _same_length(params=params, grad_sft=grad_sft, grad_rl=grad_rl, states=states)
    b1, b2 = betas
    theta_prime: list[Tensor] = []
    eff_sft: list[Tensor | None] = []
    eff_rl: list[Tensor | None] = []
    with torch.no_grad():
        for p, g_s, g_r, state in zip(params, grad_sft, grad_rl, states):
            p32 = _upcast(p.detach())
            g = torch.zeros_like(p32)
            if g_s is not None:
                g.add_(_upcast(g_s), alpha=mu)
            if g_r is not None:
                g.add_(_upcast(g_r), alpha=1.0 - mu)
            if weight_decay and not decoupled_weight_decay:
                g.add_(p32, alpha=weight_decay)
            m = _upcast(state["exp_avg"]) if "exp_avg" in state else torch.zeros_like(p32)
            v = _upcast(state["exp_avg_sq"]) if "exp_avg_sq" in state else torch.zeros_like(p32)
            t = int(float(state["step"])) + 1 if "step" in state else 1
            m1 = m * b1 + g * (1.0 - b1)
            v1 = v * b2 + g * g * (1.0 - b2)
            bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
            s = (v1 / bc2).sqrt()
            denom = s + eps
            new = p32 * (1.0 - lr * weight_decay) if weight_decay and decoupled_weight_decay else p32.clone()
            new.sub_(lr * (m1 / bc1) / denom)
            theta_prime.append(new.to(p.dtype))
            through_v = torch.where(s > 0, m1 * g * (1.0 - b2) / (bc1 * bc2 * s.clamp_min(1e-30) * denom * denom), 0.0)
            c = (1.0 - b1) / (bc1 * denom) - through_v
            eff_sft.append(None if g_s is None else c * _upcast(g_s))
            eff_rl.append(None if g_r is None else c * _upcast(g_r))
    return theta_prime, eff_sft, eff_rl
