"""AMFTModule on the embedded tiny Llama: the hypergradient, the direction of mu, warm-up and H*,
the entropy term, the meta-network, step accounting, and a run through the CLI."""

import copy
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_align import losses
from lit_align.controller import MetaNetwork, ScalarMu
from lit_align.data.datamodule import MixedDataModule
from lit_align.hf import load_tokenizer
from lit_align.modules.amft import AMFTModule
from lit_align.rewards import RewardFunction

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(12, 34), (57, 28), (40, 9), (66, 77)]


class OperatorReward(RewardFunction):
    """Share of completion characters that are '+' or '=': never in the expert's answers, so the RL
    gradient points away from imitation, and it varies between the samples of a random policy."""

    def __call__(self, prompts, completions, answers):
        return torch.tensor([sum(c in "+=" for c in s) / max(len(s), 1) for s in completions])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and they spin-wait on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch(ckpt) -> dict:
    """One fixed training batch: expert demonstrations, prompts, and meta rows (the same problems)."""
    dm = MixedDataModule(model_name_or_path=ckpt)
    dm.tokenizer = tok = load_tokenizer(ckpt)
    rows = [
        {
            "prompt": f"{a}+{b}=",
            "prompt_ids": tok(f"{a}+{b}=")["input_ids"],
            "response_ids": tok(str(a + b), add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
            "answer": str(a + b),
        }
        for a, b in PAIRS
    ]
    return {"expert": dm.collate_expert(rows), "prompts": dm.collate_prompts(rows), "meta": dm.collate_val(rows)}


def make(ckpt, **kwargs) -> AMFTModule:
    defaults = dict(
        model_name_or_path=ckpt,
        num_generations=8,
        max_new_tokens=4,
        reward=OperatorReward(),
        gradient_clip=0.0,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        warmup_sft_steps=0,
        meta_interval=1,
    )
    return AMFTModule(**{**defaults, **kwargs})


def fit(module: AMFTModule, batch: dict, steps: int) -> tuple[L.Trainer, list[dict]]:
    """Trainer.fit on ``batch`` repeated; returns the trainer and every metrics dict the module logged."""
    logged: list[dict] = []
    log, training_step = module.log_metrics, module.training_step
    step = [0]

    def record(metrics):  # "step": the policy update (global_step when its training_step began)
        logged.append({k: float(v) for k, v in metrics.items()} | {"step": step[0]})
        log(metrics)

    def counted_step(batch, batch_idx):
        step[0] = module.global_step
        return training_step(batch, batch_idx)

    module.log_metrics, module.training_step = record, counted_step
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None, collate_fn=lambda b: b))
    return trainer, logged


def steps_of(logged: list[dict]) -> list[dict]:
    return [m for m in logged if "loss" in m]


def metas_of(logged: list[dict]) -> list[dict]:
    return [m for m in logged if "meta_grad" in m]


def V_after_real_step(m, opt, start, opt_state, rollout, rewards, batch, held, mu: float) -> float:
    """V after the optimizer's own step on (1 - mu) L_RL + mu L_SFT, from the weights ``start`` and
    (for a stateful optimizer) the state ``opt_state``: what the hypergradient predicts the change of."""
    m.model.load_state_dict(start)
    if opt_state is not None:  # a copy: load_state_dict keeps the tensors, and step() would edit them
        opt.load_state_dict(copy.deepcopy(opt_state))
    opt.zero_grad(set_to_none=True)
    m.rl_terms(rollout, rewards, weight=1 - mu)  # each accumulates its gradient in .grad
    m.sft_terms(batch["expert"], weight=mu)
    opt.step()
    return m.val_objective(held)


def meta_step(m, rollout, rewards, batch, held, mu: float, lr: float):
    """(dV/dmu, theta', g_SFT, g_RL) of one meta step on fixed rollouts, through the module's own passes."""
    adv, _ = losses.group_advantages(rewards, m.hparams.num_generations, m.hparams.advantage_norm)
    _, _, g_sft, g_rl, _ = m.split_gradients(batch["expert"], rollout, adv)
    theta_prime, eff_sft, eff_rl = m.look_ahead(g_sft, g_rl, mu, lr)
    dV_dmu, _ = m.meta_gradient(theta_prime, eff_sft, eff_rl, lr, held)
    return dV_dmu, theta_prime, g_sft, g_rl


