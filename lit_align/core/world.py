"""What the parts need from the run they are in: the ranks, the backward and the gradient-sync context.

The module builds a :class:`World` from its trainer (or for a module driven by hand, one process, plain
autograd) and hands it to the parts; a part never reaches for the trainer or the module itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lit_align.core.engine import Ranks


@dataclass
class World:
    """The run's services for the parts.

    Args:
        ranks: reductions over the run's ranks (:class:`lit_align.core.engine.Ranks`).
        sharded: the policy is sharded with FSDP2 (forwards are collectives every rank must run alike).
        backward: ``backward(loss)``; Lightning's ``manual_backward`` under a trainer (precision plugins,
            the strategy's hooks), plain autograd otherwise.
        no_sync: the context of a backward whose gradients must not be reduced over ranks yet.
    """

    ranks: Ranks = field(default_factory=Ranks)
    sharded: bool = False
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward()
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @property
    def synced_generation(self) -> bool:
        """Generation must run the same forwards on every rank (FSDP2 over several ranks)."""
        return self.sharded and self.ranks.world > 1
