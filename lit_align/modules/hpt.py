"""HPTModule: Hybrid Post-Training, each prompt trained with SFT on its demonstration or with GRPO on its
samples, chosen by how many of its samples are correct.

Per rollout batch (arXiv 2509.04419, "Towards a Unified View of Large Language Model Post-Training";
official code TsinghuaC3I/Unify-Post-Training, hpt/verl/verl/mix_src/mix_trainer.py,
``select_on_off_ada_balance``):
  1. sample G completions per prompt, score them, count P = the correct ones;
  2. ``switch`` (the paper): P <= gate sends the prompt to SFT on its demonstration and drops its rollouts,
     otherwise its group trains with GRPO alone (advantages over its G samples);
     ``soft`` (the official code's tables): the group keeps its samples and takes the demonstration as a
     member, with an RL, an off-policy and an SFT coefficient looked up from P;
  3. one policy update on L = sft_loss_coef * L_SFT(routed prompts' demonstrations) + L_GRPO(the rest),
     each term normalised over its own tokens (see :meth:`HPTModule.loss`).

SuperRL (arXiv 2506.01096) is the same switch with c(x) = 1[max_i r_i > 0]: ``gate 0``, ``correct_by reward``.
"""

from __future__ import annotations

from typing import Literal

import torch

from lit_align import losses
from lit_align.core import groups, terms
from lit_align.core import settings as S
from lit_align.core.engine import Term
from lit_align.core.terms import Lazy, Loss
from lit_align.core.update import Update
from lit_align.modules.policy import PolicyModule
from lit_align.rewards import RewardScores
from lit_align.rollout import Rollout, completion_id_lists

Strategy = Literal["switch", "soft"]
CorrectBy = Literal["verdict", "reward"]
RLNormaliser = Literal["tokens", "max_new_tokens"]
SoftType = Literal[0, 1, 2]

# The official code's soft tables (mix_trainer.py, ``trainer.soft_type``; its config's default is 0): the
# number of correct members of the prompt's mixed group, demonstration included (so 0 "should not occur"),
# -> (on_coef, off_coef, sft_coef): the weights of the on-policy RL loss, of the demonstration's off-policy
# RL loss and of its SFT loss. Counts above 8 take row 8.
SOFT_TABLES: dict[int, dict[int, tuple[float, float, float]]] = {
    0: {
        0: (1.0, 1.0, 1.0),
        1: (0.0, 0.0, 1.0),
        2: (0.125, 0.5, 0.5),
        3: (0.25, 1.0, 0.25),
        4: (0.5, 0.5, 0.125),
        5: (1.0, 0.25, 0.0),
        6: (1.0, 0.125, 0.0),
        7: (1.0, 0.0, 0.0),
        8: (1.0, 0.0, 0.0),
    },
    1: {
        0: (1.0, 1.0, 1.0),
        1: (0.0, 1.0, 1.0),
        2: (0.125, 1.0, 0.5),
        3: (0.25, 1.0, 0.25),
        4: (0.5, 1.0, 0.125),
        **{k: (1.0, 1.0, 0.0) for k in range(5, 9)},
    },
    2: {
        0: (1.0, 1.0, 1.0),
        1: (0.0, 0.0, 1.0),
        2: (0.125, 0.0, 0.5),
        3: (0.25, 0.0, 0.25),
        4: (0.5, 0.0, 0.125),
        **{k: (1.0, 0.0, 0.0) for k in range(5, 9)},
    },
}

RULES = {
    "gate": S.number(words="a finite number (P <= gate routes a prompt to SFT; < 0: never, >= G: always)"),
    "sft_loss_coef": S.number(0),
}


