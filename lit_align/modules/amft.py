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

Distributed: under DDP each rank forms dV/dmu from its own gradients (autograd.grad, no gradient
communication) and the scalar is averaged over ranks. Under FSDP2 gradients exist only as shards of
the rank-averaged gradient, after a backward: the meta step back-propagates L_SFT and L_RL one
after the other, builds theta' shard by shard, writes it into the parameters for V's backward and
puts the weights back; the shards' inner products are summed over ranks (:meth:`split_backward`,
:meth:`sharded_meta_gradient`).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist

from lit_align import losses
from lit_align.controller import MetaController, ScalarMu, adam_lookahead, hypergradient, lookahead
from lit_align.modules.policy import PolicyModule
from lit_align.rollout import accepts_logits_to_keep, position_ids_from_mask


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
        super().__init__(*args, **kwargs)
        checks = {
            "controller_lr": (controller_lr, math.isfinite(controller_lr) and controller_lr >= 0),
            "meta_interval": (meta_interval, meta_interval >= 0),
            "warmup_sft_steps": (warmup_sft_steps, warmup_sft_steps >= 0),
            "entropy_coef": (entropy_coef, math.isfinite(entropy_coef) and entropy_coef >= 0),
            "num_generations": (self.hparams.num_generations, self.hparams.num_generations >= 2),
        }
        for name, (value, ok) in checks.items():
            if not ok:
                raise ValueError(f"model.{name}={value!r} is out of range")
        if meta_objective not in ("reward", "expert_nll"):
            raise ValueError(f"model.meta_objective={meta_objective!r}: choose one of ['reward', 'expert_nll']")
        if lookahead not in ("sgd", "optimizer"):
            raise ValueError(f"model.lookahead={lookahead!r}: choose one of ['sgd', 'optimizer']")
        if controller is not None and not isinstance(controller, MetaController):
            raise ValueError(f"model.controller must be a lit_align.controller.MetaController, got {type(controller)}")
        self.hparams.update(
            controller_lr=controller_lr, meta_objective=meta_objective, meta_interval=meta_interval,
            warmup_sft_steps=warmup_sft_steps, entropy_coef=entropy_coef, lookahead=lookahead,
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

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self._distributed():
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

    def policy_step(self, loss: torch.Tensor, metrics: dict, backward=None) -> bool:
        applied = super().policy_step(loss, metrics, backward)
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

    # ------------------------------------------------------------------ the meta-gradient
    def _trainable(self) -> tuple[list[str], list[torch.Tensor]]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]

    def look_ahead(self, l_sft: torch.Tensor, l_rl: torch.Tensor, mu: float, lr: float) -> tuple[list, list, list]:
        """(theta', g_SFT, g_RL): the two gradients at theta, each on its own, and the look-ahead
        (:meth:`step_ahead`). The graph is kept for the policy step.

        torch.autograd.grad on self.model's parameters, not manual_backward: Lightning arms DDP's
        gradient all-reduce only inside manual_backward, so these stay local to this rank, cost no
        communication and leave DDP's reducer alone. The scalar dV/dmu is averaged over ranks instead.
        """
        params = self._trainable()[1]
        g_sft = list(torch.autograd.grad(l_sft, params, retain_graph=True, allow_unused=True))
        g_rl = list(torch.autograd.grad(l_rl, params, retain_graph=True, allow_unused=True))
        self._pair = self._rank_averages(*_pair_sums(g_sft, g_rl))  # rank-local gradients: averaged
        return self.step_ahead(params, g_sft, g_rl, mu, lr)

    def step_ahead(self, params: list, g_sft: list, g_rl: list, mu: float, lr: float) -> tuple[list, list, list]:
        """(theta', g_SFT, g_RL) for :func:`hypergradient` at ``lr``: the SGD look-ahead, or (``lookahead:
        optimizer``) the Adam step with its mu-derivative folded into the two gradients (each scaled
        by its param group's lr / ``lr``). ``params`` may be local shards (FSDP2), like the gradients."""
        if self.hparams.lookahead == "sgd":
            return lookahead(params, g_sft, g_rl, mu, lr), g_sft, g_rl
        opt = self.optimizers()[0].optimizer
        theta_prime, eff_sft, eff_rl = [None] * len(params), [None] * len(params), [None] * len(params)
        index = {id(p): i for i, p in enumerate(self._trainable()[1])}
        for group in opt.param_groups:
            members = [(index[id(p)], p) for p in group["params"] if id(p) in index]
            ids = [i for i, _ in members]
            states = [{k: _local(v) for k, v in opt.state.get(p, {}).items()} for _, p in members]
            th, es, er = adam_lookahead(
                [params[i] for i in ids], [g_sft[i] for i in ids], [g_rl[i] for i in ids], mu, group["lr"], states,
                tuple(group["betas"]), group["eps"], group["weight_decay"], group.get("decoupled_weight_decay", False),
            )
            scale = group["lr"] / lr if lr else 0.0
            for i, t, a, b in zip(ids, th, es, er):
                theta_prime[i] = t
                eff_sft[i] = None if a is None else a.mul_(scale)
                eff_rl[i] = None if b is None else b.mul_(scale)
        return theta_prime, eff_sft, eff_rl

    # ------------------------------------------------------------------ the meta-gradient under FSDP2
    def split_backward(self, l_sft: torch.Tensor, l_rl: torch.Tensor, extra: torch.Tensor | None,
                       mu: float, lr: float, out: dict) -> None:
        """A meta step's backward under FSDP2 (``policy_step(backward=...)``): the SFT and RL terms come
        from separate forward passes, so back-propagating them one after the other costs what one
        backward of the sum costs. Each term's gradient shard (already averaged over ranks by FSDP's
        reduce-scatter) is kept in ``out`` with the look-ahead shard theta'; ``.grad`` ends as the
        gradient of ``(1 - mu) L_RL + mu L_SFT + extra``, exactly what ``manual_backward`` would give.
        Sharded autograd.grad is not an option: FSDP2 only delivers gradients to ``.grad``."""
        params = self._trainable()[1]
        grads = []
        for term, keep in ((l_sft, False), (l_rl, extra is not None)):
            self.manual_backward(term, retain_graph=keep)
            grads.append([None if p.grad is None else _local(p.grad).clone() for p in params])
            for p in params:
                if p.grad is not None:
                    _local(p.grad).zero_()  # keep the (sharded) grad object; the next backward adds to it
        if extra is not None:
            self.manual_backward(extra)  # the entropy regulariser: same graph as L_RL, kept above
        g_sft, g_rl = grads
        self._pair = self._rank_sums(_pair_sums(g_sft, g_rl))  # shards of the global gradients: summed
        with torch.no_grad():
            for p, gs, gr in zip(params, g_sft, g_rl):
                if p.grad is not None:
                    if gs is not None:
                        _local(p.grad).add_(gs, alpha=mu)
                    if gr is not None:
                        _local(p.grad).add_(gr, alpha=1.0 - mu)
            theta_prime, g_sft, g_rl = self.step_ahead([_local(p) for p in params], g_sft, g_rl, mu, lr)
        out.update(theta_prime=theta_prime, g_sft=g_sft, g_rl=g_rl)

    def sharded_meta_gradient(self, theta_prime: list, g_sft: list, g_rl: list, lr: float, held: dict) -> tuple[float, float]:
        """(dV/dmu, V(theta')) under FSDP2: theta' is written into the parameter shards, V is
        back-propagated through the sharded model (FSDP gathers theta' layer by layer), the local
        shards of <grad V, g_SFT - g_RL> are summed over ranks, and the weights are put back. All
        gradients are global (rank-averaged) ones, so this is one process's dV/dmu on the global batch."""
        params = self._trainable()[1]
        with torch.no_grad():
            saved = [_local(p).clone() for p in params]
            for p, t in zip(params, theta_prime):
                _local(p).copy_(t)
        try:
            for p in params:
                p.grad = None
            with torch.enable_grad():
                V = self.val_objective(held)
            self.manual_backward(V)
            g_val = [None if p.grad is None else _local(p.grad) for p in params]
            local = -hypergradient(g_val, g_sft, g_rl, 1.0)  # this rank's shard of the inner product
        finally:
            with torch.no_grad():
                for p, t in zip(params, saved):
                    _local(p).copy_(t)
                    p.grad = None
        dot = self._rank_sums([local])[0]
        return -lr * dot, self._rank_average(V.detach())

    def gradient_pair(self) -> dict[str, float]:
        """What the meta step weighed at its last look-ahead: the norms of grad L_SFT and grad L_RL and
        their cosine (logged as ``train/meta_sft_grad_norm``, ``train/meta_rl_grad_norm``,
        ``train/meta_grad_cosine``). mu only trades the two off where their sizes are comparable."""
        ss, rr, sr = self._pair
        denom = math.sqrt(ss * rr)
        return {"meta_sft_grad_norm": math.sqrt(ss), "meta_rl_grad_norm": math.sqrt(rr),
                "meta_grad_cosine": sr / denom if denom > 0 else 0.0}

    @torch.no_grad()
    def held_out_batch(self, meta: dict) -> dict:
        """What V needs from the meta rows: the demonstrations, or G scored samples of the prompts."""
        if self.hparams.meta_objective == "expert_nll":
            return {"expert": meta["expert"]}
        shown = self.last_samples
        rollout, rewards, _ = self.rollout_and_score(meta)
        self.last_samples = shown  # the sample monitor keeps showing training rollouts
        adv, m = losses.group_advantages(rewards, self.hparams.num_generations, self.hparams.advantage_norm)
        return {"rollout": rollout, "advantages": adv, "reward": float(m["reward_mean"])}

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, params: dict | None, start: int | None = None) -> torch.Tensor:
        """Logits as :meth:`_forward_logits` gives them (``start``: only ``logits[:, start:-1]``), at
        ``params`` through functional_call when given (one pass, no length groups)."""
        if params is None:
            return self._forward_logits(ids, mask, start)

        def forward(ids, mask, keep):
            kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
            return torch.func.functional_call(self.model, params, args=(), kwargs={**kwargs, **keep}).logits

        return self._kept_logits(forward, ids, mask, start, accepts_logits_to_keep(self.model))

    def val_objective(self, held: dict, params: dict | None = None) -> torch.Tensor:
        """V at ``params`` ({name: tensor}, via functional_call) or at the model's own weights."""
        agg = self.hparams.loss_aggregation
        if "expert" in held:
            e = held["expert"]
            logits = self._logits(e["input_ids"], e["attention_mask"], params)[:, :-1]
            labels = e["labels"][:, 1:]
            logp = losses.token_logprobs(logits, labels.clamp(min=0))
            return losses.masked_nll(logp, labels != -100, None, agg)[0]
        r = held["rollout"]
        P = r.prompt_ids.shape[1]
        logits = self._logits(r.input_ids, r.attention_mask, params, start=P - 1)
        logp = losses.token_logprobs(logits, r.completion_ids, self.hparams.temperature)
        return -losses.aggregate(held["advantages"].unsqueeze(-1) * logp, r.completion_mask, agg)

    def meta_gradient(self, theta_prime: list, g_sft: list, g_rl: list, lr: float, held: dict) -> tuple[float, float]:
        """(dV/dmu, V(theta')), both averaged over ranks. theta' goes in through functional_call, so
        the model's own weights are never written and nothing needs restoring."""
        names = self._trainable()[0]
        theta_prime = [t.requires_grad_() for t in theta_prime]
        with torch.enable_grad():
            V = self.val_objective(held, dict(zip(names, theta_prime)))
            g_val = torch.autograd.grad(V, theta_prime, allow_unused=True)
        return self._rank_average(hypergradient(g_val, g_sft, g_rl, lr)), self._rank_average(V.detach())

    # ------------------------------------------------------------------ the step
    def _forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None) -> torch.Tensor:
        logits = super()._forward_logits(input_ids, attention_mask, start)
        if self._captured is not None:  # rl_terms' logits, for the differentiable entropy
            self._captured.append(logits)
        return logits

    def rl_terms(self, rollout, rewards) -> tuple[torch.Tensor, dict]:
        """PolicyModule.rl_terms; with entropy_coef > 0 also the differentiable usual-token entropy."""
        if self.hparams.entropy_coef == 0:
            return super().rl_terms(rollout, rewards)
        self._captured = []
        try:
            loss, metrics = super().rl_terms(rollout, rewards)
            logits = self._captured[0]  # already the completion positions' (start = P - 1)
        finally:
            self._captured = None
        entropy = losses.entropy_from_logits(logits, self.hparams.temperature)
        metrics["entropy_usual_grad"] = losses.aggregate(entropy, rollout.completion_mask)
        return loss, metrics

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp, t = self.hparams, self.global_step
        if t < hp.warmup_sft_steps:  # warm-up: pure imitation, no rollouts
            loss, metrics = self.mixed_loss(batch, mu=1.0)
            self.policy_step(loss, metrics)
            return
        is_meta = hp.meta_interval > 0 and (t - hp.warmup_sft_steps + 1) % hp.meta_interval == 0
        for key, field in (("expert", "expert_data"), ("prompts", "prompt_data"), ("meta", "meta_data")):
            if key not in batch and (key != "meta" or is_meta):
                raise ValueError(f"AMFTModule needs batch key {key!r}: set data.{field}")
        rollout, rewards, metrics = self.rollout_and_score(batch["prompts"])
        l_rl, m_rl = self.rl_terms(rollout, rewards)
        l_sft, m_sft = self.sft_terms(batch["expert"])
        entropy_grad = m_rl.pop("entropy_usual_grad", None)
        metrics.update(m_rl, **m_sft)
        # the controller's inputs, averaged over ranks: every rank must compute the same mu
        sft_loss, rl_loss, H = self._rank_averages(l_sft.detach(), l_rl.detach(), m_rl["entropy_usual"])
        if not torch.isfinite(self.target_entropy):
            self.target_entropy.fill_(H)  # H*: the usual-token entropy at the first RL step
        H_star = float(self.target_entropy)
        stats = {"sft_loss": sft_loss, "rl_loss": rl_loss, "entropy": H, "grad_norm": self._last_grad_norm}
        if all(math.isfinite(v) for v in stats.values()):
            self._stats = stats
        mu = self.controller_mu(self._stats)
        extra = None if entropy_grad is None else hp.entropy_coef * torch.relu(H_star - entropy_grad)
        loss = (1.0 - mu) * l_rl + mu * l_sft
        if extra is not None:
            loss = loss + extra
        backward, look = None, {}
        if is_meta:
            lr = self.optimizers()[0].param_groups[0]["lr"]
            if self._sharded():  # the gradients exist only as shards, after backward
                backward = lambda: self.split_backward(l_sft, l_rl, extra, mu, lr, look)  # noqa: E731
            else:
                look["theta_prime"], look["g_sft"], look["g_rl"] = self.look_ahead(l_sft, l_rl, mu, lr)
        metrics.update(mu=torch.tensor(mu), entropy=torch.tensor(H), target_entropy=torch.tensor(H_star))
        applied = self.policy_step(loss, metrics, backward=backward)
        if is_meta and applied:
            held = self.held_out_batch(batch["meta"])
            meta_gradient = self.sharded_meta_gradient if self._sharded() else self.meta_gradient
            dV_dmu, V = meta_gradient(look["theta_prime"], look["g_sft"], look["g_rl"], lr, held)
            self.controller_step(dV_dmu, self._stats)
            reward = {"meta_reward": held["reward"]} if "reward" in held else {}
            self.log_metrics({"meta_grad": dV_dmu, "val_objective": V, **reward, **self.gradient_pair()})
        nudge = self.controller.eta_entropy * (H_star - H)
        if math.isfinite(nudge):  # entropy below H* raises mu (more imitation)
            self.controller.entropy_nudge(nudge)
        self.controller.after_step()
