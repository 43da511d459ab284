"""The method API: what a method sees of one policy update, and the terms it builds from it.

A method module (a :class:`~lit_align.modules.policy.PolicyModule` subclass) implements ``loss(u)``
from an :class:`Update` ``u`` and returns a :class:`~lit_align.core.terms.Loss`, e.g. CHORD::

    def loss(self, u):
        mu = self.mixing_weight(u.step, u.reward_mean if self.mu_needs_reward else None)
        return (1 - mu) * u.grpo() + mu * u.sft(self.phi)

It never sees micro-batches, ranks or the model: ``u.grpo()`` / ``u.sft()`` are lazy terms over this
update's mini-batch of rows (the rollout batch is sampled, through the buffer, only if a term of
non-zero weight or ``u.reward_mean`` asks for it), and the module's step engine runs them with exact
global normalisation over micro-batches and ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_align.core.terms import Lazy, RLSettings, TokenWeights, rl_term, sft_term


class Update:
    """One policy update's rows, as a method sees them.

    Args:
        step: policy updates done so far (``trainer.global_step``).
        batch: the training batch (``"expert"`` rows, ``"prompts"`` rows, AMFT's ``"meta"`` rows).
        expert: this update's mini-batch of the expert rows (None when the batch has none).
        rollouts: ``rollouts()`` -> this update's mini-batch of the rollout batch (a dict: ``rollout``,
            ``advantages``, ``mask``, ``rewards``, ``reward_mean``, ``metrics``; sampled at most once).
        policy, rl: what the terms are built with (the policy part, the RL settings).
        importance_weights: ``fn(rollout, rows, width)`` -> per-token weights or None (the sampler's).
        on_token_weights: receives the SFT term's token weights as they are computed.
    """

    def __init__(
        self,
        step: int,
        batch: dict,
        expert: dict | None,
        rollouts: Callable[[], dict] | None,
        policy,
        rl: RLSettings,
        importance_weights: Callable | None = None,
        on_token_weights: Callable[[torch.Tensor], None] | None = None,
    ):
        self.step, self.batch, self.expert = step, batch, expert
        self._make, self._rows = rollouts, None
        self.policy, self.rl = policy, rl
        self._is_weights, self._on_weights = importance_weights, on_token_weights
        self.metrics: dict = {}  # logged as train/<name> with the step's other scalars

    # ------------------------------------------------------------------ rows
    @property
    def has_prompts(self) -> bool:
        return self._make is not None

    def rollouts(self) -> dict:
        """This update's rollout rows (sampled and scored on first use; their metrics join ``metrics``)."""
        if self._rows is None:
            if self._make is None:
                raise ValueError("this method needs prompt rows: set data.prompt_data")
            self._rows = self._make()
            self.metrics.update(self._rows["metrics"])
        return self._rows

    @property
    def sampled(self) -> bool:
        """Whether this update's rollout rows exist (a term or the reward mean asked for them)."""
        return self._rows is not None

    @property
    def reward_mean(self) -> float:
        """The rollout batch's mean reward over all ranks (samples it if need be)."""
        return self.rollouts()["reward_mean"]

    # ------------------------------------------------------------------ terms
    def grpo(self, extra: Callable | None = None, name: str = "rl") -> Lazy:
        """The clipped GRPO surrogate over this update's rollout rows (:func:`lit_align.core.terms.rl_term`)."""

        def build(weight: float):
            if not self.has_prompts:  # a batch without prompt rows has no RL term
                return None
            r = self.rollouts()
            rollout = r["rollout"]
            is_weights = None
            if self._is_weights is not None:
                is_weights = lambda rows, width: self._is_weights(rollout, rows, width)  # noqa: E731
            return rl_term(self.policy, rollout, r["advantages"], self.rl, weight, r["mask"], name, extra, is_weights)

        return Lazy(build)

    def sft(self, token_weights: TokenWeights | None = None, expert: dict | None = None, name: str = "sft") -> Lazy:
        """The NLL of this update's demonstrations (or ``expert`` rows), each token weighted by
        ``token_weights(logp, logits)`` (None: plain NLL) (:func:`lit_align.core.terms.sft_term`)."""

        def build(weight: float):
            rows = self.expert if expert is None else expert
            if rows is None:  # a batch without expert rows has no SFT term
                return None
            return sft_term(self.policy, rows, weight, token_weights, self.rl.temperature, name, self._on_weights)

        return Lazy(build)
