"""HPT (Hybrid Post-Training): per prompt, SFT on its demonstration when few of its G samples are correct,
GRPO on its samples otherwise.

- the demonstration rows of a paired prompt batch (core.groups.demonstration_labelled) are the rows the data
  module's expert stream builds for the same prompt and response;
- P and the gate by hand (verdict and reward counting, the switch and the official code's soft tables);
- the loss and its gradient by hand in float64 (switch, soft, the code's max_new_tokens normaliser), equal
  for every micro-batch size;
- degenerate gates: below 0 is GRPO, G or above is SFT on the prompts' demonstrations, bit for bit;
- through a Trainer: the gate is decided once per rollout batch (steps_per_generation), each routed
  demonstration trains once per pass, a resume between two updates of one rollout batch is exact, LoRA;
- configs/hpt.yaml trains from the command line and logs train/gate_sft_share.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_align import GRPOModule, HPTModule, MixedDataModule, SFTModule
from lit_align.core import groups
from lit_align.events import read_scalars
from lit_align.modules.hpt import SOFT_TABLES
from lit_align.rollout import Rollout, position_ids_from_mask

ROOT = Path(__file__).resolve().parents[1]
G = 3
EPS = 1e-6  # the advantage's std epsilon


def partial(prompts, completions, answers):
    """1 for the exact answer, 0.3 for a completion that starts with it and goes on, else 0 (a lit-align
    reward: its verdict is reward >= 1)."""
    return [1.0 if c == a else 0.3 if c.startswith(a) else 0.0 for c, a in zip(completions, answers)]


def _prompts() -> dict:
    """3 prompts (left-padded), each paired with one demonstration (right-padded, its EOS included)."""
    return {
        "prompt_ids": torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]]),
        "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]]),
        "prompts": ["p0", "p1", "p2"],
        "answers": ["1", "2", "3"],
        "demo_ids": torch.tensor([[[4, 3, 0]], [[5, 6, 3]], [[7, 3, 0]]]),
        "demo_mask": torch.tensor([[[1, 1, 0]], [[1, 1, 1]], [[1, 1, 0]]]),
        "demonstrations": [["1"], ["5"], ["3"]],  # prompt 1's demonstration is wrong
    }


# the samples: prompt 0 one correct, prompt 1 none (one that starts right: reward 0.3), prompt 2 two
TEXTS = ["1", "x", "x", "x", "2x", "x", "3", "3", "x"]


def _sampled(prompts: dict) -> Rollout:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 12, (3 * G, 4), generator=g)
    mask = torch.tensor(
        [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
        + [[1, 1, 1, 0], [1, 1, 0, 0]]
    )
    old = -torch.rand(3 * G, 4, generator=g, dtype=torch.float64) * mask
    return Rollout(
        prompts["prompt_ids"].repeat_interleave(G, 0),
        prompts["prompt_mask"].repeat_interleave(G, 0),
        ids,
        mask,
        old,
        torch.zeros_like(old),
        list(TEXTS),
    )


def _fixed(cls):
    class Fixed(cls):
        """The method with its samples held fixed (scored, gated and trained as sampled ones)."""

        def sample(self, prompts, *args, **kwargs):
            return _sampled(prompts)

    return Fixed


def _module(cls=HPTModule, micro=None, **kw):
    return _fixed(cls)(
        model_name_or_path=pytest.ckpt_path,
        model_dtype="float64",
        num_generations=G,
        micro_batch_size=micro,
        epsilon_low=0.1,
        epsilon_high=0.1,
        reward=partial,
        **kw,
    )


@pytest.fixture(autouse=True, scope="module")
def _ckpt_path(ckpt):
    pytest.ckpt_path = ckpt


def _grads(module) -> dict:
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- demonstration rows
def test_demonstration_rows_are_the_expert_rows_of_the_same_prompt_and_response(ckpt, tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "response": str(a + b) * (1 + a % 3), "answer": str(a + b)} for a, b in
            [(12, 3), (40, 17), (8, 8), (5, 21), (9, 90)]]  # fmt: skip
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = MixedDataModule(
        model_name_or_path=ckpt, expert_data=None, prompt_data=str(path), val_data=None, prompt_batch_size=3, seed=0
    )
    dm.setup("fit")
    dm.pair_demonstrations(1)
    by_prompt = {r["prompt"]: r for r in dm._paired[1]}
    pad = dm.tokenizer.pad_token_id
    for batch in dm.train_dataloader().iterables["prompts"]:
        got = groups.demonstration_labelled(batch, 1, pad)
        want = dm.collate_expert([by_prompt[p] for p in batch["prompts"]])
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    # by hand: prompt 0's real tokens then its demonstration's, labels on the demonstration only
    got = groups.demonstration_labelled(_prompts(), pad_id=2)
    assert got["input_ids"].tolist() == [[5, 6, 4, 3, 2, 2], [7, 8, 9, 5, 6, 3], [4, 7, 3, 2, 2, 2]]
    assert got["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0]]
    assert got["labels"].tolist() == [[-100, -100, 4, 3, -100, -100], [-100, -100, -100, 5, 6, 3]] + [
        [-100, 7, 3, -100, -100, -100]
    ]
    with pytest.raises(ValueError, match="demonstration"):
        groups.demonstration_labelled({k: v for k, v in _prompts().items() if not k.startswith("demo")})


# ----------------------------------------------------------------------------- P and the gate
def test_p_counts_the_verdict_or_positive_rewards_and_the_gate_routes_by_hand(ckpt):
    # verdict (reward >= 1 for this reward): P = [1, 0, 2]; gate 0 routes prompt 1 only
    batch = _module(gate=0).rollout_batch(_prompts())
    assert batch["rewards"].tolist() == pytest.approx([1, 0, 0, 0, 0.3, 0, 1, 1, 0])
    assert batch["rl_coef"].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1]
    assert batch["demo_of_row"].tolist() == [-1, -1, -1, 1, -1, -1, -1, -1, -1]  # on its group's first row
    assert batch["mask"][3:6].sum() == 0 and torch.equal(batch["mask"][:3], _sampled(_prompts()).completion_mask[:3])
    assert float(batch["metrics"]["gate_sft_share"]) == pytest.approx(1 / 3)
    # gate 1: P <= 1 routes prompts 0 and 1
    batch = _module(gate=1).rollout_batch(_prompts())
    assert batch["rl_coef"].tolist() == [0] * 6 + [1] * 3 and batch["demo_of_row"].tolist()[::3] == [0, 1, -1]
    # SuperRL's gate: any sample with a reward > 0 keeps the prompt in RL (prompt 1's 0.3 counts)
    batch = _module(gate=0, correct_by="reward").rollout_batch(_prompts())
    assert batch["rl_coef"].tolist() == [1] * 9 and (batch["demo_of_row"] < 0).all()
    assert float(batch["metrics"]["gate_sft_share"]) == 0.0


def test_soft_tables_are_the_official_codes_at_p_plus_the_demonstrations_verdict(ckpt):
    module = _module(strategy="soft", soft_type=0)
    on, off, sft = module.gate_coefficients(torch.tensor([1, 0, 2, 7, 9]), torch.tensor([1, 0, 1, 1, 1]))
    # counts 2, 0, 3, 8, 10 (-> 8)
    assert on.tolist() == [0.125, 1.0, 0.25, 1.0, 1.0]
    assert off.tolist() == [0.5, 1.0, 1.0, 0.0, 0.0]
    assert sft.tolist() == [0.5, 1.0, 0.25, 0.0, 0.0]
    assert SOFT_TABLES[1][1] == (0.0, 1.0, 1.0) and SOFT_TABLES[2][4] == (0.5, 0.0, 0.125)
    switch = _module(gate=2)
    on, off, sft = switch.gate_coefficients(torch.tensor([0, 2, 3]))
    assert on.tolist() == [0, 0, 1] and off.tolist() == [0, 0, 0] and sft.tolist() == [1, 1, 0]


# ----------------------------------------------------------------------------- the loss by hand
def _rl_by_hand(model, r: Rollout, adv: torch.Tensor, rows_in: torch.Tensor, eps=0.1, gamma=0.1):
    """(token sum, token count) of the RL term: every position's logits, plain autograd; off-policy rows
    (a demonstration) -A p / (p + gamma), the others -min(rho A, clip(rho) A)."""
    P = r.prompt_ids.shape[1]
    ids, att = r.input_ids, r.attention_mask
    logits = model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att)).logits
    logp = torch.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)
    A = adv.unsqueeze(-1)
    ratio = torch.exp(logp - r.old_logp)
    per = -torch.minimum(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
    if r.off_policy is not None:
        p = logp.exp()
        per = torch.where(r.off_policy.unsqueeze(-1).expand_as(per), -A * p / (p + gamma), per)
    m = r.completion_mask.double() * rows_in.double().unsqueeze(-1)
    return (per * m).sum(), m.sum()


def _sft_by_hand(model, prompts: dict, rows: list[int], weights: list[float]):
    """(weighted NLL sum, token count) of the demonstrations of prompts ``rows``: prompt then demonstration."""
    seqs, labels = [], []
    for b in rows:
        prompt = prompts["prompt_ids"][b][prompts["prompt_mask"][b].bool()]
        demo = prompts["demo_ids"][b, 0][prompts["demo_mask"][b, 0].bool()]
        seqs.append(torch.cat([prompt, demo]))
        labels.append([-100] * len(prompt) + demo.tolist())
    total, count = torch.zeros((), dtype=torch.float64), 0
    for seq, lab, w in zip(seqs, labels, weights):  # one row at a time: no padding at all
        logits = model(input_ids=seq.unsqueeze(0)).logits[0, :-1]
        target = torch.tensor(lab[1:])
        keep = target != -100
        logp = torch.log_softmax(logits, -1)[keep].gather(-1, target[keep].unsqueeze(-1)).squeeze(-1)
        total = total - w * logp.sum()
        count += int(keep.sum())
    return total, count


def _adv(rewards: list[float], member: float | None = None) -> list[float]:
    """A group's advantages by hand: (r - mean) / (unbiased std + eps) over its samples; a demonstration
    (``member``) gets its reward against the samples' statistics."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / (n - 1))
    out = [(x - mean) / (std + EPS) for x in rewards]
    return out + ([] if member is None else [(member - mean) / (std + EPS)])


