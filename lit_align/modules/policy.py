"""PolicyModule: the one LightningModule of every method, over composed parts.

Per training step (one policy update)::

    u = Update(step, this update's expert rows, its rollout rows on demand)  # core/update.py
    loss = method.loss(u)              # the method's terms, e.g. (1 - mu) * u.grpo() + mu * u.sft(phi)
    engine.run(loss.terms())           # micro-batches, exact global normalisation, one gradient sync
    clip, optimizer step, lr step      # all ranks step, or none (non-finite updates are skipped)
    method.after_update(u, applied)    # e.g. AMFT's controller

The parts (``lit_align.core``): :class:`Policy` (model, reference, tokenizer, the one log-probs forward),
:class:`Sampler` (HF loop or vLLM engine), :class:`RolloutBuffer` (a rollout batch over several updates,
exact resume), the step engine, :class:`HeldOut` (validation). Each is handed what it needs; none calls
back into this module.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import random
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from lit_align import losses
from lit_align.core import dynamic_sampling, groups, terms
from lit_align.core import settings as S
from lit_align.core.buffer import RolloutBuffer
from lit_align.core.engine import Ranks, Term, accumulate, fsdp_no_sync
from lit_align.core.heldout import HeldOut, check_logged_name
from lit_align.core.policy import Policy
from lit_align.core.sampler import Sampler, vllm_importable
from lit_align.core.terms import Loss, RLSettings
from lit_align.core.update import Update
from lit_align.core.world import World
from lit_align.hf import apply_lora, disable_dropout_in_model, load_model, load_tokenizer
from lit_align.rewards import ExactAnswerReward, RewardFunction, RewardScores, RewardSet
from lit_align.rollout import Rollout
from lit_align.weighting import lr_factor

__all__ = ["NonFiniteError", "PolicyModule", "apply_lora"]


REWARD_LOGGED = "reward_logged"
"""The key, among an update's metrics, of the values reward functions gave ``log_metric`` (name -> scalar)."""


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


def _distinct_positive_integers(values) -> bool:
    return all(S.is_integer(v) and v >= 1 for v in values) and len(set(values)) == len(values)


# the ranges of PolicyModule's settings (choices come from the Literal annotations)
RULES = {
    "num_generations": S.integer(1),
    "max_new_tokens": S.integer(1),
    "temperature": S.number(0, low_open=True),
    "top_p": S.number(0, 1, low_open=True),
    "top_k": S.Rule(S.integer(0).holds, "an integer >= 0 (0: off)"),
    "epsilon_low": S.number(0, 1, high_open=True),
    "epsilon_high": S.number(0),
    "beta": S.number(0),
    "delta": S.Rule(lambda v: v is None or S.number(1, low_open=True).holds(v), "null or a finite number > 1"),
    "sapo_temperature_pos": S.number(0, low_open=True),
    "sapo_temperature_neg": S.number(0, low_open=True),
    "top_entropy_quantile": S.number(0, 1),
    "entropy_coef": S.number(),
    "loss_scale_factor": S.Rule(
        lambda v: v is None or S.number(0, low_open=True).holds(v), "null (max_new_tokens) or a finite number > 0"
    ),
    "warmup_steps": S.integer(0),
    "gradient_clip": S.number(0, words="a finite number >= 0 (0: off)"),
    "min_lr_ratio": S.number(0, 1),
    "max_consecutive_skips": S.integer(1),
    "reward_timeout_s": S.Rule(
        lambda v: v is None or S.number(0, low_open=True).holds(v), "null or a finite number > 0"
    ),
    "length_buckets": S.integer(1),
    "micro_batch_size": S.integer(1, optional="the whole batch"),
    "generation_batch_size": S.integer(1, optional="every row at once"),
    "steps_per_generation": S.integer(1),
    "num_iterations": S.integer(1),
    "repetition_penalty": S.number(0, low_open=True, words="a finite number > 0 (1: off)"),
    "min_p": S.number(0, 1, high_open=True, words="in [0, 1) (0: off)"),
    "vllm_gpu_memory_utilization": S.number(0, 1, low_open=True),
    "vllm_kv_cache_memory_bytes": S.integer(1 << 20, optional="1 GiB on the CPU", unit=" (bytes)"),
    "vllm_max_model_length": S.integer(1, optional="the checkpoint's"),
    "vllm_tensor_parallel_size": S.Rule(lambda v: v == 1, "1 (one colocated engine per training process)"),
    "vllm_importance_sampling_cap": S.number(1),
    "skip_special_tokens": S.Rule(lambda v: isinstance(v, bool), "true or false"),
    "pass_at_k": S.Rule(
        lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0 and _distinct_positive_integers(v)),
        "null (off) or a list of distinct integers >= 1, e.g. [1, 4, 16]",
    ),
    "pass_at_k_samples": S.integer(1, optional="the largest k of model.pass_at_k"),
    "dynamic_sampling": S.Rule(lambda v: isinstance(v, bool), "true or false"),
    "max_resample_batches": S.integer(0),
    "reward": S.Rule(
        lambda v: all(f is None or callable(f) for f in (v if isinstance(v, (list, tuple)) else [v])),
        "a lit_align.rewards.RewardFunction, a TRL-style reward function, or a list of them",
    ),
}


def _check_objective_reads(args: dict) -> None:
    """Refuse an RL-objective setting that the chosen objective never reads (ValueError naming both flags):
    ``delta`` outside ``policy_loss: clip`` (CISPO and SAPO have no unclipped branch to cap; TRL ignores it
    there too), a SAPO temperature other than its default outside ``policy_loss: sapo``, ``loss_scale_factor``
    outside ``loss_aggregation: seq-mean-token-sum-norm``. Such a value changed nothing, silently."""
    default = {name: p.default for name, p in inspect.signature(PolicyModule.__init__).parameters.items()}
    loss, aggregation = args["policy_loss"], args["loss_aggregation"]
    for name, reader, chosen in (
        ("delta", "policy_loss=clip", f"policy_loss={loss}"),
        ("sapo_temperature_pos", "policy_loss=sapo", f"policy_loss={loss}"),
        ("sapo_temperature_neg", "policy_loss=sapo", f"policy_loss={loss}"),
        ("loss_scale_factor", "loss_aggregation=seq-mean-token-sum-norm", f"loss_aggregation={aggregation}"),
    ):
        if args[name] != default[name] and chosen != reader:
            raise ValueError(
                f"model.{name}={args[name]!r} is read by {reader} only, and this run has {chosen}, where it "
                f"would change nothing: unset it, or choose {reader}"
            )


