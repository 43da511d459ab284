"""Sharded training: FSDP2 for PolicyModule, as ``--trainer.strategy=fsdp2``.

Lightning's own ``FSDPStrategy`` (FSDP1) cannot drive lit_align's manual optimization and refuses
the CPU, so the sharded strategy here is built on FSDP2 (``torch.distributed.fsdp.fully_shard``)
through Lightning's ``ModelParallelStrategy``, with the data-parallel mesh spanning every rank
(``data_parallel_size`` = world size, ``tensor_parallel_size`` = 1):

- :class:`FSDP2Strategy` sets up the mesh (NCCL on GPUs, gloo on the CPU) and writes checkpoints
  atomically; ``PolicyModule.configure_model`` calls :func:`shard_model` on the policy (and on the
  frozen reference model), one FSDP unit per decoder layer, then the root.
- ``PolicyModule.sample`` passes ``synced_gpus=True``: the sampling loop (``rollout.decode``) runs
  the same number of chunks and forward steps on every rank, so ranks whose completions end early
  keep taking part in the all-gathers. ``generate`` is registered as an FSDP forward method for the
  models sampled with HF ``generate`` (its own ``synced_gpus``).

Names registered in Lightning's ``StrategyRegistry`` (importing this module registers them; the CLI
does):

- ``fsdp2``: FSDP2, full (single-file) checkpoints;
- ``fsdp2_activation_checkpointing``: the same, recomputing decoder-layer activations in backward.

Anything else is set in YAML::

    trainer:
      strategy:
        class_path: lit_align.strategies.FSDP2Strategy
        init_args: {activation_checkpointing: true, save_distributed_checkpoint: true}

``--trainer.strategy=fsdp`` (Lightning's FSDP1) stops at start-up with a message naming ``fsdp2``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

FSDP1_NAMES = ("fsdp", "fsdp_cpu_offload")
FSDP1_MESSAGE = (
    "trainer.strategy={name!r} is Lightning's FSDPStrategy (FSDP1), which cannot run lit_align's manual "
    "optimization (and needs a GPU): use --trainer.strategy=fsdp2 (FSDP2, sharded per decoder layer; "
    "CPU and GPU) or --trainer.strategy=ddp"
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, ``fsync``, then ``os.replace``.

    A save interrupted at any point (an exception, SIGKILL, a full disk) leaves the previous
    checkpoint at that path intact: the rename is the only step that touches it, and it is atomic on
    POSIX file systems. The CLI installs it by default (``trainer.plugins``); remote paths
    (``s3://`` ...) go through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass


def check_strategy(strategy: Any) -> None:
    """Raise a ValueError naming ``fsdp2`` if ``strategy`` (a name or an object) is Lightning's FSDP1."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, str) and strategy in FSDP1_NAMES:
        raise ValueError(FSDP1_MESSAGE.format(name=strategy))
    if isinstance(strategy, FSDPStrategy):
        raise ValueError(FSDP1_MESSAGE.format(name=type(strategy).__name__))
    class_path = strategy.get("class_path") if hasattr(strategy, "get") else None  # a YAML class_path
    if isinstance(class_path, str) and class_path.split(".")[-1] == "FSDPStrategy":
        raise ValueError(FSDP1_MESSAGE.format(name=class_path))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (its ``_no_split_modules`` classes), in order.

    Works through a peft wrapper. Raises if none is found: sharding the root alone would gather the
    whole model at once and save no memory.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:  # fall back to the children of the first ModuleList called layers / h / blocks
        for name, m in base.named_modules():
            if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
                layers = list(m)
                break
    if not layers:
        raise ValueError(f"{type(base).__name__}: no decoder layers found to shard (no _no_split_modules)")
    return layers


