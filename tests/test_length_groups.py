"""Forward passes grouped by row length (``length_buckets``): the grouping is the cheapest one, and
the losses and gradients equal those of one pass over the whole padded batch."""

import itertools
import random

import pytest
import torch
from _rollouts import mixed_length_rollout

from lit_align import losses
from lit_align.core.engine import _best_cuts, length_groups
from lit_align.modules.amft import AMFTModule
from lit_align.modules.grpo import GRPOModule
from lit_align.modules.sft import SFTModule


def _cells(values, counts, cuts):
    total, start = 0, 0
    for cut in cuts:
        total += sum(counts[start : cut + 1]) * values[cut]
        start = cut + 1
    return total


def test_best_cuts_is_the_cheapest_contiguous_partition():
    rng = random.Random(0)
    for _ in range(300):
        D, k = rng.randint(1, 7), rng.randint(1, 5)
        values, counts = sorted(rng.sample(range(1, 40), D)), [rng.randint(1, 6) for _ in range(D)]
        cuts = _best_cuts(torch.tensor(values), torch.tensor(counts), k)
        assert len(cuts) <= k and cuts == sorted(set(cuts)) and cuts[-1] == D - 1
        brute = min(
            _cells(values, counts, [*inner, D - 1])
            for r in range(min(k, D))
            for inner in itertools.combinations(range(D - 1), r)
        )
        assert _cells(values, counts, cuts) == brute


def test_length_groups_cover_every_row_once_up_to_its_end():
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0]])
    groups = length_groups(mask, 2)
    assert [(rows.tolist(), width) for rows, width in groups] == [([2], 2), ([0, 3, 1], 6)]
    assert [(rows.tolist(), width) for rows, width in length_groups(mask, 8)] == [
        ([2], 2),
        ([0], 4),
        ([3], 5),
        ([1], 6),
    ]
    assert length_groups(mask, 1) is None
    assert length_groups(torch.ones(3, 5), 4) is None  # all rows full length: one pass, nothing to cut
    ((rows, width),) = length_groups(torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]]), 4)  # one length: one group,
    assert rows.tolist() == [0, 1] and width == 3  # still cut to the longest row


# ----------------------------------------------------------------------------- the losses
G = 4


def _terms(module, rollout, rewards, buckets: int, entropy_term: bool = False):
    """The RL loss, its metrics and its parameter gradients with ``length_buckets = buckets``; the
    widths of the forward passes the policy ran. ``entropy_term``: with AMFT's entropy regulariser
    (gated open: H* above the rollout's entropy)."""
    module.hparams.length_buckets = buckets
    widths = []
    hook = module.model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        module.model.zero_grad(set_to_none=True)
        if entropy_term:
            adv, _ = losses.group_advantages(rewards, G, "std")
            extra = module._entropy_term(rollout, rollout.completion_mask, H_star=10.0)
            assert extra is not None
            loss, metrics = module.run_terms([module.rl_term(rollout, adv, 1.0, extra=extra)])
        else:
            loss, metrics = module.rl_terms(rollout, rewards)
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return loss.detach(), None, metrics, grads, widths


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.05], ids=["no-kl", "kl"])
def test_grouped_rl_loss_and_gradients_equal_one_pass(ckpt, aggregation, beta):
    torch.manual_seed(0)
    module = GRPOModule(
        model_name_or_path=ckpt, num_generations=G, loss_aggregation=aggregation, beta=beta, temperature=0.7
    )
    if beta:  # a reference that differs from the policy, so the KL term has a gradient
        with torch.no_grad():
            for p in module.ref_model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    tok = module.tokenizer
    rollout = mixed_length_rollout(len(tok), tok.pad_token_id)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25])
    one_loss, _, one_metrics, one_grads, one_widths = _terms(module, rollout, rewards, 1)
    loss, _, metrics, grads, widths = _terms(module, rollout, rewards, 4)
    S = rollout.input_ids.shape[1]
    assert one_widths == [(8, S)]
    assert len(widths) == 4 and sum(w[0] for w in widths) == 8 and max(w[1] for w in widths) == S
    assert sum(r * w for r, w in widths) < 8 * S  # fewer positions computed
    assert one_loss.item() != 0.0
    torch.testing.assert_close(loss, one_loss, rtol=1e-5, atol=1e-6)
    for name in ("clip_ratio", "entropy_usual", "rl_loss") + (("kl",) if beta else ()):
        torch.testing.assert_close(metrics[name], one_metrics[name], rtol=1e-5, atol=1e-6)
    assert grads.keys() == one_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, one_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_amft_entropy_term_sees_the_same_logits(ckpt):
    torch.manual_seed(0)
    module = AMFTModule(model_name_or_path=ckpt, num_generations=G, entropy_coef=0.5)
    tok = module.tokenizer
    rollout = mixed_length_rollout(len(tok), tok.pad_token_id, seed=1)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25])
    one_loss, _, _, one_grads, _ = _terms(module, rollout, rewards, 1, entropy_term=True)
    loss, _, _, grads, widths = _terms(module, rollout, rewards, 3, entropy_term=True)
    plain = _terms(module, rollout, rewards, 3)[0]
    assert len(widths) == 3 and loss != plain  # the regulariser is in the loss
    torch.testing.assert_close(loss, one_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, one_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grouped_sft_loss_equals_one_pass_and_fsdp_runs_one_pass(ckpt):
    module = SFTModule(model_name_or_path=ckpt, loss_aggregation="seq-mean-token-mean")
    tok = module.tokenizer
    texts = ["12+34=46", "1+2=3", "57+28=85", "4+4=8", "99+99=198"]
    seqs = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]
    S = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (S - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # prompt tokens do not count
    expert = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results = []
    for buckets in (1, 3):
        module.hparams.length_buckets = buckets
        module.policy.zero_grad()
        loss, m = module.sft_terms(expert)
        results.append((loss, [p.grad.clone() for p in module.model.parameters()], m["entropy_expert"]))
    (l1, g1, e1), (l3, g3, e3) = results
    torch.testing.assert_close(l3, l1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e3, e1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g3, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    calls = []
    hook = module.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        module.policy.zero_grad()
        module.sft_terms(expert)
        assert len(calls) == 3
        calls.clear()
        module.policy.sharded = True  # FSDP2: every rank must run the same number of forwards
        module.policy.zero_grad()
        module.sft_terms(expert)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_length_buckets_is_validated(ckpt):
    with pytest.raises(ValueError, match="model.length_buckets"):
        GRPOModule(model_name_or_path=ckpt, num_generations=2, length_buckets=0)
