"""PolicyModule: what every method shares (loading, rollouts, the SFT and RL terms, the step).

A method only says how it mixes the two terms: ``mixing_weight`` returns mu in
L = (1 - mu) * L_RL + mu * L_SFT, and ``token_weights`` may reweight expert tokens.
Each term is normalised over its own tokens, so mu is a true convex weight.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from lit_align import losses
from lit_align.hf import load_model, load_tokenizer
from lit_align.rewards import ExactAnswerReward, RewardFunction, score_safely
from lit_align.rollout import Rollout, accepts_logits_to_keep, generate, length_groups, position_ids_from_mask


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


class PolicyModule(L.LightningModule):
    """Shared base of SFT, GRPO, CHORD and AMFT (manual optimization, one policy update per step).

    Args:
        model_name_or_path: Hugging Face checkpoint directory, hub id, or ``"embedded"``.
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
        reward: reward function (class path in YAML); exact final-answer match by default.
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
        length_buckets: a forward pass over rows of unequal length (rollouts, expert rows) runs as at
            most this many passes over groups of rows of similar length, each cut to its own longest
            row, so fewer padded positions are computed; logits at every attended position, the
            losses and their gradients are those of one pass (up to float rounding). 1: always one
            pass. Under FSDP2 always one pass, since every rank must run the same number of forwards.
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

    Scale-out (``--trainer.strategy=ddp`` / ``fsdp2``): rollouts are sampled on each rank from its
    own prompts, advantages are computed within each prompt's group (every group lives on one
    rank), scalars are averaged over ranks before logging, and mu, the finite-update decision and
    the reward mean seen by adaptive schedules are identical on all ranks. Both loss terms are
    token-means per rank, then gradients are averaged over ranks: equal to one process on the
    global batch when ranks hold equal token counts, otherwise a per-rank-weighted mean.
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
        reward: RewardFunction | None = None,
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
    ):
        super().__init__()
        self._validate(locals())
        self.save_hyperparameters(ignore=["optimizer", "reward", "controller", "mu_schedule"])
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.reward = reward if reward is not None else ExactAnswerReward()
        self.model = load_model(model_name_or_path, trust_remote_code, model_dtype).train()
        if lora:
            self.model = apply_lora(self.model, lora)
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        # The reference model is not a registered submodule: it is frozen and never checkpointed.
        # Under LoRA it is the policy with its adapters disabled (see _ref_logits): nothing to load.
        ref = load_model(model_name_or_path, trust_remote_code, model_dtype).eval() if beta > 0 and not lora else None
        if ref is not None:
            ref.requires_grad_(False)
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

    @staticmethod
    def _validate(args: dict) -> None:
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        timeout = args["reward_timeout_s"]
        checks = {  # name: (holds, what is allowed)
            "num_generations": (integer(args["num_generations"]) and args["num_generations"] >= 1, "an integer >= 1"),
            "max_new_tokens": (integer(args["max_new_tokens"]) and args["max_new_tokens"] >= 1, "an integer >= 1"),
            "temperature": (number(args["temperature"]) and args["temperature"] > 0, "a finite number > 0"),
            "top_p": (number(args["top_p"]) and 0 < args["top_p"] <= 1, "in (0, 1]"),
            "top_k": (integer(args["top_k"]) and args["top_k"] >= 0, "an integer >= 0 (0: off)"),
            "epsilon_low": (number(args["epsilon_low"]) and 0 <= args["epsilon_low"] < 1, "in [0, 1)"),
            "epsilon_high": (number(args["epsilon_high"]) and args["epsilon_high"] >= 0, "a finite number >= 0"),
            "beta": (number(args["beta"]) and args["beta"] >= 0, "a finite number >= 0"),
            "warmup_steps": (integer(args["warmup_steps"]) and args["warmup_steps"] >= 0, "an integer >= 0"),
            "gradient_clip": (number(args["gradient_clip"]) and args["gradient_clip"] >= 0, "a finite number >= 0 (0: off)"),
            "min_lr_ratio": (number(args["min_lr_ratio"]) and 0 <= args["min_lr_ratio"] <= 1, "in [0, 1]"),
            "max_consecutive_skips": (
                integer(args["max_consecutive_skips"]) and args["max_consecutive_skips"] >= 1, "an integer >= 1"
            ),
            "reward_timeout_s": (timeout is None or (number(timeout) and timeout > 0), "null or a finite number > 0"),
            "length_buckets": (integer(args["length_buckets"]) and args["length_buckets"] >= 1, "an integer >= 1"),
            "micro_batch_size": (args["micro_batch_size"] is None or (integer(args["micro_batch_size"]) and args["micro_batch_size"] >= 1),
                                 "null (the whole batch) or an integer >= 1"),
            "generation_batch_size": (args["generation_batch_size"] is None or (integer(args["generation_batch_size"])
                                      and args["generation_batch_size"] >= 1), "null (every row at once) or an integer >= 1"),
            "steps_per_generation": (integer(args["steps_per_generation"]) and args["steps_per_generation"] >= 1, "an integer >= 1"),
            "num_iterations": (integer(args["num_iterations"]) and args["num_iterations"] >= 1, "an integer >= 1"),
            "repetition_penalty": (number(args["repetition_penalty"]) and args["repetition_penalty"] > 0, "a finite number > 0 (1: off)"),
            "min_p": (number(args["min_p"]) and 0 <= args["min_p"] < 1, "in [0, 1) (0: off)"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"model.{name}={args[name]!r} is out of range: it must be {allowed}")
        if args["reward"] is not None and not callable(args["reward"]):
            raise ValueError(f"model.reward={args['reward']!r} must be a lit_align.rewards.RewardFunction (or a callable)")
        for name, allowed in (
            ("model_dtype", (None, "float32", "float16", "bfloat16", "float64")),
            ("loss_aggregation", losses.AGGREGATIONS),
            ("advantage_norm", losses.ADVANTAGE_NORMS),
            ("kl_estimator", losses.KL_ESTIMATORS),
            ("lr_decay", ("constant", "linear", "cosine")),
            ("reward_errors", ("raise", "zero")),
        ):
            if args[name] not in allowed:
                raise ValueError(f"model.{name}={args[name]!r}: choose one of {list(allowed)}")

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
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 0
        if hp.lr_decay == "constant" or total <= hp.warmup_steps:
            return 1.0
        frac = min(1.0, (step - hp.warmup_steps) / (total - hp.warmup_steps))
        shape = 1.0 - frac if hp.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return hp.min_lr_ratio + (1.0 - hp.min_lr_ratio) * shape

    def on_fit_start(self) -> None:
        if self.ref_model is not None:
            self.ref_model.to(self.device)

    # ------------------------------------------------------------------ forward helpers
    def _forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """The policy's logits (B, S, V); with ``start``, only those that predict tokens start + 1 .. S - 1
        (B, S - 1 - start, V), i.e. ``logits[:, start:-1]``, and the LM head runs only there when the
        model takes ``logits_to_keep`` (see :meth:`_by_length`)."""
        def forward(ids, mask, keep):
            positions = position_ids_from_mask(mask)
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **keep).logits

        return self._by_length(forward, input_ids, attention_mask, start, accepts_logits_to_keep(self.model))

    def _by_length(self, forward, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None,
                   keeps_logits: bool = False) -> torch.Tensor:
        """``forward(ids, mask, keep)`` -> logits, run over groups of rows of similar length
        (``length_buckets``), each cut to its longest row. The result is one tensor in the batch's row
        order, zero at the positions after a row's group width (never attended, so never read by a
        loss), and differentiable: its gradient reaches every group's forward.

        ``start`` None: the logits at every position (B, S, V); ``keep`` is ``{}``. ``start`` s: only the
        logits at positions s .. S - 2 (B, S - 1 - s, V), those that predict tokens s + 1 .. S - 1 (a
        completion's tokens, for s = prompt width - 1). With ``keeps_logits`` (the model's forward takes
        ``logits_to_keep``), a pass of width w gets ``keep = {"logits_to_keep": w - s}``, so the LM head
        and the logits exist only at positions s .. w - 1 (the last one, predicting past the row, is
        dropped); otherwise it computes every position and the rest are sliced off. Same values
        either way: the hidden states, and so the logits, do not depend on which positions are kept."""
        run = lambda ids, mask: self._kept_logits(forward, ids, mask, start, keeps_logits)  # noqa: E731
        groups = None if self._sharded() else length_groups(attention_mask, self.hparams.length_buckets)
        if groups is None:
            return run(input_ids, attention_mask)
        pieces = [(rows, run(input_ids[rows, :width], attention_mask[rows, :width])) for rows, width in groups]
        first = pieces[0][1]
        S = input_ids.shape[1] if start is None else input_ids.shape[1] - 1 - start
        logits = first.new_zeros(input_ids.shape[0], S, first.shape[-1])
        for rows, piece in pieces:
            logits[rows, : piece.shape[1]] = piece
        return logits

    @staticmethod
    def _kept_logits(forward, ids: torch.Tensor, mask: torch.Tensor, start: int | None, keeps_logits: bool) -> torch.Tensor:
        """One pass of ``forward(ids, mask, keep)``: every position's logits (``start`` None), or those
        at positions ``start`` .. S - 2, through ``logits_to_keep`` when the model takes it (``keeps_logits``)."""
        if start is None:
            return forward(ids, mask, {})
        if keeps_logits:  # (0 would mean every position to Hugging Face: at least 1)
            return forward(ids, mask, {"logits_to_keep": max(ids.shape[1] - start, 1)})[:, :-1]
        return forward(ids, mask, {})[:, start:-1]

    def sft_terms(self, expert: dict, reward_mean: float | None = None) -> tuple[torch.Tensor, dict]:
        """(Weighted) NLL of the demonstrations over expert tokens, plus what the monitors need."""
        logits = self._forward_logits(expert["input_ids"], expert["attention_mask"])[:, :-1]
        labels = expert["labels"][:, 1:]
        mask = labels != -100
        logp = losses.token_logprobs(logits, labels.clamp(min=0))
        weights = self.token_weights(logp.detach(), logits.detach(), reward_mean)
        loss, metrics = losses.masked_nll(logp, mask, weights, self.hparams.loss_aggregation)
        metrics["sft_loss"] = loss.detach()
        metrics["entropy_expert"] = losses.aggregate(losses.entropy_from_logits(logits.detach()), mask)
        if weights is not None:
            self.last_token_weights = weights[mask].detach()
            metrics["token_weight_mean"] = self.last_token_weights.mean()
        return loss, metrics

    def sample(self, prompts: dict, greedy: bool = False, num_generations: int | None = None) -> Rollout:
        hp = self.hparams
        return generate(
            self.model,
            self.tokenizer,
            prompts["prompt_ids"],
            prompts["prompt_mask"],
            num_generations=num_generations or hp.num_generations,
            max_new_tokens=hp.max_new_tokens,
            temperature=hp.temperature,
            top_p=hp.top_p,
            top_k=hp.top_k,
            greedy=greedy,
            synced_gpus=self._sync_generation(),
        )

    def _sync_generation(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1 and self._sharded()

    def _sharded(self) -> bool:
        """True once configure_model has sharded the policy with FSDP2 (``--trainer.strategy=fsdp2``)."""
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.model, FSDPModule)

    def score(self, prompts: list[str], rollout: Rollout, answers: list[str]) -> tuple[torch.Tensor, int]:
        hp = self.hparams
        return score_safely(self.reward, prompts, rollout.completions, answers, hp.reward_errors, hp.reward_timeout_s)

    def rollout_and_score(self, batch: dict) -> tuple[Rollout, torch.Tensor, dict]:
        """Sample G completions per prompt and score them (no gradient)."""
        G = self.hparams.num_generations
        rollout = self.sample(batch)
        prompts = [p for p in batch["prompts"] for _ in range(G)]
        answers = [a for a in batch["answers"] for _ in range(G)]
        rewards, n_errors = self.score(prompts, rollout, answers)
        rewards = rewards.to(self.device)
        self.reward_errors += n_errors
        self.last_samples = {"prompts": prompts, "completions": rollout.completions, "rewards": rewards.tolist()}
        metrics = {
            "reward_errors": torch.tensor(float(self.reward_errors)),  # cumulative, like skipped_steps
            "completion_length": rollout.completion_mask.sum(-1).float().mean(),
        }
        return rollout, rewards, metrics

    def rl_terms(self, rollout: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Clipped GRPO surrogate over the rollout's (usual) tokens."""
        hp = self.hparams
        adv, metrics = losses.group_advantages(rewards, hp.num_generations, hp.advantage_norm)
        P = rollout.prompt_ids.shape[1]
        # logits at the completion positions only: the LM head skips the prompt (logits_to_keep)
        logits = self._forward_logits(rollout.input_ids, rollout.attention_mask, start=P - 1)
        logp = losses.token_logprobs(logits, rollout.completion_ids, hp.temperature)
        ref_logp = None
        if hp.beta > 0:
            with torch.no_grad():
                ref_logits = self._ref_logits(rollout.input_ids, rollout.attention_mask, start=P - 1)
                ref_logp = losses.token_logprobs(ref_logits, rollout.completion_ids, hp.temperature)
        loss, more = losses.clipped_surrogate(
            logp, rollout.old_logp, adv, rollout.completion_mask, hp.epsilon_low, hp.epsilon_high,
            hp.loss_aggregation, ref_logp, hp.beta, hp.kl_estimator,
        )
        metrics.update(more)
        metrics["rl_loss"] = loss.detach()
        metrics["entropy_usual"] = losses.aggregate(
            losses.entropy_from_logits(logits.detach(), hp.temperature), rollout.completion_mask
        )
        return loss, metrics

    def mixed_loss(self, batch: dict, mu: float | None = None) -> tuple[torch.Tensor, dict]:
        """L = (1 - mu) * L_RL + mu * L_SFT; a term whose weight is 0 is not computed."""
        metrics: dict = {}
        rollout = rewards = None
        if mu is None and not self.mu_needs_reward:
            mu = self.mixing_weight(self.global_step)
        if "prompts" in batch and (mu is None or mu < 1.0):
            rollout, rewards, metrics = self.rollout_and_score(batch["prompts"])
        # the mean over all ranks: a reward-driven mu (and token weights) must be the same everywhere
        reward_mean = self._rank_average(rewards.mean()) if rewards is not None else None
        if mu is None:
            mu = self.mixing_weight(self.global_step, reward_mean)
        loss = torch.zeros((), device=self.device)
        if rollout is not None and mu < 1.0:
            rl, m = self.rl_terms(rollout, rewards)
            loss = loss + (1.0 - mu) * rl
            metrics.update(m)
        if "expert" in batch and mu > 0.0:
            sft, m = self.sft_terms(batch["expert"], reward_mean)
            loss = loss + mu * sft
            metrics.update(m)
        metrics["mu"] = torch.tensor(float(mu))
        metrics["entropy"] = metrics.get("entropy_usual", metrics.get("entropy_expert", torch.tensor(float("nan"))))
        return loss, metrics

    # ------------------------------------------------------------------ the step
    def policy_step(self, loss: torch.Tensor, metrics: dict, backward: Callable[[], None] | None = None) -> bool:
        """Backward, clip, step the optimizer and the LR schedule; skip non-finite updates.

        ``backward``, when given, fills the parameters' ``.grad`` in place of ``manual_backward(loss)``
        (AMFT's meta steps under FSDP2 back-propagate the two terms separately). Returns True if the
        update was applied.
        """
        opts = self.optimizers()
        opt = opts[0] if isinstance(opts, list) else opts  # the policy's (AMFT adds a controller's)
        opt.zero_grad(set_to_none=True)
        if backward is None:
            self.manual_backward(loss)
        else:
            backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.hparams.gradient_clip if self.hparams.gradient_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(loss.detach()).item() and torch.isfinite(grad_norm).item())
        finite = self._rank_average(float(finite)) == 1.0  # all ranks step, or none does
        if finite:
            opt.step()
            self.lr_schedulers().step()
            self._consecutive_skips = 0
        else:
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._consecutive_skips += 1
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lit_align_state"] = self._resume_state()  # collective under DDP/FSDP: first
        self.check_finite_checkpoint(checkpoint)

    def check_finite_checkpoint(self, checkpoint: dict) -> None:
        """Raise NonFiniteError, so nothing is written, if a weight or optimizer state is NaN/inf.

        Buffers are not checked: they may hold NaN on purpose (e.g. a "not yet set" marker).
        """
        buffers = {name for name, _ in self.named_buffers()}

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
                f"refusing to save a checkpoint at step {self.global_step}: {len(found)} tensors hold NaN or inf "
                f"(first: {', '.join(found[:3])}); the last checkpoint written is the last good one"
            )

    def log_metrics(self, metrics: dict) -> None:
        shown = {"loss", "reward_mean"}
        metrics = self._reduce_metrics(metrics)
        for name, value in metrics.items():
            value = value.detach().float().cpu() if torch.is_tensor(value) else float(value)
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name in shown, batch_size=1)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        loss, metrics = self.mixed_loss(batch)
        self.policy_step(loss, metrics)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int, prefix: str = "val") -> None:
        """Greedy answers on held-out prompts (accuracy, reward) and NLL of held-out demonstrations."""
        rollout = self.sample(batch, greedy=True, num_generations=1)
        rewards, _ = self.score(batch["prompts"], rollout, batch["answers"])
        hp = self.hparams  # a failing check counts as wrong (reward_errors=zero) or stops (raise)
        if getattr(type(self.reward), "correct", None) is RewardFunction.correct:
            correct = RewardFunction.is_full_reward(rewards)  # the default verdict: no second scoring pass
        else:
            correct, _ = score_safely(
                self.reward.correct, batch["prompts"], rollout.completions, batch["answers"], hp.reward_errors,
                hp.reward_timeout_s,
            )
        self.val_reward.update(rewards.to(self.device))
        self.val_accuracy.update(correct.float().to(self.device))
        if "expert" in batch:
            expert = batch["expert"]
            logits = self._forward_logits(expert["input_ids"], expert["attention_mask"])[:, :-1]
            labels = expert["labels"][:, 1:]
            mask = labels != -100
            logp = losses.token_logprobs(logits, labels.clamp(min=0))
            n = mask.sum()
            self.val_expert_nll.update(-(logp[mask]).mean(), weight=n)
            hits = (logits.argmax(-1) == labels)[mask].float()
            self.val_expert_token_acc.update(hits.mean(), weight=n)
            self.log(f"{prefix}/expert_nll", self.val_expert_nll, on_epoch=True, batch_size=int(n))
            self.log(f"{prefix}/expert_token_acc", self.val_expert_token_acc, on_epoch=True, batch_size=int(n))
            if "responses" in batch:
                self._split_expert_nll(batch, -(logp * mask).sum(1), mask.sum(1), prefix)
        bs = len(batch["prompts"])
        self.log(f"{prefix}/accuracy", self.val_accuracy, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log(f"{prefix}/reward", self.val_reward, on_epoch=True, batch_size=bs)

    def _split_expert_nll(self, batch: dict, nll: torch.Tensor, tokens: torch.Tensor, prefix: str) -> None:
        """``<prefix>/expert_nll_correct`` and ``_incorrect``: val/expert_nll over the held-out
        demonstrations the reward's correctness check accepts and over those it rejects (per-row summed
        ``nll`` and ``tokens``). A method that corrects a noisy expert raises the second; the first shows
        whether it still imitates the expert where the expert is right. Each demonstration is checked
        once per run, on first sight. Every rank updates both metrics every batch (weight 0 when it has
        no such rows), so the cross-rank sync cannot hang; a class absent from the whole validation set
        reads NaN."""
        hp, keys = self.hparams, list(zip(batch["prompts"], batch["responses"], batch["answers"]))
        new = [i for i, key in enumerate(keys) if key not in self._demo_verdicts]
        if new:  # a demonstration's verdict never changes: each one is checked once per run
            prompts, demos, answers = (list(column) for column in zip(*(keys[i] for i in new)))
            verdicts, _ = score_safely(self.reward.correct, prompts, demos, answers, hp.reward_errors, hp.reward_timeout_s)
            self._demo_verdicts.update((keys[i], bool(v)) for i, v in zip(new, verdicts.tolist()))
        ok = torch.tensor([self._demo_verdicts[key] for key in keys], device=self.device)
        for name, rows in (("correct", ok), ("incorrect", ~ok)):
            k = tokens[rows].sum()
            value = nll[rows].sum() / k if k > 0 else nll.new_zeros(())
            metric = self.val_expert_nll_split[name]
            metric.update(value, weight=k)
            self.log(f"{prefix}/expert_nll_{name}", metric, on_epoch=True, batch_size=max(int(k), 1))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx, prefix="test")

    # ------------------------------------------------------------------ scale-out: sharding, checkpoints, export
    def setup(self, stage: str) -> None:
        from lit_align.strategies import check_strategy

        check_strategy(self.trainer.strategy)  # Lightning's FSDP1 cannot run manual optimization

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

    def _ref_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """Logits of the frozen reference: the separate model, or under LoRA the adapter-free policy.
        ``start`` as in :meth:`_forward_logits`."""
        model = self.ref_model if self.ref_model is not None else self.model

        def forward(ids, mask, keep):
            kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
            if self.ref_model is not None:
                return self.ref_model(**kwargs, **keep).logits
            with self.model.disable_adapter():
                return self.model(**kwargs, **keep).logits

        return self._by_length(forward, input_ids, attention_mask, start, accepts_logits_to_keep(model))

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

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return self._trainer is not None and self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _rank_sums(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks, in float64, with one all-reduce (the values themselves
        in a single process)."""
        if not self._distributed():
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _rank_averages(self, *values) -> list[float]:
        """Means of scalars over all ranks (one all-reduce)."""
        world = self.trainer.world_size if self._distributed() else 1
        return [v / world for v in self._rank_sums(list(values))]

    def _rank_average(self, value) -> float:
        """Mean of a scalar over all ranks (the value itself in a single process)."""
        return self._rank_averages(value)[0]

    SUMMED_METRICS = ("reward_errors",)  # counts: summed over ranks; every other scalar is averaged

    def _reduce_metrics(self, metrics: dict) -> dict:
        """One all-reduce for all of a step's scalars, so rank 0's logs describe the global batch."""
        if not self._distributed():
            return metrics
        names = sorted(metrics)
        world = self.trainer.world_size
        sums = self._rank_sums([metrics[n] for n in names])
        return {n: torch.tensor(v if n in self.SUMMED_METRICS else v / world, dtype=torch.float32) for n, v in zip(names, sums)}

    def _resume_state(self) -> dict:
        """What a checkpoint needs beyond weights, optimizers and schedules for an exact resume: the
        counters and every rank's RNG states (torch, CUDA, Python, NumPy), gathered to rank 0."""
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        rng = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        states = [rng]
        if self._distributed():
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
        rank = self.trainer.global_rank if self._trainer is not None else 0
        states = state["rng"]
        self._rng_to_restore = states[rank] if rank < len(states) else None  # another world size: fresh RNG

    def on_train_start(self) -> None:
        """Put back the RNG states of the checkpoint, as late as possible: after the sanity check and
        the data-loader set-up, right before the first resumed step, as in the uninterrupted run."""
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng is None:
            return
        import numpy as np

        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        n = rng["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def apply_lora(model, lora: dict):
    """Wrap ``model`` with peft LoRA adapters (``lora``: LoraConfig arguments); the base is frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("model.lora needs peft: pip install 'lit-align[lora]' (or pip install peft)") from e
    try:
        config = LoraConfig(**{"task_type": "CAUSAL_LM", **dict(lora)})
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.lora={dict(lora)!r}: {e}") from e
    return get_peft_model(model, config)
