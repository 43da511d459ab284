"""PrefixRFTModule: some of each prompt's rollouts continue from a prefix of its demonstration.

Prefix-RFT (arXiv 2507.01679; code ZeroYuHuang/prefix_rft), per policy update:
  1. of the G rollouts of prompt i, the last ``prefix_rollouts`` continue a prefix y*_{<L} of its
     demonstration y*: L = min(floor(l |y*|), |y*| - 1), l ~ U(low_t, high), one draw per row, low_t on a
     cosine decay (``prefix_start`` -> ``prefix_end`` over ``prefix_steps`` policy updates, then held);
     the policy samples the continuation (HF sampler or vLLM engine, ``self.sample(prefix_ids=...)``);
  2. every row is scored; a hybrid row's advantage is its own reward against its prompt's group
     (statistics over the on-policy rows by default, ``advantage_stats``);
  3. one RL term: sampled tokens get the clipped surrogate; given (prefix) tokens are off-policy with
     behaviour probability 1, LUFFY's shaped -A f(p), f(p) = p / (p + gamma), and only the top
     ``entropy_share`` of them by the policy's entropy (over the rollout batch, all ranks) keep their
     advantage: the others get advantage 0 (no gradient) and still count in the token-mean's normaliser.

UFT (arXiv 2505.16984; code liumy2010/UFT) as settings: ``prefix_length: binomial`` (one hint length per
prompt, K ~ Binomial(n, p_t) pieces of the demonstration, p_t on the same cosine, no hint after
``prefix_steps``) and ``prefix_objective: nll`` (the RL term over the sampled tokens only, plus
``sft_loss_coef`` x the NLL of the hint tokens, normalised over them). See docs/methods/prefix_rft.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from lit_align import losses
from lit_align.core import groups, terms
from lit_align.core import settings as S
from lit_align.core.terms import Lazy, Loss
from lit_align.core.update import Update
from lit_align.modules.policy import PolicyModule
from lit_align.rollout import Rollout

RULES = {
    "prefix_rollouts": S.integer(0, optional="half of num_generations"),
    "prefix_high": S.number(0, 1),
    "prefix_start": S.number(0, 1),
    "prefix_end": S.number(0, 1),
    "prefix_steps": S.integer(1),
    "binomial_pieces": S.integer(1),
    "entropy_share": S.number(0, 1),
    "off_policy_gamma": S.number(0, low_open=True),
    "sft_loss_coef": S.number(0),
}
EPS = 1e-6  # the group-advantage epsilon (losses.group_advantages_by_id; the official code's)


class PrefixRFTModule(PolicyModule):
    """Prefix-RFT: rollouts that continue demonstration prefixes, the prefixes trained off-policy.

    Args:
        prefix_rollouts: m, the rollouts of each prompt (of G) that continue a prefix of its
            demonstration; the other G - m sample from the prompt alone. 0: GRPO. None (default): G // 2.
        prefix_length: ``uniform`` (Prefix-RFT: per row, L = min(floor(l |y*|), |y*| - 1),
            l ~ U(low_t, prefix_high)) or ``binomial`` (UFT: per prompt, K ~ Binomial(n, p_t),
            n = min(binomial_pieces, |y*|), L = min(round(K |y*| / n), |y*| - 1), shared by its m rows).
        prefix_high: the upper end of l (uniform); low_t never exceeds it, so 0 gives no prefix at all.
        prefix_start, prefix_end, prefix_steps: the cosine schedule c_t = end + (start - end) *
            0.5 * (1 + cos(pi * min(t, T) / T)), t the policy updates done, T = prefix_steps: low_t = min(c_t,
            prefix_high) (uniform, held at the end after T); p_t = c_t for t < T, then 0 (binomial: UFT
            gives no hint after T_hint).
        binomial_pieces: n, the pieces the demonstration is cut into for the binomial draw (UFT: 5).
        prefix_objective: ``off_policy`` (Prefix-RFT: given tokens get -A f(p), top-entropy share only) or
            ``nll`` (UFT: given tokens leave the RL term; ``sft_loss_coef`` x their plain NLL, its own term).
        entropy_share: the share of the rollout batch's given tokens (all ranks), highest policy entropy
            at sampling time first, that keep their advantage (off_policy). 0: none, 1: all.
        prefix_advantage: ``sequence`` (the paper: the hybrid row's one advantage on every token) or
            ``code`` (the official compute_grpo_prefix_outcome_advantage, one continuation per prefix: the
            continuation gets r / (1 + eps) (advantage_norm std) or r (none), the prefix that minus the
            mean reward of the prompt's on-policy rows).
        advantage_stats: the group statistics a hybrid row's advantage is taken against: ``on_policy``
            (the prompt's on-policy rows; default) or ``all`` (every row of the group).
        off_policy_gamma: gamma of the shaping f(p) = p / (p + gamma) on given tokens (LUFFY's 0.1).
        sft_loss_coef: the NLL term's weight (nll; UFT: 0.001).
        **kwargs: the shared PolicyModule arguments (model, optimizer, G, clipping, reward, ...).
    """

    demonstrations_per_prompt = 1  # each prompt row carries its demonstration (demo_ids (B, 1, D))
    HEADLINE_METRICS = ("train/reward_mean", "train/prefix_ratio_mean")

    def __init__(
        self,
        *args,
        prefix_rollouts: int | None = None,
        prefix_length: Literal["uniform", "binomial"] = "uniform",
        prefix_high: float = 1.0,
        prefix_start: float = 0.95,
        prefix_end: float = 0.05,
        prefix_steps: int = 500,
        binomial_pieces: int = 5,
        prefix_objective: Literal["off_policy", "nll"] = "off_policy",
        entropy_share: float = 0.2,
        prefix_advantage: Literal["sequence", "code"] = "sequence",
        advantage_stats: losses.AdvantageStats = "on_policy",
        off_policy_gamma: float = 0.1,
        sft_loss_coef: float = 0.001,
        **kwargs,
    ):
        S.check(PrefixRFTModule.__init__, locals(), RULES)
        super().__init__(*args, **kwargs)
        hp = self.hparams
        G = hp.num_generations
        if G < 2:
            raise ValueError(f"model.num_generations={G}: Prefix-RFT's group advantages need at least 2 rollouts")
        if prefix_rollouts is None:
            prefix_rollouts = G // 2
        if prefix_rollouts > G:
            raise ValueError(
                f"model.prefix_rollouts={prefix_rollouts} is out of range: it must be <= model.num_generations ({G})"
            )
        if prefix_objective == "off_policy" and (advantage_stats == "on_policy" or prefix_advantage == "code"):
            if prefix_rollouts == G:
                raise ValueError(
                    f"model.prefix_rollouts={prefix_rollouts} = model.num_generations leaves no on-policy rollout for "
                    "the on-policy statistics (model.advantage_stats=on_policy, or prefix_advantage=code): lower "
                    "prefix_rollouts or set advantage_stats all"
                )
        if prefix_advantage == "code":
            if prefix_objective != "off_policy":
                raise ValueError("model.prefix_advantage=code is the off-policy objective's: set prefix_objective")
            if hp.advantage_norm == "batch-std":
                raise ValueError(
                    "model.prefix_advantage=code has the official code's two forms, advantage_norm std and none; "
                    "got batch-std"
                )
        self.advantage_stats = advantage_stats
        hp.update(
            prefix_rollouts=prefix_rollouts,
            prefix_length=prefix_length,
            prefix_high=prefix_high,
            prefix_start=prefix_start,
            prefix_end=prefix_end,
            prefix_steps=prefix_steps,
            binomial_pieces=binomial_pieces,
            prefix_objective=prefix_objective,
            entropy_share=entropy_share,
            prefix_advantage=prefix_advantage,
            advantage_stats=advantage_stats,
            off_policy_gamma=off_policy_gamma,  # read by the RL term's settings (RLSettings)
            sft_loss_coef=sft_loss_coef,
        )

    # ------------------------------------------------------------------ prefixes
    def schedule(self, step: int) -> float:
        """c_t: the cosine from ``prefix_start`` to ``prefix_end`` over ``prefix_steps`` updates, then held."""
        hp = self.hparams
        f = min(step, hp.prefix_steps) / hp.prefix_steps
        return hp.prefix_end + (hp.prefix_start - hp.prefix_end) * 0.5 * (1.0 + math.cos(math.pi * f))

    def prefix_lengths(self, demo_lengths: torch.Tensor, step: int) -> torch.Tensor | None:
        """The prefix length L of each of the B x G rows (long, CPU; row i * G + g is prompt i's g-th) for
        demonstrations of ``demo_lengths`` (B,) tokens at policy update ``step``, drawn from the global torch
        RNG (which checkpoints restore); None when no row can have one (no draw is made: GRPO's RNG stream)."""
        hp = self.hparams
        G, m = hp.num_generations, hp.prefix_rollouts
        D = demo_lengths.detach().cpu().long()
        B = D.shape[0]
        if m == 0 or B == 0:
            return None
        cap = (D - 1).clamp(min=0)  # at least the demonstration's last token is left to the policy
        if hp.prefix_length == "uniform":
            if hp.prefix_high == 0:
                return None
            high = hp.prefix_high
            low = min(self.schedule(step), high)
            l = low + (high - low) * torch.rand(B, m, dtype=torch.float64)  # noqa: E741
            drawn = torch.floor(l * D.unsqueeze(1).double()).long()
        else:
            p = self.schedule(step) if step < hp.prefix_steps else 0.0
            if p == 0:
                return None
            n = torch.minimum(torch.full_like(D, hp.binomial_pieces), D).clamp(min=1)
            k = torch.binomial(n.double(), torch.full((B,), p, dtype=torch.float64)).long()
            per_prompt = torch.tensor([round(int(a) / int(b) * int(d)) for a, b, d in zip(k, n, D)], dtype=torch.long)
            drawn = per_prompt.unsqueeze(1).expand(B, m)
        lengths = torch.zeros(B, G, dtype=torch.long)
        lengths[:, G - m :] = torch.minimum(drawn, cap.unsqueeze(1)).clamp(min=0)
        return lengths.reshape(-1)

    def group_rollouts(self, prompts: dict) -> Rollout:
        """G rollouts per prompt, the last ``prefix_rollouts`` continuing prefixes of its demonstration
        (:meth:`prefix_lengths`). Off-policy objective: rows holding given tokens are the groups'
        off-policy members (``Rollout.off_policy``), for the advantage statistics."""
        hp = self.hparams
        G = hp.num_generations
        if "demo_ids" not in prompts:
            groups.demonstration_rows(prompts)  # raises, naming how to pair demonstrations
        demo_ids, demo_mask = prompts["demo_ids"][:, 0], prompts["demo_mask"][:, 0]
        lengths = self.prefix_lengths(demo_mask.sum(-1), self.global_step)
        if lengths is None or not bool(lengths.any()):
            return self.sample(prompts)
        width = int(lengths.max())
        device = demo_ids.device
        prefix_ids = demo_ids[:, :width].repeat_interleave(G, dim=0)
        columns = torch.arange(width)
        prefix_mask = (columns.unsqueeze(0) < lengths.unsqueeze(1)).long().to(device)
        rollout = self.sample(prompts, prefix_ids=prefix_ids, prefix_mask=prefix_mask)
        if hp.prefix_objective == "off_policy" and rollout.prefix_mask is not None:
            n = len(rollout.completions)
            rollout.group_ids = torch.arange(n, device=rollout.completion_ids.device) // G
            rollout.off_policy = rollout.prefix_mask.ne(0).any(-1)
        return rollout

    # ------------------------------------------------------------------ the rollout batch
    def rollout_batch(self, prompts: dict) -> dict:
        """The rollout batch (:meth:`PolicyModule.rollout_batch`), plus what the terms read, computed once per
        rollout batch so that no micro-batch, mini-batch or rank changes it: ``prefix_advantages`` (N,) the
        advantage of each row's given tokens, ``prefix_keep`` (N, T) the given tokens that keep it (the top
        ``entropy_share`` by sampling-time entropy over all ranks), ``prefixed`` whether any rank's batch
        holds a given token; and the prefix metrics (over all ranks)."""
        hp = self.hparams
        batch = super().rollout_batch(prompts)
        prompts = batch["prompts"]  # its groups' (under dynamic sampling, not all the training batch's)
        rollout, rewards = batch["rollout"], batch["rewards"]
        n, G = len(rewards), hp.num_generations
        given = _given(rollout)
        hybrid = given.any(-1)
        adv = batch["advantages"]
        prefix_adv = adv.clone()
        if hp.prefix_advantage == "code" and bool(hybrid.any()):
            adv, prefix_adv = self.code_advantages(rewards, groups.group_ids(rollout, G), hybrid)
            batch["advantages"] = adv
        prefix_adv = torch.where(hybrid, prefix_adv, torch.zeros_like(prefix_adv))
        # the metrics and the decisions that need every rank: one all-reduce
        chosen = (torch.arange(n, device=rewards.device) % G) >= G - hp.prefix_rollouts
        if "demo_mask" in prompts and n:
            demo_len = prompts["demo_mask"][:, 0].sum(-1).to(rewards.device).double()
            row_demo = demo_len[groups.group_ids(rollout, G)].clamp(min=1)
            ratio_sum = float((given.sum(-1).double() / row_demo)[chosen].sum())
        else:
            ratio_sum = 0.0
        tokens = rollout.completion_mask.ne(0)
        sums = self.ranks.sums(
            [
                ratio_sum,
                float(chosen.sum()),
                float(given.sum()),
                float(tokens.sum()),
                float(prefix_adv[hybrid].double().sum()),
                float(hybrid.sum()),
            ]
        )
        prefixed = sums[2] > 0
        keep = torch.zeros_like(given)
        if prefixed and hp.prefix_objective == "off_policy":
            keep = self.top_entropy(rollout.entropy, given, hp.entropy_share)
        kept = self.ranks.sums([float(keep.sum())])[0] if prefixed else 0.0
        batch.update(prefix_advantages=prefix_adv, prefix_keep=keep, prefixed=prefixed)
        batch["metrics"].update(
            prefix_ratio_mean=torch.tensor(sums[0] / sums[1] if sums[1] else 0.0),
            prefix_token_share=torch.tensor(sums[2] / sums[3] if sums[3] else 0.0),
            expert_advantage_mean=torch.tensor(sums[4] / sums[5] if sums[5] else 0.0),
            prefix_kept_share=torch.tensor(kept / sums[2] if sums[2] else 0.0),
        )
        return batch

    def code_advantages(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, hybrid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The official code's advantages (compute_grpo_prefix_outcome_advantage / the dr_grpo variant, one
        continuation per prefix): on-policy rows (r - mean_on) / (std_on + eps) against their prompt's
        on-policy rows (losses.group_advantages_by_id); a hybrid row's continuation r / (1 + eps) (std; its
        prefix's group of one has mean 0, std 1) or r (none), its prefix tokens that minus mean_on.
        Returns (row advantages (N,), prefix-token advantages (N,))."""
        hp = self.hparams
        on = ~hybrid
        adv_on, _ = losses.group_advantages_by_id(
            rewards, group_ids, on, hp.advantage_norm, "on_policy", batch_std=self.ranks.std
        )
        r = rewards.to(adv_on.dtype)
        ids, group = torch.unique(group_ids, return_inverse=True)
        count = torch.zeros(len(ids), dtype=r.dtype, device=r.device).index_add_(0, group[on], torch.ones_like(r[on]))
        total = torch.zeros_like(count).index_add_(0, group[on], r[on])
        mean_on = total / count.clamp(min=1)
        continuation = r / (1.0 + EPS) if hp.advantage_norm == "std" else r
        adv = torch.where(hybrid, continuation, adv_on)
        return adv, torch.where(hybrid, continuation - mean_on[group], torch.zeros_like(r))

    def top_entropy(self, entropy: torch.Tensor, given: torch.Tensor, share: float) -> torch.Tensor:
        """(N, T) bool: the given tokens whose sampling-time entropy is among the top ``share`` of the given
        tokens of the rollout batch on all ranks: of n given tokens, the floor((1 - share) n) lowest lose their
        gradient (the official code's split), the rest keep it; ties at the threshold all keep it."""
        values = entropy[given].detach().double().cpu()
        ranks = self.ranks
        if ranks.world > 1:
            import torch.distributed as dist

            width = int(ranks.maxes([float(values.numel())])[0])
            padded = torch.full((width,), -math.inf, dtype=torch.float64)
            padded[: values.numel()] = values
            padded = padded.to(self.device)
            parts = [torch.empty_like(padded) for _ in range(ranks.world)]
            dist.all_gather(parts, padded)
            everyone = torch.cat(parts).cpu()
            everyone = everyone[everyone > -math.inf]
        else:
            everyone = values
        total = everyone.numel()
        keep = total - math.floor((1.0 - share) * total + 1e-9)
        if keep <= 0:
            return torch.zeros_like(given)
        threshold = torch.topk(everyone, keep).values[-1]
        return given & (entropy.detach().double() >= threshold.to(entropy.device))

    # ------------------------------------------------------------------ the loss
    def loss(self, u: Update) -> Loss:
        """L = L_RL (given tokens: -A_prefix f(p) on the kept ones, 0 on the others) [+ sft_loss_coef *
        L_NLL(given tokens), prefix_objective nll]."""
        loss = Loss([(1.0, self.prefix_rl_term(u))])
        if self.hparams.prefix_objective == "nll":
            loss = loss + self.hparams.sft_loss_coef * self.prefix_nll_term(u)
        return loss

    def prefix_rl_term(self, u: Update) -> Lazy:
        """The RL term over this update's rollout rows: GRPO's exactly when no rank holds a given token."""
        hp = self.hparams

        def build(weight: float):
            if not u.has_prompts:
                return None
            r = u.rollouts()
            rollout, adv, mask = r["rollout"], r["advantages"], r["mask"]

            def is_weights(rows: torch.Tensor, width: int):
                return self.sampler.importance_weights(rollout, rows, width)

            if not r["prefixed"]:
                return terms.rl_term(u.policy, rollout, adv, u.rl, weight, mask, "rl", None, is_weights)
            given = _given(rollout)
            if hp.prefix_objective == "nll":  # the hint is the state's, not the policy's: sampled tokens only
                mask = mask * (~given).to(mask.dtype)
                return terms.rl_term(u.policy, rollout, adv, u.rl, weight, mask, "rl", None, is_weights)
            # behaviour probability 1 at given tokens: the shaped ratio is p itself
            behaviour = dataclasses.replace(rollout, old_logp=rollout.old_logp.masked_fill(given, 0.0))
            off_adv = r["prefix_advantages"].unsqueeze(-1) * r["prefix_keep"].to(r["prefix_advantages"].dtype)
            return terms.rl_term(u.policy, behaviour, adv, u.rl, weight, mask, "rl", None, is_weights, given, off_adv)

        return Lazy(build)

    def prefix_nll_term(self, u: Update) -> Lazy:
        """UFT's log-likelihood of the hint: the plain NLL of the given tokens, normalised over them."""

        def build(weight: float):
            if not u.has_prompts:
                return None
            r = u.rollouts()
            if not r["prefixed"]:  # no rank holds a hint: no term anywhere (every rank runs the same terms)
                return None
            rollout = r["rollout"]
            hint = dataclasses.replace(rollout, completion_mask=_given(rollout).to(rollout.completion_mask.dtype))
            ones = torch.ones(len(rollout.completions), dtype=torch.float32, device=rollout.completion_ids.device)
            term = terms.pg_term(u.policy, hint, ones, 1.0, "prefix_nll")  # -1 * log p per given token
            term.weight = weight
            return term

        return Lazy(build)


def _given(rollout: Rollout) -> torch.Tensor:
    """(N, T) bool: the completion tokens that were given (a prefix), not sampled."""
    if rollout.prefix_mask is None:
        return torch.zeros_like(rollout.completion_mask, dtype=torch.bool)
    return rollout.prefix_mask.ne(0) & rollout.completion_mask.ne(0)
