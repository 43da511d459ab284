"""The rollout buffer: one rollout batch serving ``steps_per_generation`` x ``num_iterations`` updates.

The data module yields each training batch k times with a ``repeat`` index r; the rollout batch is made
at r = 0 (or at the first update that needs one) and kept for the cycle; update r trains on mini-batch
``r % steps_per_generation`` of the rollout rows and of the expert rows. The kept batch goes into
checkpoints (:meth:`RolloutBuffer.state_dict`), so a run resumed between two updates of one rollout
batch trains on the same rows as the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch

from lit_align.rollout import Rollout


class RolloutBuffer:
    """The rollout batch of the current cycle and the mini-batch of each update.

    Args:
        steps_per_generation: mini-batches (optimizer steps) per pass over a rollout batch (TRL's name).
        num_iterations: passes over the same rollout batch (TRL's name).
    """

    def __init__(self, steps_per_generation: int = 1, num_iterations: int = 1):
        self.steps_per_generation, self.num_iterations = steps_per_generation, num_iterations
        self.cycle: dict | None = None

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps per rollout batch: steps_per_generation x num_iterations."""
        return self.steps_per_generation * self.num_iterations

    def position(self, batch: dict) -> int:
        """Which update of its rollout batch this step is (0 .. updates_per_batch - 1): the ``repeat``
        index the data module puts on each repeated batch (0 when there is none). At 0 the buffer empties."""
        r = next((b["repeat"] for b in batch.values() if isinstance(b, dict) and "repeat" in b), None)
        if r is None and self.updates_per_batch > 1:
            raise ValueError(
                "model.steps_per_generation / model.num_iterations > 1 need each batch repeated once per update: "
                "use lit_align.MixedDataModule (its batch_repeats is set at set-up), or put a 'repeat' index in "
                "the batch"
            )
        position = int(r or 0)
        if position == 0:
            self.cycle = None
        return position

    def get(self, position: int, make: Callable[[], dict]) -> dict:
        """The rollout batch of this cycle: ``make()`` at its first update (or the first that needs one)."""
        if position == 0 or self.cycle is None:
            self.cycle = make()
        return self.cycle

    def minibatch(self, rows: int, position: int, what: str = "rollout rows") -> torch.Tensor:
        """Row indices of this update's mini-batch: the rows split in ``steps_per_generation`` parts
        (sizes differing by at most one where it does not divide ``rows``).

        Raises:
            ValueError: fewer rows than ``steps_per_generation`` (some updates would be empty steps),
                at the first batch, naming the flags that set both.
        """
        k = self.steps_per_generation
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

    def rollout_rows(self, cycle: dict, position: int) -> dict:
        """This update's mini-batch of the cycle's rows: every per-row tensor of ``cycle`` (the rollout's
        fields, ``advantages``, ``mask``, ...) cut to the mini-batch's rows; the rest as is."""
        if self.steps_per_generation == 1:
            return cycle
        n = len(cycle["advantages"])
        rows = self.minibatch(n, position).to(cycle["advantages"].device)
        return {k: _rows_of(v, rows, n) for k, v in cycle.items()}

    def expert_rows(self, expert: dict, position: int) -> dict:
        """This update's mini-batch of the step's expert rows."""
        if self.steps_per_generation == 1:
            return expert
        rows = self.minibatch(expert["input_ids"].shape[0], position, "expert rows")
        return {k: v[rows] for k, v in expert.items() if torch.is_tensor(v)}

    # ------------------------------------------------------------------ exact resume
    def state_dict(self) -> dict | None:
        """The buffered rollout batch as plain tensors, lists and numbers (for a checkpoint)."""
        c = self.cycle
        if c is None:
            return None
        return {
            k: ({f.name: getattr(v, f.name) for f in fields(v)} if isinstance(v, Rollout) else v) for k, v in c.items()
        }

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            self.cycle = None
            return
        state = dict(state)
        state["rollout"] = Rollout(**state["rollout"])
        self.cycle = state


def _rows_of(value, rows: torch.Tensor, n: int):
    """``value`` cut to ``rows`` where it has one entry per row (n of them): tensors, lists, Rollouts."""
    if isinstance(value, Rollout):
        return Rollout(**{f.name: _rows_of(getattr(value, f.name), rows, n) for f in fields(value)})
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
        return value[rows]
    if isinstance(value, list) and len(value) == n:
        return [value[i] for i in rows.tolist()]
    return value
