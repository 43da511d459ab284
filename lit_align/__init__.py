"""lit-align: single-stage LLM post-training (SFT + RL in one run) as PyTorch Lightning modules."""

from lit_align.data.datamodule import MixedDataModule
from lit_align.modules.amft import AMFTModule
from lit_align.modules.chord import CHORDModule
from lit_align.modules.grpo import GRPOModule, SFTThenGRPOModule
from lit_align.modules.hpt import HPTModule
from lit_align.modules.luffy import LUFFYModule
from lit_align.modules.policy import PolicyModule
from lit_align.modules.prefix_rft import PrefixRFTModule
from lit_align.modules.sft import SFTModule
from lit_align.modules.srft import SRFTModule

__all__ = [
    "AMFTModule",
    "CHORDModule",
    "HPTModule",
    "LUFFYModule",
    "MixedDataModule",
    "PolicyModule",
    "PrefixRFTModule",
    "SFTModule",
    "SRFTModule",
    "GRPOModule",
    "SFTThenGRPOModule",
]
__version__ = "0.1.0"
