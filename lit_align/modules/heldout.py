"""Held-out evaluation of the policy: greedy answers on held-out prompts (accuracy, reward), the NLL of
held-out demonstrations (split by whether the reward accepts them), and the demonstrations' self-check.

A mixin of :class:`lit_align.modules.policy.PolicyModule`.
"""

from __future__ import annotations

import torch

from lit_align import losses
from lit_align.modules.engine import micro_batches


class HeldOut:
    """``validation_step`` / ``test_step`` and the per-row expert NLL they log."""

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0, prefix: str = "val") -> None:
        """Greedy answers on held-out prompts (accuracy, reward) and NLL of held-out demonstrations; on a batch
        of a retention set (``batch["retention"]``, the skill), only ``<prefix>/retention/<skill>``."""
        if "retention" in batch:
            return self._retention_step(batch, prefix)
        scores, correct = self._greedy_verdicts(batch)
        self.val_reward.update(scores.total.to(self.device))
        self.val_accuracy.update(correct.float().to(self.device))
        if "expert" in batch:
            nll, hits, tokens = self.expert_nll_rows(batch["expert"])
            n = tokens.sum()
            self.val_expert_nll.update(nll.sum() / n.clamp(min=1), weight=n)
            self.val_expert_token_acc.update(hits.sum() / n.clamp(min=1), weight=n)
            self.log(
                f"{prefix}/expert_nll", self.val_expert_nll, on_epoch=True, batch_size=int(n), add_dataloader_idx=False
            )
            self.log(
                f"{prefix}/expert_token_acc",
                self.val_expert_token_acc,
                on_epoch=True,
                batch_size=int(n),
                add_dataloader_idx=False,
            )
            if "responses" in batch:
                self._split_expert_nll(batch, nll, tokens, prefix)
        bs = len(batch["prompts"])
        self.log(
            f"{prefix}/accuracy",
            self.val_accuracy,
            on_epoch=True,
            prog_bar=True,
            batch_size=bs,
            add_dataloader_idx=False,
        )
        self.log(f"{prefix}/reward", self.val_reward, on_epoch=True, batch_size=bs, add_dataloader_idx=False)

    def _greedy_verdicts(self, batch: dict):
        """Greedy answers to the batch's prompts: their reward scores (:class:`RewardScores`) and the
        correctness verdict per prompt (bool, (N,))."""
        rollout = self.sample(batch, greedy=True, num_generations=1)
        scores = self.score_all(batch["prompts"], rollout, batch["answers"], batch.get("columns"))
        hp = self.hparams  # a failing check counts as wrong (reward_errors=zero) or stops (raise)
        correct, _ = self.rewards.correct(  # the judge's default verdict is read from scores: no second pass
            batch["prompts"],
            rollout.completions,
            batch["answers"],
            scores,
            on_error=hp.reward_errors,
            timeout_s=hp.reward_timeout_s,
        )
        return scores, correct

    def _retention_step(self, batch: dict, prefix: str) -> None:
        """``<prefix>/retention/<skill>``: the share of the batch's prompts whose greedy answer the reward's
        correctness check accepts, averaged over the set (weighted by rows, synced over ranks)."""
        _, correct = self._greedy_verdicts(batch)
        self.log(
            f"{prefix}/retention/{batch['retention']}",
            correct.float().mean().to(self.device),
            on_epoch=True,
            batch_size=len(batch["prompts"]),
            sync_dist=True,
            add_dataloader_idx=False,
        )

    @torch.no_grad()
    def expert_nll_rows(self, expert: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of ``expert``: (summed NLL of its response tokens, greedy hits among them, their
        count), each (B,), from forwards of ``micro_batch_size`` rows with logits at response positions
        only (no (B, S, V) tensor for the whole batch)."""
        labels_all = expert["labels"][:, 1:]
        out = torch.zeros(3, labels_all.shape[0], dtype=torch.float64, device=labels_all.device)
        for rows in micro_batches(labels_all != -100, self.hparams.micro_batch_size):
            logits, labels, tokens, logp = self._expert_logprobs(expert, rows)
            hit = losses.chunked(lambda x, y: (x.argmax(-1) == y).float(), logits, labels)
            out[:, rows.to(out.device)] = torch.stack(
                [-(logp * tokens).sum(1), (hit * tokens).sum(1), tokens.sum(1)]
            ).double()
            del logits
        return out[0], out[1], out[2]

    def _split_expert_nll(self, batch: dict, nll: torch.Tensor, tokens: torch.Tensor, prefix: str) -> None:
        """``<prefix>/expert_nll_correct`` and ``_incorrect``: val/expert_nll over the held-out
        demonstrations the reward's correctness check accepts and over those it rejects (per-row summed
        ``nll`` and ``tokens``). A method that corrects a noisy expert raises the second; the first shows
        whether it still imitates the expert where the expert is right. Each demonstration is checked
        once per run, on first sight. Every rank updates both metrics every batch (weight 0 when it has
        no such rows), so the cross-rank sync cannot hang; a class absent from the whole validation set
        reads NaN."""
        hp, keys = self.hparams, list(zip(batch["prompts"], batch["responses"], batch["answers"]))
        new = [i for i, key in enumerate(keys) if key not in self._demo_verdicts]
        if new:  # a demonstration's verdict never changes: each one is checked once per run
            prompts, demos, answers = (list(column) for column in zip(*(keys[i] for i in new)))
            cols = {k: [v[i] for i in new] for k, v in (batch.get("columns") or {}).items()}
            verdicts, _ = self.rewards.correct(
                prompts, demos, answers, columns=cols, on_error=hp.reward_errors, timeout_s=hp.reward_timeout_s
            )
            self._demo_verdicts.update((keys[i], bool(v)) for i, v in zip(new, verdicts.tolist()))
        ok = torch.tensor([self._demo_verdicts[key] for key in keys], device=self.device)
        for name, rows in (("correct", ok), ("incorrect", ~ok)):
            k = tokens[rows].sum()
            value = nll[rows].sum() / k if k > 0 else nll.new_zeros(())
            metric = self.val_expert_nll_split[name]
            metric.update(value, weight=k)
            self.log(
                f"{prefix}/expert_nll_{name}",
                metric,
                on_epoch=True,
                batch_size=max(int(k), 1),
                add_dataloader_idx=False,
            )

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx, prefix="test")

    def judge_demonstrations(
        self,
        prompts: list[str],
        completions: list[str],
        answers: list[str],
        completion_ids: list[list[int]] | None = None,
        columns: dict | None = None,
    ) -> torch.Tensor:
        """Bool (N,): which texts the reward set accepts as correct (the data module's set-up self-check).
        Where a reward function failed on some of them (an exception, the time limit, NaN; scored 0 under
        ``reward_errors=zero``), a warning says so: the cause is then the function, not the data."""
        hp = self.hparams
        verdicts, n_errors = self.rewards.correct(
            prompts,
            completions,
            answers,
            completion_ids=completion_ids,
            columns=columns,
            on_error=hp.reward_errors,
            timeout_s=hp.reward_timeout_s,
        )
        if n_errors:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"self-check: the reward failed on {int(n_errors)} of {len(completions)} demonstrations (an exception, "
                f"model.reward_timeout_s={hp.reward_timeout_s}, or a non-finite value; model.reward_errors="
                f"{hp.reward_errors!r} scores them 0): check the reward functions and the columns they take; "
                f"--model.init_args.reward_errors raise shows the error"
            )
        return verdicts
