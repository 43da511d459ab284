"""LUFFYModule: a prompt's demonstration as a member of its own GRPO group (arXiv 2504.14945; code
ElliottYan/LUFFY, luffy/verl/verl/mix_src).

Per rollout batch:
  1. each prompt's group holds G - k samples of the policy and k of its demonstrations
     (k = ``demonstrations_per_prompt``; the paper: 1 demonstration + 7 samples), all scored by the reward;
  2. advantages over the mixed group: A_i = (r_i - mean_g) / (std_g + eps) with mean and std over every
     member (``advantage_stats="all"``, the paper) or over the samples only (``"on_policy"``, the code's
     "split" estimator);
  3. one RL term over every token of the update, normalised together: on-policy tokens the clipped
     surrogate, demonstration tokens -A f(r), f(r) = r / (r + gamma), r = p / pi_beta (pi_beta = 1 for a
     demonstration without log-probs), no clip (see :meth:`LUFFYModule.loss`).
"""

from __future__ import annotations

from typing import Literal

import torch

from lit_align import losses
from lit_align.core import groups
from lit_align.core import settings as S
from lit_align.core.terms import Loss
from lit_align.core.update import Update
from lit_align.modules.policy import PolicyModule
from lit_align.rollout import Rollout

RULES = {
    "demonstrations_per_prompt": S.integer(0),
    "off_policy_gamma": S.number(0, low_open=True),
}


class LUFFYModule(PolicyModule):
    """LUFFY: each prompt's demonstration replaces one of its G rollouts; advantages over the mixed
    group; demonstration tokens get the policy-shaped objective -A p / (p + gamma), unclipped.

    Args:
        demonstrations_per_prompt: k, demonstrations in each prompt's group of G (the group then holds
            G - k samples); the data module pairs every prompt row with k demonstrations of that very
            prompt at set-up (``data.pair_by``). Paper: 1 of 8. 0: no demonstration, plain GRPO.
        advantage_stats: the members whose rewards give a group's mean and std: ``all`` (the mixed
            group, the paper's Eq.) or ``on_policy`` (the samples only; every member, the demonstration
            too, is then measured against them: the official code's compute_grpo_outcome_advantage_split).
        off_policy_gamma: gamma of the shaping f(p) = p / (p + gamma) on demonstration tokens (paper 0.1).
            It is the RL term's ``RLSettings.off_policy_gamma``, read from this module's settings.
        behaviour_logprobs: the demonstration's behaviour policy: ``none`` (probability 1: a human or
            closed-model trace, the "ratio" is p itself) or ``given`` (the prompt batch carries the
            per-token log-probs of the model that wrote each demonstration as ``demo_logp``, shaped like
            ``demo_ids``; the ratio is then p / pi_beta).
        **kwargs: the shared PolicyModule arguments (model, optimizer, G, clipping, reward, ...).

    Logged besides GRPO's: ``train/off_policy_token_share`` and ``train/off_policy_weight_mean`` (the RL
    term's, over the demonstration tokens), ``train/expert_advantage_mean`` and
    ``train/expert_reward_mean`` (over this update's demonstration rows, all ranks).
    """

    HEADLINE_METRICS = ("train/reward_mean", "train/off_policy_token_share", "train/expert_reward_mean")

    def __init__(
        self,
        *args,
        demonstrations_per_prompt: int = 1,
        advantage_stats: losses.AdvantageStats = "all",
        off_policy_gamma: float = 0.1,
        behaviour_logprobs: Literal["none", "given"] = "none",
        **kwargs,
    ):
        S.check(LUFFYModule.__init__, locals(), RULES)
        super().__init__(*args, **kwargs)
        G = self.hparams.num_generations
        if G < 2:
            raise ValueError(f"model.num_generations={G}: LUFFY's group advantages need at least 2 members per prompt")
        if demonstrations_per_prompt >= G:
            raise ValueError(
                f"model.demonstrations_per_prompt={demonstrations_per_prompt} leaves no sample of the policy in a "
                f"group of model.num_generations={G}: it must be below num_generations"
            )
        self.demonstrations_per_prompt = demonstrations_per_prompt
        self.advantage_stats = advantage_stats
        self.behaviour_logprobs = behaviour_logprobs
        # the RL term reads off_policy_gamma from the module's settings (RLSettings.from_hparams)
        self.hparams.update(
            demonstrations_per_prompt=demonstrations_per_prompt,
            advantage_stats=advantage_stats,
            off_policy_gamma=off_policy_gamma,
            behaviour_logprobs=behaviour_logprobs,
        )

    # ------------------------------------------------------------------ the group
    def group_rollouts(self, prompts: dict) -> Rollout:
        """G - k samples per prompt, then its k demonstrations (off-policy rows), each group contiguous."""
        k = self.demonstrations_per_prompt
        if k == 0:
            return self.sample(prompts)
        G = self.hparams.num_generations
        sampled = self.sample(prompts, num_generations=G - k)
        demos = groups.demonstration_rows(prompts, k)
        if self.behaviour_logprobs == "given":
            demos.old_logp = given_logprobs(prompts, k, demos)
        return groups.mix(sampled, G - k, demos)

    # ------------------------------------------------------------------ the loss
    def loss(self, u: Update) -> Loss:
        """L = the RL term over the mixed groups: -min(rho A, clip(rho) A) on sampled tokens, -A f(r) on
        demonstration tokens, token-mean over both (the core's RL term with this module's gamma)."""
        if u.has_prompts:
            self.log_demonstrations(u)
        return u.grpo()

    def log_demonstrations(self, u: Update) -> None:
        """``expert_advantage_mean`` / ``expert_reward_mean``: the mean advantage / reward of this update's
        demonstration (off-policy) rows over all ranks; not logged when no rank's update holds one."""
        r = u.rollouts()
        off = groups.off_policy(r["rollout"])
        adv, rewards = r["advantages"][off], r["rewards"][off]
        adv_sum, reward_sum, n = self.ranks.sums([float(adv.sum()), float(rewards.sum()), float(off.sum())])
        if n:
            u.metrics["expert_advantage_mean"] = adv_sum / n
            u.metrics["expert_reward_mean"] = reward_sum / n