# ----------------------------------------------------------------------------- the hypergradient
@pytest.mark.parametrize("objective", ["reward", "expert_nll"])
def test_hypergradient_matches_finite_difference_of_a_real_step(ckpt, batch, objective):
    torch.manual_seed(0)
    m = make(ckpt, meta_objective=objective)
    # The random policy samples the pad token, and nn.Embedding(padding_idx=pad) drops that row's
    # input gradient: autograd would then not be the true derivative of the forward pass.
    m.model.model.embed_tokens.padding_idx = None
    rollout, rewards, _ = m.rollout_and_score(batch["prompts"])  # held fixed: sampled once
    held = m.held_out_batch(batch["meta"])
    assert rewards.std() > 0
    start = copy.deepcopy(m.model.state_dict())
    mu, lr, eps = 0.5, 0.1, 0.05

    dV_dmu, theta_prime, g_sft, g_rl = meta_step(m, rollout, rewards, batch, held, mu, lr)
    # the monitors of what the meta step weighed: the two gradients' sizes and their cosine
    flat_sft = torch.cat([g.flatten() for g in g_sft if g is not None]).double()
    flat_rl = torch.cat([g.flatten() for g in g_rl if g is not None]).double()
    pair = m.gradient_pair()
    assert pair["meta_sft_grad_norm"] == pytest.approx(float(flat_sft.norm()), rel=1e-6)
    assert pair["meta_rl_grad_norm"] == pytest.approx(float(flat_rl.norm()), rel=1e-6)
    cosine = float(flat_sft @ flat_rl / (flat_sft.norm() * flat_rl.norm()))
    assert pair["meta_grad_cosine"] == pytest.approx(cosine, rel=1e-6, abs=1e-9)

    sgd = torch.optim.SGD(m.model.parameters(), lr=lr)
    V_after_step = lambda mu_: V_after_real_step(m, sgd, start, None, rollout, rewards, batch, held, mu_)  # noqa: E731
    finite_diff = (V_after_step(mu + eps) - V_after_step(mu - eps)) / (2 * eps)
    assert dV_dmu != 0 and math.copysign(1, dV_dmu) == math.copysign(1, finite_diff)
    assert abs(dV_dmu - finite_diff) < 0.1 * abs(finite_diff), (dV_dmu, finite_diff)


@pytest.mark.parametrize("objective", ["reward", "expert_nll"])
def test_optimizer_lookahead_matches_finite_difference_of_the_real_adamw_step(ckpt, batch, objective):
    """lookahead: optimizer: dV/dmu is the derivative of the step AdamW really takes, with the moments
    it has gathered over earlier updates (the SGD formula is not, for an Adam-trained policy)."""
    torch.manual_seed(0)
    adamw = lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)  # noqa: E731
    m = make(ckpt, meta_objective=objective, optimizer=adamw, lookahead="optimizer", meta_interval=0)
    m.model.model.embed_tokens.padding_idx = None  # see the SGD test above
    fit(m, batch, steps=3)  # three real updates: AdamW's moments and step count
    opt = m.optimizers()[0].optimizer
    rollout, rewards, _ = m.rollout_and_score(batch["prompts"])
    held = m.held_out_batch(batch["meta"])
    start, opt_start = copy.deepcopy(m.model.state_dict()), copy.deepcopy(opt.state_dict())
    mu, eps = 0.5, 0.02
    lr = opt.param_groups[0]["lr"]

    dV_dmu, theta_prime, _, _ = meta_step(m, rollout, rewards, batch, held, mu, lr)
    m.hparams.lookahead = "sgd"  # the papers' formula on the same batch, for contrast
    sgd_dV_dmu = meta_step(m, rollout, rewards, batch, held, mu, lr)[0]

    V_after_step = lambda mu_: V_after_real_step(m, opt, start, opt_start, rollout, rewards, batch, held, mu_)  # noqa: E731
    stepped = V_after_step(mu)
    names = m.policy.trainable()[0]
    for name, t in zip(names, theta_prime):  # theta' is the step itself
        torch.testing.assert_close(t, dict(m.model.named_parameters())[name].detach(), rtol=1e-4, atol=1e-6)
    assert stepped == pytest.approx(m.val_objective(held))
    finite_diff = (V_after_step(mu + eps) - V_after_step(mu - eps)) / (2 * eps)
    assert dV_dmu != 0 and math.copysign(1, dV_dmu) == math.copysign(1, finite_diff)
    assert abs(dV_dmu - finite_diff) < 0.1 * abs(finite_diff), (dV_dmu, finite_diff)
    assert abs(sgd_dV_dmu - finite_diff) > 0.5 * abs(finite_diff), (sgd_dV_dmu, finite_diff)


