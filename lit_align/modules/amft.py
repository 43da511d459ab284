"""AMFTModule: SFT and RL mixed by a learned weight mu, trained by a look-ahead meta-gradient.

AMFT (arXiv 2508.06944). Policy update t, with W = warmup_sft_steps and K = meta_interval::

    t < W:  theta <- step on L_SFT                                   (mu = 1, no rollouts)
    t >= W: sample G completions per prompt and score them
            H  = mean entropy of the policy on the sampled (usual) tokens
            H* = H at the first RL step (t = W), kept in a buffer (checkpointed)
            mu = controller(sft loss, rl loss, H, last grad norm)
            theta <- step on (1 - mu) L_RL + mu L_SFT [+ entropy_coef * max(0, H* - H)]
            every K-th RL step (a meta step):
                theta' = theta - lr ((1 - mu) g_RL + mu g_SFT)        (g_* at theta; SGD look-ahead)
                dV/dmu = -lr <grad V(theta'), g_SFT - g_RL>           (same on every rank, below)
                (lookahead: optimizer: theta' = the Adam/AdamW step itself, dV/dmu its exact derivative)
                controller <- SGD step (lr = controller_lr) on dV/dmu   (mu moves to lower V)
            mu <- clip(mu + eta_H (H* - H))                            (controller.entropy_nudge)

V is a held-out loss (lower is better) on the batch's ``"meta"`` rows: ``expert_nll``, the NLL of
the held-out completions (the expert's demonstrations, or with ``data.meta_response_column: answer``
the verified reference answers), or ``reward``, minus the advantage-weighted log-likelihood of G
fresh samples of the held-out prompts (the policy-gradient surrogate of held-out reward).

Scale: every pass goes through the step engine (micro-batches of ``micro_batch_size`` rows, each term
normalised over the whole update on all ranks, one gradient reduction per pass). A meta step (or a
controller that reads this update's statistics, e.g. MetaNetwork) back-propagates L_SFT and L_RL one
after the other, keeps each gradient (global, reduced over ranks; local shards under FSDP2) and forms
``.grad`` = mu g_SFT + (1 - mu) g_RL; otherwise mu is known first and one pass runs both terms. V's
gradient at theta' is taken with theta' written into the parameters and the weights put back; the
inner products are summed over shards under FSDP2. So one meta step on N ranks equals one process on
the global batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.distributed as dist

from lit_align import losses
from lit_align.controller import MetaController, ScalarMu, adam_lookahead, hypergradient, lookahead
from lit_align.core import settings as S
from lit_align.core.engine import Term
from lit_align.core.terms import pg_term
from lit_align.modules.policy import PolicyModule


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (FSDP2), any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _pair_sums(g_sft: list, g_rl: list) -> list[float]:
    """[|g_SFT|^2, |g_RL|^2, <g_SFT, g_RL>] over this rank's (local) gradient tensors (one host sync)."""
    total = None
    for a, b in zip(g_sft, g_rl):
        ref = a if a is not None else b
        if ref is None:
            continue
        a = torch.zeros_like(ref, dtype=torch.float64) if a is None else a.double()
        b = torch.zeros_like(ref, dtype=torch.float64) if b is None else b.double()
        sums = torch.stack([(a * a).sum(), (b * b).sum(), (a * b).sum()])
        total = sums if total is None else total + sums
    return [0.0, 0.0, 0.0] if total is None else total.tolist()


RULES = {
    "controller_lr": S.number(0),
    "meta_interval": S.integer(0),
    "warmup_sft_steps": S.integer(0),
    "entropy_coef": S.number(0),
    "controller": S.Rule(
        lambda v: v is None or isinstance(v, MetaController), "a lit_align.controller.MetaController (or null)"
    ),
}


