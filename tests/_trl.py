"""TRL's own GRPO loss (GRPOTrainer._compute_loss) on given tensors, for equivalence tests.

A minimal stand-in for the trainer carries TRL's settings; its forward returns the given log-probs (and
entropies), so TRL's code computes the ratios, clipping, its loss types, the entropy mask and bonus, the KL
term and the aggregation exactly as it does in training. One process, one accumulation step.
"""

from __future__ import annotations

import types
from collections import defaultdict
from types import SimpleNamespace

import torch


def trl_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    entropies: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    **config,
) -> torch.Tensor:
    """TRL's loss for (B, T) ``logp`` (with its graph), ``old_logp``, ``mask``, (B,) ``advantages`` and
    optional (B, T) ``entropies`` (with a graph for the entropy bonus) and ``ref_logp`` (beta > 0);
    ``config``: GRPOConfig fields (loss_type, epsilon, epsilon_high, importance_sampling_level, delta,
    top_entropy_quantile, entropy_coef, beta, ...). ``max_completion_length`` defaults to T."""
    from trl import GRPOConfig, GRPOTrainer

    if "use_bias_correction_kl" in GRPOConfig.__dataclass_fields__:
        config.setdefault("use_bias_correction_kl", False)  # TRL 1.x weights the KL by the ratio by default
    config.setdefault("max_completion_length", mask.shape[1])
    args = GRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none", **config)
    ident = lambda t, *a, **k: t  # noqa: E731  (one process: gather / reduce / pad are the identity)
    stub = SimpleNamespace(
        args=args,
        loss_type=args.loss_type,
        beta=args.beta,
        epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        importance_sampling_level=args.importance_sampling_level,
        top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        aux_loss_enabled=False,
        entropy_coef=args.entropy_coef,
        use_adaptive_entropy=False,
        _entropy_bonus_enabled=args.entropy_coef != 0.0,
        max_completion_length=args.max_completion_length,
        current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            num_processes=1,
            gather=ident,
            reduce=ident,
            gather_for_metrics=ident,
            pad_across_processes=ident,
            sync_gradients=True,
        ),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    ent = torch.zeros_like(logp) if entropies is None else entropies
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (logp, ent, None)
    stub.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, stub)
    rows, T = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(rows, 3, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
        "completion_ids": torch.zeros(rows, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logp,
        "ref_per_token_logps": ref_logp,
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(stub, None, inputs)
