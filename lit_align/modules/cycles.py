"""Rollout batches that serve several optimizer steps (``steps_per_generation`` x ``num_iterations``).

A mixin of :class:`lit_align.modules.policy.PolicyModule`. The data module yields each training batch
k times with a ``repeat`` index r; the rollouts are sampled at r = 0 (or at the first update that
needs them) and kept for the cycle; update r trains on mini-batch ``r % steps_per_generation`` of the
rollout rows and of the expert rows. The kept rollouts go into checkpoints (see ``resume.py``).
"""

from __future__ import annotations

import torch

from lit_align.rollout import Rollout


class RolloutCycles:
    """The rollout batch of the current cycle and the mini-batch of each update."""

    def cycle_position(self, batch: dict) -> int:
        """Which update of its rollout batch this step is (0 .. updates_per_rollout_batch - 1): the
        ``repeat`` index the data module puts on each repeated batch (0 when there is none)."""
        r = next((b["repeat"] for b in batch.values() if isinstance(b, dict) and "repeat" in b), None)
        if r is None and self.updates_per_rollout_batch > 1:
            raise ValueError(
                "model.steps_per_generation / model.num_iterations > 1 need each batch repeated once per update: "
                "use lit_align.MixedDataModule (its batch_repeats is set at set-up), or put a 'repeat' index in "
                "the batch"
            )
        return int(r or 0)

    def minibatch(self, rows: int, position: int, what: str = "rollout rows") -> torch.Tensor:
        """Row indices of this update's mini-batch: the rows split in ``steps_per_generation`` parts
        (sizes differing by at most one where it does not divide ``rows``).

        Raises:
            ValueError: fewer rows than ``steps_per_generation`` (some updates would be empty steps),
                at the first batch, naming the flags that set both.
        """
        k = self.hparams.steps_per_generation
        if 0 < rows < k:
            source = (
                "data.prompt_batch_size x model.num_generations" if what == "rollout rows" else "data.expert_batch_size"
            )
            raise ValueError(
                f"model.steps_per_generation={k} splits each batch's {what} into {k} mini-batches, one optimizer "
                f"step each, but a batch holds only {rows} {what} per rank ({source}): updates would run on "
                f"no rows. Lower model.steps_per_generation or raise {source.split(' x ')[0]}."
            )
        return torch.tensor_split(torch.arange(rows), k)[position % k]

    def rollouts_for(self, batch: dict, position: int) -> dict:
        """The rollout batch of this cycle: sampled at its first update (or the first that needs one)."""
        if position == 0 or self._cycle is None:
            self._cycle = self.rollout_batch(batch)
        return self._cycle

    def _rl_rows(self, cycle: dict, position: int) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
        """(rollout, advantages, mask) of this update's mini-batch of the cycle's rollout batch."""
        r, adv, mask = cycle["rollout"], cycle["advantages"], cycle["mask"]
        if self.hparams.steps_per_generation == 1:
            return r, adv, mask
        rows = self.minibatch(len(adv), position).to(adv.device)
        part = Rollout(
            r.prompt_ids[rows],
            r.prompt_mask[rows],
            r.completion_ids[rows],
            r.completion_mask[rows],
            r.old_logp[rows],
            r.entropy[rows],
            [r.completions[i] for i in rows.tolist()],
            r.sampler,
            None if r.sampler_logp is None else r.sampler_logp[rows],
        )
        return part, adv[rows], mask[rows]

    def _expert_rows(self, expert: dict, position: int) -> dict:
        if self.hparams.steps_per_generation == 1:
            return expert
        rows = self.minibatch(expert["input_ids"].shape[0], position, "expert rows")
        return {k: v[rows] for k, v in expert.items() if torch.is_tensor(v)}

    def _cycle_state(self) -> dict | None:
        """The buffered rollout batch as plain tensors, lists and numbers (for a checkpoint)."""
        c = self._cycle
        if c is None:
            return None
        r = c["rollout"]
        return {
            "rollout": {
                f: getattr(r, f)
                for f in (
                    "prompt_ids",
                    "prompt_mask",
                    "completion_ids",
                    "completion_mask",
                    "old_logp",
                    "entropy",
                    "completions",
                    "sampler",
                    "sampler_logp",
                )
            },
            **{k: c[k] for k in ("rewards", "advantages", "mask", "reward_mean", "metrics")},
        }

    def _load_cycle_state(self, state: dict | None) -> None:
        if state is None:
            self._cycle = None
            return
        state = dict(state)
        state["rollout"] = Rollout(**state["rollout"])
        self._cycle = state