def test_optimizer_lookahead_needs_an_adam_family_optimizer(ckpt, batch):
    m = make(ckpt, lookahead="optimizer")  # the helper's default optimizer is SGD
    with pytest.raises(ValueError, match="model.lookahead='optimizer'.*SGD"):
        fit(m, batch, steps=1)
    with pytest.raises(ValueError, match="model.lookahead"):
        make(ckpt, lookahead="adam")


# ----------------------------------------------------------------------------- where mu goes
@pytest.mark.parametrize(
    "objective, meta_sign",
    [("expert_nll", -1), ("reward", +1)],  # V = imitation: mu rises; V = the RL objective: mu falls
)
def test_mu_follows_the_validation_objective_and_stays_in_bounds(ckpt, batch, objective, meta_sign):
    torch.manual_seed(0)
    controller = ScalarMu(init_mu=0.5, mu_min=0.3, mu_max=0.7)
    sgd = lambda p: torch.optim.SGD(p, lr=0.01)  # noqa: E731 (small: the look-ahead must not overshoot)
    m = make(ckpt, meta_objective=objective, controller=controller, controller_lr=20.0, optimizer=sgd)
    _, logged = fit(m, batch, steps=3)
    mus = [s["mu"] for s in steps_of(logged)] + [m.controller.mu_value()]
    grads = [s["meta_grad"] for s in metas_of(logged)]
    assert len(grads) == 3 and all(math.copysign(1, g) == meta_sign for g in grads), grads
    assert all(0.3 <= mu <= 0.7 for mu in mus)
    moves = [b - a for a, b in zip(mus, mus[1:])]
    assert moves[0] * meta_sign < 0 and all(d * meta_sign <= 0 for d in moves), mus
    if objective == "reward":
        assert all("meta_reward" in s for s in metas_of(logged))


def test_bounds_are_hit_exactly_with_a_large_controller_lr(ckpt, batch):
    torch.manual_seed(0)
    m = make(ckpt, meta_objective="expert_nll", controller=ScalarMu(0.5, 0.3, 0.7), controller_lr=1e6)
    fit(m, batch, steps=1)
    assert m.controller.mu_value() == pytest.approx(0.7, abs=1e-7)


# ----------------------------------------------------------------------------- warm-up, H*, steps
def test_warmup_target_entropy_and_global_step(ckpt, batch):
    torch.manual_seed(0)
    m = make(ckpt, warmup_sft_steps=2, meta_interval=2, controller=ScalarMu(eta_entropy=0.05))
    rollouts, rollout_and_score = [], m.rollout_and_score
    m.rollout_and_score = lambda b: (rollouts.append(m.global_step), rollout_and_score(b))[1]
    trainer, logged = fit(m, batch, steps=6)

    assert trainer.global_step == 6  # policy updates only: the controller's 2 steps are not counted
    assert [s["step"] for s in metas_of(logged)] == [3, 5]  # the last of every 2 RL updates
    steps = steps_of(logged)
    assert [s["step"] for s in steps] == list(range(6))
    assert [s["mu"] for s in steps[:2]] == [1.0, 1.0] and min(rollouts) == 2  # warm-up: no rollouts
    assert all("rl_loss" not in s and "target_entropy" not in s for s in steps[:2])
    # H*: the usual-token entropy of the first RL step, kept afterwards, checkpointed in a buffer
    h_star = steps[2]["entropy_usual"]
    assert all(s["target_entropy"] == pytest.approx(h_star) for s in steps[2:])
    assert float(m.state_dict()["target_entropy"]) == pytest.approx(h_star)
    fresh = make(ckpt)
    assert math.isnan(float(fresh.target_entropy))
    fresh.load_state_dict(m.state_dict())
    assert float(fresh.target_entropy) == pytest.approx(h_star)
    assert fresh.controller.mu_value() == m.controller.mu_value()
    assert m.state_dict()["controller.mu"].dtype == torch.float32
    # the entropy term moved mu every RL step: mu_{t+1} = mu_t - eta * dV/dmu [meta] + eta_H (H* - H_t)
    for s, nxt in zip(steps[2:], steps[3:]):
        meta = next((x["meta_grad"] for x in metas_of(logged) if x["step"] == s["step"]), 0.0)
        expected = s["mu"] - 1.0 * meta + 0.05 * (h_star - s["entropy_usual"])
        assert nxt["mu"] == pytest.approx(min(max(expected, 0.05), 0.95), abs=1e-5)


