"""The composed core's parts on their own, without a LightningModule: the one log-probs forward (Policy),
the sampler, the rollout buffer, the settings checks; and the shape rules (no mixins, no part importing
the module that drives it)."""

import ast
import inspect
from pathlib import Path
from typing import Literal

import lightning as L
import pytest
import torch

from lit_align.core import settings as S
from lit_align.core.buffer import RolloutBuffer
from lit_align.core.policy import Completions, Labelled, Policy
from lit_align.core.sampler import Sampler, SamplerSettings
from lit_align.core.world import World
from lit_align.hf import load_model, load_tokenizer
from lit_align.modules.policy import PolicyModule
from lit_align.rollout import Rollout

CORE = Path(__file__).resolve().parents[1] / "lit_align" / "core"


def test_policy_module_has_no_mixins_and_no_part_imports_a_module():
    assert PolicyModule.__bases__ == (L.LightningModule,)
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.startswith("lit_align.modules")], path.name
        # no LightningModule / Trainer below the modules; only Lightning's rank-zero logging helpers
        lightning = [m for m in imported if m.split(".")[0] == "lightning"]
        assert all(m == "lightning.pytorch.utilities" for m in lightning), (path.name, lightning)


@pytest.fixture(scope="module")
def policy(ckpt):
    model = load_model(ckpt, dtype="float64").train()
    return Policy(model, load_tokenizer(ckpt))


def test_one_forward_serves_completions_and_labelled_rows_alike(policy):
    """The same sequences as prompt + completion rows and as input ids with labels give the same log-probs
    (the one Policy.logprobs path), equal to a plain full forward."""
    prompt = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completion = torch.tensor([[4, 3, 2, 0], [5, 6, 7, 8]])
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    rows = torch.arange(2)
    a = policy.logprobs(Completions(prompt, prompt_mask, completion, completion_mask), rows)
    # the same rows right-padded, prompt tokens labelled -100
    ids = torch.tensor([[5, 6, 4, 3, 2, 0, 0], [7, 8, 9, 5, 6, 7, 8]])
    att = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 4, 3, 2, -100, -100], [-100, -100, -100, 5, 6, 7, 8]])
    b = policy.logprobs(Labelled(ids, att, labels), rows)
    got_a = a.logp[a.mask.bool()]
    got_b = b.logp[b.mask.bool()]
    torch.testing.assert_close(got_a, got_b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        logits = policy.model(input_ids=ids, attention_mask=att).logits
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got_b, want[labels[:, 1:] != -100], rtol=1e-10, atol=1e-10)


def test_the_sampler_runs_without_a_module(policy, ckpt):
    sampler = Sampler(policy, SamplerSettings(num_generations=3, max_new_tokens=5))
    tok = policy.tokenizer
    enc = tok(["1+2=", "12+30="], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    r = sampler.sample({"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask}, World())
    assert r.completion_ids.shape[0] == 6 and len(r.completions) == 6 and r.completion_ids.shape[1] <= 5
    assert sampler.truncated(r).shape == (6,)
    assert sampler.metrics(r) == {} and sampler.importance_weights(r, torch.arange(6), 5) is None


def _rollout(n: int) -> Rollout:
    return Rollout(
        torch.zeros(n, 2, dtype=torch.long),
        torch.ones(n, 2, dtype=torch.long),
        torch.arange(n * 3).view(n, 3),
        torch.ones(n, 3, dtype=torch.long),
        torch.zeros(n, 3),
        torch.zeros(n, 3),
        [str(i) for i in range(n)],
        group_ids=torch.arange(n) // 2,
        off_policy=torch.arange(n) % 2 == 1,
    )


def test_the_buffer_keeps_one_rollout_batch_per_cycle_and_cuts_its_mini_batches():
    buffer = RolloutBuffer(steps_per_generation=2, num_iterations=2)
    made = []

    def make():
        made.append(1)
        return {"rollout": _rollout(6), "advantages": torch.arange(6.0), "mask": torch.ones(6, 3), "reward_mean": 0.5}

    seen = []
    for r in range(4):  # one cycle: 2 mini-batches x 2 passes
        position = buffer.position({"prompts": {"repeat": r}})
        rows = buffer.rollout_rows(buffer.get(position, make), position)
        seen.append(rows["advantages"].tolist())
        assert rows["rollout"].completions == [str(int(a)) for a in rows["advantages"]]
        assert rows["rollout"].off_policy.tolist() == [int(a) % 2 == 1 for a in rows["advantages"]]
        assert rows["reward_mean"] == 0.5
    assert len(made) == 1 and seen == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]]
    state = buffer.state_dict()
    other = RolloutBuffer(2, 2)
    other.load_state_dict(state)
    assert torch.equal(other.cycle["rollout"].group_ids, buffer.cycle["rollout"].group_ids)
    assert other.position({"prompts": {"repeat": 0}}) == 0 and other.cycle is None  # a new cycle empties it
    with pytest.raises(ValueError, match="model.steps_per_generation=2"):
        RolloutBuffer(2).minibatch(1, 0)


def test_one_validation_style():
    def ctor(mode: Literal["a", "b"] = "a", dtype: Literal["x"] | None = None, n: int = 1):
        pass

    S.check(ctor, {"mode": "a", "dtype": None, "n": 3}, {"n": S.integer(1)})
    with pytest.raises(ValueError, match=r"model.mode='c': choose one of \['a', 'b'\]"):
        S.check(ctor, {"mode": "c"})
    with pytest.raises(ValueError, match=r"model.dtype='y': choose one of \['x', None\]"):
        S.check(ctor, {"dtype": "y"})
    with pytest.raises(ValueError, match=r"data.n=0 is out of range: it must be an integer >= 1"):
        S.check(ctor, {"n": 0}, {"n": S.integer(1)}, prefix="data")
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        S.check(ctor, {"n": 0.0}, {"n": S.number(0, 1, low_open=True)})
    assert "token_weighting" in S.literal_choices(inspect.unwrap(__import__("lit_align").CHORDModule.__init__))
