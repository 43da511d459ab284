"""The recorder behind ``benchmarks/equivalence.py``: a Lightning callback and the launcher of ``train.py``.

Imported by the ``train.py fit`` subprocess that ``equivalence.py dump`` starts (with this folder on
PYTHONPATH), never by the library. It observes the run only through public interfaces, so that it keeps
working however ``lit_align/modules`` is organised:

- ``torch.nn.utils.clip_grad_norm_`` is wrapped before ``lit_align`` is imported (:func:`launch`); during
  the first training step the wrapper copies the gradients it is handed, i.e. the policy's gradients
  *before* clipping, and the total norm it returns;
- Lightning's ``on_before_optimizer_step`` hook (run inside ``LightningOptimizer.step``, after the module
  clipped) gives the *clipped* gradients of the first step of the first optimizer (the policy's; AMFT's
  controller steps its raw optimizer, which no hook sees) and names them;
- ``trainer.callback_metrics`` after each training batch gives every scalar the module logged
  (``train/loss``, ``train/reward_mean``, ``train/mu``, ...).

If no ``clip_grad_norm_`` call is seen (a module that clips otherwise), the pre-clip gradients are
rebuilt from the clipped ones and the logged ``train/grad_norm``; the dump says which (``grads_source``).
"""

from __future__ import annotations

import hashlib
import os
import runpy
import sys
import time

import lightning as L
import torch

_ORIGINAL_CLIP = torch.nn.utils.clip_grad_norm_
_CAPTURE: dict = {"armed": False, "grads": None, "norm": None, "max_norm": None}


def _recording_clip_grad_norm_(parameters, max_norm, *args, **kwargs):
    """``torch.nn.utils.clip_grad_norm_`` that, when armed (the first training step, until its policy
    optimizer step), first copies the gradients it will clip; the latest copy of a parameter's wins."""
    if _CAPTURE["armed"]:
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        grads = _CAPTURE["grads"] if _CAPTURE["grads"] is not None else {}
        grads.update({id(p): _whole(p.grad).detach().clone() for p in params if p.grad is not None})
        _CAPTURE.update(grads=grads, max_norm=float(max_norm))
        norm = _ORIGINAL_CLIP(params, max_norm, *args, **kwargs)
        _CAPTURE["norm"] = float(_whole(norm))
        return norm
    return _ORIGINAL_CLIP(parameters, max_norm, *args, **kwargs)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def install_clip_recorder() -> None:
    torch.nn.utils.clip_grad_norm_ = _recording_clip_grad_norm_
    torch.nn.utils.clip_grad.clip_grad_norm_ = _recording_clip_grad_norm_


def launch() -> None:
    """``python -c 'import _equivalence_callback as e; e.launch()' TRAIN_PY fit ...``: wrap the clipping,
    then run ``train.py`` as ``python TRAIN_PY fit ...`` would."""
    install_clip_recorder()
    train_py = os.path.abspath(sys.argv[1])
    sys.argv = [train_py, *sys.argv[2:]]
    sys.path.insert(0, os.path.dirname(train_py))
    runpy.run_path(train_py, run_name="__main__")


def _scalar(value) -> float | None:
    if torch.is_tensor(value):
        return float(value.detach().float().cpu()) if value.numel() == 1 else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


class EquivalenceRecorder(L.Callback):
    """Writes to ``out`` (torch.save) at the end of fit: the first policy update's gradients (before and
    after clipping, by parameter name, in the optimizer's order) and loss, every training step's logged
    ``train/*`` scalars, and a fingerprint of the policy's weights at the start of training."""

    def __init__(self, out: str):
        self.out = out
        self.first: dict | None = None
        self.steps: list[dict] = []
        self.start: dict = {}
        self._t0 = time.perf_counter()

    @staticmethod
    def _policy_params(trainer) -> list[torch.Tensor]:
        opt = trainer.optimizers[0]
        return [p for group in opt.param_groups for p in group["params"]]

    def on_train_start(self, trainer, pl_module) -> None:
        params = self._policy_params(trainer)
        digest = hashlib.sha256()
        for p in params:
            digest.update(_whole(p).detach().float().cpu().contiguous().numpy().tobytes())
        self.start = {
            "weights_sha256": digest.hexdigest(),
            "num_tensors": len(params),
            "num_elements": sum(p.numel() for p in params),
            "torch_threads": torch.get_num_threads(),
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first is None:
            _CAPTURE.update(armed=True, grads=None, norm=None, max_norm=None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.first is not None or getattr(optimizer, "optimizer", optimizer) is not trainer.optimizers[0]:
            return
        _CAPTURE["armed"] = False
        names = {id(p): n for n, p in pl_module.named_parameters()}
        params = self._policy_params(trainer)
        captured = _CAPTURE["grads"]
        grads, clipped = [], []
        for p in params:
            g = None if p.grad is None else _whole(p.grad).detach().float().cpu().clone()
            clipped.append(g)
            if captured is not None:
                pre = captured.get(id(p))
                grads.append(None if pre is None else pre.float().cpu())
        if captured is not None and any((g is None) != (c is None) for g, c in zip(grads, clipped)):
            captured = None  # the clipping seen was not of this optimizer's gradients: rebuild them below
        self.first = {
            "names": [names.get(id(p), f"param{i}") for i, p in enumerate(params)],
            "grads_clipped": clipped,
            "grads": grads if captured is not None else None,
            "grads_source": "clip_grad_norm_ input" if captured is not None else None,
            "clip_norm": _CAPTURE["norm"],
            "clip_max_norm": _CAPTURE["max_norm"],
            "global_step": trainer.global_step,
        }
        _CAPTURE.update(grads=None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = {}
        for name, value in trainer.callback_metrics.items():
            if name.startswith("train/"):
                v = _scalar(value)
                if v is not None:
                    metrics[name] = v
        self.steps.append({"batch_idx": batch_idx, "global_step": trainer.global_step, "metrics": metrics})
        first = self.first
        if first is not None and "loss" not in first:
            first["loss"] = metrics.get("train/loss")
            first["grad_norm"] = metrics.get("train/grad_norm")
            if first["grads"] is None:  # no clip_grad_norm_ call seen: undo the clipping by the logged norm
                first["grads"], first["grads_source"] = self._unclipped(
                    first["grads_clipped"], first["grad_norm"], pl_module
                )

    @staticmethod
    def _unclipped(clipped: list, norm: float | None, pl_module) -> tuple[list, str]:
        max_norm = float(getattr(pl_module, "hparams", {}).get("gradient_clip", 0.0) or 0.0)
        if norm is None or max_norm <= 0 or norm <= max_norm:
            return clipped, "optimizer step input (no clipping applied: norm <= max_norm or clipping off)"
        scale = (norm + 1e-6) / max_norm  # torch's clip coefficient is max_norm / (norm + 1e-6)
        return [None if g is None else g * scale for g in clipped], "rebuilt from clipped gradients and train/grad_norm"

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        record = {
            "format": 1,
            "first_update": self.first,
            "steps": self.steps,
            "start": self.start,
            "fit_seconds": time.perf_counter() - self._t0,
        }
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        tmp = self.out + ".tmp"
        torch.save(record, tmp)
        os.replace(tmp, self.out)
