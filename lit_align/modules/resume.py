"""What a checkpoint holds beyond weights, optimizers and schedules, for an exact resume; and the
refusal to write a checkpoint holding NaN or inf.

A mixin of :class:`lit_align.modules.policy.PolicyModule` (Lightning's checkpoint hooks)."""

from __future__ import annotations

import random

import torch


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


class ResumeState:
    """Counters, every rank's RNG states and the rollout batch being trained on (between the updates
    of one rollout batch, with ``steps_per_generation`` / ``num_iterations`` > 1) go into each
    checkpoint, so a resumed run continues exactly as the uninterrupted one."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lit_align_state"] = self._resume_state()  # collective under DDP/FSDP: first
        self.check_finite_checkpoint(checkpoint)

    def check_finite_checkpoint(self, checkpoint: dict) -> None:
        """Raise NonFiniteError, so nothing is written, if a weight or optimizer state is NaN/inf.

        Buffers are not checked: they may hold NaN on purpose (e.g. a "not yet set" marker).
        """
        buffers = {name for name, _ in self.named_buffers()}

        def bad(tree, where: str):
            if torch.is_tensor(tree):
                local = tree.to_local() if hasattr(tree, "to_local") else tree
                if (local.is_floating_point() or local.is_complex()) and not bool(torch.isfinite(local).all()):
                    yield where
            elif isinstance(tree, dict):
                for k, v in tree.items():
                    yield from bad(v, f"{where}.{k}")
            elif isinstance(tree, (list, tuple)):
                for i, v in enumerate(tree):
                    yield from bad(v, f"{where}[{i}]")

        weights = {k: v for k, v in checkpoint.get("state_dict", {}).items() if k not in buffers}
        found = [*bad(weights, "state_dict"), *bad(checkpoint.get("optimizer_states", []), "optimizer_states")]
        if found:
            raise NonFiniteError(
                f"refusing to save a checkpoint at step {self.global_step}: {len(found)} tensors hold NaN or inf "
                f"(first: {', '.join(found[:3])}); the last checkpoint written is the last good one"
            )

    def _resume_state(self) -> dict:
        """What a checkpoint needs beyond weights, optimizers and schedules for an exact resume: the
        counters and every rank's RNG states (torch, CUDA, Python, NumPy) and buffered rollout batch,
        gathered to rank 0."""
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        rng = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype("int64")),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "gauss": float(gauss),
            },
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rng["rollout_batch"] = self._cycle_state()  # this rank's rollouts, when a checkpoint falls inside a cycle
        states = [rng]
        if self.ranks.world > 1:
            import torch.distributed as dist

            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, rng)
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self._consecutive_skips,
            "reward_errors": self.reward_errors,
            "rng": states,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lit_align_state")
        if not state:
            return
        self.skipped_steps = state["skipped_steps"]
        self._consecutive_skips = state["consecutive_skips"]
        self.reward_errors = state.get("reward_errors", 0)
        rank = self.trainer.global_rank if self._trainer is not None else 0
        states = state["rng"]
        self._rng_to_restore = states[rank] if rank < len(states) else None  # another world size: fresh RNG
        self._load_cycle_state(self._rng_to_restore.get("rollout_batch") if self._rng_to_restore else None)

    def on_train_start(self) -> None:
        """Put back the RNG states of the checkpoint, as late as possible: after the sanity check and
        the data-loader set-up, right before the first resumed step, as in the uninterrupted run."""
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng is None:
            return
        import numpy as np

        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        n = rng["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
