import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lit_align.controller import MetaController, MetaNetwork, ScalarMu, adam_lookahead, hypergradient, lookahead

STATS = {"sft_loss": 1.3, "rl_loss": -0.4, "entropy": 2.1, "grad_norm": 7.5}


# --- a tiny problem: a 2-layer MLP with three different losses -------------------------


class Problem:
    """Random regression data; L_sft, L_rl and V are three different losses of one MLP."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        self.x_sft, self.y_sft = rand(16, 5), rand(16, 3)
        self.x_rl, self.w_rl = rand(16, 5), rand(16, 3)
        self.x_val, self.y_val = rand(12, 5), rand(12, 3)

    def sft(self, out_fn):  # squared error to expert targets
        return ((out_fn(self.x_sft) - self.y_sft) ** 2).mean()

    def rl(self, out_fn):  # a different objective: a weighted log-sum-exp surrogate
        return -(self.w_rl * torch.log_softmax(out_fn(self.x_rl), -1)).mean()

    def val(self, out_fn):  # held-out smooth-L1 loss
        return nn.functional.smooth_l1_loss(out_fn(self.x_val), self.y_val)

    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def grads(self, loss_fn, params=None) -> list[torch.Tensor]:
        if params is None:
            params = self.params()
            out_fn = self.model
        else:
            names = [n for n, _ in self.model.named_parameters()]
            params = [p.detach().requires_grad_(True) for p in params]
            out_fn = lambda x: functional_call(self.model, dict(zip(names, params)), (x,))  # noqa: E731
        return list(torch.autograd.grad(loss_fn(out_fn), params))

    def meta_grad(self, mu: float, lr: float, val_fn=None) -> float:
        g_sft, g_rl = self.grads(self.sft), self.grads(self.rl)
        theta_prime = lookahead(self.params(), g_sft, g_rl, mu, lr)
        g_val = self.grads(val_fn or self.val, theta_prime)
        return hypergradient(g_val, g_sft, g_rl, lr)

    def val_after_sgd_step(self, mu: float, lr: float) -> float:
        model = copy.deepcopy(self.model)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        ((1 - mu) * self.rl(model) + mu * self.sft(model)).backward()
        opt.step()
        with torch.no_grad():
            return float(self.val(model))

    def sgd_step(self, mu: float, lr: float) -> None:
        g_sft, g_rl = self.grads(self.sft), self.grads(self.rl)
        with torch.no_grad():
            for p, new in zip(self.params(), lookahead(self.params(), g_sft, g_rl, mu, lr)):
                p.copy_(new)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mu", [0.1, 0.5, 0.9])
def test_hypergradient_matches_finite_difference(seed: int, mu: float) -> None:
    prob, lr, eps = Problem(seed), 0.5, 1e-4
    dV_dmu = prob.meta_grad(mu, lr)
    fd = (prob.val_after_sgd_step(mu + eps, lr) - prob.val_after_sgd_step(mu - eps, lr)) / (2 * eps)
    assert abs(fd) > 1e-6
    assert math.copysign(1, dV_dmu) == math.copysign(1, fd)
    assert abs(dV_dmu - fd) < 0.1 * abs(fd)


def test_lookahead_equals_sgd_step_and_leaves_params() -> None:
    prob = Problem(3)
    before = [p.detach().clone() for p in prob.params()]
    g_sft, g_rl = prob.grads(prob.sft), prob.grads(prob.rl)
    theta_prime = lookahead(prob.params(), g_sft, g_rl, 0.3, 0.1)
    model = copy.deepcopy(prob.model)
    (0.7 * prob.rl(model) + 0.3 * prob.sft(model)).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for new, ref, p, b in zip(theta_prime, model.parameters(), prob.params(), before):
        torch.testing.assert_close(new, ref.detach())
        assert torch.equal(p, b) and not new.requires_grad


def _adam_after_history(prob: Problem, opt_cls, steps: int, **opt_kwargs):
    """A copy of the problem's model and an Adam-family optimizer that has taken ``steps`` steps on
    changing mixtures (so its moments are not those of the next step's gradient)."""
    model = copy.deepcopy(prob.model)
    opt = opt_cls(model.parameters(), **opt_kwargs)
    for k in range(steps):
        opt.zero_grad()
        mix = 0.2 + 0.6 * (k % 3) / 2
        ((1 - mix) * prob.rl(model) + mix * prob.sft(model)).backward()
        opt.step()
    return model, opt


def _adam_case(prob: Problem, opt_cls, steps: int, mu: float, **opt_kwargs):
    """(theta', dV/dmu from adam_lookahead, V after the optimizer's real step at mu +- eps)."""
    model, opt = _adam_after_history(prob, opt_cls, steps, **opt_kwargs)
    params = list(model.parameters())
    g_sft = list(torch.autograd.grad(prob.sft(model), params))
    g_rl = list(torch.autograd.grad(prob.rl(model), params))
    group = opt.param_groups[0]
    theta_prime, e_sft, e_rl = adam_lookahead(
        params,
        g_sft,
        g_rl,
        mu,
        group["lr"],
        [opt.state[p] for p in params],
        group["betas"],
        group["eps"],
        group["weight_decay"],
        group["decoupled_weight_decay"],
    )
    names = [n for n, _ in model.named_parameters()]
    at = [t.detach().requires_grad_(True) for t in theta_prime]
    g_val = torch.autograd.grad(prob.val(lambda x: functional_call(model, dict(zip(names, at)), (x,))), at)
    dV_dmu = hypergradient(g_val, e_sft, e_rl, group["lr"])

    def real_step(mu_: float) -> tuple[list[torch.Tensor], float]:
        m, o = copy.deepcopy((model, opt))  # one deepcopy: the copy's state is keyed by the copy's params
        o.zero_grad()
        ((1 - mu_) * prob.rl(m) + mu_ * prob.sft(m)).backward()
        o.step()
        with torch.no_grad():
            return [q.detach().clone() for q in m.parameters()], float(prob.val(m))

    return theta_prime, dV_dmu, real_step


@pytest.mark.parametrize(
    "opt_cls, steps, kwargs",
    [
        (torch.optim.AdamW, 5, dict(lr=0.05, weight_decay=0.1)),
        (torch.optim.Adam, 5, dict(lr=0.05, weight_decay=0.01)),
        (torch.optim.AdamW, 0, dict(lr=0.05, betas=(0.8, 0.99))),  # the first step: no moments yet
    ],
)
@pytest.mark.parametrize("mu", [0.2, 0.7])
def test_adam_lookahead_is_the_optimizers_step_and_its_derivative(opt_cls, steps, kwargs, mu) -> None:
    prob = Problem(4)
    theta_prime, dV_dmu, real_step = _adam_case(prob, opt_cls, steps, mu, **kwargs)
    stepped, _ = real_step(mu)
    for new, ref in zip(theta_prime, stepped):
        torch.testing.assert_close(new, ref, rtol=1e-10, atol=1e-12)
    eps = 1e-5
    fd = (real_step(mu + eps)[1] - real_step(mu - eps)[1]) / (2 * eps)
    assert abs(dV_dmu - fd) < 0.01 * abs(fd) + 1e-8, (dV_dmu, fd)
    if steps > 0:  # (Adam's first step, g / |g| per element, is nearly flat in mu)
        assert abs(fd) > 1e-4 and math.copysign(1, dV_dmu) == math.copysign(1, fd)


def test_none_gradients_count_as_zero() -> None:
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([0.5, 0.5])
    assert hypergradient([a, None], [b, a], [c, a], lr=2.0) == pytest.approx(-2.0 * (1 * 2.5 + 2 * -1.5))
    assert hypergradient([a], [None], [c], lr=1.0) == pytest.approx(1.5)
    assert hypergradient([a], [b], [None], lr=1.0) == pytest.approx(-1.0)
    assert hypergradient([a], [None], [None], lr=1.0) == 0.0
    (p,) = lookahead([a], [None], [c], mu=0.5, lr=1.0)
    torch.testing.assert_close(p, a - 0.25)
    with pytest.raises(ValueError, match="same length"):
        hypergradient([a], [b, b], [c], lr=1.0)
    with pytest.raises(ValueError, match="same length"):
        lookahead([a], [b], [], mu=0.5, lr=1.0)


# --- the controllers follow the hypergradient ---------------------------------------------


def _stats(prob: Problem) -> dict[str, float]:
    with torch.no_grad():
        sft, rl = float(prob.sft(prob.model)), float(prob.rl(prob.model))
    return {"sft_loss": sft, "rl_loss": rl, "entropy": 1.0, "grad_norm": 1.0}


def _train(controller: MetaController, val: str, steps: int = 8, eta_mu: float = 0.5) -> tuple[float, float]:
    prob = Problem(4)
    val_fn = prob.sft if val == "sft" else prob.rl
    opt = torch.optim.SGD(controller.parameters(), lr=eta_mu)
    start = controller.mu_value(_stats(prob))
    for _ in range(steps):
        stats = _stats(prob)
        mu = controller.mu_value(stats)
        dV_dmu = prob.meta_grad(mu, 0.2, val_fn)
        opt.zero_grad()
        controller.apply_meta_gradient(dV_dmu, stats)
        opt.step()
        controller.after_step()
        prob.sgd_step(controller.mu_value(stats), 0.2)
    return start, controller.mu_value(_stats(prob))


@pytest.mark.parametrize("make", [lambda: ScalarMu(init_mu=0.5), lambda: MetaNetwork(init_mu=0.5)])
def test_mu_rises_when_validation_is_sft_and_falls_when_rl(make) -> None:
    torch.manual_seed(0)
    start, end = _train(make(), "sft")
    assert end > start + 0.01
    start, end = _train(make(), "rl")
    assert end < start - 0.01


def test_scalar_update_is_the_methods_formula() -> None:
    eta_mu, mu_min, mu_max = 0.3, 0.05, 0.95
    for mu0, dV, delta in [(0.8, 0.2, 0.01), (0.8, -0.2, -0.03), (0.9, -1.0, -0.2), (0.1, 1.0, 0.04)]:
        c = ScalarMu(init_mu=mu0, mu_min=mu_min, mu_max=mu_max)
        opt = torch.optim.SGD(c.parameters(), lr=eta_mu)
        c.apply_meta_gradient(dV)
        opt.step()
        c.entropy_nudge(delta)
        c.after_step()
        expected = min(max(mu0 - eta_mu * dV + delta, mu_min), mu_max)
        assert c.mu_value() == pytest.approx(expected, abs=1e-6)


# --- bounds, entropy, gradient flow ---------------------------------------------------


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_gradients_stay_in_bounds(sign: float) -> None:
    torch.manual_seed(0)
    for c in (ScalarMu(mu_min=0.1, mu_max=0.7, init_mu=0.5), MetaNetwork(mu_min=0.1, mu_max=0.7, init_mu=0.5)):
        opt = torch.optim.SGD(c.parameters(), lr=10.0)
        for step in range(6):
            stats = {k: v * (step + 1) for k, v in STATS.items()}
            opt.zero_grad()
            c.apply_meta_gradient(sign * 1e12, stats)
            opt.step()
            c.after_step()
            with torch.no_grad():  # the raw tensor, not the rounding-guarded mu_value
                assert 0.1 - 1e-6 <= float(c(stats)) <= 0.7 + 1e-6
            c.entropy_nudge(-sign * 1e9 * (step % 2))
            c.after_step()
            mu = c.mu_value(stats)
            assert 0.1 <= mu <= 0.7 and math.isfinite(mu)
        assert c.mu_value(stats) == pytest.approx(0.1 if sign > 0 else 0.7, abs=1e-3)


@pytest.mark.parametrize("make", [ScalarMu, MetaNetwork])
def test_entropy_below_target_raises_mu_and_above_lowers_it(make) -> None:
    eta_h, target = 0.05, 1.0
    for entropy, direction in [(0.6, 1), (1.4, -1)]:
        c = make(eta_entropy=eta_h)
        before = c.mu_value(STATS)
        delta = c.eta_entropy * (target - entropy)
        c.entropy_nudge(delta)
        c.after_step()
        after = c.mu_value(STATS)
        assert (after - before) * direction > 0
        assert after - before == pytest.approx(delta, abs=1e-5)  # exact at the last stats seen


def test_meta_network_entropy_nudge_saturates_in_the_right_direction() -> None:
    c = MetaNetwork(init_mu=0.5)
    c.entropy_nudge(10.0)
    top = c.mu_value(STATS)
    assert top == pytest.approx(c.mu_max, abs=1e-5)
    c.entropy_nudge(1.0)  # already at the top: must not move down
    assert c.mu_value(STATS) >= top
    c.entropy_nudge(-0.1)
    assert c.mu_value(STATS) == pytest.approx(top - 0.1, abs=1e-4)


@pytest.mark.parametrize("dV_dmu", [0.5, -0.5])
def test_meta_network_gradient_reaches_every_weight(dV_dmu: float) -> None:
    torch.manual_seed(0)
    c = MetaNetwork(hidden=6)
    opt = torch.optim.SGD(c.parameters(), lr=0.5)
    hidden, out = c.net[0], c.net[-1]
    # zero-initialised output layer: mu starts at init_mu and only the output layer moves
    assert c.mu_value(STATS) == pytest.approx(0.8, abs=1e-6)
    c.apply_meta_gradient(dV_dmu, STATS)
    assert out.weight.grad.abs().min() > 0 and out.bias.grad.abs().min() > 0
    opt.step()
    # now the hidden layer influences mu, and every weight gets a non-zero gradient
    for _ in range(2):
        before = c.mu_value(STATS)
        opt.zero_grad()
        c.apply_meta_gradient(dV_dmu, STATS)
        for name, p in c.named_parameters():
            assert p.grad is not None and p.grad.abs().min() > 0, name
        opt.step()
        assert (c.mu_value(STATS) - before) * -dV_dmu > 0
    assert hidden.weight.grad.abs().min() > 0


def test_apply_meta_gradient_accumulates_dV_dmu_times_dmu() -> None:
    c = ScalarMu(init_mu=0.4)
    c.apply_meta_gradient(0.25)
    c.apply_meta_gradient(0.5)
    assert float(c.mu.grad) == pytest.approx(0.75)
    assert c(None).ndim == 0 and c(None).requires_grad


def test_meta_network_missing_stat_raises_key_error() -> None:
    c = MetaNetwork()
    with pytest.raises(KeyError, match="grad_norm"):
        c({k: v for k, v in STATS.items() if k != "grad_norm"})
    with pytest.raises(KeyError, match="sft_loss"):
        c.mu_value()
    with pytest.raises(ValueError, match="entropy"):
        c({**STATS, "entropy": float("nan")})


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: ScalarMu(mu_min=-0.1), "mu_min"),
        (lambda: ScalarMu(mu_max=1.5), "mu_max"),
        (lambda: ScalarMu(mu_min=0.6, mu_max=0.5, init_mu=0.55), "mu_min"),
        (lambda: ScalarMu(init_mu=0.99), "init_mu"),
        (lambda: ScalarMu(init_mu=0.01), "init_mu"),
        (lambda: ScalarMu(eta_entropy=-1.0), "eta_entropy"),
        (lambda: MetaNetwork(hidden=0), "hidden"),
        (lambda: MetaNetwork(init_mu=0.95), "init_mu"),
        (lambda: MetaNetwork(mu_max=2.0), "mu_max"),
        (lambda: MetaNetwork(eta_entropy=float("nan")), "eta_entropy"),
        (lambda: ScalarMu().apply_meta_gradient(float("inf")), "dV_dmu"),
        (lambda: ScalarMu().entropy_nudge(float("nan")), "delta"),
    ],
)
def test_invalid_arguments_name_the_field(make, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make()
