"""Callbacks: alignment monitors for TensorBoard and the Hugging Face export at the end of fit.

The scalars themselves (train/mu, train/token_weight_mean, train/entropy_usual, ...) are logged
by the modules from values they already computed, so monitoring costs no extra forward pass.
These callbacks add what ``self.log`` cannot: text samples and token-weight histograms.
"""

from __future__ import annotations

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

    - ``samples``: a table of a few prompts with their sampled completions and rewards;
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
            rows = ["| prompt | completion | reward |", "|---|---|---|"]
            for p, c, r in list(zip(samples["prompts"], samples["completions"], samples["rewards"]))[
                : self.num_samples
            ]:
                cell = lambda t: t.replace("|", "\\|").replace("\n", " ")[:300]  # noqa: E731
                rows.append(f"| {cell(p)} | {cell(c)} | {r:.3g} |")
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