def _advantages(module, by_hand: list[float]) -> torch.Tensor:
    """The update's advantages (float32, as rewards are), checked against ``by_hand``, in float64."""
    got = module.rollout_buffer.cycle["advantages"].double()
    torch.testing.assert_close(got, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    return got


def _check(module, want, micro_results):
    want.backward()
    ref = _grads(module)
    for loss, grads in micro_results:
        assert loss == pytest.approx(float(want.detach()), rel=1e-9)
        assert grads.keys() == ref.keys()
        for n, g in ref.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-7, atol=1e-10, msg=n)


@pytest.mark.parametrize("rl_normaliser", ["tokens", "max_new_tokens"])
def test_switch_loss_and_gradient_by_hand(ckpt, rl_normaliser):
    """gate 0: prompt 1 (no correct sample) trains its demonstration with SFT, prompts 0 and 2 their samples
    with GRPO: L = 0.7 * NLL(demonstration 1) / its tokens + RL over the 6 kept rows / their tokens (or, as
    the official script, / (9 rollout rows x max_new_tokens))."""
    results = []
    for micro in (None, 1, 3):
        module = _module(micro=micro, gate=0, sft_loss_coef=0.7, rl_normaliser=rl_normaliser, max_new_tokens=5)
        loss, metrics = module.accumulate_update({"prompts": _prompts()})
        results.append((float(loss), _grads(module)))
    module.policy.zero_grad()
    adv = _advantages(module, _adv([1, 0, 0]) + [0.0] * 3 + _adv([1, 1, 0]))  # routed rows: 0
    rows_in = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 1])
    rl_sum, rl_count = _rl_by_hand(module.model, _sampled(_prompts()), adv, rows_in)
    rl = rl_sum / (rl_count if rl_normaliser == "tokens" else 9 * 5)
    sft_sum, sft_count = _sft_by_hand(module.model, _prompts(), [1], [1.0])
    assert sft_count == 3
    _check(module, rl + 0.7 * sft_sum / sft_count, results)
    assert float(metrics["gate_sft_share"]) == pytest.approx(1 / 3)
    assert float(metrics["sft_loss"]) == pytest.approx(float(sft_sum.detach() / sft_count), rel=1e-9)
    assert float(metrics["rl_loss"]) == pytest.approx(
        float(rl_sum.detach() / rl_count), rel=1e-9
    )  # the term, unweighted