class PolicyModule(L.LightningModule):
    """The one LightningModule every method subclasses (manual optimization, one policy update per step).

    A method implements :meth:`loss` (its terms for one update, from an :class:`~lit_align.core.update.Update`)
    and, if it needs one, :meth:`after_update`; everything else is here, in composed parts.

    Args:
        model_name_or_path: Hugging Face checkpoint directory, hub id, ``"embedded"`` (the tiny model, freshly
            initialised), ``"embedded-base"`` (the same, pre-trained on several skills) or ``"embedded-instruct"``
            / ``"embedded-instruct-<seed>"`` (pre-trained to sample like an instruct model, one per seed; both
            built on first use).
        optimizer: policy optimizer (class path + init args in YAML); AdamW by default.
        warmup_steps: linear learning-rate warm-up, in policy updates.
        lr_decay: ``constant``, ``linear`` or ``cosine`` decay to ``min_lr_ratio`` x lr at max_steps.
        gradient_clip: max global gradient norm (0 disables clipping; the norm is still logged).
        num_generations: G, completions sampled per prompt.
        max_new_tokens, temperature, top_p, top_k: sampling settings (top_k=0: off).
        epsilon_low, epsilon_high: PPO clip range [1 - eps_low, 1 + eps_high] (with ``policy_loss: cispo``,
            epsilon_high is the cap of the importance weight itself, TRL's convention: 5.0 in ScaleRL).
        beta: KL coefficient to a frozen reference (0: no reference model is loaded).
        kl_estimator: k1, k2 or k3.
        policy_loss: the on-policy objective: ``clip`` (PPO / GRPO's clipped surrogate), ``cispo``
            (MiniMax-M1: capped, detached importance weight times log-prob) or ``sapo`` (a soft gate,
            ``sapo_temperature_pos`` / ``_neg``); TRL's ``loss_type`` cispo / sapo.
        importance_sampling_level: ``token`` (default), ``sequence`` (GSPO: one length-normalised ratio
            per completion, clipped as a whole) or ``sequence_token`` (GSPO-token); TRL's name.
        delta: two-sided clipping (TRL's name, INTELLECT-2): the ratio is also capped at delta where the
            advantage is negative; null (default) off; must exceed 1 + epsilon_high.
        top_entropy_quantile: only this highest-entropy share of each completion's tokens gets the policy
            loss ("Beyond the 80/20 Rule": 0.2; TRL's name); 1 (default) every token.
        entropy_coef: entropy bonus (TRL's name): the RL term gets - entropy_coef x the token-mean entropy
            (at the sampling temperature) of its sampled tokens; 0 (default) off.
        loss_aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm
            (Dr.GRPO: each row's token sum divided by the constant ``loss_scale_factor``, then the mean
            over rows; TRL's dr_grpo) (both terms).
        loss_scale_factor: seq-mean-token-sum-norm's constant (verl's name); null: max_new_tokens.
        advantage_norm: std (GRPO), none (Dr.GRPO) or batch-std (the global batch's std, all ranks).
        reward: a reward function or a list of them (class paths, or ``package.module.function`` paths
            in YAML); exact final-answer match by default. A lit-align ``RewardFunction`` (or a callable
            taking ``(prompts, completions, answers)`` and no ``**kwargs``) is called
            ``fn(prompts, completions, answers)``; any other callable as TRL calls reward functions,
            ``fn(prompts=..., completions=..., completion_ids=..., **columns)`` with the data set's
            other columns (and ``trainer_state``, ``log_metric``, ``log_extra`` where it takes them;
            ``async def`` ones awaited), returning a float or None (does not apply) per completion; for a row
            of conversational data, ``prompts`` holds its messages and ``completions`` ``[{"role":
            "assistant", "content": text}]``, as TRL passes them. See
            :class:`lit_align.rewards.RewardSet`. Logged per function: ``train/rewards/<name>/mean``
            and ``/std``; the weighted total is ``train/reward_mean``.
        reward_weights: one weight per reward function (TRL's name); None: all 1.0.
        skip_special_tokens: drop special tokens from the completion text the rewards see (TRL's
            behaviour, default). False keeps the special tokens the model sampled (an added
            ``<answer>`` token, ...) in the text; only the end token that stopped a completion is cut.
            Both rollout engines decode the text from the token ids with the same function.
        reward_errors: ``raise`` stops at a failing reward call, naming prompt and completion;
            ``zero`` scores it 0 and counts it in ``train/reward_errors``.
            ``train/reward_errors`` is the run's cumulative count of failed reward items.
        reward_timeout_s: time limit of one reward call (None: no limit).
        max_consecutive_skips: stop after this many updates in a row skipped as non-finite
            (each skipped update counts in ``train/skipped_steps``). A checkpoint is never written
            while a weight or optimizer state is non-finite: the save raises NonFiniteError.
        trust_remote_code: passed to from_pretrained; off unless you set it.
        model_dtype: load the weights in this torch dtype (e.g. bfloat16); None keeps the file's. Where the
            HF sampler's decode loop rounds unlike the training forward (weights other than float32, autocast,
            TF32), ``old_logp`` comes from one more no-grad training forward, so the first update has ratio 1.
        lora: train LoRA adapters (peft) instead of all weights: ``peft.LoraConfig`` arguments, e.g.
            ``{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj], lora_dropout: 0.0}``; null
            (default) trains every weight. With ``beta > 0`` the reference model is the policy with
            its adapters disabled, so no second model is loaded. Exports and the vLLM engine get merged
            full weights, equal to peft's ``merge_and_unload`` (LoRA, DoRA ``use_dora: true``,
            ``lora_bias``, ``modules_to_save``; :mod:`lit_align.adapters`); adapters that could not be
            merged are refused here, before training. A ``modules_to_save`` (or LoRA) output layer or
            input embedding of a checkpoint with tied embeddings is trained apart from its twin: exported
            with ``tie_word_embeddings: false``, and the vLLM engine is built with an output layer of its own.
        length_buckets: a micro-batch over rows of unequal length (rollouts, expert rows) runs as at
            most this many forward/backward passes over groups of rows of similar length, each cut to
            its own longest row, so fewer padded positions are computed and no pass holds logits for
            more rows than its group; the losses and their gradients are those of one pass (up to
            float rounding). 1: always one pass. Under FSDP2 always one pass, since every rank must
            run the same number of forwards.
        micro_batch_size: rows per forward/backward (TRL's per-device micro-batch). One policy update
            accumulates gradients over micro-batches of rollout rows and of expert rows, then clips and
            steps once; each term is normalised over the whole update's tokens (token-mean) or rows
            (seq-mean modes) on every rank, so the loss and gradient do not depend on this number or on
            how tokens are spread over ranks. None (default): the whole batch in one forward.
        generation_batch_size: rows (prompts x G) decoded at once; None (default): all of them.
        steps_per_generation: the rollout batch and the step's expert rows are split into this many
            mini-batches, one optimizer step each (TRL's name). Each Lightning training step is one
            optimizer step, so max_steps, lr / mu schedules, AMFT's K and checkpoints count updates.
        num_iterations: passes over the same rollouts (TRL's name, PPO epochs); with
            steps_per_generation, each rollout batch serves steps_per_generation x num_iterations
            updates, and the PPO clip and the sampling-time log-probs do their job.
        disable_dropout: dropout off in the policy, its LoRA adapters and the reference model (TRL's
            name), so a strictly on-policy update has ratio 1 and KL 0.
        mask_truncated_completions: completions that reach max_new_tokens without an end token get no
            RL loss (their group statistics are computed as usual). ``train/clipped_ratio``, the share
            of such completions, is always logged.
        dynamic_sampling: DAPO's dynamic sampling (arXiv 2503.14476, Eq. 11): groups whose rewards are all
            equal (advantage 0 for every member: no gradient) are dropped from the rollout batch, and groups
            of more prompts (``data``'s refill stream, :meth:`lit_align.MixedDataModule.refill_prompts`) are
            sampled in their place, one prompt batch per extra round, until this rank holds the batch's
            number of groups again (extra groups of the last round are cut, as DAPO does) or after
            ``max_resample_batches`` extra rounds. Advantages are computed over the groups kept; the rollout
            statistics stay the training batch's as sampled (:meth:`rollout_batch`). A method may keep more
            groups (HPT: those its gate routes to SFT). ms-swift's ``dynamic_sample``, verl's
            ``algorithm.filter_groups.enable``. Logged: ``train/dynamic_sampling_dropped``, ``_batches``,
            ``_filled``. See :meth:`dynamic_round` and docs/guides/dynamic_sampling.md.
        max_resample_batches: extra prompt batches sampled at most per rollout batch (ms-swift's
            ``max_resample_times``; verl's ``max_num_gen_batches`` counts the first batch too). Still short
            after them, the update trains on the groups kept (``train/dynamic_sampling_filled`` < 1); 0:
            drop, never refill.
        repetition_penalty, min_p: sampling settings (TRL's names; 1.0 / 0.0: off). The checkpoint's
            own generation config never changes sampling: its sampling fields are overridden by these
            settings, and the start-up log names the ones it overrode.
        rollout_engine: ``hf`` (default: lit-align's KV-cache loop, or HF generate) or ``vllm``: one
            colocated vLLM engine per rank, built at fit start from the checkpoint, given the policy's
            weights after each optimizer step that changed them (before it samples again), used for
            training rollouts and validation's greedy answers. ``old_logp`` still comes from the
            trainer's forward; ``train/sampler_logp_diff`` (and ``_max``) log the mean (max)
            |vLLM - trainer| log-prob over completion tokens. Needs ``pip install "lit-align[vllm]"``.
        vllm_gpu_memory_utilization: share of the GPU's memory the engine takes (TRL's name, default 0.3).
        vllm_kv_cache_memory_bytes: the engine's KV cache in bytes; on the CPU always bounded (None: 1 GiB),
            on a GPU it overrides vllm_gpu_memory_utilization's sizing of the cache.
        vllm_max_model_length: longest prompt + completion the engine serves, in tokens (None: the
            checkpoint's max_position_embeddings).
        vllm_tensor_parallel_size: GPUs per engine (TRL's name); only 1, one engine per rank, for now.
        vllm_enable_sleep_mode: on GPUs, the engine's weights and KV cache leave GPU memory while the
            policy trains (TRL's name); the CPU engine has none.
        vllm_importance_sampling_correction: multiply each RL token's loss by min(exp(old_logp -
            sampler_logp), vllm_importance_sampling_cap), TRL's truncated importance-sampling correction for
            the engine's numerics; off by default (the trainer's old_logp alone defines the ratio).
        vllm_importance_sampling_cap: the truncation of those weights (TRL's name, default 3.0).
        pass_at_k: log ``val/pass@k`` for these k (e.g. ``[1, 4, 16]``; one int: that k alone): the unbiased estimator of Chen et
            al. 2021 (arXiv 2107.03374) from ``pass_at_k_samples`` answers per held-out prompt, sampled with
            the training sampler's settings and judged by val/accuracy's rule, averaged over problems
            (:func:`lit_align.core.heldout.pass_at_k`). Null (default): off, no extra sampling. TRL has no
            such setting; verl samples ``val_kwargs.n`` answers per prompt.
        pass_at_k_samples: n, answers sampled per held-out prompt for pass@k (verl's ``val_kwargs.n``);
            null: the largest k. Must be >= every k (pass@k is undefined from fewer than k samples).

    Scale-out (``--trainer.strategy=ddp`` / ``fsdp2``): rollouts are sampled on each rank from its
    own prompts, advantages are computed within each prompt's group (every group lives on one
    rank; ``batch-std`` divides by the global batch's std, over every rank), scalars are averaged over
    ranks before logging (``rewards/<name>/mean`` and ``/std`` are the global batch's), and mu, the finite-update decision and
    the reward mean seen by adaptive schedules are identical on all ranks. Each loss term is
    normalised by its token (or row) count over the whole update on all ranks
    (:mod:`lit_align.modules.engine`), so an update equals one process on the global batch whatever
    the micro-batch size and however tokens fall on ranks.
    """

    def __init__(
        self,
        model_name_or_path: str = "embedded",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        lr_decay: Literal["constant", "linear", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        gradient_clip: float = 1.0,
        num_generations: int = 8,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        beta: float = 0.0,
        kl_estimator: losses.KLEstimator = "k3",
        policy_loss: losses.PolicyLoss = "clip",
        importance_sampling_level: losses.ImportanceSamplingLevel = "token",
        delta: float | None = None,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        top_entropy_quantile: float = 1.0,
        entropy_coef: float = 0.0,
        loss_aggregation: losses.Aggregation = "token-mean",
        loss_scale_factor: float | None = None,
        advantage_norm: losses.AdvantageNorm = "std",
        reward: RewardFunction | list[Callable] | Callable | None = None,  # this order serializes in config.yaml
        reward_weights: list[float] | None = None,
        skip_special_tokens: bool = True,
        reward_errors: Literal["raise", "zero"] = "raise",
        reward_timeout_s: float | None = None,
        max_consecutive_skips: int = 10,
        trust_remote_code: bool = False,
        model_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None,
        lora: dict | None = None,
        length_buckets: int = 4,
        micro_batch_size: int | None = None,
        generation_batch_size: int | None = None,
        steps_per_generation: int = 1,
        num_iterations: int = 1,
        disable_dropout: bool = True,
        mask_truncated_completions: bool = False,
        dynamic_sampling: bool = False,
        max_resample_batches: int = 3,
        repetition_penalty: float = 1.0,
        min_p: float = 0.0,
        rollout_engine: Literal["hf", "vllm"] = "hf",
        vllm_gpu_memory_utilization: float = 0.3,
        vllm_kv_cache_memory_bytes: int | None = None,
        vllm_max_model_length: int | None = None,
        vllm_tensor_parallel_size: int = 1,
        vllm_enable_sleep_mode: bool = False,
        vllm_importance_sampling_correction: bool = False,
        vllm_importance_sampling_cap: float = 3.0,
        pass_at_k: list[int] | int | None = None,
        pass_at_k_samples: int | None = None,
    ):
        super().__init__()
        if isinstance(pass_at_k, int) and not isinstance(pass_at_k, bool):
            pass_at_k = [pass_at_k]  # pass_at_k=4: one k (saved in the hyper-parameters as [4])
        S.check(PolicyModule.__init__, locals(), RULES)
        _check_objective_reads(locals())
        if delta is not None and delta <= 1.0 + epsilon_high:
            raise ValueError(
                f"model.delta={delta} must exceed 1 + model.epsilon_high={1.0 + epsilon_high:g}: two-sided clipping "
                "caps the ratio above the clip range (TRL: delta > 1 + epsilon), else it cuts positive updates too"
            )
        if policy_loss == "cispo" and epsilon_high < 1.0:
            raise ValueError(
                f"model.policy_loss=cispo caps the importance weight at model.epsilon_high itself (TRL's convention), "
                f"and epsilon_high={epsilon_high:g} < 1 would scale every token's gradient down: set it to the cap, "
                "e.g. 5.0 (ScaleRL)"
            )
        if pass_at_k_samples is not None and pass_at_k is None:
            raise ValueError(
                f"model.pass_at_k_samples={pass_at_k_samples} is set but model.pass_at_k is null: name the k to "
                "log, e.g. --model.init_args.pass_at_k=[1,4,16]"
            )
        if pass_at_k and pass_at_k_samples is not None and max(pass_at_k) > pass_at_k_samples:
            raise ValueError(
                f"model.pass_at_k={list(pass_at_k)}: pass@{max(pass_at_k)} is undefined from "
                f"model.pass_at_k_samples={pass_at_k_samples} samples per problem (k <= n): raise "
                "pass_at_k_samples or drop the larger k"
            )
        if rollout_engine == "vllm" and not vllm_importable():
            from lit_align.vllm_engine import INSTALL

            raise ImportError(f"model.rollout_engine=vllm needs vLLM, which is not installed: {INSTALL}")
        self.save_hyperparameters(ignore=list(self.NOT_HPARAMS))
        self.hparams.pass_at_k = pass_at_k  # a subclass's frame holds the value as given (4, not [4])
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.reward = reward if reward is not None else ExactAnswerReward()
        self.rewards = RewardSet(self.reward, reward_weights)
        self.model = load_model(model_name_or_path, trust_remote_code, model_dtype).train()
        if lora:
            self.model = apply_lora(self.model, lora)
        if disable_dropout:  # after apply_lora: its lora_dropout too
            disable_dropout_in_model(self.model)
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        # The reference model is not a registered submodule: it is frozen and never checkpointed.
        # Under LoRA it is the policy with its adapters disabled: nothing to load.
        ref = load_model(model_name_or_path, trust_remote_code, model_dtype).eval() if beta > 0 and not lora else None
        if ref is not None:
            ref.requires_grad_(False)
            if disable_dropout:
                disable_dropout_in_model(ref)
        # the parts
        self.policy = Policy(self.model, self.tokenizer, ref)
        self.sampler = Sampler(self.policy, self.hparams)  # the parts read the module's settings as they are now
        self.rollout_buffer = RolloutBuffer(steps_per_generation, num_iterations)
        self.heldout = HeldOut(self.policy, self.sampler, self.rewards, self.hparams)
        # read by the callbacks: the last rollouts' texts and rewards, the last SFT token weights
        self.last_samples: dict | None = None
        self.last_token_weights: torch.Tensor | None = None
        self.skipped_steps = 0
        self.reward_errors = 0
        self._consecutive_skips = 0
        self._warned_all_truncated = False
        self._warned_nothing_kept = False  # dynamic sampling kept no group of a rollout batch: said once
        self._rng_to_restore: dict | None = None  # set by on_load_checkpoint, applied in on_train_start
        self.validated_at_step: int | None = None  # the policy update the latest val/* metrics were measured at

    # constructor arguments that are objects, not settings: kept out of hparams.yaml (a method adds its own)
    NOT_HPARAMS: tuple[str, ...] = ("optimizer", "reward")
    # the method's own train/* metrics (docs/reference/metrics.md) the end of a run prints beside val/accuracy
    # (lit_align.callbacks.fit_report); a name not logged in the run is left out
    HEADLINE_METRICS: tuple[str, ...] = ("train/reward_mean",)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in ("model", "tokenizer") and "policy" in self.__dict__:  # a swapped model: the parts follow
            setattr(self.policy, name, value)

    @property
    def ref_model(self):
        """The frozen reference (None at beta = 0 and under LoRA), the policy part's."""
        return self.policy.ref_model

    @ref_model.setter
    def ref_model(self, model) -> None:
        self.policy.ref_model = model

    @property
    def rl_settings(self) -> RLSettings:
        """The RL term's settings, as the module's are now."""
        return RLSettings.from_hparams(self.hparams)

    # ------------------------------------------------------------------ what a method states
    demonstrations_per_prompt = 0  # > 0: each prompt row carries this many of its demonstrations (LUFFY, HPT, ...)
    advantage_stats: losses.AdvantageStats = "all"  # a mixed group's statistics: all members, or on-policy ones

    def group_rollouts(self, prompts: dict) -> Rollout:
        """The rows of a rollout batch: G samples per prompt. A method may add members to the groups (a
        demonstration beside the samples: :func:`lit_align.core.groups.mix`) or sample from a prefix."""
        return self.sample(prompts)

    def loss(self, u: Update) -> Loss:
        """This update's loss as a weighted sum of terms built from ``u`` (see :mod:`lit_align.core.update`)."""
        raise NotImplementedError

    def after_update(self, u: Update, applied: bool) -> None:
        """Called after each policy update (``applied``: the optimizer stepped)."""

    # ------------------------------------------------------------------ the parts' view of the run
    @property
    def ranks(self) -> Ranks:
        """Reductions over the run's ranks (one process: the values themselves)."""
        import torch.distributed as dist

        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and not (dist.is_available() and dist.is_initialized()):
            world = 1
        return Ranks(world, self.device)

    @property
    def world(self) -> World:
        """What the parts need from the run: ranks, sharding, backward and the no-sync context."""
        return World(self.ranks, self.policy.sharded, self._backward, self._no_grad_sync)

    def _backward(self, loss: torch.Tensor) -> None:
        """``manual_backward`` under a trainer (precision plugins, the strategy's hooks); plain autograd
        outside one (a module driven by hand)."""
        if self._trainer is None:
            loss.backward()
        else:
            self.manual_backward(loss)

    def _no_grad_sync(self):
        """The context of a backward whose gradients must not be reduced over ranks yet."""
        if self.policy.sharded:
            return fsdp_no_sync(self.model)
        if self._trainer is not None and self.ranks.world > 1:
            return self.trainer.strategy.block_backward_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ set-up
    def configure_optimizers(self):
        opt = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        hp = self.hparams
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 0
        return lr_factor(step, hp.warmup_steps, total, hp.lr_decay, hp.min_lr_ratio)

    def setup(self, stage: str) -> None:
        from lit_align.strategies import check_strategy

        check_strategy(self.trainer.strategy)  # Lightning's FSDP1 cannot run manual optimization
        k = self.rollout_buffer.updates_per_batch
        datamodule = getattr(self.trainer, "datamodule", None)
        end = getattr(datamodule, "end_token_id", None)  # set by the data module's setup, which runs first
        if end is not None:  # rollouts stop where the demonstrations end (data.eos_token: a chat turn's end)
            self.policy.add_end_token(end)
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "check_demonstrations"):
            judge = functools.partial(self.heldout.judge_demonstrations, trainer_state=self.reward_state())
            datamodule.check_demonstrations(judge)  # data/demo_reward_rate
        if stage == "fit" and self.demonstrations_per_prompt:
            if not hasattr(datamodule, "pair_demonstrations"):
                raise ValueError(
                    f"{type(self).__name__} reads each prompt's demonstration: it needs lit_align.MixedDataModule "
                    f"(data.pair_by pairs prompts with demonstrations); got {type(datamodule).__name__}"
                )
            datamodule.pair_demonstrations(self.demonstrations_per_prompt)
        if stage == "fit" and self.hparams.dynamic_sampling and not hasattr(datamodule, "refill_prompts"):
            raise ValueError(
                "model.dynamic_sampling=true samples more prompts in place of the groups it drops: it needs a data "
                f"module with a refill stream (lit_align.MixedDataModule); got {type(datamodule).__name__}"
            )
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "batch_repeats"):
            datamodule.batch_repeats = k  # each training batch comes k times: one rollout batch, k updates
        elif stage == "fit" and k > 1:
            raise ValueError(
                f"model.steps_per_generation x model.num_iterations = {k} updates per rollout batch need a data "
                f"module that repeats each batch (lit_align.MixedDataModule); got {type(datamodule).__name__}"
            )

    def configure_model(self) -> None:
        """Under ``--trainer.strategy=fsdp2``: shard the policy, then the frozen reference, with FSDP2
        over the data-parallel mesh (one unit per decoder layer, then the root). A no-op otherwise."""
        if self.device_mesh is None or self.policy.sharded:
            return
        from lit_align.strategies import shard_model

        mesh = self.device_mesh["data_parallel"]
        shard_model(self.model, mesh, **getattr(self.trainer.strategy, "sharding_options", {}))
        if self.ref_model is not None:
            shard_model(self.ref_model.eval(), mesh)

    def on_fit_start(self) -> None:
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        trainer = self._trainer  # None: a module driven by hand, one process
        rank = (trainer.global_rank, trainer.local_rank) if trainer is not None and trainer.world_size > 1 else None
        self.sampler.start(self.world, rank)

    def on_fit_end(self) -> None:
        self.sampler.stop()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's weights as whole CPU tensors under Hugging Face names, LoRA adapters merged (a
        collective under sharding; only rank 0 gets the weights). HFExport and ``lit_align.export`` use it."""
        return self.policy.full_state_dict()

    # ------------------------------------------------------------------ rollouts
    def sample(
        self,
        prompts: dict,
        greedy: bool = False,
        num_generations: int | None = None,
        prefix_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
    ) -> Rollout:
        """G completions per prompt, optionally continuing a given prefix per row (see
        :meth:`lit_align.core.sampler.Sampler.sample`)."""
        return self.sampler.sample(prompts, self.world, greedy, num_generations, prefix_ids, prefix_mask)

    def score(
        self,
        prompts: list[str],
        rollout: Rollout,
        answers: list[str],
        columns: dict | None = None,
        prompt_messages: list | None = None,
    ) -> tuple[torch.Tensor, int]:
        """The weighted total reward (N,) of ``rollout``'s completions and the number of failed items."""
        scores = self.score_all(prompts, rollout, answers, columns, prompt_messages)
        return scores.total, scores.n_errors

    def score_all(
        self,
        prompts: list[str],
        rollout: Rollout,
        answers: list[str],
        columns: dict | None = None,
        prompt_messages: list | None = None,
    ) -> RewardScores:
        """Every reward function's scores of ``rollout``'s completions (:meth:`HeldOut.score`, the one place
        rewards are called with the run's error policy and time limit), TRL-style ones given
        :meth:`reward_state` as ``trainer_state`` and, for rows of conversational data, their prompt's messages
        (``prompt_messages``, one entry per completion, None for a text row) as TRL passes them."""
        return self.heldout.score(prompts, rollout, answers, columns, self.reward_state(), prompt_messages)

    def reward_state(self):
        """What TRL passes reward functions as ``trainer_state``: a ``transformers.TrainerState`` of this run.
        ``global_step``: policy updates done (AMFT's controller steps are not counted; TRL issue 3668: curricula
        by step); ``max_steps``: ``trainer.max_steps`` (else max_epochs x batches per epoch when known, else 0);
        ``epoch``: epochs done, fractional; ``num_train_epochs``; ``is_world_process_zero`` and
        ``is_local_process_zero``. A module without a trainer: a fresh state, step 0."""
        from transformers import TrainerState

        t = self._trainer
        if t is None:
            return TrainerState()
        per_epoch = t.num_training_batches if isinstance(t.num_training_batches, int) else 0
        epochs = t.max_epochs if t.max_epochs is not None and t.max_epochs > 0 else 0
        max_steps = t.max_steps if t.max_steps > 0 else epochs * per_epoch
        done = t.fit_loop.epoch_loop.batch_progress.current.completed  # training batches of this epoch
        return TrainerState(
            global_step=self.global_step,
            max_steps=max_steps,
            epoch=t.current_epoch + (done / per_epoch if per_epoch else 0.0),
            num_train_epochs=epochs,
            is_local_process_zero=t.local_rank == 0,
            is_world_process_zero=t.is_global_zero,
        )

    def reward_metrics(self, scores: RewardScores) -> dict:
        """``rewards/<name>/mean`` and ``/std`` per reward function, over the rows it applies to on every
        rank (TRL's names, over its gathered batch; NaN where it applies to none / to one; each rank returns the
        global values, so averaging them over ranks for the log keeps them); the values the functions gave
        ``log_metric``, averaged over the calls on all ranks (a collective: every rank scores at once), under
        :data:`REWARD_LOGGED`."""
        out, ranks = {}, self.ranks
        for k, name in enumerate(self.rewards.names):
            values = scores.per_function[:, k]
            mean, std = ranks.mean_std(values[~torch.isnan(values)])
            out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = mean, std
        if self.rewards.may_log:
            pooled = self.ranks.pooled_means(scores.logged)
            out[REWARD_LOGGED] = {name: torch.tensor(mean) for name, (mean, _) in pooled.items()}
        return out

    def rollout_and_score(self, batch: dict) -> tuple[Rollout, torch.Tensor, dict]:
        """The rollout batch's rows (:meth:`group_rollouts`: G samples per prompt) and their scores (no
        gradient); each row is scored against its own prompt's answer, columns and, for conversational data,
        messages (demonstration rows of a mixed group included)."""
        rollout = self.group_rollouts(batch)
        self._check_groups(rollout, len(batch["prompts"]))
        of = groups.group_ids(rollout, self.hparams.num_generations).tolist()  # each row's prompt
        prompts = [batch["prompts"][i] for i in of]
        answers = [batch["answers"][i] for i in of]
        columns = {k: [v[i] for i in of] for k, v in batch.get("columns", {}).items()}
        messages = batch.get("prompt_messages")
        messages = None if messages is None else [messages[i] for i in of]
        scores = self.score_all(prompts, rollout, answers, columns, messages)
        rewards = scores.total.to(self.device)
        self.reward_errors += scores.n_errors
        self.last_samples = {
            "prompts": prompts,
            "completions": rollout.completions,
            "rewards": rewards.tolist(),
            "extra": scores.extra,  # the columns reward functions gave TRL's log_extra
        }
        metrics = {
            "reward_errors": torch.tensor(float(self.reward_errors)),  # cumulative, like skipped_steps
            "completion_length": rollout.completion_mask.sum(-1).float().mean(),
            **self.sampler.metrics(rollout),
            **self.reward_metrics(scores),
        }
        return rollout, rewards, metrics

    def sample_round(self, batch: dict) -> dict:
        """One prompt batch sampled and scored (:meth:`rollout_and_score`) as a round of
        :mod:`lit_align.core.dynamic_sampling`: ``prompts`` (``batch``), ``rollout``, ``rewards`` (N,),
        ``metrics`` and ``rows``, the per-row values a method computes right after scoring (none here; HPT:
        its verdicts), which dynamic sampling keeps or drops with their rows."""
        rollout, rewards, metrics = self.rollout_and_score(batch)
        return {"prompts": batch, "rollout": rollout, "rewards": rewards, "metrics": metrics, "rows": {}}

    # ------------------------------------------------------------------ dynamic sampling (DAPO)
    def signal_groups(self, r: dict) -> torch.Tensor:
        """(B,) bool over round ``r``'s prompts: the groups dynamic sampling keeps, those whose rewards are not
        all equal (:func:`lit_align.core.dynamic_sampling.signal_groups`). A method whose other terms train
        on a group with equal rewards keeps it too (HPT: the prompts its gate routes to SFT)."""
        n = len(r["prompts"]["prompts"])
        return dynamic_sampling.signal_groups(
            r["rewards"], groups.group_ids(r["rollout"], self.hparams.num_generations), n
        )

    def refill_prompts(self) -> dict:
        """The next prompt batch of the data module's refill stream, on this module's device."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if not hasattr(datamodule, "refill_prompts"):
            raise ValueError(
                "model.dynamic_sampling=true draws more prompts from the data module's refill stream: it needs a "
                f"Trainer with lit_align.MixedDataModule; got {type(datamodule).__name__}"
            )
        return trainer.strategy.batch_to_device(datamodule.refill_prompts())

    def dynamic_round(self, first: dict) -> tuple[dict, dict]:
        """The round a rollout batch is made of, from ``first`` (:meth:`sample_round` of the training batch's
        prompts), and the dynamic sampling metrics; ``first`` and {} when ``dynamic_sampling`` is off.

        DAPO's dynamic sampling (arXiv 2503.14476, Algorithm 1 lines 6-7): the groups of :meth:`signal_groups`
        are kept; while this rank holds fewer than B (``first``'s prompts), another prompt batch from the
        refill stream is sampled and scored, at most ``max_resample_batches`` times. Every rank runs as many
        rounds, decided by one all-reduce (MAX of "still short") per round: sampling is a collective under
        FSDP2, and each rank's refill stream must stay at rank 0's position, which checkpoints record. A rank
        already full draws the round's batch too and, outside FSDP2, does not sample it. The first B groups
        kept, in sampling order, are the rollout batch (DAPO cuts the surplus likewise). Still short after the
        last round, the batch holds the groups kept; a rank whose kept rows are fewer than its
        ``steps_per_generation`` mini-batches need (none at all: no group kept) takes the first groups it
        dropped in addition (advantage 0: no gradient, their tokens count in the normaliser as without dynamic
        sampling), so that no rank's update runs on no rows.

        Metrics (the same on every rank): ``dynamic_sampling_dropped`` the share of the sampled groups dropped
        (over every round and rank), ``dynamic_sampling_batches`` the extra prompt batches drawn,
        ``dynamic_sampling_filled`` the share of the batch's groups filled with kept groups (1: full).
        """
        hp = self.hparams
        if not hp.dynamic_sampling:
            return first, {}
        G, B = hp.num_generations, len(first["prompts"]["prompts"])
        rounds = []  # (round, its kept groups, its dropped groups)

        def sort(r: dict) -> None:
            keep = self.signal_groups(r).cpu()
            every = torch.arange(len(keep))
            rounds.append((r, every[keep], every[~keep]))

        sort(first)
        extra = 0
        while extra < hp.max_resample_batches:
            short = sum(len(k) for _, k, _ in rounds) < B
            if self.ranks.maxes([float(short)])[0] == 0:
                break
            more = self.refill_prompts()
            extra += 1
            if short or self.world.synced_generation:
                sort(self.sample_round(more))
        parts, need = [], B  # (round, its groups taken)
        for r, keep, _ in rounds:
            if need > 0 and len(keep):
                parts.append((r, keep[:need]))
                need -= len(keep[:need])
        filled = B - need
        rows = sum(int(self._group_sizes(r)[g].sum()) for r, g in parts)
        for r, _, drop in rounds:
            sizes, fill = self._group_sizes(r), []
            for g in drop.tolist():
                if rows >= max(1, hp.steps_per_generation):
                    break
                fill.append(g)
                rows += int(sizes[g])
            if fill:
                parts.append((r, torch.tensor(fill)))
        if len(parts) == 1 and parts[0][0] is first and torch.equal(parts[0][1], torch.arange(B)):
            final = first  # nothing dropped: the batch as sampled
        else:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            final = dynamic_sampling.cat([dynamic_sampling.take(r, g, G) for r, g in parts], G, pad)
        dropped = sum(len(d) for _, _, d in rounds)
        sampled = sum(len(k) + len(d) for _, k, d in rounds)
        s = self.ranks.sums([float(dropped), float(sampled), float(filled), float(B)])
        if s[2] == 0 and not self._warned_nothing_kept:
            self._warned_nothing_kept = True
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"model.dynamic_sampling: every group of this rollout batch and of its {extra} refill batch(es) had "
                "equal rewards (train/dynamic_sampling_filled 0): the update trains on nothing (said once; the "
                "metric is logged every update). The reward gives no signal on this data yet: raise "
                "model.max_resample_batches, change the data or the reward, or warm the model up with SFT first."
            )
        return final, {
            "dynamic_sampling_dropped": torch.tensor(s[0] / s[1] if s[1] else 0.0),
            "dynamic_sampling_batches": torch.tensor(float(extra)),
            "dynamic_sampling_filled": torch.tensor(s[2] / s[3] if s[3] else 1.0),
        }

    def _group_sizes(self, r: dict) -> torch.Tensor:
        """(B,) rows of each group of round ``r``."""
        gid = groups.group_ids(r["rollout"], self.hparams.num_generations).cpu()
        return torch.bincount(gid, minlength=len(r["prompts"]["prompts"]))

    def _check_groups(self, rollout: Rollout, num_prompts: int) -> None:
        """Each row of ``group_rollouts``' result must belong to one of the batch's prompts: without
        ``group_ids`` the rows are G consecutive samples per prompt (B x G rows); with them, every id is a
        prompt index. Otherwise rows would be scored against another prompt's answer and grouped with
        another prompt's samples."""
        n, G, name = len(rollout.completions), self.hparams.num_generations, type(self).__name__
        if rollout.group_ids is None:
            if n != num_prompts * G:
                raise ValueError(
                    f"{name}.group_rollouts returned {n} rows for {num_prompts} prompts: without group_ids they must "
                    f"be model.num_generations={G} consecutive samples per prompt ({num_prompts * G} rows). A method "
                    "that samples another number per prompt or adds members gives each row its prompt index "
                    "(Rollout.group_ids, e.g. through lit_align.core.groups.mix)"
                )
            return
        ids = rollout.group_ids
        if ids.numel() != n or (n and (int(ids.min()) < 0 or int(ids.max()) >= num_prompts)):
            raise ValueError(
                f"{name}.group_rollouts returned {n} rows whose group_ids ({ids.numel()} of them, in "
                f"[{int(ids.min()) if ids.numel() else 0}, {int(ids.max()) if ids.numel() else 0}]) must be one prompt "
                f"index in [0, {num_prompts}) per row"
            )

    def rollout_batch(self, prompts: dict) -> dict:
        """Sample and score a rollout batch: the rollout, its rewards and group advantages, the reward
        mean over all ranks (what reward-driven mu schedules read), its metrics and the RL token mask
        (``mask_truncated_completions`` drops truncated completions from it); ``prompts``, the prompt batch
        the groups belong to (group ids index it), without the data set's other ``columns``; and the
        round's per-row values (:meth:`sample_round`'s ``rows``).

        Under ``dynamic_sampling`` (:meth:`dynamic_round`) the rows, advantages, mask and ``prompts`` are
        those of the groups kept, while the rollout statistics (``reward_mean`` and ``reward_std`` included,
        for the schedules too) stay those of the training batch's prompts as sampled, what the run logs
        without it: a binary reward's mean over groups kept for their spread says nothing of the policy's
        progress."""
        hp = self.hparams
        first = self.sample_round(prompts)
        shown = self.last_samples
        r, dynamic = self.dynamic_round(first)
        rollout, rewards = r["rollout"], r["rewards"]
        adv, stats = self.group_advantages(r)
        metrics = {**first["metrics"], **dynamic}
        if r is not first:
            self.last_samples = shown  # the callbacks show the training batch's samples
            stats = self.group_advantages(first)[1]
            metrics["reward_errors"] = torch.tensor(float(self.reward_errors))  # the refills' count too
        metrics.update(stats)
        truncated = self.sampler.truncated(first["rollout"])
        metrics["clipped_ratio"] = truncated.float().mean()
        if r is not first:
            truncated = self.sampler.truncated(rollout)
        mask = rollout.completion_mask
        if hp.mask_truncated_completions:
            mask = mask * (~truncated).long().unsqueeze(-1)
            if len(truncated) and bool(truncated.all()) and not self._warned_all_truncated:
                self._warned_all_truncated = True
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"every completion of this rollout batch reached model.max_new_tokens={hp.max_new_tokens} without "
                    "an end token, and model.mask_truncated_completions drops them all: the RL term has no tokens "
                    "this update (said once; train/clipped_ratio is the share truncated, every update). Raise "
                    "max_new_tokens, or set mask_truncated_completions false."
                )
        # the mean over all ranks: a reward-driven mu (and token weights) must be the same everywhere
        reward_mean = self.ranks.averages(first["rewards"].mean())[0]
        return {
            "rollout": rollout,
            "rewards": rewards,
            "advantages": adv,
            "mask": mask,
            "reward_mean": reward_mean,
            "metrics": metrics,
            # the data set's columns stay out: a checkpoint holds the batch, and they may be of any type
            "prompts": {k: v for k, v in r["prompts"].items() if k != "columns"},
            **r["rows"],
        }

    def group_advantages(self, r: dict) -> tuple[torch.Tensor, dict]:
        """Round ``r``'s advantages (N,) within each group and their statistics (``reward_mean``,
        ``reward_std``, ``frac_reward_zero_std``): groups of G samples, or mixed groups whose statistics
        cover every member or the on-policy ones (``advantage_stats``). Under ``advantage_norm: batch-std`` a
        collective (the global batch's std): every rank calls it alike."""
        hp, rollout = self.hparams, r["rollout"]
        batch_std = self.ranks.std  # advantage_norm batch-std: the global batch's std, every rank's rewards
        if rollout.group_ids is None and rollout.off_policy is None:  # groups of G samples
            return losses.group_advantages(r["rewards"], hp.num_generations, hp.advantage_norm, batch_std=batch_std)
        on = ~groups.off_policy(rollout)
        return losses.group_advantages_by_id(
            r["rewards"], rollout.group_ids, on, hp.advantage_norm, self.advantage_stats, batch_std=batch_std
        )

    # ------------------------------------------------------------------ one update
    def begin_update(self, batch: dict) -> Update:
        """The :class:`Update` of this training batch: its position in the rollout batch's cycle, this
        update's mini-batch of expert rows, and its rollout rows on demand (through the buffer)."""
        position = self.rollout_buffer.position(batch)
        rollouts = None
        if "prompts" in batch:

            def rollouts() -> dict:
                cycle = self.rollout_buffer.get(position, lambda: self.rollout_batch(batch["prompts"]))
                return self.rollout_buffer.rollout_rows(cycle, position)

        expert = self.rollout_buffer.expert_rows(batch["expert"], position) if "expert" in batch else None
        self.last_token_weights = None
        kept: list[torch.Tensor] = []

        def on_token_weights(w: torch.Tensor) -> None:
            kept.append(w)
            self.last_token_weights = torch.cat(kept)

        return Update(
            self.global_step,
            batch,
            expert,
            rollouts,
            self.policy,
            self.rl_settings,
            self.sampler.importance_weights,
            on_token_weights,
        )

    DATA_STREAMS = (("prompts", "prompt_data"), ("expert", "expert_data"))  # training batch key -> its data flag

    def accumulate_update(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """One update's gradients of the method's loss (accumulated in ``.grad``), its value and metrics."""
        u = self.begin_update(batch)
        return self.run_loss(self.loss(u), u)

    def run_loss(self, loss: Loss, u: Update) -> tuple[torch.Tensor, dict]:
        """Run ``loss``'s terms through the step engine; metrics: the rollout rows' (when sampled), the
        engine's, the method's (``u.metrics``), and ``entropy`` (usual tokens', else expert tokens')."""
        terms = loss.terms()
        if not terms and any(w != 0.0 for w, _ in (loss.parts if isinstance(loss, Loss) else [(1.0, loss)])):
            # every term the method weighted lacks its rows: the update would train nothing, silently
            absent = [f"{key} rows (data.{field} is null?)" for key, field in self.DATA_STREAMS if key not in u.batch]
            raise ValueError(
                f"{type(self).__name__}: update {u.step} has nothing to train on: each term of its loss needs rows "
                f"that the training batch lacks ({', '.join(absent) or 'keys: ' + ', '.join(sorted(u.batch))}). "
                "An RL term reads data.prompt_data, an SFT term data.expert_data."
            )
        value, m = self.run_terms(terms)
        metrics = {
            k: v if torch.is_tensor(v) or k == REWARD_LOGGED else torch.tensor(float(v)) for k, v in u.metrics.items()
        }
        metrics.update(m)
        metrics["entropy"] = m.get("entropy_usual", m.get("entropy_expert", torch.tensor(float("nan"))))
        return value, metrics

    def run_terms(self, terms: list[Term], grad: bool = True) -> tuple[torch.Tensor, dict]:
        """Accumulate one update's gradients over its ``terms`` (:func:`lit_align.core.engine.accumulate`:
        micro-batches of ``micro_batch_size`` rows, global normalisation, one gradient sync)."""
        w, hp = self.world, self.hparams
        buckets = 1 if w.sharded else hp.length_buckets  # FSDP2's forwards are collectives: one per micro-batch
        return accumulate(
            terms,
            hp.micro_batch_size,
            hp.loss_aggregation,
            w.backward,
            w.no_sync,
            w.ranks,
            grad=grad,
            length_buckets=buckets,
            aggregation_norm=self.aggregation_norm,
        )

    @property
    def aggregation_norm(self) -> float:
        """seq-mean-token-sum-norm's constant: ``loss_scale_factor``, else ``max_new_tokens``."""
        hp = self.hparams
        factor = hp.get("loss_scale_factor")
        return float(hp.max_new_tokens if factor is None else factor)

    def rl_term(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        weight: float = 1.0,
        mask: torch.Tensor | None = None,
        name: str = "rl",
        extra: Callable | None = None,
    ) -> Term:
        """The clipped GRPO surrogate over ``rollout`` with this module's settings and the sampler's
        importance weights (:func:`lit_align.core.terms.rl_term`)."""

        def is_weights(rows: torch.Tensor, width: int):
            return self.sampler.importance_weights(rollout, rows, width)

        return terms.rl_term(self.policy, rollout, advantages, self.rl_settings, weight, mask, name, extra, is_weights)

    def sft_term(self, expert: dict, weight: float = 1.0, token_weights=None, name: str = "sft") -> Term:
        """The (weighted) NLL of ``expert`` rows (:func:`lit_align.core.terms.sft_term`)."""
        return terms.sft_term(self.policy, expert, weight, token_weights, self.hparams.temperature, name)

    def rl_terms(self, rollout: Rollout, rewards: torch.Tensor, weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        """The RL term alone over ``rollout`` scored ``rewards`` (advantages within each group),
        weighted ``weight``: its gradient accumulated in ``.grad``, its value (detached) and metrics."""
        hp = self.hparams
        adv, metrics = losses.group_advantages(rewards, hp.num_generations, hp.advantage_norm, batch_std=self.ranks.std)
        loss, more = self.run_terms([self.rl_term(rollout, adv, weight)])
        return loss, {**metrics, **more}

    def sft_terms(self, expert: dict, weight: float = 1.0, token_weights=None) -> tuple[torch.Tensor, dict]:
        """The SFT term alone over ``expert`` rows, weighted ``weight``: gradient in ``.grad``, value, metrics."""
        return self.run_terms([self.sft_term(expert, weight, token_weights)])

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self.policy.zero_grad()
        u = self.begin_update(batch)
        loss, metrics = self.run_loss(self.loss(u), u)
        applied = self.policy_step(loss, metrics)
        self.after_update(u, applied)

    # ------------------------------------------------------------------ the step
    def policy_step(self, loss: torch.Tensor, metrics: dict) -> bool:
        """Clip the accumulated gradients, step the optimizer and the LR schedule; skip non-finite
        updates (on every rank or none). Returns True if the update was applied."""
        opts = self.optimizers()
        opt = opts[0] if isinstance(opts, list) else opts  # the policy's (AMFT adds a controller's)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.hparams.gradient_clip if self.hparams.gradient_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(loss.detach()).item() and torch.isfinite(grad_norm).item())
        finite = self.ranks.averages(float(finite))[0] == 1.0  # all ranks step, or none does
        if finite:
            opt.step()
            self.sampler.weights_changed()
            self.lr_schedulers().step()
            self._consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self._consecutive_skips += 1
        opt.zero_grad(set_to_none=True)
        metrics["loss"] = loss.detach()
        metrics["grad_norm"] = grad_norm.detach()
        metrics["skipped_steps"] = torch.tensor(float(self.skipped_steps))
        metrics["lr"] = torch.tensor(opt.param_groups[0]["lr"])
        self.log_metrics(metrics)
        if self._consecutive_skips >= self.hparams.max_consecutive_skips:
            raise NonFiniteError(
                f"{self._consecutive_skips} consecutive updates had a non-finite loss or gradient "
                f"(last loss {loss.item()}, grad norm {grad_norm.item()}); stopping. Lower the learning rate "
                f"or raise model.max_consecutive_skips."
            )
        return finite

    SUMMED_METRICS = ("reward_errors",)  # counts: summed over ranks; every other scalar is averaged

    def reduce_metrics(self, metrics: dict) -> dict:
        """One all-reduce for all of a step's scalars, so rank 0's logs describe the global batch: counts
        (``SUMMED_METRICS``) summed over ranks, the rest averaged."""
        ranks = self.ranks
        if ranks.world == 1:
            return metrics
        names = sorted(metrics)
        sums = ranks.sums([metrics[n] for n in names])
        return {
            n: torch.tensor(v if n in self.SUMMED_METRICS else v / ranks.world, dtype=torch.float32)
            for n, v in zip(names, sums)
        }

    def log_metrics(self, metrics: dict) -> None:
        """Log ``train/<name>`` for each scalar of the step, reduced over ranks (:meth:`reduce_metrics`); the
        values reward functions gave ``log_metric`` (``metrics[REWARD_LOGGED]``, already pooled over ranks) as
        ``train/<name>`` too, as TRL logs them, a name lit-align logs itself being an error."""
        metrics = dict(metrics)
        logged = metrics.pop(REWARD_LOGGED, None) or {}
        for name in logged:
            check_logged_name(name, f"train/{name}", {f"train/{k}" for k in metrics})
        metrics = self.reduce_metrics({**metrics, **logged})
        shown = {"loss", "reward_mean"}
        for name, value in metrics.items():
            value = value.detach().float().cpu() if torch.is_tensor(value) else float(value)
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name in shown, batch_size=1)

    # ------------------------------------------------------------------ held-out evaluation
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0, prefix: str = "val") -> None:
        """Greedy answers on held-out prompts (accuracy, reward), pass@k (``model.pass_at_k``), NLL of
        held-out demonstrations, or a retention set's accuracy (:class:`lit_align.core.heldout.HeldOut`)."""
        state = self.reward_state()
        for name, value, options in self.heldout.step(batch, prefix, self.world, self.device, state, batch_idx):
            self.log(name, value, on_epoch=True, add_dataloader_idx=False, **options)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx, prefix="test")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:  # the sanity check's metrics are discarded
            self.validated_at_step = self.global_step

    # ------------------------------------------------------------------ checkpoints: exact resume, finite weights
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lit_align_state"] = self._resume_state()  # collective under DDP/FSDP: first
        check_finite_checkpoint(self, checkpoint)

    def _resume_state(self) -> dict:
        """What a checkpoint needs beyond weights, optimizers and schedules for an exact resume: the
        counters and every rank's RNG states (torch, CUDA, Python, NumPy) and buffered rollout batch,
        gathered to rank 0."""
        rng = rng_state()
        rng["rollout_batch"] = self.rollout_buffer.state_dict()  # this rank's rollouts, inside a cycle
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
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        states = state["rng"]
        self._rng_to_restore = states[rank] if rank < len(states) else None  # another world size: fresh RNG
        self.rollout_buffer.load_state_dict(self._buffered_rollouts(states, rank, world, checkpoint))

    # the buffered rollout rows point into the training batch (HPT: each prompt's demonstration, by index),
    # which on another number of devices holds other rows: such a checkpoint inside a rollout batch resumes
    # only on its own device count
    rollouts_read_training_batch = False

    def _buffered_rollouts(self, states: list[dict], rank: int, world: int, checkpoint: dict) -> dict | None:
        """This rank's buffered rollout batch from a checkpoint's per-rank states, taken on ``len(states)``
        devices and resumed on ``world``. The same count: this rank's own. Inside a rollout batch (the next
        update is not its first: ``global_step`` not a multiple of the updates per rollout batch) on fewer
        devices: several ranks' batches merged (:func:`lit_align.core.buffer.merge_states`, contiguous ranks
        per device), so the remaining updates train on the global rows of the interrupted run. On more
        devices (a rank would have none) or for a method whose rows point into the training batch: a
        ValueError naming both device counts and what to do, before any update. At a rollout-batch
        boundary the buffer is refilled anyway: nothing is kept."""
        saved = len(states)
        if saved == world:
            return states[rank].get("rollout_batch")
        k, step = self.rollout_buffer.updates_per_batch, int(checkpoint.get("global_step", 0))
        batches = [s.get("rollout_batch") for s in states]
        if step % k == 0 or all(b is None for b in batches):
            return None
        if world > saved or self.rollouts_read_training_batch:
            path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            on = f"{saved} device{'s' * (saved > 1)}"
            why = (
                f"{type(self).__name__} reads each buffered prompt's demonstration from the training batch, which "
                f"holds other prompts on {world} device{'s' * (world > 1)}"
                if world < saved and self.rollouts_read_training_batch
                else f"the rollouts buffered on {on} cannot be split over {world} devices without leaving one none"
            )
            raise ValueError(
                f"{f'checkpoint {path}' if path else 'the checkpoint'} was taken on {on} inside a rollout batch "
                f"(global_step {step}: the next update is number {step % k + 1} of the {k} that share one, "
                f"model.steps_per_generation x model.num_iterations) and is resumed on {world} device{'s' * (world > 1)}: {why}. Resume on {on}, "
                f"or from a checkpoint whose global_step is a multiple of {k} (a rollout-batch boundary)."
            )
        from lit_align.core.buffer import merge_states

        mine = [batches[i] for i in torch.tensor_split(torch.arange(saved), world)[rank].tolist()]
        mine = [b for b in mine if b is not None]  # a rank with nothing buffered had no rows to keep
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        spg = self.rollout_buffer.steps_per_generation
        return merge_states(mine, spg, pad, self.SUMMED_METRICS) if mine else None

    def on_train_start(self) -> None:
        """Put back the RNG states of the checkpoint, as late as possible: after the sanity check and the
        data-loader set-up, right before the first resumed step, as in the uninterrupted run."""
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng is not None:
            set_rng_state(rng)


def rng_state() -> dict:
    """This process's RNG states: torch, CUDA (where initialised), Python, NumPy."""
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
    return rng


def set_rng_state(rng: dict) -> None:
    """Put back states from :func:`rng_state`."""
    import numpy as np

    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def check_finite_checkpoint(module: torch.nn.Module, checkpoint: dict) -> None:
    """Raise NonFiniteError, so nothing is written, if a weight or optimizer state is NaN/inf.

    Buffers are not checked: they may hold NaN on purpose (e.g. a "not yet set" marker).
    """
    buffers = {name for name, _ in module.named_buffers()}

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
            f"refusing to save a checkpoint at step {module.global_step}: {len(found)} tensors hold NaN or inf "
            f"(first: {', '.join(found[:3])}); the last checkpoint written is the last good one"
        )
