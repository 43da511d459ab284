"""PolicyModule: what every method shares (loading, rollouts, the SFT and RL terms, the step).

A method only says how it mixes the two terms: ``mixing_weight`` returns mu in
L = (1 - mu) * L_RL + mu * L_SFT, and ``token_weights`` may reweight expert tokens.
Each term is normalised over its own tokens, so mu is a true convex weight.
"""
from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from lit_align import losses
from lit_align.hf import load_model, load_tokenizer
from lit_align.rewards import ExactAnswerReward, RewardFunction, score_safely
from lit_align.rollout import Rollout, generate, position_ids_from_mask


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
        reward_timeout_s: time limit of one reward call (None: no limit).
        max_consecutive_skips: stop after this many updates in a row skipped as non-finite.
        trust_remote_code: passed to from_pretrained; off unless you set it.
        model_dtype: load the weights in this torch dtype (e.g. bfloat16); None keeps the file's.
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
    ):
        super().__init__()
        self._validate(locals())
        self.save_hyperparameters(ignore=["optimizer", "reward"])
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.reward = reward if reward is not None else ExactAnswerReward()
        self.model = load_model(model_name_or_path, trust_remote_code, model_dtype).train()
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        # The reference model is not a registered submodule: it is frozen and never checkpointed.
        ref = load_model(model_name_or_path, trust_remote_code, model_dtype).eval() if beta > 0 else None
        if ref is not None:
            ref.requires_grad_(False)
        object.__setattr__(self, "ref_model", ref)
        self.val_accuracy, self.val_reward = MeanMetric(), MeanMetric()
        self.val_expert_nll, self.val_expert_token_acc = MeanMetric(), MeanMetric()
        self.last_samples: dict | None = None  # read by the sample-text callback
        self.last_token_weights: torch.Tensor | None = None  # read by the token-weight callback
        self.skipped_steps = 0
        self._consecutive_skips = 0

    @staticmethod
    def _validate(args: dict) -> None:
        checks = {
            "num_generations": args["num_generations"] >= 1,
            "max_new_tokens": args["max_new_tokens"] >= 1,
            "temperature": args["temperature"] > 0,
            "top_p": 0 < args["top_p"] <= 1,
            "top_k": args["top_k"] >= 0,
            "epsilon_low": 0 <= args["epsilon_low"] < 1,
            "epsilon_high": args["epsilon_high"] >= 0,
            "beta": args["beta"] >= 0,
            "warmup_steps": args["warmup_steps"] >= 0,
            "gradient_clip": args["gradient_clip"] >= 0,
            "min_lr_ratio": 0 <= args["min_lr_ratio"] <= 1,
            "max_consecutive_skips": args["max_consecutive_skips"] >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"model.{name}={args[name]!r} is out of range")
        for name, allowed in (
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
        opt = self.optimizer_factory(self.model.parameters())
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
    def _forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.logits

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
        return False

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
        self.last_samples = {"prompts": prompts, "completions": rollout.completions, "rewards": rewards.tolist()}
        metrics = {
            "reward_errors": torch.tensor(float(n_errors)),
            "completion_length": rollout.completion_mask.sum(-1).float().mean(),
        }
        return rollout, rewards, metrics

    def rl_terms(self, rollout: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Clipped GRPO surrogate over the rollout's (usual) tokens."""
        hp = self.hparams
        adv, metrics = losses.group_advantages(rewards, hp.num_generations, hp.advantage_norm)
        P = rollout.prompt_ids.shape[1]
        logits = self._forward_logits(rollout.input_ids, rollout.attention_mask)[:, P - 1 : -1]
        logp = losses.token_logprobs(logits, rollout.completion_ids, hp.temperature)
        ref_logp = None
        if hp.beta > 0:
            with torch.no_grad():
                ids, mask = rollout.input_ids, rollout.attention_mask
                ref_logits = self.ref_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
                ref_logp = losses.token_logprobs(ref_logits[:, P - 1 : -1], rollout.completion_ids, hp.temperature)
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
        reward_mean = rewards.mean().item() if rewards is not None else None
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
    def policy_step(self, loss: torch.Tensor, metrics: dict) -> bool:
        """Backward, clip, step the optimizer and the LR schedule; skip non-finite updates.

        Returns True if the update was applied.
        """
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.hparams.gradient_clip if self.hparams.gradient_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(loss.detach()).item() and torch.isfinite(grad_norm).item())
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

    def log_metrics(self, metrics: dict) -> None:
        shown = {"loss", "reward_mean"}
        for name, value in metrics.items():
            value = value.detach().float().cpu() if torch.is_tensor(value) else float(value)
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name in shown, batch_size=1)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        loss, metrics = self.mixed_loss(batch)
        self.policy_step(loss, metrics)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        rollout = self.sample(batch, greedy=True, num_generations=1)
        rewards, _ = self.score(batch["prompts"], rollout, batch["answers"])
        correct = self.reward.correct(batch["prompts"], rollout.completions, batch["answers"])
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
            self.log("val/expert_nll", self.val_expert_nll, on_epoch=True, batch_size=int(n))
            self.log("val/expert_token_acc", self.val_expert_token_acc, on_epoch=True, batch_size=int(n))
        bs = len(batch["prompts"])
        self.log("val/accuracy", self.val_accuracy, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("val/reward", self.val_reward, on_epoch=True, batch_size=bs)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)