@pytest.mark.parametrize("h_star", [10.0, 0.0])
def test_entropy_term_sign_and_regulariser(ckpt, batch, h_star):
    torch.manual_seed(0)
    m = make(ckpt, meta_interval=0, controller=ScalarMu(0.5, eta_entropy=0.01), entropy_coef=0.1)
    m.target_entropy.fill_(h_star)  # as if measured at the end of the warm-up (not measured again)
    _, logged = fit(m, batch, steps=1)
    (s,) = steps_of(logged)
    H = s["entropy_usual"]
    assert s["target_entropy"] == h_star and 0 < H < math.log(16) + 1e-4
    # entropy below target raises mu (more imitation), above it lowers mu
    assert m.controller.mu_value() == pytest.approx(0.5 + 0.01 * (h_star - H), abs=1e-6)
    # the regulariser adds coef * max(0, H* - H) to the policy loss
    mixed = 0.5 * s["rl_loss"] + 0.5 * s["sft_loss"]
    assert s["loss"] - mixed == pytest.approx(0.1 * max(0.0, h_star - H), abs=1e-4)


def test_meta_network_is_trained_through_the_module(ckpt, batch):
    torch.manual_seed(0)
    net = MetaNetwork(hidden=8, init_mu=0.5)
    before = copy.deepcopy(net.state_dict())
    m = make(ckpt, meta_objective="expert_nll", controller=net, controller_lr=10.0)
    _, logged = fit(m, batch, steps=3)
    assert len(metas_of(logged)) == 3
    after = m.controller.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"net.2.weight", "net.2.bias", "net.0.weight"} <= changed  # hidden layer from the 2nd step on
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in m.controller.parameters())
    mus = [s["mu"] for s in steps_of(logged)]
    assert mus[0] == pytest.approx(0.5) and mus[-1] > mus[0]


# ----------------------------------------------------------------------------- arguments
def test_arguments_are_validated(ckpt, batch):
    for field, value in [
        ("meta_interval", -1),
        ("warmup_sft_steps", -2),
        ("controller_lr", -1.0),
        ("entropy_coef", float("nan")),
        ("num_generations", 1),
        ("meta_objective", "accuracy"),
    ]:
        with pytest.raises(ValueError, match=field):
            make(ckpt, **{field: value})
    m = make(ckpt)
    no_meta = {k: v for k, v in batch.items() if k != "meta"}
    with pytest.raises(ValueError, match="data.meta_data"):
        fit(m, no_meta, steps=1)


def test_controller_and_target_entropy_stay_float32_under_a_precision_cast(ckpt):
    m = make(ckpt, controller=ScalarMu(init_mu=0.8))
    m.target_entropy.fill_(1.2345678)
    m.to(torch.bfloat16)  # what the bf16-true precision plugin does to the whole module
    assert next(m.model.parameters()).dtype == torch.bfloat16
    assert m.controller.mu.dtype == m.target_entropy.dtype == torch.float32
    assert float(m.controller.mu) == pytest.approx(0.8, abs=1e-7)
    assert float(m.target_entropy) == pytest.approx(1.2345678)