class HPTModule(PolicyModule):
    """HPT: per prompt, SFT on its demonstration when its samples fail, GRPO on its samples otherwise.

    Each training prompt is paired with its demonstration at set-up (``demonstrations_per_prompt = 1``:
    ``data.pair_by``; the embedded task pairs each prompt with its expert's demonstration).

    Args:
        strategy: ``switch`` (the paper, Eq. 10): P <= ``gate`` trains the prompt's demonstration with SFT
            (weight ``sft_loss_coef``) and drops its rollouts; otherwise its G samples train with GRPO.
            ``soft`` (the official code only; the paper has no soft tables): the demonstration joins the
            prompt's group as an off-policy member and the coefficients (on, off, sft) of ``soft_type``'s
            table, looked up at the group's correct members (the demonstration's verdict included), weight
            the samples' RL loss, the demonstration's off-policy RL loss (LUFFY's shaped objective) and its SFT
            loss.
        gate: the switch threshold on P, the number of correct samples of the G (the paper's gamma = gate / G:
            0 for its Qwen models, 2/8 for LLaMA). Below 0 no prompt is routed (GRPO); G or above every prompt
            is (SFT on the prompts' demonstrations).
        sft_loss_coef: weight of the SFT term (the official code's ``sft_loss_coef``, 1.0 in its script).
        correct_by: what counts as a correct sample. ``verdict``: the reward set's correctness verdict
            (:meth:`lit_align.rewards.RewardSet.correct`: the first lit-align reward's own ``correct``, else its
            reward >= 1; the check behind val/accuracy): the paper's verifier v(tau) in {0, 1}. ``reward``: a
            total reward > 0: SuperRL's c(x) = 1[max_i r_i > 0] (with ``gate 0``).
        soft_type: the official code's table for ``strategy soft`` (its ``trainer.soft_type``, default 0).
        rl_normaliser: ``tokens`` (default): the RL term normalised over its own tokens like every term
            (``loss_aggregation``). ``max_new_tokens``: the official script's ``loss_remove_token_mean``: the
            RL term's token sum divided by max_new_tokens x the update's rollout rows (routed ones included),
            so the RL term shrinks as prompts are routed (Dr.GRPO's constant normaliser; needs
            ``loss_aggregation`` token-mean or seq-mean-token-sum).
        advantage_stats: a mixed group's advantage statistics (``soft``): ``on_policy`` (default: its samples
            only, the demonstration gets r - mean against them) or ``all`` (every member: the official code's
            ``adv_estimator=grpo`` over the mixed group). The switch strategy's groups hold samples only.
        **kwargs: the shared PolicyModule arguments (model, optimizer, G, clipping, reward, ...).
    """

    demonstrations_per_prompt = 1
    HEADLINE_METRICS = ("train/reward_mean", "train/gate_sft_share")
    rollouts_read_training_batch = True  # the SFT term reads the routed prompts' demonstrations from u.batch

    def __init__(
        self,
        *args,
        strategy: Strategy = "switch",
        gate: float = 0.0,
        sft_loss_coef: float = 1.0,
        correct_by: CorrectBy = "verdict",
        soft_type: SoftType = 0,
        rl_normaliser: RLNormaliser = "tokens",
        advantage_stats: losses.AdvantageStats = "on_policy",
        **kwargs,
    ):
        S.check(HPTModule.__init__, locals(), RULES)
        super().__init__(*args, **kwargs)
        hp = self.hparams
        if hp.num_generations < 2:
            raise ValueError(
                f"model.num_generations={hp.num_generations}: HPT's GRPO term needs at least 2 samples per prompt"
            )
        if rl_normaliser == "max_new_tokens" and hp.loss_aggregation == "seq-mean-token-mean":
            raise ValueError(
                "model.rl_normaliser=max_new_tokens divides the RL term's token sum by a constant: it needs "
                "model.loss_aggregation token-mean or seq-mean-token-sum, not seq-mean-token-mean"
            )
        self.strategy, self.gate, self.sft_loss_coef = strategy, float(gate), float(sft_loss_coef)
        self.correct_by, self.soft_type, self.rl_normaliser = correct_by, soft_type, rl_normaliser
        self.advantage_stats = advantage_stats
        self._scores: RewardScores | None = None  # the last rollout's scores, for the verdict
        self.hparams.update(
            strategy=strategy,
            gate=self.gate,
            sft_loss_coef=self.sft_loss_coef,
            correct_by=correct_by,
            soft_type=soft_type,
            rl_normaliser=rl_normaliser,
            advantage_stats=advantage_stats,
        )

    # ------------------------------------------------------------------ the rollout batch and the gate
    def group_rollouts(self, prompts: dict) -> Rollout:
        """G samples per prompt; under ``soft`` the prompt's demonstration joins its group (off-policy row)."""
        if self.strategy == "soft":
            G = self.hparams.num_generations
            return groups.mix(self.sample(prompts), G, groups.demonstration_rows(prompts, 1))
        return self.sample(prompts)

    def score_all(self, prompts, rollout, answers, columns=None, prompt_messages=None) -> RewardScores:
        scores = super().score_all(prompts, rollout, answers, columns, prompt_messages)
        self._scores = scores  # the verdict reads them instead of scoring again
        return scores

    def correct_samples(self, prompts: dict, rollout: Rollout, rewards: torch.Tensor) -> torch.Tensor:
        """(N,) bool: which rows of ``rollout`` count as correct (``correct_by``)."""
        scores, self._scores = self._scores, None
        if self.correct_by == "reward":
            return rewards > 0
        hp = self.hparams
        of = groups.group_ids(rollout, hp.num_generations).tolist()
        if scores is not None and len(scores.total) != len(of):
            scores = None
        messages = prompts.get("prompt_messages")
        verdicts, n_errors = self.rewards.correct(
            [prompts["prompts"][i] for i in of],
            rollout.completions,
            [prompts["answers"][i] for i in of],
            scores=scores,
            completion_ids=completion_id_lists(rollout),
            columns={k: [v[i] for i in of] for k, v in prompts.get("columns", {}).items()},
            on_error=hp.reward_errors,
            timeout_s=hp.reward_timeout_s,
            trainer_state=self.reward_state(),
            prompt_messages=None if messages is None else [messages[i] for i in of],
        )
        self.reward_errors += n_errors
        return verdicts.to(device=rewards.device, dtype=torch.bool)

    def gate_coefficients(self, P: torch.Tensor, demo_correct: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Per prompt, from P (B,) correct samples: (on, off, sft) coefficients, each (B,) float. ``switch``:
        (1, 0, 0) for P > gate, (0, 0, 1) for P <= gate. ``soft``: ``soft_type``'s table at P + the
        demonstration's verdict (``demo_correct`` (B,) bool), at most 8."""
        if self.strategy == "switch":
            routed = (P.double() <= self.gate).to(torch.float32)
            return 1.0 - routed, torch.zeros_like(routed), routed
        table = SOFT_TABLES[self.soft_type]
        k = P.long() + (demo_correct.long() if demo_correct is not None else 0)
        rows = torch.tensor([table[min(int(i), 8)] for i in k.tolist()], dtype=torch.float32, device=P.device)
        rows = rows.reshape(-1, 3)
        return rows[:, 0], rows[:, 1], rows[:, 2]

    def sample_round(self, batch: dict) -> dict:
        """A prompt batch sampled and scored (:meth:`PolicyModule.sample_round`), with each row's verdict,
        ``rows["correct"]`` (N,) bool (:meth:`correct_samples`, from this round's scores)."""
        self._scores = None
        r = super().sample_round(batch)
        r["rows"]["correct"] = self.correct_samples(batch, r["rollout"], r["rewards"])
        return r

    def gate_of(self, r: dict) -> tuple[torch.Tensor, ...]:
        """Round ``r``'s gate: (group id (N,), on-policy (N,), on, off, sft coefficients (B,) each) from the
        correct samples P of each prompt (and its demonstration's verdict, soft)."""
        rollout, correct = r["rollout"], r["rows"]["correct"]
        B = len(r["prompts"]["prompts"])
        gid = groups.group_ids(rollout, self.hparams.num_generations)
        on = ~groups.off_policy(rollout)
        P = torch.zeros(B, dtype=torch.long, device=gid.device).index_add_(0, gid[on], correct[on].long())
        demo_correct = None
        if not bool(on.all()):
            demo_correct = torch.zeros(B, dtype=torch.long, device=gid.device).index_add_(
                0, gid[~on], correct[~on].long()
            )
        return gid, on, *self.gate_coefficients(P, demo_correct)

    def signal_groups(self, r: dict) -> torch.Tensor:
        """Dynamic sampling keeps the groups whose rewards differ and the prompts the gate sends to SFT: their
        demonstration trains whatever the samples' rewards (switch, gate 0: the prompts no sample solves)."""
        sft = self.gate_of(r)[4] > 0
        return super().signal_groups(r) | sft.to(self.device)

    def rollout_batch(self, prompts: dict) -> dict:
        """The rollout batch (samples, rewards, advantages over each group's samples) and the gate, decided
        once for it: per row ``rl_coef`` (its RL weight; 0: no RL loss, the row leaves the RL term),
        ``demo_of_row`` (on the first row of each prompt with an SFT term, the prompt's index; -1 elsewhere:
        the demonstration trains in the update whose mini-batch holds that row) and ``sft_coef`` (that
        demonstration's SFT weight); ``gate_sft_share`` among its metrics. Under dynamic sampling the gate is
        that of the groups kept, whose prompts (``out["prompts"]``) the SFT term reads."""
        out = super().rollout_batch(prompts)
        rewards = out["rewards"]
        gid, on, on_c, off_c, sft_c = self.gate_of({**out, "rows": {"correct": out["correct"]}})
        rl_coef = torch.where(on, on_c[gid], off_c[gid]).to(rewards.device)
        first = torch.ones_like(gid, dtype=torch.bool)
        first[1:] = gid[1:] != gid[:-1]  # groups are contiguous
        with_sft = (sft_c > 0)[gid] & first
        out["rl_coef"] = rl_coef
        out["demo_of_row"] = torch.where(with_sft, gid, torch.full_like(gid, -1))
        out["sft_coef"] = sft_c[gid]
        if not bool((rl_coef == 1).all()):
            out["advantages"] = out["advantages"] * rl_coef.to(out["advantages"].dtype)
            out["mask"] = out["mask"] * (rl_coef > 0).to(out["mask"].dtype).unsqueeze(-1)
        metrics = out["metrics"]
        metrics["gate_sft_share"] = (sft_c > 0).float().mean()
        metrics["reward_errors"] = torch.tensor(float(self.reward_errors))
        return out

    # ------------------------------------------------------------------ the loss
    def loss(self, u: Update) -> Loss:
        """L = sft_loss_coef * L_SFT + L_RL on this update's rows: the RL term over the rows whose ``rl_coef``
        is > 0 (their advantages scaled by it), the SFT term over the demonstrations of the routed prompts
        (weighted by their ``sft_coef``), each normalised over its own tokens. A term is built on every rank
        when any rank has rows for it (a rank without any runs one row at zero weight, so every rank runs
        the same forwards), and on none otherwise."""
        r = u.rollouts()
        hp = self.hparams
        keep = r["rl_coef"] > 0
        demo = r["demo_of_row"]
        on = ~groups.off_policy(r["rollout"])
        den = (
            losses.aggregate_parts(None, r["mask"][keep], hp.loss_aggregation, self.aggregation_norm)[1]
            if bool(keep.any())
            else 0.0
        )
        n_keep, n_demo, den, rows = self.ranks.sums(
            [float(keep.sum()), float((demo >= 0).sum()), float(den), float(on.sum())]
        )
        loss = Loss()
        if n_keep > 0:
            weight = 1.0
            if self.rl_normaliser == "max_new_tokens":
                weight = den / (rows * hp.max_new_tokens) if den > 0 else 1.0
            loss = loss + weight * Lazy(lambda w: self._rl_term(r, keep, w))
        if n_demo > 0:
            loss = loss + self.sft_loss_coef * Lazy(lambda w: self._sft_term(u, r, w))
        return loss

    def _rl_term(self, r: dict, keep: torch.Tensor, weight: float) -> Term:
        rollout, adv, mask = r["rollout"], r["advantages"], r["mask"]
        if not bool(keep.all()):
            rows = torch.nonzero(keep).squeeze(-1)
            if rows.numel() == 0:  # every prompt of this rank routed: one row at no weight, in step with the others
                rows = torch.zeros(1, dtype=torch.long, device=keep.device)
            rollout, adv, mask = rollout.take(rows), adv[rows], mask[rows] * keep[rows].unsqueeze(-1)

        def is_weights(rows: torch.Tensor, width: int):
            return self.sampler.importance_weights(rollout, rows, width)

        return terms.rl_term(self.policy, rollout, adv, self.rl_settings, weight, mask, "rl", None, is_weights)

    def _sft_term(self, u: Update, r: dict, weight: float) -> Term:
        demo = r["demo_of_row"]
        has = demo >= 0
        prompts, coef = demo[has], r["sft_coef"][has]
        # the prompts of the rollout batch's groups (under dynamic sampling not the training batch's); a cycle
        # restored from a checkpoint written before cycles kept them has the training batch's
        batch = r.get("prompts") or u.batch["prompts"]
        expert = groups.demonstration_labelled(batch, 1, self.tokenizer.pad_token_id)
        if prompts.numel() == 0:  # no demonstration on this rank: one row at no weight, in step with the others
            expert = {k: v[:1] for k, v in expert.items()}
            expert["labels"] = torch.full_like(expert["labels"], -100)
        else:
            rows = prompts.to(expert["input_ids"].device)
            expert = {k: v[rows] for k, v in expert.items()}
        term = terms.sft_term(self.policy, expert, weight, None, self.hparams.temperature, "sft")
        if prompts.numel() == 0 or bool((coef == 1).all()):
            return term
        coef = coef.to(expert["input_ids"].device)
        forward = term.forward

        def weighted(rows: torch.Tensor):  # soft: each demonstration's NLL times its sft_coef
            out = forward(rows)
            out.values = out.values * coef[rows].to(out.values.dtype).unsqueeze(-1)
            return out

        return Term(term.name, term.weight, term.mask, weighted)
