"""The command line: ``python train.py fit --config configs/chord_phi.yaml``."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lit_align.callbacks import AlignmentMonitor, HFExport, fit_report
from lit_align.data.datamodule import MixedDataModule
from lit_align.modules.policy import PolicyModule
from lit_align.strategies import check_strategy  # importing lit_align.strategies registers "fsdp2"


class AlignCLI(LightningCLI):
    """LightningCLI in subclass mode: ``model`` is any PolicyModule (SFTModule, GRPOModule, ...),
    ``data`` any LightningDataModule (MixedDataModule by default). The model's checkpoint path and
    ``trust_remote_code`` are passed on to the data module, which needs the same tokenizer."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.model_name_or_path")
        parser.link_arguments("model.init_args.trust_remote_code", "data.init_args.trust_remote_code")

    def parse_arguments(self, parser, args) -> None:
        check_hash_values(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Resuming with ``--ckpt_path`` keeps the settings given on the command line / ``--config``
        (pass the run's own ``config.yaml`` to resume it exactly). Lightning would re-parse the
        checkpoint's hyper_parameters into the config instead, which fails on values logged for
        reading rather than re-parsing (e.g. CHORD's ``mu_schedule``, stored as its repr)."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_run_config(config)
        check_strategy(config.get("trainer.strategy"))
        if config.get("trainer.enable_checkpointing") is False:
            # Lightning refuses a ModelCheckpoint when checkpointing is off: leave the default one out
            # (the trainer_defaults callbacks are added when the Trainer is built, after this hook)
            callbacks = [c for c in self.trainer_defaults["callbacks"] if not isinstance(c, ModelCheckpoint)]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": callbacks}

    def instantiate_classes(self) -> None:
        """Build the model, data module and trainer. A constructor's own error (a flag out of range, a
        missing file) reaches the user as itself, message last: jsonargparse would wrap it in a
        "Does not validate against any of the Union subtypes" error followed by the whole parsed
        config. An error whose message names its flag (``model.*``, ``data.*``, ``trainer.*``) comes
        without the traceback through jsonargparse's frames."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if cause is err:
                raise
            if isinstance(cause, ValueError) and str(cause).startswith(FLAG_PREFIXES):
                raise cause.with_traceback(None) from None
            raise cause from None

    def after_fit(self) -> None:
        """End the run's output with its score, the TensorBoard command for it and the exported model's
        directory (:func:`lit_align.callbacks.fit_report`), once, on rank zero: Lightning's last line is its
        progress bar."""
        if self.trainer.is_global_zero:
            print("\n".join(fit_report(self.trainer)), flush=True)


FLAG_PREFIXES = ("model.", "data.", "trainer.")


def check_hash_values(args) -> None:
    """A command-line value that starts with ``#`` reaches jsonargparse's YAML reading as a comment, i.e.
    null, whatever the flag's type and however it is quoted in the shell: ``--data.init_args.answer_pattern
    '####\\s*(.+)'`` would silently become no pattern (every GSM8K reward 0). Say so before parsing.

    Raises:
        ValueError: naming the flag and a form that is read as written.
    """
    if not isinstance(args, (list, tuple)):
        return  # a dict / Namespace given in code: no YAML reading of strings
    args = [str(a) for a in args]
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        if "=" in arg:
            flag, value = arg.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            flag, value = arg, args[i + 1]
        else:
            continue
        if value.lstrip().startswith("#"):
            example = " (for this pattern: '[#]{4}\\s*(.+)')" if flag.endswith("answer_pattern") else ""
            raise ValueError(
                f"{flag.lstrip('-')}={value!r}: on the command line a value that starts with '#' is read as a YAML "
                f"comment, i.e. null, however the shell quotes it: write it so that it does not start with '#'"
                f"{example}, or set it, quoted, in a YAML config file"
            )


def trainer_defaults() -> dict:
    """Defaults every run gets; a config's own ``trainer.callbacks`` are added to these. The
    ModelCheckpoint is left out under ``--trainer.enable_checkpointing=false``."""
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "lit_align"},
        },
        "callbacks": [
            ModelCheckpoint(
                monitor="val/accuracy",
                mode="max",
                save_last=True,
                filename="best-step{step}",
                auto_insert_metric_name=False,
            ),
            AlignmentMonitor(),
            HFExport(),
        ],
        "check_val_every_n_epoch": None,
        # checkpoints are written to a temporary file and renamed into place: a save interrupted by
        # a crash or SIGKILL never replaces the last good checkpoint
        "plugins": [{"class_path": "lit_align.strategies.AtomicCheckpointIO"}],
    }


def main(args: list[str] | None = None, run: bool = True) -> AlignCLI:
    return AlignCLI(
        PolicyModule,
        MixedDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=trainer_defaults(),
        args=args,
        run=run,
    )


def check_run_config(config) -> None:
    """Before any model is loaded: an unknown ``trainer.strategy`` name is an error listing the known
    ones, and checkpoints (``--ckpt_path``) load with ``weights_only=True`` unless set otherwise."""
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = config.get("trainer.strategy")
    known = ["auto", *StrategyRegistry.available_strategies()]
    if isinstance(strategy, str) and strategy.lower() not in known:
        raise ValueError(f"trainer.strategy={strategy!r} is not a known strategy: choose one of {known}")
    if "weights_only" in config and config.get("weights_only") is None:
        config["weights_only"] = True