DDP_SCRIPT = """
import sys, torch, lightning as L
from torch.utils.data import DataLoader
from lit_align.controller import ScalarMu
from lit_align.data.datamodule import MixedDataModule
from lit_align.hf import load_tokenizer
from lit_align.modules.amft import AMFTModule
from lit_align.rewards import RewardFunction

class OperatorReward(RewardFunction):
    def __call__(self, prompts, completions, answers):
        return torch.tensor([sum(c in "+=" for c in s) / max(len(s), 1) for s in completions])

if __name__ == "__main__":
    torch.set_num_threads(1)
    ckpt = sys.argv[1]
    dm = MixedDataModule(model_name_or_path=ckpt)
    dm.tokenizer = tok = load_tokenizer(ckpt)
    def batch(k):  # a different batch for each rank and step
        rows = [{"prompt": f"{a}+{b}=", "prompt_ids": tok(f"{a}+{b}=")["input_ids"], "answer": str(a + b),
                 "response_ids": tok(str(a + b), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]}
                for a, b in [(7 * k + i, 3 * k + 2 * i) for i in range(3)]]
        return {"expert": dm.collate_expert(rows), "prompts": dm.collate_prompts(rows), "meta": dm.collate_val(rows)}
    L.seed_everything(0)
    m = AMFTModule(ckpt, num_generations=4, max_new_tokens=3, reward=OperatorReward(), warmup_sft_steps=1,
                   meta_interval=1, controller=ScalarMu(0.5, eta_entropy=0.05), controller_lr=1.0,
                   optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(m, DataLoader([batch(k) for k in range(6)], batch_size=None, collate_fn=lambda b: b))
    with torch.no_grad():  # one file per rank: two processes' lines on one stdout pipe can get lost or mixed
        result = [trainer.global_step, repr(m.controller.mu_value()), repr(float(m.target_entropy)),
                  repr(float(sum(p.double().sum() for p in m.model.parameters())))]
    with open(f"result_{trainer.global_rank}.txt", "w") as f:
        f.write(" ".join(map(str, result)))
"""


def test_ddp_ranks_hold_the_same_mu(tmp_path, ckpt):
    """Two CPU processes (gloo): DDP ignores the controller's parameters, and the averaged
    meta-gradient and statistics give every rank the same mu and H*."""
    script = tmp_path / "amft_ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script), ckpt], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    files = sorted(tmp_path.glob("result_*.txt"))
    assert out.returncode == 0 and len(files) == 2, out.stderr[-3000:]
    results = [f.read_text().split() for f in files]
    assert results[0] == results[1]  # global step, mu, H*, policy weights
    step, mu, h_star, _ = results[0]
    assert step == "3" and float(mu) != 0.5 and math.isfinite(float(h_star))


# ----------------------------------------------------------------------------- the CLI
def test_cli_run_logs_the_controller(tmp_path, ckpt):
    from lit_align.cli import main
    from lit_align.events import read_scalars

    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "amft.yaml"),
            "--trainer.max_steps=4",
            "--trainer.log_every_n_steps=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.init_args.warmup_sft_steps=2",
            "--model.init_args.meta_interval=2",
            "--model.init_args.num_generations=2",
            "--model.init_args.max_new_tokens=3",
            "--data.init_args.expert_batch_size=4",
            "--data.init_args.prompt_batch_size=2",
            "--data.init_args.meta_batch_size=2",
        ]
    )
    scalars = read_scalars(tmp_path)
    for tag in (
        "train/mu",
        "train/meta_grad",
        "train/target_entropy",
        "train/val_objective",
        "train/meta_sft_grad_norm",
        "train/meta_rl_grad_norm",
        "train/meta_grad_cosine",
    ):
        assert tag in scalars, sorted(scalars)
    assert [step for step, _ in scalars["train/meta_grad"]] == [3]
    assert all(math.isfinite(v) for _, v in scalars["train/loss"])
    assert len(scalars["train/mu"]) == 4


def test_missing_meta_data_stops_at_set_up_not_at_the_first_meta_step(ckpt):
    """Without data.meta_data the first meta step (update warmup_sft_steps + meta_interval - 1) would stop the
    run after the whole SFT warm-up; set-up says it instead. meta_interval 0 needs no meta data."""
    module = make(ckpt, warmup_sft_steps=3, meta_interval=2)
    dm = MixedDataModule(model_name_or_path=ckpt, expert_batch_size=4, prompt_batch_size=2, meta_data=None)
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"AMFTModule needs data.meta_data .*meta_interval=2"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0
    module = make(ckpt, warmup_sft_steps=3, meta_interval=0)
    dm = MixedDataModule(model_name_or_path=ckpt, expert_batch_size=4, prompt_batch_size=2, prompt_data=None)
    with pytest.raises(ValueError, match=r"AMFTModule needs data.prompt_data "):
        L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
            module, datamodule=dm
        )