class AMFTModule(PolicyModule):
    """Adaptive meta fine-tuning: mu is learned so that each update lowers a held-out loss.

    Args:
        controller: the meta-controller of mu (class path in YAML): ``lit_align.controller.ScalarMu``
            (default: init 0.8, bounds 0.05/0.95) or ``lit_align.controller.MetaNetwork``. Its
            ``eta_entropy`` is the entropy step eta_H. Kept in float32 whatever the policy's precision.
        controller_lr: eta_mu, the learning rate of the controller's SGD optimizer.
        meta_objective: V, ``reward`` (held-out policy-gradient surrogate, the paper's) or
            ``expert_nll`` (NLL of the held-out rows' completions, the paper's code: the expert's
            demonstrations, or verified answers with ``data.meta_response_column``: where the answer
            is the only completion a prompt's reward accepts, its NLL is minus the log of that
            prompt's expected reward, computed without sampling). Needs ``data.meta_data``.
        meta_interval: K, RL updates between meta-gradient steps (0: no meta-gradient, an ablation).
        warmup_sft_steps: W, pure-SFT updates before the RL term and the controller start.
        entropy_coef: weight of ``max(0, H* - H)`` in the policy loss (0: off).
        lookahead: theta' for the meta-gradient. ``sgd`` (the papers' first-order formula):
            theta - lr grad L_total, dV/dmu = -lr <grad V(theta'), g_SFT - g_RL>. ``optimizer``: the
            step the policy's Adam / AdamW will actually take, with its moments, bias corrections and
            weight decay, and the exact derivative of that step in mu
            (:func:`lit_align.controller.adam_lookahead`); dV/dmu is then independent of the raw
            gradient scale, like the step itself.

    Plus every :class:`PolicyModule` argument; ``num_generations`` must be at least 2. The look-ahead
    (either kind) uses the policy optimizer's current lr and no gradient clipping, so dV/dmu scales
    with that lr: scale controller_lr with 1 / lr (a decaying lr also slows the controller). A meta step
    holds three extra parameter-sized tensors (g_SFT, g_RL, theta') and samples the meta prompts.

    Logged: ``train/mu``, ``train/entropy`` (H) and ``train/target_entropy`` (H*) every update;
    ``train/meta_grad`` (dV/dmu), ``train/val_objective`` (V(theta')) and, for the reward objective,
    ``train/meta_reward`` at meta steps (Lightning repeats the latest value until the next one).
    """

    NOT_HPARAMS = (*PolicyModule.NOT_HPARAMS, "controller")  # a module: checkpointed as weights
    HEADLINE_METRICS = ("train/mu", "train/reward_mean", "train/entropy")  # H: the controller's input

    def __init__(
        self,
        *args,
        controller: MetaController | None = None,
        controller_lr: float = 1.0,
        meta_objective: Literal["reward", "expert_nll"] = "reward",
        meta_interval: int = 20,
        warmup_sft_steps: int = 50,
        entropy_coef: float = 0.0,
        lookahead: Literal["sgd", "optimizer"] = "sgd",
        **kwargs,
    ):
        S.check(AMFTModule.__init__, locals(), RULES)
        super().__init__(*args, **kwargs)
        if self.hparams.num_generations < 2:
            raise ValueError(
                f"model.num_generations={self.hparams.num_generations}: AMFT's RL term needs at least 2 samples per "
                "prompt"
            )
        self.hparams.update(
            controller_lr=controller_lr,
            meta_objective=meta_objective,
            meta_interval=meta_interval,
            warmup_sft_steps=warmup_sft_steps,
            entropy_coef=entropy_coef,
            lookahead=lookahead,
        )
        self.controller = (controller if controller is not None else ScalarMu()).float()
        self.register_buffer("target_entropy", torch.tensor(float("nan")))  # H*, set at the first RL step
        # mu comes from the controller, never from the DDP-wrapped forward: DDP must not reduce its grads.
        self._ddp_params_and_buffers_to_ignore = [f"controller.{n}" for n, _ in self.controller.named_parameters()]
        self._stats: dict[str, float] = {}  # the controller's inputs at the last RL step
        self._last_grad_norm = 0.0
        self._captured: list[torch.Tensor] | None = None
        self._pair = [0.0, 0.0, 0.0]  # the last meta step's |g_SFT|^2, |g_RL|^2, <g_SFT, g_RL>

    # ------------------------------------------------------------------ set-up
    def configure_optimizers(self):
        policy = super().configure_optimizers()
        opt = policy["optimizer"]
        if self.hparams.lookahead == "optimizer":
            ok = isinstance(opt, torch.optim.Adam) and not any(g["amsgrad"] or g["maximize"] for g in opt.param_groups)
            if not ok:
                raise ValueError(
                    f"model.lookahead='optimizer' follows torch.optim.Adam / AdamW steps (without amsgrad or "
                    f"maximize); model.optimizer is {type(opt).__name__}: use model.lookahead='sgd'"
                )
        meta = torch.optim.SGD(self.controller.parameters(), lr=self.hparams.controller_lr)
        return [policy["optimizer"], meta], [policy["lr_scheduler"]]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # the data AMFT reads after its SFT warm-up: missing, it would stop only at the first RL / meta
        # step (update warmup_sft_steps + meta_interval - 1), after the warm-up's work; say it now
        hp, dm = self.hparams, getattr(self.trainer, "datamodule", None)
        data = getattr(dm, "hparams", None)
        if stage != "fit" or data is None or "meta_data" not in data:
            return
        needed = [("expert_data", True), ("prompt_data", True), ("meta_data", hp.meta_interval > 0)]
        missing = [f"data.{field}" for field, needs in needed if needs and not data.get(field)]
        if missing:
            raise ValueError(
                f"AMFTModule needs {' and '.join(missing)} (null here): after its {hp.warmup_sft_steps} SFT warm-up "
                f"updates it trains on demonstrations (expert_data) and prompts (prompt_data), and every "
                f"model.meta_interval={hp.meta_interval} RL updates its meta-gradient reads held-out rows (meta_data; "
                "meta_interval 0 switches it off)"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.ranks.world > 1:
            for p in self.controller.parameters():  # DDP ignores them, so it does not sync them either
                dist.broadcast(p.data, src=0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["amft_last_grad_norm"] = self._last_grad_norm  # a MetaNetwork input: exact resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._last_grad_norm = checkpoint.get("amft_last_grad_norm", 0.0)

    def _apply(self, fn, recurse=True):
        """Device moves reach the controller and H*, dtype casts (``bf16-true``, ``.half()``) do not."""
        modules, buffers = self._modules, self._buffers
        self._modules = {k: m for k, m in modules.items() if k != "controller"}
        self._buffers = {k: b for k, b in buffers.items() if k != "target_entropy"}
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules, self._buffers = modules, buffers
        move = lambda t: t.to(fn(t.new_empty(0)).device)  # noqa: E731
        if "controller" in modules:
            modules["controller"]._apply(move, recurse)
        if "target_entropy" in buffers:
            buffers["target_entropy"] = move(buffers["target_entropy"])
        return self

    def policy_step(self, loss: torch.Tensor, metrics: dict) -> bool:
        applied = super().policy_step(loss, metrics)
        self._last_grad_norm = float(metrics["grad_norm"])
        return applied

    # ------------------------------------------------------------------ mu
    def mixing_weight(self, step: int, mean_reward: float | None = None) -> float:
        return 1.0 if step < self.hparams.warmup_sft_steps else self.controller_mu(self._stats)

    def controller_mu(self, stats: dict) -> float:
        with torch.autocast(self.device.type, enabled=False):
            return self.controller.mu_value(stats)

    def controller_step(self, dV_dmu: float, stats: dict) -> None:
        """SGD on the controller along dV/dmu, through the raw torch optimizer: Lightning counts every
        LightningOptimizer.step() in global_step, which must count policy updates only."""
        opt = self.optimizers()[1].optimizer
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad(), torch.autocast(self.device.type, enabled=False):
            self.controller.apply_meta_gradient(dV_dmu, stats)
        opt.step()

    # ------------------------------------------------------------------ the two gradients
    def _take_grads(self) -> list[torch.Tensor | None]:
        """A copy of this rank's (local) gradients; ``.grad`` is then zeroed in place (FSDP2 keeps its
        sharded gradient objects), so the next pass accumulates from zero."""
        grads = []
        for p in self.policy.trainable()[1]:
            if p.grad is None:
                grads.append(None)
                continue
            grads.append(_local(p.grad).clone())
            _local(p.grad).zero_()
        return grads

    def _global_sums(self, values: list[float]) -> list[float]:
        """Sums of per-tensor reductions over what each rank holds: shards under FSDP2 (summed over
        ranks), whole replicated gradients otherwise (already global)."""
        return self.ranks.sums(values) if self.policy.sharded else [float(v) for v in values]

    def split_gradients(self, expert: dict, rollout, advantages: torch.Tensor, mask: torch.Tensor | None = None):
        """(L_SFT, L_RL, g_SFT, g_RL, metrics): each term's value and gradient on its own, through the step
        engine (micro-batches, global normalisation, gradients reduced over ranks once per term), so
        g_SFT and g_RL are the gradients of one process on the global batch (local shards under FSDP2).
        ``.grad`` is left at zero."""
        l_sft, m_sft = self.run_terms([self.sft_term(expert, 1.0)])
        g_sft = self._take_grads()
        l_rl, m_rl = self.run_terms([self.rl_term(rollout, advantages, 1.0, mask)])
        g_rl = self._take_grads()
        self._pair = self._global_sums(_pair_sums(g_sft, g_rl))
        return l_sft, l_rl, g_sft, g_rl, {**m_sft, **m_rl}

    def look_ahead(self, g_sft: list, g_rl: list, mu: float, lr: float) -> tuple[list, list, list]:
        """(theta', g_SFT, g_RL) for :func:`hypergradient` at ``lr``: the SGD look-ahead
        theta - lr ((1 - mu) g_RL + mu g_SFT), or (``lookahead: optimizer``) the Adam step with its
        mu-derivative folded into the two gradients (each scaled by its param group's lr / ``lr``).
        Over this rank's parameters (local shards under FSDP2), like the gradients."""
        params = [_local(p).detach() for p in self.policy.trainable()[1]]
        if self.hparams.lookahead == "sgd":
            return lookahead(params, g_sft, g_rl, mu, lr), g_sft, g_rl
        opt = self.optimizers()[0].optimizer
        theta_prime, eff_sft, eff_rl = [None] * len(params), [None] * len(params), [None] * len(params)
        index = {id(p): i for i, p in enumerate(self.policy.trainable()[1])}
        for group in opt.param_groups:
            members = [(index[id(p)], p) for p in group["params"] if id(p) in index]
            ids = [i for i, _ in members]
            states = [{k: _local(v) for k, v in opt.state.get(p, {}).items()} for _, p in members]
            th, es, er = adam_lookahead(
                [params[i] for i in ids],
                [g_sft[i] for i in ids],
                [g_rl[i] for i in ids],
                mu,
                group["lr"],
                states,
                tuple(group["betas"]),
                group["eps"],
                group["weight_decay"],
                group.get("decoupled_weight_decay", False),
            )
            scale = group["lr"] / lr if lr else 0.0
            for i, t, a, b in zip(ids, th, es, er):
                theta_prime[i] = t
                eff_sft[i] = None if a is None else a.mul_(scale)
                eff_rl[i] = None if b is None else b.mul_(scale)
        return theta_prime, eff_sft, eff_rl

    def gradient_pair(self) -> dict[str, float]:
        """What the meta step weighed at its last look-ahead: the norms of grad L_SFT and grad L_RL and
        their cosine (logged as ``train/meta_sft_grad_norm``, ``train/meta_rl_grad_norm``,
        ``train/meta_grad_cosine``). mu only trades the two off where their sizes are comparable."""
        ss, rr, sr = self._pair
        denom = math.sqrt(ss * rr)
        return {
            "meta_sft_grad_norm": math.sqrt(ss),
            "meta_rl_grad_norm": math.sqrt(rr),
            "meta_grad_cosine": sr / denom if denom > 0 else 0.0,
        }

    # ------------------------------------------------------------------ the held-out objective
    @torch.no_grad()
    def held_out_batch(self, meta: dict) -> dict:
        """What V needs from the meta rows: the demonstrations, or G scored samples of the prompts."""
        if self.hparams.meta_objective == "expert_nll":
            return {"expert": meta["expert"]}
        shown = self.last_samples
        rollout, rewards, _ = self.rollout_and_score(meta)
        self.last_samples = shown  # the sample monitor keeps showing training rollouts
        hp = self.hparams
        adv, m = losses.group_advantages(rewards, hp.num_generations, hp.advantage_norm, batch_std=self.ranks.std)
        return {"rollout": rollout, "advantages": adv, "reward": float(m["reward_mean"])}

    def val_term(self, held: dict) -> Term:
        """V as a :class:`Term`: the held-out NLL (plain, no token weights), or minus the
        advantage-weighted log-likelihood of the held-out samples (the policy-gradient surrogate)."""
        if "expert" in held:
            return self.sft_term(held["expert"], 1.0, name="val")
        return pg_term(self.policy, held["rollout"], held["advantages"], self.hparams.temperature)

    @torch.no_grad()
    def val_objective(self, held: dict) -> float:
        """V at the model's current weights (global over ranks)."""
        return float(self.run_terms([self.val_term(held)], grad=False)[0])

    def meta_gradient(self, theta_prime: list, g_sft: list, g_rl: list, lr: float, held: dict) -> tuple[float, float]:
        """(dV/dmu, V(theta')), the same on every rank: theta' is written into the parameters (this
        rank's shards), grad V is back-propagated through the step engine (reduced over ranks like a
        training gradient), dV/dmu = -lr <grad V(theta'), g_SFT - g_RL> over the global gradients (shards
        summed over ranks under FSDP2), and the weights are put back."""
        params = self.policy.trainable()[1]
        with torch.no_grad():
            saved = [_local(p).detach().clone() for p in params]
            for p, t in zip(params, theta_prime):
                _local(p).copy_(t)
        try:
            self.policy.zero_grad()
            V, _ = self.run_terms([self.val_term(held)])
            g_val = [None if p.grad is None else _local(p.grad) for p in params]
            local = -hypergradient(g_val, g_sft, g_rl, 1.0)  # <grad V, g_SFT - g_RL> over what this rank holds
        finally:
            with torch.no_grad():
                for p, t in zip(params, saved):
                    _local(p).copy_(t)
            self.policy.zero_grad()
        dot = self._global_sums([local])[0]
        return -lr * dot, float(V)

    @property
    def rl_settings(self):
        """The RL term's settings, without the constant entropy bonus: AMFT's ``entropy_coef`` is the paper's
        target-gated regulariser entropy_coef * max(0, H* - H) (:meth:`_entropy_term`), applied on its own."""
        return dataclasses.replace(super().rl_settings, entropy_coef=0.0)

    # ------------------------------------------------------------------ the step
    def _entropy_term(self, rollout, mask: torch.Tensor, H_star: float):
        """AMFT's entropy regulariser entropy_coef * max(0, H* - H) as a per-micro-batch ``extra`` of the
        RL term (None when off): H is the differentiable token-mean entropy of the policy on the usual
        tokens (over the whole update, all ranks); whether H < H* is read from the sampling-time entropy
        of the same rollouts (equal to the training forward's on an update's first pass)."""
        coef = self.hparams.entropy_coef
        if coef == 0 or not math.isfinite(H_star):
            return None
        ent_sum, tokens = self.ranks.sums([float((rollout.entropy * mask).sum()), float(mask.sum())])
        H_sampled = ent_sum / max(tokens, 1.0)
        if H_sampled >= H_star:
            return None
        scale = coef / max(tokens, 1.0)

        def extra(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            entropy = losses.entropy_from_logits(logits, self.hparams.temperature)
            return scale * (H_star * m.sum() - (entropy * m).sum())  # this micro-batch's share of coef (H* - H)

        return extra

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One policy update, in the order of the algorithm box (module docstring)."""
        hp, t = self.hparams, self.global_step
        self.policy.zero_grad()
        u = self.begin_update(batch)
        if t < hp.warmup_sft_steps:  # t < W: a step on L_SFT (mu = 1, no rollouts)
            u.metrics["mu"] = 1.0
            self.policy_step(*self.run_loss(u.sft(), u))
            return
        is_meta = hp.meta_interval > 0 and (t - hp.warmup_sft_steps + 1) % hp.meta_interval == 0
        for key, field in (("expert", "expert_data"), ("prompts", "prompt_data"), ("meta", "meta_data")):
            if key not in batch and (key != "meta" or is_meta):
                raise ValueError(f"AMFTModule needs batch key {key!r}: set data.{field}")
        rows = u.rollouts()  # sample G completions per prompt and score them
        rollout, adv, mask, expert = rows["rollout"], rows["advantages"], rows["mask"], u.expert
        extra = self._entropy_term(rollout, mask, float(self.target_entropy))  # entropy_coef max(0, H* - H)
        if is_meta or self.controller.uses_stats:  # g_SFT and g_RL on their own: the meta step needs them
            l_sft, l_rl, g_sft, g_rl, m = self.split_gradients(expert, rollout, adv, mask)
            stats = self._controller_inputs(l_sft, l_rl, m)
            mu = self.controller_mu(self._stats)  # mu = controller(sft loss, rl loss, H, grad norm)
            extra_value = 0.0
            if extra is not None:  # its own pass: .grad holds only the regulariser's gradient
                extra_value = float(self.run_terms([self.rl_term(rollout, adv, 0.0, mask, extra=extra)])[0])
            with torch.no_grad():  # .grad += mu g_SFT + (1 - mu) g_RL
                for p, gs, gr in zip(self.policy.trainable()[1], g_sft, g_rl):
                    if p.grad is not None:
                        if gs is not None:
                            _local(p.grad).add_(gs, alpha=mu)
                        if gr is not None:
                            _local(p.grad).add_(gr, alpha=1.0 - mu)
            loss = torch.tensor((1.0 - mu) * float(l_rl) + mu * float(l_sft) + extra_value)
        else:  # mu does not depend on this update's statistics: one pass over both terms
            mu = self.controller_mu(self._stats)
            loss, m = self.run_loss((1.0 - mu) * u.grpo(extra=extra) + mu * u.sft(), u)
            stats = self._controller_inputs(m["sft_loss"], m["rl_loss"], m)
        metrics = {**u.metrics, **m}
        H = stats["entropy"]
        if not torch.isfinite(self.target_entropy):
            self.target_entropy.fill_(H)  # H*: the usual-token entropy at the first RL step
        H_star = float(self.target_entropy)
        look = None
        if is_meta:  # theta' = theta - lr ((1 - mu) g_RL + mu g_SFT), before the step: Adam's state as it sees it
            lr = self.optimizers()[0].param_groups[0]["lr"]
            look = self.look_ahead(g_sft, g_rl, mu, lr)
        metrics.update(mu=torch.tensor(mu), entropy=torch.tensor(H), target_entropy=torch.tensor(H_star))
        applied = self.policy_step(loss, metrics)  # theta <- step on (1 - mu) L_RL + mu L_SFT [+ entropy term]
        if look is not None and applied:  # dV/dmu = -lr <grad V(theta'), g_SFT - g_RL>; SGD on the controller
            held = self.held_out_batch(batch["meta"])
            dV_dmu, V = self.meta_gradient(*look, lr, held)
            self.controller_step(dV_dmu, self._stats)
            reward = {"meta_reward": held["reward"]} if "reward" in held else {}
            self.log_metrics({"meta_grad": dV_dmu, "val_objective": V, **reward, **self.gradient_pair()})
        nudge = self.controller.eta_entropy * (H_star - H)
        if math.isfinite(nudge):  # mu <- clip(mu + eta_H (H* - H)): entropy below H* raises mu
            self.controller.entropy_nudge(nudge)
        self.controller.after_step()

    def _controller_inputs(self, l_sft, l_rl, metrics: dict) -> dict:
        """The controller's inputs from this update (global values, the same on every rank); kept as
        ``_stats`` when finite."""
        stats = {
            "sft_loss": float(l_sft),
            "rl_loss": float(l_rl),
            "entropy": float(metrics["entropy_usual"]),
            "grad_norm": self._last_grad_norm,
        }
        if all(math.isfinite(v) for v in stats.values()):
            self._stats = stats
        return stats