def test_soft_loss_and_gradient_by_hand(ckpt):
    """soft, table 0: each group holds its 3 samples and its demonstration; counts (P + demonstration's
    verdict) 2, 0, 3 give (on, off, sft) = (0.125, 0.5, 0.5), (1, 1, 1), (0.25, 1, 0.25): the samples'
    advantages times on, the demonstration's (shaped, off-policy) times off, its NLL times sft."""
    results = []
    for micro in (None, 1, 3):
        module = _module(micro=micro, strategy="soft", soft_type=0, sft_loss_coef=0.7)
        loss, metrics = module.accumulate_update({"prompts": _prompts()})
        results.append((float(loss), _grads(module)))
    module.policy.zero_grad()
    prompts = _prompts()
    mixed = groups.mix(_sampled(prompts), G, groups.demonstration_rows(prompts, 1))
    coef = [0.125] * 3 + [0.5] + [1.0] * 4 + [0.25] * 3 + [1.0]
    adv = _adv([1, 0, 0], 1.0) + _adv([0, 0.3, 0], 0.0) + _adv([1, 1, 0], 1.0)
    adv = _advantages(module, [c * a for c, a in zip(coef, adv)])
    rl_sum, rl_count = _rl_by_hand(module.model, mixed, adv, torch.ones(12))
    sft_sum, sft_count = _sft_by_hand(module.model, prompts, [0, 1, 2], [0.5, 1.0, 0.25])
    _check(module, rl_sum / rl_count + 0.7 * sft_sum / sft_count, results)
    assert float(metrics["gate_sft_share"]) == 1.0
    assert float(metrics["off_policy_token_share"]) == pytest.approx(7 / float(rl_count))  # 2 + 3 + 2 tokens