def given_logprobs(prompts: dict, k: int, demos: Rollout) -> torch.Tensor:
    """The behaviour log-probs of the first ``k`` demonstrations of each prompt, laid out as
    :func:`lit_align.core.groups.demonstration_rows` lays out their tokens: (B * k, width), 0 off the mask.

    Raises:
        ValueError: the prompt batch carries no ``demo_logp``, or not shaped like ``demo_ids``, or a
            log-prob on a demonstration token is not finite and <= 0.
    """
    if "demo_logp" not in prompts:
        raise ValueError(
            "model.behaviour_logprobs=given reads each demonstration's per-token log-probs from the prompt batch "
            "('demo_logp', shaped like 'demo_ids'), and this batch has none: set behaviour_logprobs=none (behaviour "
            "probability 1) or give the data those log-probs"
        )
    logp, ids = prompts["demo_logp"], prompts["demo_ids"]
    if tuple(logp.shape) != tuple(ids.shape):
        raise ValueError(f"demo_logp {tuple(logp.shape)} must be shaped like demo_ids {tuple(ids.shape)}")
    B, _, D = ids.shape
    width = demos.completion_ids.shape[1]
    logp = logp[:, :k].reshape(B * k, D)[:, :width]
    logp = logp.to(torch.promote_types(logp.dtype, torch.float32))
    mask = demos.completion_mask.bool()
    bad = mask & ~(torch.isfinite(logp) & (logp <= 0))
    if bool(bad.any()):
        raise ValueError("demo_logp holds a value that is not a finite log-probability (<= 0) on a demonstration token")
    return logp * mask
