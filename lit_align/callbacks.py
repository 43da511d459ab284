"""Callbacks: alignment monitors for TensorBoard and the Hugging Face export at the end of fit; the
lines a run ends with (:func:`fit_report`).

The scalars themselves (train/mu, train/token_weight_mean, train/entropy_usual, ...) are logged
by the modules from values they already computed, so monitoring costs no extra forward pass.
These callbacks add what ``self.log`` cannot: text samples and token-weight histograms.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


def _tensorboard(trainer: L.Trainer):
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class AlignmentMonitor(L.Callback):
    """Write to TensorBoard (rank zero only), at fit start:

    - ``data``: the data module's set-up counts as a table (``datamodule.summary()``, where it has one:
      rows kept, invalid, skipped and truncated per stream, held-out duplicates, the self-check's share);

    and every ``every_n_steps`` policy updates:

    - ``samples``: a table of a few prompts with their sampled completions and rewards (and the columns
      reward functions gave TRL's ``log_extra``);
    - ``train/token_weights``: a histogram of the SFT token weights over expert tokens
      (CHORD-phi and friends), from the last update.

    Args:
        every_n_steps: how often (in policy updates) to write; keeps event files small.
        num_samples: how many prompt/completion rows go into the text table.
    """

    def __init__(self, every_n_steps: int = 50, num_samples: int = 4):
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError("AlignmentMonitor: every_n_steps and num_samples must be >= 1")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self._last_written = -1

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        # after every setup hook (the policy module's runs the data self-check), before the first step
        summary = getattr(trainer.datamodule, "summary", None)
        writer = _tensorboard(trainer)
        text = summary() if callable(summary) else ""
        if writer is not None and text:
            writer.add_text("data", text, 0)  # step 0, as the data/* scalars

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_written or (step - 1) % self.every_n_steps:
            return
        self._last_written = step
        writer = _tensorboard(trainer)
        if writer is None:
            return
        samples = getattr(pl_module, "last_samples", None)
        if samples:
            extra = samples.get("extra") or {}  # columns reward functions gave TRL's log_extra
            rows = [
                "| " + " | ".join(["prompt", "completion", "reward", *extra]) + " |",
                "|---" * (3 + len(extra)) + "|",
            ]
            cell = lambda t: ("" if t is None else str(t)).replace("|", "\\|").replace("\n", " ")[:300]  # noqa: E731
            for i, (p, c, r) in enumerate(zip(samples["prompts"], samples["completions"], samples["rewards"])):
                if i == self.num_samples:
                    break
                cells = [cell(p), cell(c), f"{r:.3g}", *(cell(values[i]) for values in extra.values())]
                rows.append("| " + " | ".join(cells) + " |")
            writer.add_text("samples", "\n".join(rows), step)
        weights = getattr(pl_module, "last_token_weights", None)
        if weights is not None and weights.numel():
            writer.add_histogram("train/token_weights", weights.float().cpu(), step)


class HFExport(L.Callback):
    """At the end of fit, save the policy and tokenizer as a Hugging Face directory.

    The directory (``<log_dir>/hf_model`` unless ``dirpath`` is given) loads with
    AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained, so it can feed a next
    stage (``--model.model_name_or_path``) or any Hugging Face tool.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.saved_to: str | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        target = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "hf_model")
        export(pl_module, target, is_global_zero=trainer.is_global_zero)
        self.saved_to = str(target)


def export(pl_module, target: str | Path, is_global_zero: bool = True) -> Path:
    """Write ``pl_module.model`` and ``pl_module.tokenizer`` to ``target`` (rank zero writes)."""
    target = Path(target)
    state = None
    get_full = getattr(pl_module, "full_state_dict", None)
    if get_full is not None:
        state = get_full()  # collective under sharding: every rank must call it
    if is_global_zero:
        if state is not None:  # whole weights, LoRA merged: works under FSDP2 shards and peft wrappers
            from lit_align.export import save_module

            return save_module(pl_module, target, state)
        target.mkdir(parents=True, exist_ok=True)
        pl_module.model.save_pretrained(target, state_dict=state)
        pl_module.tokenizer.save_pretrained(target)
    return target


def fit_report(trainer: L.Trainer) -> list[str]:
    """The lines a run ends with (``AlignCLI`` prints them once, on rank zero, after the export; issue 22):

    - ``val/accuracy 0.942 at step 1500 (val/retention/<skill> ..., ...; last update: train/mu 0.1, ...)``: the
      latest validation's accuracy and the step it was measured at, the retention scores of that validation
      (shares, 3 decimals), and the module's ``HEADLINE_METRICS`` of the last update (3 significant digits); or,
      when no validation ran after the sanity check, ``val/accuracy: not measured (...)`` naming
      ``trainer.val_check_interval``;
    - ``TensorBoard: tensorboard --logdir <this run's version directory>``, per TensorBoardLogger;
    - ``Exported model: <dir>``, per :class:`HFExport` that saved (absolute paths, shell-quoted where needed).
    """
    module, metrics = trainer.lightning_module, trainer.callback_metrics

    def values(names, fmt: str = ".3g") -> str:
        return ", ".join(f"{n} {float(metrics[n]):{fmt}}" for n in names if n in metrics)

    last = values(getattr(module, "HEADLINE_METRICS", ()))
    last = f"last update: {last}" if last else ""
    step = getattr(module, "validated_at_step", None)
    if "val/accuracy" in metrics and step is not None:
        heldout = values(sorted(n for n in metrics if n.startswith("val/retention/")), ".3f")
        inside = "; ".join(part for part in (heldout, last) if part)
        lines = [
            f"val/accuracy {float(metrics['val/accuracy']):.3f} at step {step}" + (f" ({inside})" if inside else "")
        ]
    else:
        lines = [
            f"val/accuracy: not measured (no validation ran in the {trainer.global_step} updates; "
            f"trainer.val_check_interval={trainer.val_check_interval})" + (f"; {last}" if last else "")
        ]
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            lines.append(f"TensorBoard: tensorboard --logdir {shlex.quote(str(Path(logger.log_dir).resolve()))}")
    for callback in trainer.callbacks:
        if isinstance(callback, HFExport) and callback.saved_to:
            lines.append(f"Exported model: {shlex.quote(str(Path(callback.saved_to).resolve()))}")
    return lines