# ----------------------------------------------------------------------------- degenerate gates
def test_a_gate_below_zero_is_grpo_bit_for_bit(ckpt):
    hpt = _module(gate=-1, micro=2)
    grpo = _module(GRPOModule, micro=2)
    loss, metrics = hpt.accumulate_update({"prompts": _prompts()})
    want, want_metrics = grpo.accumulate_update({"prompts": _prompts()})
    assert float(loss) == float(want) and float(metrics["gate_sft_share"]) == 0.0
    assert "sft_loss" not in metrics and metrics["rl_loss"] == want_metrics["rl_loss"]
    got, ref = _grads(hpt), _grads(grpo)
    assert got.keys() == ref.keys()
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


@pytest.mark.parametrize("gate", [G, 100])
def test_a_gate_at_or_above_g_is_sft_on_the_prompts_demonstrations_bit_for_bit(ckpt, gate):
    hpt = _module(gate=gate, micro=2)
    sft = _module(SFTModule, micro=2)
    loss, metrics = hpt.accumulate_update({"prompts": _prompts()})
    expert = groups.demonstration_labelled(_prompts(), 1, sft.tokenizer.pad_token_id)
    want, want_metrics = sft.accumulate_update({"expert": expert})
    assert float(loss) == float(want) and float(metrics["gate_sft_share"]) == 1.0
    assert "rl_loss" not in metrics and metrics["sft_loss"] == want_metrics["sft_loss"]
    got, ref = _grads(hpt), _grads(sft)
    assert got.keys() == ref.keys()
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"strategy": "hard"}, r"model.strategy='hard': choose one of \['switch', 'soft'\]"),
        ({"gate": float("nan")}, r"model.gate=nan is out of range"),
        ({"sft_loss_coef": -1.0}, r"model.sft_loss_coef=-1.0 is out of range: it must be a finite number >= 0"),
        ({"correct_by": "max"}, r"model.correct_by='max': choose one of \['verdict', 'reward'\]"),
        ({"soft_type": 3}, r"model.soft_type=3: choose one of \[0, 1, 2\]"),
        ({"rl_normaliser": "rows"}, r"model.rl_normaliser='rows'"),
        ({"rl_normaliser": "max_new_tokens", "loss_aggregation": "seq-mean-token-mean"}, "token-mean or"),
        ({"num_generations": 1}, "at least 2 samples"),
    ],
)
def test_bad_settings_are_named(ckpt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HPTModule(model_name_or_path=ckpt, **{"num_generations": 2, **kwargs})


# ----------------------------------------------------------------------------- through a Trainer
def _trainer(steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **{"enable_checkpointing": False, **kw},
    )


def _data(ckpt) -> MixedDataModule:
    """The embedded task's prompts, each paired with its own response (the expert's demonstration)."""
    return MixedDataModule(model_name_or_path=ckpt, expert_data=None, val_data=None, prompt_batch_size=4, seed=0)


def _hpt(ckpt, **kw) -> HPTModule:
    from _rewards import LengthMatchReward  # a verdict a fresh policy earns sometimes: some prompts stay in RL

    kw = {
        "num_generations": 2,
        "max_new_tokens": 3,
        "reward": LengthMatchReward(),
        "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-2),
        **kw,
    }
    return HPTModule(model_name_or_path=ckpt, **kw)


def test_the_gate_is_decided_once_per_rollout_batch_and_each_demonstration_trains_once_per_pass(ckpt):
    """steps_per_generation 2 x num_iterations 2: one rollout batch (4 prompts x G 2 = 8 rows) serves 4
    updates; the gate (and train/gate_sft_share) is that of the rollout batch; a routed prompt's
    demonstration trains in the mini-batch that holds its group's first row, once per pass."""
    torch.manual_seed(0)
    module = _hpt(ckpt, steps_per_generation=2, num_iterations=2)
    logged, routed, trained, now = [], [], [], set()
    log, make, sft = module.log_metrics, module.rollout_batch, module._sft_term

    def rollout_batch(prompts):  # each rollout batch's routed prompts
        out = make(prompts)
        demo = out["demo_of_row"]
        routed.append(sorted(demo[demo >= 0].tolist()))
        return out

    def sft_term(u, r, weight):  # the prompts whose demonstration this update trains
        demo = r["demo_of_row"]
        now.update(demo[demo >= 0].tolist())
        return sft(u, r, weight)

    def record(metrics):  # after each update
        logged.append(float(metrics["gate_sft_share"]))
        trained.append(set(now))
        now.clear()
        log(metrics)

    module.log_metrics, module.rollout_batch, module._sft_term = record, rollout_batch, sft_term
    _trainer(8).fit(module, datamodule=_data(ckpt))
    assert len(routed) == 2 and len(logged) == 8  # two rollout batches, 8 updates
    for cycle in range(2):
        shares = logged[4 * cycle : 4 * cycle + 4]
        assert len(set(shares)) == 1 and shares[0] == pytest.approx(len(routed[cycle]) / 4)
        updates = trained[4 * cycle : 4 * cycle + 4]
        # mini-batch 0 holds rows 0-3 (prompts 0, 1), mini-batch 1 rows 4-7 (prompts 2, 3); two passes
        assert updates[0] == updates[2] == {p for p in routed[cycle] if p < 2}
        assert updates[1] == updates[3] == {p for p in routed[cycle] if p >= 2}
    assert any(0 < len(r) < 4 for r in routed), routed  # both terms at work, not a degenerate gate


def test_a_resume_between_two_updates_of_one_rollout_batch_is_exact(ckpt, tmp_path):
    """A checkpoint after update 3 (steps_per_generation 2: updates 3 and 4 share a rollout batch)
    resumed to update 4, under another seed, ends where the uninterrupted run did without sampling: the
    gate, the coefficients and the rows come back with the buffered rollout batch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(seed: int, out: Path, **fit):
        L.seed_everything(seed)
        module = _hpt(ckpt, steps_per_generation=2)
        sampled, updates, make, step = [], [], module.rollout_batch, module.policy_step
        module.rollout_batch = lambda prompts: sampled.append(1) or make(prompts)
        module.policy_step = lambda loss, metrics: updates.append(1) or step(loss, metrics)
        keep = ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_top_k=-1, filename="{step}")
        _trainer(4, enable_checkpointing=True, callbacks=[keep]).fit(module, datamodule=_data(ckpt), **fit)
        weights = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        return weights, len(sampled), len(updates)

    full, sampled, updates = run(0, tmp_path / "full")
    assert (sampled, updates) == (2, 4)
    resumed, sampled, updates = run(1, tmp_path / "resumed", ckpt_path=tmp_path / "full" / "step=3.ckpt")
    assert (sampled, updates) == (0, 1), "update 4 trains on the checkpoint's rollout batch"
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("stats", ["on_policy", "all"])
def test_soft_trains_through_a_trainer(ckpt, stats):
    """soft: each group holds G samples and its demonstration (scored, an off-policy member), every update
    logs the share of prompts with an SFT coefficient and the RL term's off-policy tokens."""
    torch.manual_seed(0)
    module = _hpt(ckpt, strategy="soft", soft_type=1, advantage_stats=stats)
    logged, log = [], module.log_metrics
    module.log_metrics = lambda m: logged.append({k: float(v) for k, v in m.items()}) or log(m)
    _trainer(2).fit(module, datamodule=_data(ckpt))
    assert len(logged) == 2 and len(module.last_samples["completions"]) == 4 * (2 + 1)
    for m in logged:
        assert 0.0 <= m["gate_sft_share"] <= 1.0 and math.isfinite(m["loss"])
        assert m["off_policy_token_share"] > 0  # soft_type 1 trains every demonstration off-policy too


def test_lora_trains_the_adapters(ckpt):
    module = _hpt(ckpt, lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    names, _ = module.policy.trainable()
    assert names and all("lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    _trainer(2).fit(module, datamodule=_data(ckpt))
    after = dict(module.model.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in before), "the adapters did not move"


def test_the_config_trains_and_logs_the_routed_share(tmp_path):
    out = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/hpt.yaml", "--trainer.max_steps", "3",
         "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1", "--data.init_args.retention_data",
         "null", "--trainer.logger.init_args.save_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = {e.parent for e in tmp_path.rglob("events.out.tfevents.*")}
    scalars = read_scalars(run)
    shares = [v for _, v in scalars["train/gate_sft_share"]]
    # the freshly initialised model answers nothing right: every prompt is routed to its demonstration
    assert shares == [1.0, 1.0, 1.0]
    assert len(scalars["train/sft_loss"]) == 3 and "train/rl_loss" not in scalars
    assert "val/accuracy" in scalars


def test_the_chat_checkpoint_config_parses(capsys):
    from lit_align.cli import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "configs/math_hpt.yaml", "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "lit_align.HPTModule" in printed and "strategy: switch" in printed
