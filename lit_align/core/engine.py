"""The step engine: one policy update's loss terms, run as micro-batches with exact global normalisation.

Every method goes through :func:`accumulate`. A method states its terms (the RL term over rollout
rows, the SFT term over expert rows, AMFT's held-out objective) and a weight for each; the engine

1. counts each term's normaliser over the whole update on every rank before any forward (tokens for
   ``token-mean``, rows holding tokens for the seq-mean modes) with one all-reduce, and the number of
   forward passes each rank runs (its micro-batches, each split by row length, :func:`forward_groups`;
   the largest count over ranks: a rank with fewer passes repeats its last at weight 0, so every rank
   runs the same forwards and collectives);
2. runs each micro-batch's forward and backward, the term's per-token loss summed and divided by the
   GLOBAL normaliser (times the world size, since the gradient reduction averages over ranks): the
   gradients add up to those of one process on the global batch, whatever the micro-batch size and
   however tokens fall on ranks;
3. lets the gradient reduction happen only on the update's last backward (DDP's ``no_sync`` through
   the strategy's ``block_backward_sync``; FSDP2's ``set_requires_gradient_sync``);
4. returns the update's loss and every term's metrics as global token-means (one all-reduce).

Nothing here knows about rollouts or methods; the caller's ``forward`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lit_align import losses


@dataclass
class TermOutput:
    """What one micro-batch's forward gives: ``values`` (b, T) per-token loss with its graph, ``mask``
    (b, T) the tokens that count, ``metrics`` {name: (b, T) detached per-token values, or (values, mask)
    for a mean over the term's tokens where ``mask`` is set} to be reported
    as token-means over the term's tokens, ``extra`` a scalar added as is to the micro-batch's loss
    (already normalised by the caller; AMFT's entropy regulariser), and ``token_mean`` (b, T) per-token
    values with their graph added to the term's loss as a token-mean over the term's tokens of the whole
    update, whatever the aggregation, times the term's weight (an entropy bonus, as TRL normalises it)."""

    values: torch.Tensor
    mask: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: torch.Tensor | None = None
    token_mean: torch.Tensor | None = None


@dataclass
class Term:
    """One loss term of an update.

    Args:
        name: prefix of its loss metric (``<name>_loss``), e.g. ``rl``, ``sft``.
        weight: its weight in the update's loss (mu, 1 - mu, or 1).
        mask: (N, T) the tokens that count, for all N rows of this rank, known before any forward.
        forward: ``forward(rows)`` -> :class:`TermOutput` for the rows ``rows`` (a LongTensor of row
            indices, ascending in length), with the graph to the policy's parameters.
    """

    name: str
    weight: float
    mask: torch.Tensor
    forward: Callable[[torch.Tensor], TermOutput]

    @property
    def rows(self) -> int:
        return self.mask.shape[0]


class Ranks:
    """Reductions over the ranks of a run (a single process: the values themselves)."""

    def __init__(self, world: int = 1, device: torch.device | str = "cpu"):
        self.world, self.device = world, device

    def _reduce(self, values: list[float], op) -> list[float]:
        if self.world == 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sums(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks, in float64, with one all-reduce."""
        import torch.distributed as dist

        return self._reduce(values, dist.ReduceOp.SUM if self.world > 1 else None)

    def maxes(self, values: list[float]) -> list[float]:
        """Element-wise maxima over all ranks (one all-reduce)."""
        import torch.distributed as dist

        return self._reduce(values, dist.ReduceOp.MAX if self.world > 1 else None)

    def averages(self, *values) -> list[float]:
        """Means of scalars over all ranks (one all-reduce)."""
        return [v / self.world for v in self.sums(list(values))]

    def union(self, names: list[str]) -> list[str]:
        """The names any rank holds, sorted, the same list on every rank (one all-gather of Python objects)."""
        if self.world == 1:
            return sorted(set(names))
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, sorted(set(names)))
        return sorted(set().union(*gathered))

    def pooled_means(self, values: dict[str, list[float]]) -> dict[str, tuple[float, int]]:
        """Per name that any rank holds values of: the mean of all ranks' values together, and their count (the
        same on every rank; :meth:`union` and one all-reduce). TRL averages reward functions' ``log_metric``
        values so."""
        names = self.union(list(values))
        if not names:
            return {}
        totals = self.sums([sum(values.get(n, [])) for n in names] + [len(values.get(n, [])) for n in names])
        k = len(names)
        return {n: (s / c, int(c)) for n, s, c in zip(names, totals[:k], totals[k:]) if c > 0}

    def mean_std(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased std of ``values`` (1-D, this rank's) over every rank's values: the global batch's
        statistics, not the mean of each rank's. 0-dim tensors of ``values``' dtype and device; NaN where
        undefined (no value anywhere; fewer than 2 for the std). One process: ``values.mean()`` and
        ``values.std()`` themselves. Several: two all-reduces in float64, the count and sum, then the squared
        deviations from the global mean (no cancellation of large squares). Every rank must call it."""
        nan = values.new_tensor(float("nan"))
        if self.world == 1:
            n = values.numel()
            return (values.mean() if n else nan), (values.std() if n > 1 else nan)
        x = values.detach().double()
        n, total = self.sums([x.numel(), float(x.sum())])
        mean = total / n if n else float("nan")
        squares = self.sums([float(((x - mean) ** 2).sum()) if n else 0.0])[0]
        std = (squares / (n - 1)) ** 0.5 if n > 1 else float("nan")
        return values.new_tensor(mean), values.new_tensor(std)

    def std(self, values: torch.Tensor) -> torch.Tensor:
        """The unbiased std of ``values`` over every rank's values (see :meth:`mean_std`)."""
        return self.mean_std(values)[1]


def length_groups(attention_mask: torch.Tensor, max_groups: int) -> list[tuple[torch.Tensor, int]] | None:
    """Split a batch's rows into at most ``max_groups`` groups of similar length, each to be run
    only up to its own longest row: ``[(row indices, width), ...]``, or None when one pass over the
    whole batch computes no fewer token positions.

    A row's length is its last attended position + 1 (left padding counts, right padding does not).
    In a causal model the logits at positions below ``width`` do not depend on the columns cut off,
    so running each group on ``[:, :width]`` gives the same logits at every attended position.
    The groups are contiguous in length order and minimise the number of computed positions
    (sum of rows x width), preferring fewer groups on ties.
    """
    B, S = attention_mask.shape
    if max_groups <= 1 or B <= 1:
        return None
    positions = torch.arange(1, S + 1, device=attention_mask.device)
    ends = (attention_mask.ne(0) * positions).amax(-1).clamp(min=1).cpu()
    values, counts = torch.unique(ends, sorted=True, return_counts=True)
    if len(values) == 1 and int(values[0]) == S:
        return None
    cuts = _best_cuts(values.long(), counts.long(), max_groups)
    order = torch.argsort(ends, stable=True).to(attention_mask.device)
    bounds = torch.cumsum(counts, 0).tolist()
    groups, start = [], 0
    for cut in cuts:
        groups.append((order[start : bounds[cut]], int(values[cut])))
        start = bounds[cut]
    return groups


def _best_cuts(values: torch.Tensor, counts: torch.Tensor, max_groups: int) -> list[int]:
    """Indices j of ``values`` (ascending) that close each group, for the partition of the sorted
    values into at most ``max_groups`` contiguous runs minimising sum(count of run) x (last value of run).
    Exact dynamic programme, vectorised over the run's first and last index: O(max_groups) tensor ops."""
    D = len(values)
    C = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # C[j] = rows with value index < j
    j = torch.arange(D)
    # cost[i, j]: one run over value indices i..j (i <= j) = (C[j+1] - C[i]) * values[j]
    cost = (C[1:].unsqueeze(0) - C[:-1].unsqueeze(1)) * values.unsqueeze(0)
    invalid = j.unsqueeze(1) > j.unsqueeze(0)  # i > j
    best = cost[0].clone()  # one run over 0..j
    choices = []  # per extra run: where its last run starts for each j, -1 = keep fewer runs
    big = torch.iinfo(torch.long).max // 4
    for _ in range(1, max_groups):
        prev = torch.cat([best.new_full((1,), big), best[:-1]])  # best for 0..i-1, per i (i = 0: impossible)
        total = (prev.unsqueeze(1) + cost).masked_fill(invalid, big)
        total[0] = big
        split, start = total.min(dim=0)
        better = split < best
        choices.append(torch.where(better, start, torch.full_like(start, -1)))
        best = torch.where(better, split, best)
    cuts, last, runs = [], D - 1, max_groups
    while last >= 0:
        start = int(choices[runs - 2][last]) if runs >= 2 else -1
        if runs >= 2 and start == -1:
            runs -= 1
            continue
        cuts.append(last)
        last, runs = (start - 1, runs - 1) if runs >= 2 else (-1, runs)
    return cuts[::-1]


def micro_batches(mask: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    """Row indices of each micro-batch of at most ``size`` rows (None: one micro-batch of every row),
    rows taken in order of their last attended token, so each micro-batch's rows are of similar length
    and a forward cut to its longest row computes little padding."""
    n = mask.shape[0]
    if n == 0:
        return []
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    ends = (mask.ne(0) * positions).amax(-1) if mask.shape[1] else torch.zeros(n, dtype=torch.long)
    order = torch.argsort(ends.cpu(), stable=True)
    size = n if size is None else size
    return [order[i : i + size].sort().values for i in range(0, n, size)] if size < n else [torch.arange(n)]


def forward_groups(mask: torch.Tensor, size: int | None, buckets: int = 1) -> list[torch.Tensor]:
    """Row indices of each forward pass: the :func:`micro_batches` of at most ``size`` rows, each
    split into at most ``buckets`` groups of similar length (:func:`length_groups`,
    the split that computes the fewest positions, or none) so a forward cut to its longest row
    computes little padding. Each group is its own forward and backward: no pass ever holds logits
    for more rows than its group, and none assembles groups into one padded tensor."""
    groups = []
    for rows in micro_batches(mask, size):
        split = length_groups(mask[rows], buckets) if buckets > 1 else None
        groups += [rows] if split is None else [rows[g.to(rows.device)].sort().values for g, _ in split]
    return groups


def accumulate(
    terms: list[Term],
    micro_batch_size: int | None,
    aggregation: str,
    backward: Callable[[torch.Tensor], None],
    no_sync: Callable[[], contextlib.AbstractContextManager],
    ranks: Ranks,
    grad: bool = True,
    length_buckets: int = 1,
    aggregation_norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run one update's ``terms`` (see the module docstring): gradients accumulate in the parameters'
    ``.grad`` (``backward(loss)`` per micro-batch, the last one outside ``no_sync()``); returns the
    update's loss sum_k weight_k * L_k over the global batch (detached, same on every rank) and the
    metrics: ``<name>_loss`` per term and each term's per-token metrics as global token-means.
    ``grad=False``: forwards only (no backward, no graph), for evaluation. ``length_buckets``: each
    micro-batch runs as up to that many forwards over rows of similar length (:func:`forward_groups`);
    1 under FSDP2, whose forwards are collectives every rank must run alike. ``aggregation_norm``: the
    constant of ``seq-mean-token-sum-norm`` (None: each term's mask width)."""
    local = []
    for t in terms:
        local += [float(losses.aggregate_parts(None, t.mask, aggregation, aggregation_norm)[1]), float(t.mask.sum())]
    counts = ranks.sums(local)
    plans = [forward_groups(t.mask, micro_batch_size, length_buckets) for t in terms]
    steps = ranks.maxes([len(p) for p in plans]) if ranks.world > 1 else [len(p) for p in plans]
    schedule = []  # (term index, rows, scale)
    for k, (t, plan, n) in enumerate(zip(terms, plans, steps)):
        for i in range(int(n)):
            if i < len(plan):
                schedule.append((k, plan[i], 1.0))
            elif plan:  # pad: every rank runs the same number of forwards (FSDP2's all-gathers)
                schedule.append((k, plan[-1], 0.0))
    sums: dict[str, float] = {}
    tokens: dict[str, float] = {}
    loss_sums = [0.0] * len(terms)
    for j, (k, rows, scale) in enumerate(schedule):
        t = terms[k]
        den, ntok = max(counts[2 * k], 1.0), max(counts[2 * k + 1], 1.0)
        with torch.set_grad_enabled(grad):
            out = t.forward(rows)
            num, _ = losses.aggregate_parts(out.values, out.mask, aggregation, aggregation_norm)
            term_value = num / den
            if out.token_mean is not None:
                term_value = term_value + (out.token_mean * out.mask.to(out.token_mean.dtype)).sum() / ntok
            loss = (t.weight * ranks.world * scale) * term_value
            if out.extra is not None:
                loss = loss + ranks.world * scale * out.extra
        if grad:
            last = j == len(schedule) - 1
            with contextlib.nullcontext() if last else no_sync():
                backward(loss)
        if scale:
            loss_sums[k] += float(term_value.detach())
            maskf = out.mask.to(torch.float64)
            for name, v in out.metrics.items():
                if isinstance(v, tuple):  # (values, mask): a token-mean over its own tokens (global count)
                    v, own = v
                    own = own.to(torch.float64) * maskf
                    sums[name + "#"] = sums.get(name + "#", 0.0) + float(own.sum())
                    sums[name] = sums.get(name, 0.0) + float((v.detach().double() * own).sum())
                    continue
                sums[name] = sums.get(name, 0.0) + float((v.detach().double() * maskf).sum())
                tokens[name] = ntok
            if out.extra is not None:
                sums["_extra"] = sums.get("_extra", 0.0) + float(out.extra.detach())
        del out, loss, term_value, num
    names = sorted(sums)
    totals = ranks.sums(loss_sums + [sums[n] for n in names])
    term_values, metric_totals = totals[: len(terms)], totals[len(terms) :]
    metrics: dict[str, torch.Tensor] = {}
    total = 0.0
    for t, v in zip(terms, term_values):
        metrics[f"{t.name}_loss"] = torch.tensor(v, dtype=torch.float64)
        total += t.weight * v
    by_name = dict(zip(names, metric_totals))
    for n, v in by_name.items():
        if n == "_extra":
            total += v
            continue
        if n.endswith("#"):
            continue
        count = tokens[n] if n in tokens else by_name[n + "#"]  # NaN over no tokens of its own
        metrics[n] = torch.tensor(v / count if count else float("nan"), dtype=torch.float64)
    return torch.tensor(total, dtype=torch.float64), metrics


@contextlib.contextmanager
def fsdp_no_sync(model) -> Iterator[None]:
    """FSDP2: keep this backward's gradients unsharded and unreduced (they are reduced with the next
    synchronised backward's)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
