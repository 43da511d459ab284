"""The command line: ``python train.py fit --config configs/chord_phi.yaml``."""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lit_align.callbacks import AlignmentMonitor, HFExport
from lit_align.data.datamodule import MixedDataModule
from lit_align.modules.policy import PolicyModule


class AlignCLI(LightningCLI):
    """LightningCLI in subclass mode: ``model`` is any PolicyModule (SFTModule, GRPOModule, ...),
    ``data`` any LightningDataModule (MixedDataModule by default). The model's checkpoint path and
    ``trust_remote_code`` are passed on to the data module, which needs the same tokenizer."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.model_name_or_path")
        parser.link_arguments("model.init_args.trust_remote_code", "data.init_args.trust_remote_code")


def trainer_defaults() -> dict:
    """Defaults every run gets; a config's own ``trainer.callbacks`` are added to these."""
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "lit_align"},
        },
        "callbacks": [
            ModelCheckpoint(
                monitor="val/accuracy", mode="max", save_last=True, filename="best-step{step}",
                auto_insert_metric_name=False,
            ),
            AlignmentMonitor(),
            HFExport(),
        ],
        "check_val_every_n_epoch": None,
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
