"""RL forwards compute logits only at completion positions (``logits_to_keep``) when the model's
forward takes it, and all of them otherwise: the losses and gradients are the same either way."""

import pytest
import torch
from _rollouts import PROMPT_LENS, mixed_length_rollout

from lit_align import losses
from lit_align.core import policy as logits_module  # where the policy looks up logits_to_keep support
from lit_align.modules.amft import AMFTModule
from lit_align.modules.grpo import GRPOModule
from lit_align.rollout import accepts_logits_to_keep

G = 4
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25])


def _perturb_reference(module) -> None:
    """A reference that differs from the policy, so the KL term has a gradient."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.ref_model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _lm_head_rows(model) -> tuple[list, object]:
    """Record the sequence length of every input the model's LM head sees."""
    seen: list[int] = []
    head = model.get_output_embeddings()
    return seen, head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))


def _rl(module, rollout, full: bool, monkeypatch):
    """(loss, metrics, entropy term, grads by name, LM-head widths of policy and reference) of one
    rl_terms + backward; ``full``: as if no model took ``logits_to_keep``."""
    with monkeypatch.context() as m:
        if full:
            m.setattr(logits_module, "accepts_logits_to_keep", lambda model: False)
        policy_widths, h1 = _lm_head_rows(module.model)
        ref = module.ref_model
        ref_widths, h2 = _lm_head_rows(ref) if ref is not None else ([], None)
        try:
            module.model.zero_grad(set_to_none=True)
            extra = None
            if getattr(module.hparams, "entropy_coef", 0):  # AMFT's entropy regulariser, gated open
                adv, _ = losses.group_advantages(REWARDS, module.hparams.num_generations, "std")
                extra = module._entropy_term(rollout, rollout.completion_mask, H_star=10.0)
                loss, metrics = module.run_terms([module.rl_term(rollout, adv, 1.0, extra=extra)])
            else:
                loss, metrics = module.rl_terms(rollout, REWARDS)
        finally:
            h1.remove()
            if h2 is not None:
                h2.remove()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, None, grads, policy_widths, ref_widths


def _assert_same(a, b, rtol=1e-10, atol=1e-12):
    loss_a, metrics_a, extra_a, grads_a, *_ = a
    loss_b, metrics_b, extra_b, grads_b, *_ = b
    assert loss_a.item() != 0.0
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    for name in metrics_b:
        torch.testing.assert_close(metrics_a[name].double(), metrics_b[name].double(), rtol=rtol, atol=atol, msg=name)
    if extra_b is not None:
        torch.testing.assert_close(extra_a, extra_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name, grad in grads_a.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("buckets", [1, 4])
def test_grpo_with_reference_keeps_only_completion_logits_and_matches_full_logits(ckpt, buckets, monkeypatch):
    torch.manual_seed(0)
    module = GRPOModule(
        model_name_or_path=ckpt,
        num_generations=G,
        beta=0.05,
        temperature=0.7,
        model_dtype="float64",
        length_buckets=buckets,
    )
    _perturb_reference(module)
    assert accepts_logits_to_keep(module.model) and accepts_logits_to_keep(module.ref_model)
    tok = module.tokenizer
    rollout = mixed_length_rollout(len(tok), tok.pad_token_id, seed=0, dtype=torch.float64)
    kept = _rl(module, rollout, full=False, monkeypatch=monkeypatch)
    full = _rl(module, rollout, full=True, monkeypatch=monkeypatch)
    assert "kl" in full[1] and full[1]["kl"].item() > 0
    _assert_same(kept, full)
    P, S = rollout.prompt_ids.shape[1], rollout.input_ids.shape[1]
    for widths_kept, widths_full in ((kept[4], full[4]), (kept[5], full[5])):
        assert len(widths_kept) == len(widths_full) == (1 if buckets == 1 else 4)  # same forwards
        # the LM head ran at positions P - 1 .. width - 2 of each pass only (those that predict a completion token)
        assert [w - P for w in widths_full] == widths_kept
        assert max(widths_full) == S


def test_fallback_for_a_model_without_logits_to_keep(ckpt, monkeypatch):
    """A wrapper whose forward has no ``logits_to_keep`` gets full logits (it would raise on the
    argument) and gives the loss and gradients of the model it wraps with ``logits_to_keep``."""

    class NoKeep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config, self.generation_config = inner.config, inner.generation_config

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
            )

    torch.manual_seed(0)
    module = GRPOModule(
        model_name_or_path=ckpt, num_generations=G, beta=0.05, temperature=0.7, model_dtype="float64", length_buckets=3
    )
    _perturb_reference(module)
    tok = module.tokenizer
    rollout = mixed_length_rollout(len(tok), tok.pad_token_id, seed=2, dtype=torch.float64)
    kept = _rl(module, rollout, full=False, monkeypatch=monkeypatch)
    module.model = NoKeep(module.model)
    object.__setattr__(module, "ref_model", NoKeep(module.ref_model))
    assert not accepts_logits_to_keep(module.model) and not accepts_logits_to_keep(module.ref_model)
    fallback = _rl(module, rollout, full=False, monkeypatch=monkeypatch)
    fallback = (*fallback[:3], {n.removeprefix("inner."): g for n, g in fallback[3].items()}, *fallback[4:])
    _assert_same(fallback, kept)
    P = rollout.prompt_ids.shape[1]
    assert [w - P for w in fallback[4]] == kept[4] and [w - P for w in fallback[5]] == kept[5]


