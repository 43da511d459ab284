"""The rollout buffer: one rollout batch serving ``steps_per_generation`` x ``num_iterations`` updates.

The data module yields each training batch k times with a ``repeat`` index r; the rollout batch is made
at r = 0 (or at the first update that needs one) and kept for the cycle; update r trains on mini-batch
``r % steps_per_generation`` of the rollout rows and of the expert rows. The kept batch goes into
checkpoints (:meth:`RolloutBuffer.state_dict`, every rank's), so a run resumed between two updates of one
rollout batch trains on the same rows as the uninterrupted run; resumed on fewer devices, each rank takes
several ranks' batches (:func:`merge_states`), so the global batch of the remaining updates is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch

from lit_align.rollout import Rollout, take_rows


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
        fields, ``advantages``, ``mask``, ...) cut to the mini-batch's rows; the rest as is. A cycle merged
        from several ranks' (:func:`merge_states`) says each row's mini-batch in ``"minibatch"``: each
        source rank's own split."""
        if self.steps_per_generation == 1:
            return cycle
        n = len(cycle["advantages"])
        if "minibatch" in cycle:
            rows = torch.nonzero(cycle["minibatch"] == position % self.steps_per_generation).squeeze(1)
        else:
            rows = self.minibatch(n, position)
        rows = rows.to(cycle["advantages"].device)
        return {k: take_rows(v, rows, n) for k, v in cycle.items()}

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


# ---------------------------------------------------------------------------------------------- merging ranks
def merge_states(
    states: list[dict], steps_per_generation: int, pad_token_id: int, summed: tuple[str, ...] = ()
) -> dict:
    """One rank's buffered rollout batch made of several ranks' (:meth:`RolloutBuffer.state_dict` each):
    a checkpoint taken on W devices inside a rollout batch, resumed on fewer. Their rows side by side, so
    the remaining updates of the batch train on the same global rows as on W devices.

    Rows: each per-row entry (a tensor or list with one entry per row: ``rewards``, ``advantages``,
    ``mask``, a method's own) concatenated, (N, T) tensors right-padded with 0 to the widest; the rollout's
    prompts left-padded (``pad_token_id``, mask 0), its completions and per-token tensors right-padded
    (completion ids with ``pad_token_id``, the rest 0), ``group_ids`` offset past the previous ranks'
    prompts; ``"prompts"`` (the prompt batch of the cycle's groups) concatenated in rank order, as the group
    ids are. ``"minibatch"`` (N,) long: the mini-batch each row had on its own rank (of
    ``steps_per_generation``), so update r trains on every source's mini-batch r (:meth:`RolloutBuffer.rollout_rows`).
    Scalars (``reward_mean``, a method's global decisions) must be equal on every rank and are kept;
    ``metrics`` are averaged, those named in ``summed`` (counts) summed, as logging over ranks does.

    Raises:
        ValueError: an entry that is neither per row nor the same on every rank (it cannot be merged).
    """
    ns = [len(s["advantages"]) for s in states]
    merged: dict = {}
    for key in states[0]:
        values = [s[key] for s in states]
        if key == "rollout":
            merged[key] = _merge_rollouts(values, ns, pad_token_id)
        elif key == "metrics":
            merged[key] = {name: _reduce([m[name] for m in values if name in m], name in summed) for name in values[0]}
        elif key == "minibatch":
            continue
        elif key == "prompts" and isinstance(values[0], dict):  # the prompt batch of the cycle's groups
            from lit_align.core.dynamic_sampling import cat_prompts

            merged[key] = cat_prompts(values, [len(v["prompts"]) for v in values], pad_token_id)
        elif all(_per_row(v, n) for v, n in zip(values, ns)):
            merged[key] = _cat_rows(values) if torch.is_tensor(values[0]) else [x for v in values for x in v]
        elif all(_same(v, values[0]) for v in values):
            merged[key] = values[0]
        else:
            raise ValueError(
                f"the buffered rollout batches of {len(states)} ranks differ in {key!r}, which is not per row: "
                "they cannot be merged into one rank's"
            )
    parts = []
    for s, n in zip(states, ns):
        if "minibatch" in s:  # merged before (e.g. 4 devices, then 2, then 1): each row keeps its own
            parts.append(s["minibatch"].long())
            continue
        part = torch.empty(n, dtype=torch.long)
        for k, rows in enumerate(torch.tensor_split(torch.arange(n), steps_per_generation)):
            part[rows] = k
        parts.append(part)
    merged["minibatch"] = torch.cat(parts).to(merged["advantages"].device)
    return merged


def _per_row(value, n: int) -> bool:
    return (torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n) or (
        isinstance(value, list) and len(value) == n
    )


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def _reduce(values: list, summed: bool):
    total = sum(torch.as_tensor(v, dtype=torch.float64) for v in values)
    return (total if summed else total / len(values)).float()


def _cat_rows(values: list[torch.Tensor], pad=0, left: bool = False) -> torch.Tensor:
    """``values`` (n_i, ...) stacked on rows; (n_i, T_i) ones first padded to the widest T with ``pad``, on
    the left (``left``: left-padded prompts) or the right."""
    if values[0].dim() < 2:
        return torch.cat(values)
    width = max(v.shape[1] for v in values)
    out = []
    for v in values:
        gap = width - v.shape[1]
        if gap:
            fill = v.new_full((v.shape[0], gap, *v.shape[2:]), pad)
            v = torch.cat([fill, v] if left else [v, fill], 1)
        out.append(v)
    return torch.cat(out)


def _merge_rollouts(rollouts: list[dict], ns: list[int], pad: int) -> dict:
    """The :class:`Rollout` fields (as saved) of several ranks' rollouts, rows side by side."""
    known = {f.name for f in fields(Rollout)}
    out: dict = {}
    for name in rollouts[0]:
        if name not in known:
            raise ValueError(f"a buffered rollout holds {name!r}, which merging ranks does not know")
        values = [r[name] for r in rollouts]
        if name in ("prompt_ids", "prompt_mask"):  # left-padded
            out[name] = _cat_rows(values, pad if name == "prompt_ids" else 0, left=True)
        elif name == "completions":
            out[name] = [text for v in values for text in v]
        elif name == "sampler":
            out[name] = values[0]
        elif all(v is None for v in values):
            out[name] = None
        elif name == "group_ids":  # prompt indices on each rank: past the previous ranks' prompts
            if any(v is None for v in values):
                raise ValueError("some ranks' buffered rollouts name their groups and others do not")
            offset, ids = 0, []
            for v in values:
                ids.append(v + offset)
                offset += int(v.max()) + 1 if v.numel() else 0
            out[name] = torch.cat(ids)
        elif name == "off_policy":
            like = next(v for v in values if v is not None)
            out[name] = torch.cat(
                [
                    torch.zeros(n, dtype=torch.bool, device=like.device) if v is None else v.bool()
                    for v, n in zip(values, ns)
                ]
            )
        else:  # (N, T) per completion token: completion ids, masks, log-probs, entropies, given prefixes
            like = next(v for v in values if v is not None)
            filled = [like.new_zeros((n, 0)) if v is None else v for v, n in zip(values, ns)]
            out[name] = _cat_rows(filled, pad if name == "completion_ids" else 0)
    return out
