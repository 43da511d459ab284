"""SRFTModule: LUFFY's mixed group plus SRFT's two entropy-aware weights (arXiv 2506.19767; code
fyqqyf/SRFT, srft/verl/verl/mix_src, built on LUFFY's).

Per policy update, with H the policy's mean token entropy on this update's sampled tokens (detached):
  1. w_SFT = sft_coef * exp(-H) (the paper; ``sft_entropy_sign="positive"``: exp(+H), the released code's
     form), w_RL = rl_coef * exp(H) (the paper and the code);
  2. L = L_RL + w_SFT * L_SFT, where
     L_RL  = LUFFY's RL term over the mixed groups (demonstration tokens -A f(p), sampled tokens the clipped
             surrogate), each positive sample's (A > 0) surrogate weighted w_RL, the negative ones' weight 1
             (the paper's split of the self-rollout objective into positive and negative samples), normalised
             over all its tokens;
     L_SFT = the NLL of the demonstrations in this update's groups, normalised over their tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from lit_align.core import groups
from lit_align.core import settings as S
from lit_align.core.terms import Lazy, Loss
from lit_align.core.update import Update
from lit_align.modules.luffy import LUFFYModule
from lit_align.rollout import Rollout

RULES = {
    "sft_coef": S.number(0),
    "rl_coef": S.number(0),
    "reward_split": S.Rule(lambda v: isinstance(v, bool), "true or false"),
}


class SRFTModule(LUFFYModule):
    """SRFT: LUFFY's group and off-policy term, an entropy-weighted SFT term on the demonstrations and an
    entropy-weighted split of the sampled completions by the sign of their advantage.

    Args:
        sft_coef: c_SFT in w_SFT = c_SFT * exp(-H) (paper 0.5). 0: no SFT term (it is not computed).
        rl_coef: c_RL in w_RL = c_RL * exp(H), the weight of the positive samples' RL term (paper 0.1).
        sft_entropy_sign: the sign of H in w_SFT: ``negative``, exp(-H), the paper's (imitation fades while
            the policy is uncertain); ``positive``, exp(+H), the released code's (mix_core_alg.py,
            ``entropy_exp_coeff = entropy.exp()``).
        reward_split: weight the positive samples' RL term by w_RL (the paper). False: every sample's term
            has weight 1 (LUFFY's RL term; with sft_coef 0 the module is LUFFY exactly).
        **kwargs: LUFFY's arguments (``demonstrations_per_prompt``, ``advantage_stats``,
            ``off_policy_gamma``, ``behaviour_logprobs``) and the shared PolicyModule ones.

    H is the mean, over this update's sampled (on-policy) completion tokens on all ranks, of the entropy
    of the sampling distribution recorded when they were sampled (``Rollout.entropy``, at the sampling
    temperature): the current policy's at the first update of a rollout batch. Logged: ``train/srft_w_sft``,
    ``train/srft_w_rl`` and ``train/srft_entropy`` (H), besides LUFFY's.
    """

    HEADLINE_METRICS = ("train/reward_mean", "train/srft_w_sft", "train/srft_w_rl")

    def __init__(
        self,
        *args,
        sft_coef: float = 0.5,
        rl_coef: float = 0.1,
        sft_entropy_sign: Literal["negative", "positive"] = "negative",
        reward_split: bool = True,
        **kwargs,
    ):
        S.check(SRFTModule.__init__, locals(), RULES)
        super().__init__(*args, **kwargs)
        self.sft_coef, self.rl_coef = sft_coef, rl_coef
        self.sft_entropy_sign, self.reward_split = sft_entropy_sign, reward_split
        self.hparams.update(
            sft_coef=sft_coef, rl_coef=rl_coef, sft_entropy_sign=sft_entropy_sign, reward_split=reward_split
        )

    def weights(self, H: float) -> tuple[float, float]:
        """(w_SFT, w_RL) at mean token entropy H."""
        sign = -1.0 if self.sft_entropy_sign == "negative" else 1.0
        return self.sft_coef * math.exp(sign * H), self.rl_coef * math.exp(H)

    def loss(self, u: Update) -> Loss:
        """L = L_RL(positive samples weighted w_RL) + w_SFT * L_SFT(demonstrations), see the module docstring."""
        if not u.has_prompts:
            return Loss()
        self.log_demonstrations(u)
        r = u.rollouts()
        rollout, adv, mask = r["rollout"], r["advantages"], r["mask"]
        off = groups.off_policy(rollout)
        H = self.sampled_entropy(rollout, mask, off)
        w_sft, w_rl = self.weights(H)
        u.metrics.update(srft_entropy=H, srft_w_sft=w_sft, srft_w_rl=w_rl)
        if self.reward_split:
            # -min(rho w A, clip(rho) w A) = w * -min(rho A, clip(rho) A) for w >= 0: the positive samples'
            # surrogate weighted w_RL, the negative ones' and the demonstrations' (off-policy) left as they are
            positive = ~off & (adv > 0)
            adv = torch.where(positive, adv * w_rl, adv)
        rl = Lazy(lambda weight: self.rl_term(rollout, adv, weight, mask))
        demos = demonstration_rows(rollout, off, mask)
        sft = Lazy(lambda weight: None if demos is None else self.sft_term(demos, weight))
        return rl + w_sft * sft

    def sampled_entropy(self, rollout: Rollout, mask: torch.Tensor, off: torch.Tensor) -> float:
        """H: the mean sampling-time entropy of the update's counted on-policy tokens over all ranks (0
        when there are none)."""
        on = mask.bool() & ~off.unsqueeze(-1)
        total, count = self.ranks.sums([float((rollout.entropy.double() * on).sum()), float(on.sum())])
        return total / count if count else 0.0


def demonstration_rows(rollout: Rollout, off: torch.Tensor, mask: torch.Tensor) -> dict | None:
    """The rollout's off-policy rows as right-padded labelled rows (``input_ids``, ``attention_mask``,
    ``labels``: the prompt's tokens then the completion's, labels on the completion tokens ``mask``
    counts), the layout of the SFT term; None when there are none."""
    rows = torch.nonzero(off).squeeze(-1).tolist()
    if not rows:
        return None
    seqs, labels = [], []
    for i in rows:
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
        n = int(rollout.completion_mask[i].sum())
        completion = rollout.completion_ids[i, :n]
        seqs.append(torch.cat([prompt, completion]))
        labels.append(torch.cat([torch.full_like(prompt, -100), completion.masked_fill(mask[i, :n] == 0, -100)]))
    S = max(len(s) for s in seqs)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, S - len(t)), value=v)  # noqa: E731
    return {
        "input_ids": torch.stack([pad(s, 0) for s in seqs]),
        "attention_mask": torch.stack([pad(torch.ones_like(s), 0) for s in seqs]),
        "labels": torch.stack([pad(lab, -100) for lab in labels]),
    }