def test_lora_reference_keeps_only_completion_logits(ckpt, monkeypatch):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    module = GRPOModule(
        model_name_or_path=ckpt,
        num_generations=G,
        beta=0.1,
        model_dtype="float64",
        length_buckets=4,
        lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
    )
    with torch.no_grad():  # adapters away from B = 0, so policy and reference differ
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    assert module.ref_model is None and accepts_logits_to_keep(module.model)
    tok = module.tokenizer
    rollout = mixed_length_rollout(len(tok), tok.pad_token_id, seed=3, dtype=torch.float64)
    kept = _rl(module, rollout, full=False, monkeypatch=monkeypatch)
    full = _rl(module, rollout, full=True, monkeypatch=monkeypatch)
    assert full[1]["kl"].item() > 0
    _assert_same(kept, full)
    P = rollout.prompt_ids.shape[1]
    assert len(full[4]) == 2 * 4  # 4 groups each of the policy and the adapter-free reference, one head
    assert [w - P for w in full[4]] == kept[4]


def test_amft_entropy_term_and_reward_objective_match_full_logits(ckpt, monkeypatch):
    torch.manual_seed(0)
    module = AMFTModule(
        model_name_or_path=ckpt, num_generations=G, entropy_coef=0.5, model_dtype="float64", length_buckets=3
    )
    tok = module.tokenizer
    rollout = mixed_length_rollout(len(tok), tok.pad_token_id, seed=1, dtype=torch.float64)
    kept = _rl(module, rollout, full=False, monkeypatch=monkeypatch)
    full = _rl(module, rollout, full=True, monkeypatch=monkeypatch)
    _assert_same(kept, full)

    # V of the reward objective (its value and gradient through the step engine)
    params = module.policy.trainable()[1]
    adv = torch.linspace(-1.0, 1.0, len(PROMPT_LENS), dtype=torch.float64)
    held = {"rollout": rollout, "advantages": adv}

    def objective(full: bool):
        with monkeypatch.context() as m:
            if full:
                m.setattr(logits_module, "accepts_logits_to_keep", lambda model: False)
            widths, hook = _lm_head_rows(module.model)
            try:
                module.policy.zero_grad()
                V, _ = module.run_terms([module.val_term(held)])
            finally:
                hook.remove()
        return V, [p.grad.clone() for p in params], widths

    P = rollout.prompt_ids.shape[1]
    (V_kept, g_kept, w_kept), (V_full, g_full, w_full) = objective(False), objective(True)
    assert V_full.item() != 0.0
    torch.testing.assert_close(V_kept, V_full, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_kept, g_full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert [w - P for w in w_full] == w_kept and len(w_kept) == 3