def shard_model(
    model: torch.nn.Module,
    mesh,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> torch.nn.Module:
    """Apply FSDP2 in place: ``fully_shard`` on each decoder layer, then on the root, over ``mesh``.

    Also registers ``generate`` as a forward method (parameters are gathered around it) and, on
    gloo, asks FSDP for SUM reductions followed by its own division by the world size: gloo's AVG
    reduce-scatter has summed instead of averaged in some torch versions (pytorch issue 162338).
    The numerical-equivalence test (tests/test_distributed.py) pins the result against one process.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        return model
    for layer in decoder_layers(model):
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(layer)
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    register_fsdp_forward_method(model, "generate")
    if dist.get_backend(mesh.get_group()) == "gloo":
        for m in model.modules():
            if isinstance(m, FSDPModule) and hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism for lit_align's modules (manual optimization, CPU or GPU).

    The mesh is one data-parallel dimension over all ranks (``num_nodes x devices``); the module
    shards itself in ``configure_model`` (see :func:`shard_model`).

    Args:
        activation_checkpointing: recompute each decoder layer's activations in backward
            (less memory, about a third more compute).
        reshard_after_forward: free gathered parameters after each forward (ZeRO-3 style); False
            keeps them until backward (ZeRO-2 style: faster, more memory).
        save_distributed_checkpoint: False (default) writes one consolidated ``.ckpt`` file (rank 0
            gathers it; portable; ``python -m lit_align.export`` reads it). True writes a directory
            with one shard per rank (no gather; for models that do not fit one host's memory).
            Either way the write is atomic: an interrupted save never replaces the last good one.
        process_group_backend: ``nccl`` / ``gloo``; default: NCCL on GPUs, gloo on the CPU.
        timeout: collective timeout.
    """

    strategy_name = "fsdp2"

    def __init__(
        self,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward

    @property
    def sharding_options(self) -> dict:
        """Keyword arguments for :func:`shard_model`, read by ``PolicyModule.configure_model``."""
        return {
            "activation_checkpointing": self.activation_checkpointing,
            "reshard_after_forward": self.reshard_after_forward,
        }

    @property
    def checkpoint_io(self):
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io) -> None:
        self._checkpoint_io = io

    def setup_environment(self) -> None:
        # data parallelism over every rank, whatever the node layout ("auto" would mean num_nodes)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # a sharded checkpoint is a directory: write it beside the target, then swap it in
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)
        self.barrier("fsdp2_ckpt_clean")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("fsdp2_ckpt_written")
        if self.is_global_zero:
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
            partial.rename(path)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            elif old.exists():
                old.unlink()
        self.barrier("fsdp2_ckpt_swapped")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader, able to restore optimizers that hold no state tensors (AMFT's controller:
        plain SGD on a 0-dim mu). For a consolidated checkpoint Lightning indexes the first entry of
        each optimizer's state and torch's full-state loader needs a state tensor to find the device,
        so trailing stateless optimizers are kept out of Lightning's loop and get their param-group
        settings (lr, ...) back directly; the others (the policy's) take Lightning's path unchanged."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_file():  # a sharded checkpoint directory: torch's distributed loader copes
            return super().load_checkpoint(path, weights_only=weights_only)
        saved = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only).get("optimizer_states", [])
        keep = min(len(self._optimizers), len(saved))
        while keep > 1 and not saved[keep - 1].get("state"):
            keep -= 1
        everything = self._optimizers
        self._optimizers = everything[:keep]
        try:
            checkpoint = super().load_checkpoint(path, weights_only=weights_only)
        finally:
            self._optimizers = everything
        for optimizer, state in zip(everything[keep:], saved[keep:]):
            for group, saved_group in zip(optimizer.param_groups, state["param_groups"]):
                group.update({k: v for k, v in saved_group.items() if k != "params"})
        return checkpoint


def _register() -> None:
    for name, kwargs, text in (
        ("fsdp2", {}, "FSDP2 (fully_shard per decoder layer) for lit_align, CPU or GPU"),
        (
            "fsdp2_activation_checkpointing",
            {"activation_checkpointing": True},
            "FSDP2 for lit_align with activation checkpointing of decoder layers",
        ),
    ):
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, FSDP2Strategy, description=text, **kwargs)


_register()
