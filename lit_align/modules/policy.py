"""PolicyModule: what every method shares (loading, rollouts, the SFT and RL terms, the step).

A method only says how it mixes the two terms: ``mixing_weight`` returns mu in
L = (1 - mu) * L_RL + mu * L_SFT, and ``token_weights`` may reweight expert tokens.
Each term is normalised over its own tokens, so mu is a true convex weight.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from lit_align import losses
from lit_align.hf import apply_lora, disable_dropout_in_model, load_model, load_tokenizer
from lit_align.modules.cycles import RolloutCycles
from lit_align.modules.engine import Ranks, Term, TermOutput, accumulate, fsdp_no_sync
from lit_align.modules.heldout import HeldOut
from lit_align.modules.knobs import check_knobs
from lit_align.modules.logits import PolicyLogits
from lit_align.modules.resume import NonFiniteError, ResumeState
from lit_align.modules.rollout_engine import RolloutEngine
from lit_align.rewards import ExactAnswerReward, RewardFunction, RewardScores, RewardSet
from lit_align.rollout import (
    Rollout,
    _eos_ids,
    completion_id_lists,
    generate,
)
from lit_align.weighting import lr_factor

__all__ = ["NonFiniteError", "PolicyModule", "apply_lora"]


class PolicyModule(PolicyLogits, RolloutCycles, RolloutEngine, HeldOut, ResumeState, L.LightningModule):
    """Shared base of SFT, GRPO, CHORD and AMFT (manual optimization, one policy update per step).

    Args:
        model_name_or_path: Hugging Face checkpoint directory, hub id, ``"embedded"`` (the tiny model, freshly
            initialised) or ``"embedded-base"`` (the same, pre-trained on several skills; built on first use).
        optimizer: policy optimizer (class path + init args in YAML); AdamW by default.
        warmup_steps: linear learning-rate warm-up, in policy updates.
        lr_decay: ``constant``, ``linear`` or ``cosine`` decay to ``min_lr_ratio`` x lr at max_steps.
        gradient_clip: max global gradient norm (0 disables clipping; the norm is still logged).
        num_generations: G, completions sampled per prompt.
        max_new_tokens, temperature, top_p, top_k: sampling settings (top_k=0: off).
        epsilon_low, epsilon_high: PPO clip range [1 - eps_low, 1 + eps_high].
        beta: KL coefficient to a frozen reference (0: no reference model is loaded).
        kl_estimator: k1, k2 or k3.
        loss_aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum (both terms).
        advantage_norm: std (GRPO), none (Dr.GRPO) or batch-std.
        reward: a reward function or a list of them (class paths, or ``package.module.function`` paths
            in YAML); exact final-answer match by default. A lit-align ``RewardFunction`` (or a callable
            taking ``(prompts, completions, answers)`` and no ``**kwargs``) is called
            ``fn(prompts, completions, answers)``; any other callable as TRL calls reward functions,
            ``fn(prompts=..., completions=..., completion_ids=..., **columns)`` with the data set's
            other columns, returning a float or None (does not apply) per completion. See
            :class:`lit_align.rewards.RewardSet`. Logged per function: ``train/rewards/<name>/mean``
            and ``/std``; the weighted total is ``train/reward_mean``.
        reward_weights: one weight per reward function (TRL's name); None: all 1.0.
        skip_special_tokens: drop special tokens from the completion text the rewards see (TRL's
            behaviour, default). False keeps the special tokens the model sampled (an added
            ``<answer>`` token, ...) in the text; only the end token that stopped a completion is cut.
        reward_errors: ``raise`` stops at a failing reward call, naming prompt and completion;
            ``zero`` scores it 0 and counts it in ``train/reward_errors``.
            ``train/reward_errors`` is the run's cumulative count of failed reward items.
        reward_timeout_s: time limit of one reward call (None: no limit).
        max_consecutive_skips: stop after this many updates in a row skipped as non-finite
            (each skipped update counts in ``train/skipped_steps``). A checkpoint is never written
            while a weight or optimizer state is non-finite: the save raises NonFiniteError.
        trust_remote_code: passed to from_pretrained; off unless you set it.
        model_dtype: load the weights in this torch dtype (e.g. bfloat16); None keeps the file's.
        lora: train LoRA adapters (peft) instead of all weights: ``peft.LoraConfig`` arguments, e.g.
            ``{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj], lora_dropout: 0.0}``; null
            (default) trains every weight. With ``beta > 0`` the reference model is the policy with
            its adapters disabled, so no second model is loaded. Exports are merged full weights.
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

    Scale-out (``--trainer.strategy=ddp`` / ``fsdp2``): rollouts are sampled on each rank from its
    own prompts, advantages are computed within each prompt's group (every group lives on one
    rank), scalars are averaged over ranks before logging, and mu, the finite-update decision and
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
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean",
        advantage_norm: Literal["std", "none", "batch-std"] = "std",
        reward: RewardFunction | list[Callable] | Callable | None = None,  # this order serializes in config.yaml
        reward_weights: list[float] | None = None,
        skip_special_tokens: bool = True,
        reward_errors: Literal["raise", "zero"] = "raise",
        reward_timeout_s: float | None = None,
        max_consecutive_skips: int = 10,
        trust_remote_code: bool = False,
        model_dtype: str | None = None,
        lora: dict | None = None,
        length_buckets: int = 4,
        micro_batch_size: int | None = None,
        generation_batch_size: int | None = None,
        steps_per_generation: int = 1,
        num_iterations: int = 1,
        disable_dropout: bool = True,
        mask_truncated_completions: bool = False,
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
    ):
        super().__init__()
        check_knobs(locals())
        self.save_hyperparameters(ignore=["optimizer", "reward", "controller", "mu_schedule"])
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
        # Under LoRA it is the policy with its adapters disabled (see _ref_logits): nothing to load.
        ref = load_model(model_name_or_path, trust_remote_code, model_dtype).eval() if beta > 0 and not lora else None
        if ref is not None:
            ref.requires_grad_(False)
            if disable_dropout:
                disable_dropout_in_model(ref)
        object.__setattr__(self, "ref_model", ref)
        self.val_accuracy, self.val_reward = MeanMetric(), MeanMetric()
        self.val_expert_nll, self.val_expert_token_acc = MeanMetric(), MeanMetric()
        # val/expert_nll over the demonstrations the reward's correctness check accepts / rejects
        self.val_expert_nll_split = torch.nn.ModuleDict({"correct": MeanMetric(), "incorrect": MeanMetric()})
        self._demo_verdicts: dict[tuple[str, str, str], bool] = {}  # (prompt, demonstration, answer) -> correct
        self.last_samples: dict | None = None  # read by the sample-text callback
        self.last_token_weights: torch.Tensor | None = None  # read by the token-weight callback
        self.skipped_steps = 0
        self.reward_errors = 0
        self._consecutive_skips = 0
        self._rng_to_restore: dict | None = None  # set by on_load_checkpoint, applied in on_train_start
        self._cycle: dict | None = None  # the rollout batch of the current cycle (steps_per_generation ...)

    # ------------------------------------------------------------------ what a method decides
    def mixing_weight(self, step: int, mean_reward: float | None = None) -> float:
        """mu, the SFT weight of this step (1: pure imitation, 0: pure RL)."""
        raise NotImplementedError

    def token_weights(self, logp: torch.Tensor, logits: torch.Tensor, reward_mean: float | None) -> torch.Tensor | None:
        """Per-token weights of the SFT term (detached), or None for plain SFT."""
        return None

    @property
    def mu_needs_reward(self) -> bool:
        """True when mu depends on this step's rewards (then rollouts are always sampled)."""
        return False

    # ------------------------------------------------------------------ set-up
    def configure_optimizers(self):
        opt = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        hp = self.hparams
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 0
        return lr_factor(step, hp.warmup_steps, total, hp.lr_decay, hp.min_lr_ratio)

    def on_fit_start(self) -> None:
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        self.start_rollout_engine()

    def on_fit_end(self) -> None:
        self.stop_rollout_engine()

    @property
    def updates_per_rollout_batch(self) -> int:
        """Optimizer steps per rollout batch: steps_per_generation x num_iterations."""
        return self.hparams.steps_per_generation * self.hparams.num_iterations

    # ------------------------------------------------------------------ the loss terms
    @staticmethod
    def _expert_positions(expert: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input_ids, attention_mask, start) of expert rows cut to their longest row, with ``start`` the
        position before the first response token of any row: logits are needed from there on only."""
        mask = expert["attention_mask"]
        width = max(int(((mask != 0).cumsum(-1) * (mask != 0)).amax()), 2)  # right padding: longest row
        width = int(max(width, int((mask != 0).sum(-1).max())))
        labels = expert["labels"][:, 1:width]
        has = labels != -100
        first = int(torch.where(has.any(0))[0].min()) if bool(has.any()) else 0  # first label column (of labels[:, 1:])
        return expert["input_ids"][:, :width], mask[:, :width], first

    def _expert_logprobs(self, expert: dict, rows: torch.Tensor):
        """(logits, labels, tokens, logp) of expert rows ``rows``, at response positions only: logits
        (b, T, V) predicting ``labels`` (b, T), ``tokens`` the labels that count, ``logp`` their log-probs."""
        part = {k: v[rows] for k, v in expert.items() if torch.is_tensor(v)}
        ids, mask, start = self._expert_positions(part)
        logits = self._forward_logits(ids, mask, start=start)
        labels = part["labels"][:, start + 1 : ids.shape[1]]
        # the backward writes the logits' gradient over them (consume): metrics read them in the forward only
        return logits, labels, labels != -100, losses.token_logprobs(logits, labels.clamp(min=0), consume=True)

    def sft_term(
        self,
        expert: dict,
        weight: float,
        reward_mean: float | None = None,
        name: str = "sft",
        token_weights: bool = True,
    ) -> Term:
        """The (weighted) NLL of the demonstrations over expert tokens, as a :class:`Term`: per token
        w_t * (-log p_t), with w = :meth:`token_weights` (CHORD) or 1. Logged per token: expert_nll
        (unweighted), entropy_expert (at the sampling temperature, like entropy_usual) and
        token_weight_mean."""
        labels_all = expert["labels"][:, 1:]
        self.last_token_weights = None
        kept: list[torch.Tensor] = []

        def forward(rows: torch.Tensor) -> TermOutput:
            logits, labels, tokens, logp = self._expert_logprobs(expert, rows)
            weights = self.token_weights(logp.detach(), logits.detach(), reward_mean) if token_weights else None
            metrics = {
                "expert_nll": -logp.detach(),
                "entropy_expert": losses.entropy_from_logits(logits.detach(), self.hparams.temperature),
            }
            if weights is not None:
                metrics["token_weight_mean"] = weights
                kept.append(weights[tokens].detach())
                self.last_token_weights = torch.cat(kept)
            values = -logp if weights is None else -(weights * logp)
            return TermOutput(values, tokens, metrics)

        return Term(name, weight, labels_all != -100, forward)

    def rl_term(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        weight: float,
        mask: torch.Tensor | None = None,
        name: str = "rl",
        extra=None,
    ) -> Term:
        """The clipped GRPO surrogate over the rollout's (usual) tokens, as a :class:`Term` (per token
        -min(rho A, clip(rho) A) [+ beta KL]); logged per token: clip_ratio, kl (beta > 0), entropy_usual.
        ``mask`` (B, T): the tokens that count (default: the completion mask). ``extra(logits, mask)``:
        a scalar added to each micro-batch's loss, from its completion logits (AMFT's entropy term)."""
        hp = self.hparams
        mask = rollout.completion_mask if mask is None else mask
        P = rollout.prompt_ids.shape[1]

        def forward(rows: torch.Tensor) -> TermOutput:
            m = mask[rows]
            width = max(int((rollout.completion_mask[rows].sum(-1)).max()), 1)
            ids = torch.cat([rollout.prompt_ids[rows], rollout.completion_ids[rows, :width]], 1)
            att = torch.cat([rollout.prompt_mask[rows], rollout.completion_mask[rows, :width]], 1)
            completion = rollout.completion_ids[rows, :width]
            # logits at the completion positions only: the LM head skips the prompt (logits_to_keep)
            logits = self._forward_logits(ids, att, start=P - 1)
            # the backward writes the logits' gradient over them, unless extra's graph reads them too
            logp = losses.token_logprobs(logits, completion, hp.temperature, consume=extra is None)
            ref_logp = None
            if hp.beta > 0:
                with torch.no_grad():
                    ref_logp = losses.token_logprobs(
                        self._ref_logits(ids, att, start=P - 1), completion, hp.temperature
                    )
            is_weights = self.importance_weights(rollout, rows, width)
            values, metrics = losses.surrogate_per_token(
                logp,
                rollout.old_logp[rows, :width],
                advantages[rows],
                hp.epsilon_low,
                hp.epsilon_high,
                ref_logp,
                hp.beta,
                hp.kl_estimator,
                is_weights,
            )
            if is_weights is not None:
                metrics["importance_sampling_ratio"] = is_weights
            metrics["entropy_usual"] = losses.entropy_from_logits(logits.detach(), hp.temperature)
            more = None if extra is None else extra(logits, m[:, :width])
            return TermOutput(values, m[:, :width], metrics, more)

        return Term(name, weight, mask, forward)

    def rl_terms(self, rollout: Rollout, rewards: torch.Tensor, weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        """The RL term alone over ``rollout`` scored ``rewards`` (advantages within each group),
        weighted ``weight``: its gradient accumulated in ``.grad``, its value (detached) and metrics."""
        hp = self.hparams
        adv, metrics = losses.group_advantages(rewards, hp.num_generations, hp.advantage_norm)
        loss, more = self.run_terms([self.rl_term(rollout, adv, weight)])
        return loss, {**metrics, **more}

    def sft_terms(
        self, expert: dict, reward_mean: float | None = None, weight: float = 1.0
    ) -> tuple[torch.Tensor, dict]:
        """The SFT term alone over ``expert`` rows, weighted ``weight``: gradient in ``.grad``, value, metrics."""
        return self.run_terms([self.sft_term(expert, weight, reward_mean)])

    def run_terms(self, terms: list[Term], grad: bool = True) -> tuple[torch.Tensor, dict]:
        """Accumulate one update's gradients over its ``terms`` (:func:`lit_align.modules.engine.accumulate`:
        micro-batches of ``micro_batch_size`` rows, global normalisation, one gradient sync)."""
        return accumulate(
            terms,
            self.hparams.micro_batch_size,
            self.hparams.loss_aggregation,
            self._backward,
            self._no_grad_sync,
            self.ranks,
            grad=grad,
            length_buckets=self._length_buckets(),
        )

    def _length_buckets(self) -> int:
        """Forward passes per micro-batch by row length (``length_buckets``); 1 under FSDP2, whose
        forwards all-gather and so must be the same on every rank."""
        return 1 if self._sharded() else self.hparams.length_buckets

    def _backward(self, loss: torch.Tensor) -> None:
        """``manual_backward`` under a trainer (precision plugins, the strategy's hooks); plain
        autograd outside one (a module driven by hand)."""
        if self._trainer is None:
            loss.backward()
        else:
            self.manual_backward(loss)

    def _no_grad_sync(self):
        """The context of a backward whose gradients must not be reduced over ranks yet."""
        if self._sharded():
            return fsdp_no_sync(self.model)
        if self._trainer is not None and self.ranks.world > 1:
            return self.trainer.strategy.block_backward_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ rollouts
    def sample(self, prompts: dict, greedy: bool = False, num_generations: int | None = None) -> Rollout:
        """G completions per prompt with the module's sampling settings only (never the checkpoint's
        generation config), ``generation_batch_size`` rows at a time, synced over ranks under FSDP2; with
        ``rollout_engine=vllm`` while fit runs, by this rank's vLLM engine (:meth:`engine_sample`).
        The first call logs which sampler runs and which checkpoint fields were overridden."""
        hp = self.hparams
        sampling = dict(
            max_new_tokens=hp.max_new_tokens,
            temperature=hp.temperature,
            top_p=hp.top_p,
            top_k=hp.top_k,
            min_p=hp.min_p,
            repetition_penalty=hp.repetition_penalty,
        )
        if self.engine_can_sample(prompts):  # model.rollout_engine=vllm, while fit runs
            return self._logged(
                self.engine_sample(prompts, greedy, num_generations or hp.num_generations, sampling), sampling
            )
        return self._logged(
            generate(
                self.model,
                self.tokenizer,
                prompts["prompt_ids"],
                prompts["prompt_mask"],
                num_generations=num_generations or hp.num_generations,
                greedy=greedy,
                synced_gpus=self._sync_generation(),
                generation_batch_size=hp.generation_batch_size,
                skip_special_tokens=hp.skip_special_tokens,
                **sampling,
            ),
            sampling,
        )

    def _logged(self, rollout: Rollout, sampling: dict) -> Rollout:
        if not getattr(self, "_sampling_logged", False):  # once, at start-up
            self._sampling_logged = True
            from lightning.pytorch.utilities import rank_zero_info

            from lit_align.rollout import sampling_overrides, sampling_settings

            overridden = sampling_overrides(self.model, sampling_settings(self.model, self.tokenizer, **sampling))
            rank_zero_info(
                f"lit_align sampling: {rollout.sampler} sampler; "
                + (
                    "the checkpoint's generation config sets "
                    + ", ".join(f"{name}={old!r} (sampling with {new!r})" for name, (old, new) in overridden.items())
                    + ": overridden by model.* settings"
                    if overridden
                    else "no checkpoint sampling field overridden"
                )
            )
        return rollout

    def _sync_generation(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1 and self._sharded()

    def _sharded(self) -> bool:
        """True once configure_model has sharded the policy with FSDP2 (``--trainer.strategy=fsdp2``)."""
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.model, FSDPModule)

    def score(
        self, prompts: list[str], rollout: Rollout, answers: list[str], columns: dict | None = None
    ) -> tuple[torch.Tensor, int]:
        """The weighted total reward (N,) of ``rollout``'s completions and the number of failed items."""
        scores = self.score_all(prompts, rollout, answers, columns)
        return scores.total, scores.n_errors

    def score_all(
        self, prompts: list[str], rollout: Rollout, answers: list[str], columns: dict | None = None
    ) -> RewardScores:
        """Every reward function's scores of ``rollout``'s completions (see :class:`RewardSet`);
        ``columns``: the data set's other columns, one value per completion."""
        hp = self.hparams
        return self.rewards.score(
            prompts,
            rollout.completions,
            answers,
            completion_id_lists(rollout),
            columns,
            hp.reward_errors,
            hp.reward_timeout_s,
        )

    def reward_metrics(self, scores: RewardScores) -> dict:
        """``rewards/<name>/mean`` and ``/std`` per reward function, over the rows it applies to (TRL's
        names; NaN where it applies to none / to one)."""
        out = {}
        for k, name in enumerate(self.rewards.names):
            values = scores.per_function[:, k]
            values = values[~torch.isnan(values)]
            out[f"rewards/{name}/mean"] = values.mean() if values.numel() else torch.tensor(math.nan)
            out[f"rewards/{name}/std"] = values.std() if values.numel() > 1 else torch.tensor(math.nan)
        return out

    def truncated(self, rollout: Rollout) -> torch.Tensor:
        """(B,) True for completions that reached max_new_tokens without an end token."""
        lengths = rollout.completion_mask.sum(-1)
        full = lengths >= self.hparams.max_new_tokens
        eos = _eos_ids(self.model, self.tokenizer)
        if not eos or rollout.completion_ids.shape[1] == 0:
            return full
        last = rollout.completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        return full & ~torch.isin(last, torch.as_tensor(eos, device=last.device))

    def rollout_and_score(self, batch: dict) -> tuple[Rollout, torch.Tensor, dict]:
        """Sample G completions per prompt and score them (no gradient)."""
        G = self.hparams.num_generations
        rollout = self.sample(batch)
        prompts = [p for p in batch["prompts"] for _ in range(G)]
        answers = [a for a in batch["answers"] for _ in range(G)]
        columns = {k: [x for x in v for _ in range(G)] for k, v in batch.get("columns", {}).items()}
        scores = self.score_all(prompts, rollout, answers, columns)
        rewards = scores.total.to(self.device)
        self.reward_errors += scores.n_errors
        self.last_samples = {"prompts": prompts, "completions": rollout.completions, "rewards": rewards.tolist()}
        metrics = {
            "reward_errors": torch.tensor(float(self.reward_errors)),  # cumulative, like skipped_steps
            "completion_length": rollout.completion_mask.sum(-1).float().mean(),
            **self.sampler_metrics(rollout),
            **self.reward_metrics(scores),
        }
        return rollout, rewards, metrics

    def rollout_batch(self, prompts: dict) -> dict:
        """Sample and score a rollout batch: the rollout, its rewards and group advantages, the reward
        mean over all ranks (what reward-driven mu schedules read), its metrics and the RL token mask
        (``mask_truncated_completions`` drops truncated completions from it)."""
        hp = self.hparams
        rollout, rewards, metrics = self.rollout_and_score(prompts)
        adv, more = losses.group_advantages(rewards, hp.num_generations, hp.advantage_norm)
        metrics.update(more)
        truncated = self.truncated(rollout)
        metrics["clipped_ratio"] = truncated.float().mean()
        mask = rollout.completion_mask
        if hp.mask_truncated_completions:
            mask = mask * (~truncated).long().unsqueeze(-1)
            if len(truncated) and bool(truncated.all()) and not getattr(self, "_warned_all_truncated", False):
                self._warned_all_truncated = True
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"every completion of this rollout batch reached model.max_new_tokens={hp.max_new_tokens} without "
                    "an end token, and model.mask_truncated_completions drops them all: the RL term has no tokens "
                    "this update (said once; train/clipped_ratio is the share truncated, every update). Raise "
                    "max_new_tokens, or set mask_truncated_completions false."
                )
        # the mean over all ranks: a reward-driven mu (and token weights) must be the same everywhere
        reward_mean = self.ranks.averages(rewards.mean())[0]
        return {
            "rollout": rollout,
            "rewards": rewards,
            "advantages": adv,
            "mask": mask,
            "reward_mean": reward_mean,
            "metrics": metrics,
        }

    # ------------------------------------------------------------------ rollout batches and their updates
    def mixed_loss(self, batch: dict, mu: float | None = None) -> tuple[torch.Tensor, dict]:
        """One update's gradients of L = (1 - mu) * L_RL + mu * L_SFT (accumulated in ``.grad``), and its
        loss and metrics; a term whose weight is 0 is not computed. With steps_per_generation > 1 the
        rollouts and expert rows are this update's mini-batch of the rollout batch."""
        position = self.cycle_position(batch)
        if position == 0:
            self._cycle = None
        metrics: dict = {}
        if mu is None and not self.mu_needs_reward:
            mu = self.mixing_weight(self.global_step)
        cycle = None
        if "prompts" in batch and (mu is None or mu < 1.0):
            cycle = self.rollouts_for(batch["prompts"], position)
            metrics.update(cycle["metrics"])
        reward_mean = cycle["reward_mean"] if cycle is not None else None
        if mu is None:
            mu = self.mixing_weight(self.global_step, reward_mean)
        terms = []
        if cycle is not None and mu < 1.0:
            rollout, adv, mask = self._rl_rows(cycle, position)
            terms.append(self.rl_term(rollout, adv, 1.0 - mu, mask))
        if "expert" in batch and mu > 0.0:
            terms.append(self.sft_term(self._expert_rows(batch["expert"], position), mu, reward_mean))
        loss, m = self.run_terms(terms)
        metrics.update(m)
        metrics["mu"] = torch.tensor(float(mu))
        metrics["entropy"] = metrics.get("entropy_usual", metrics.get("entropy_expert", torch.tensor(float("nan"))))
        return loss, metrics

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
            self.weights_changed()
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

    def zero_policy_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def log_metrics(self, metrics: dict) -> None:
        shown = {"loss", "reward_mean"}
        metrics = self._reduce_metrics(metrics)
        for name, value in metrics.items():
            value = value.detach().float().cpu() if torch.is_tensor(value) else float(value)
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name in shown, batch_size=1)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self.zero_policy_grad()
        loss, metrics = self.mixed_loss(batch)
        self.policy_step(loss, metrics)

    # ------------------------------------------------------------------ scale-out: sharding, checkpoints, export
    def setup(self, stage: str) -> None:
        from lit_align.strategies import check_strategy

        check_strategy(self.trainer.strategy)  # Lightning's FSDP1 cannot run manual optimization
        k = self.updates_per_rollout_batch
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "check_demonstrations"):
            datamodule.check_demonstrations(self.judge_demonstrations)  # data/demo_reward_rate, a loud warning if low
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
        if self.device_mesh is None or self._sharded():
            return
        from lit_align.strategies import shard_model

        mesh = self.device_mesh["data_parallel"]
        shard_model(self.model, mesh, **getattr(self.trainer.strategy, "sharding_options", {}))
        if self.ref_model is not None:
            shard_model(self.ref_model.eval(), mesh)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's weights as whole CPU tensors under Hugging Face names, LoRA adapters merged.

        Under sharding this is a collective (every rank must call it) and only rank 0 gets the
        weights (the other ranks get an empty dict). HFExport and ``lit_align.export`` use it.
        """
        if self._sharded():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if state and hasattr(self.model, "peft_config"):
            from lit_align.export import merge_lora

            state = merge_lora(self.model, state)
        return state

    @property
    def ranks(self) -> Ranks:
        """Reductions over the run's ranks (one process: the values themselves)."""
        import torch.distributed as dist

        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and not (dist.is_available() and dist.is_initialized()):
            world = 1
        return Ranks(world, self.device)

    SUMMED_METRICS = ("reward_errors",)  # counts: summed over ranks; every other scalar is averaged

    def _reduce_metrics(self, metrics: dict) -> dict:
        """One all-reduce for all of a step's scalars, so rank 0's logs describe the global batch."""
        ranks = self.ranks
        if ranks.world == 1:
            return metrics
        names = sorted(metrics)
        sums = ranks.sums([metrics[n] for n in names])
        return {
            n: torch.tensor(v if n in self.SUMMED_METRICS else v / ranks.world, dtype=torch.float32)
            for n, v in zip(names, sums)
        }
