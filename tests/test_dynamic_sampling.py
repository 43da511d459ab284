"""DAPO's dynamic sampling (model.dynamic_sampling): groups whose rewards are all equal are dropped and the
rollout batch is refilled from the data module's refill stream; resume stays exact."""

import json
from pathlib import Path

import torch

from lit_align import MixedDataModule, losses
from lit_align.core import dynamic_sampling
from lit_align.rollout import Rollout


def _data(tmp_path: Path, n: int = 16, parity: str = "both") -> Path:
    """``n`` addition prompts whose answers alternate even, odd (``parity="even"``: all even)."""
    pairs = [(10 + i, 3) for i in range(n)] if parity == "both" else [(10 + 2 * i, 4) for i in range(n)]
    rows = [{"prompt": f"{a}+{b}=", "response": str(a + b), "answer": str(a + b)} for a, b in pairs]
    path = tmp_path / f"prompts_{parity}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- the pure pieces
def test_signal_groups_are_those_whose_rewards_differ_over_every_member():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5 + 1e-10, 0.5, 2.0])
    gid = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    # equal, spread, equal up to a zero std (as the advantages see it), one member, no member
    assert dynamic_sampling.signal_groups(rewards, gid, 5).tolist() == [False, True, False, False, False]
    # LUFFY's group: every sample fails, the demonstration (last member) succeeds: a signal, kept
    assert dynamic_sampling.signal_groups(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.zeros(4).long(), 1).tolist() == [
        True
    ]
    # groups of G samples: kept exactly where GRPO's advantages are not all 0
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (40, 4), generator=g).float().reshape(-1)
    adv, _ = losses.group_advantages(rewards, 4)
    signal = dynamic_sampling.signal_groups(rewards, torch.arange(160) // 4, 40)
    assert signal.tolist() == (adv.view(40, 4) != 0).any(-1).tolist()
    assert 0 < int(signal.sum()) < 40


def _round(names: list[str], G: int, width: int, prompt_width: int, mixed: bool) -> dict:
    """A hand-made round: ``names`` prompts, G samples each (``mixed``: plus one demonstration per group)."""
    per = G + int(mixed)
    n = len(names) * per
    texts = [f"{p}/{j}" for p in names for j in range(per)]
    rollout = Rollout(
        torch.arange(n * prompt_width).view(n, prompt_width) + 1,
        torch.ones(n, prompt_width, dtype=torch.long),
        torch.arange(n * width).view(n, width) + 100,
        torch.ones(n, width, dtype=torch.long),
        torch.full((n, width), -0.5),
        torch.full((n, width), 0.25),
        texts,
        "decode",
        group_ids=torch.arange(len(names)).repeat_interleave(per) if mixed else None,
        off_policy=(torch.arange(n) % per == G) if mixed else None,
    )
    prompts = {
        "prompt_ids": torch.arange(len(names) * prompt_width).view(len(names), prompt_width) + 1,
        "prompt_mask": torch.ones(len(names), prompt_width, dtype=torch.long),
        "prompts": list(names),
        "answers": [f"answer of {p}" for p in names],
        "columns": {"id": [f"id of {p}" for p in names]},
        "repeat": 0,
    }
    rewards = torch.arange(n, dtype=torch.float32)
    return {"prompts": prompts, "rollout": rollout, "rewards": rewards, "rows": {"tag": rewards * 10}, "metrics": {}}


def test_take_and_cat_keep_every_row_with_its_prompt():
    a = _round(["a0", "a1"], G=2, width=2, prompt_width=3, mixed=False)
    b = _round(["b0", "b1"], G=2, width=3, prompt_width=4, mixed=True)
    out = dynamic_sampling.cat(
        [dynamic_sampling.take(a, torch.tensor([1]), 2), dynamic_sampling.take(b, torch.tensor([1, 0]), 2)], 2, 7
    )
    r = out["rollout"]
    assert out["prompts"]["prompts"] == ["a1", "b1", "b0"]
    assert out["prompts"]["answers"] == ["answer of a1", "answer of b1", "answer of b0"]
    assert out["prompts"]["columns"] == {"id": ["id of a1", "id of b1", "id of b0"]}
    assert out["prompts"]["repeat"] == 0
    assert r.completions == ["a1/0", "a1/1", "b1/0", "b1/1", "b1/2", "b0/0", "b0/1", "b0/2"]
    assert r.group_ids.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert r.off_policy.tolist() == [False, False, False, False, True, False, False, True]
    # each row's reward and per-row value came with it (a1's rows are a's 2, 3; b1's are b's 3, 4, 5)
    assert out["rewards"].tolist() == [2, 3, 3, 4, 5, 0, 1, 2]
    assert out["rows"]["tag"].tolist() == [20, 30, 30, 40, 50, 0, 10, 20]
    # widths: prompts left-padded (pad id under mask 0), completions right-padded (0 under mask 0)
    assert r.prompt_ids.shape == (8, 4) and r.completion_ids.shape == (8, 3)
    assert r.prompt_mask[:2].tolist() == [[0, 1, 1, 1]] * 2 and r.prompt_ids[0, 0] == 7
    assert r.completion_mask[:2].tolist() == [[1, 1, 0]] * 2 and r.completion_mask[2:].eq(1).all()
    assert torch.equal(r.completion_ids[0, :2], a["rollout"].completion_ids[2])
    assert torch.equal(r.completion_ids[2], b["rollout"].completion_ids[3])
    assert out["prompts"]["prompt_ids"].shape == (3, 4) and out["prompts"]["prompt_mask"][0].tolist() == [0, 1, 1, 1]
    assert torch.equal(out["prompts"]["prompt_ids"][0, 1:], a["prompts"]["prompt_ids"][1])
    # a round of plain groups cut to some of them keeps its layout (no group ids needed)
    plain = dynamic_sampling.take(a, torch.tensor([1, 0]), 2)
    assert plain["rollout"].group_ids is None and plain["rollout"].completions == ["a1/0", "a1/1", "a0/0", "a0/1"]


# ----------------------------------------------------------------------------- the refill stream
def test_refill_stream_resumes_where_it_stopped_and_has_an_order_of_its_own(tmp_path, ckpt):
    data = _data(tmp_path)

    def setup(state=None):
        dm = MixedDataModule(
            model_name_or_path=ckpt, expert_data=None, prompt_data=str(data), val_data=None, prompt_batch_size=4, seed=0
        )
        dm.setup("fit")
        if state is not None:
            dm.load_state_dict(state)
        return dm

    dm = setup()
    assert dm.state_dict() == {}, "nothing to save before the stream is used"
    drawn = [dm.refill_prompts()["prompts"] for _ in range(7)]  # 4 batches a pass: into the second pass
    first_pass = sorted(p for batch in drawn[:4] for p in batch)
    assert first_pass == sorted(r["prompt"] for r in map(json.loads, data.read_text().splitlines()))
    assert drawn[4:7] != drawn[:3], "each pass has an order of its own"
    training = [b["prompts"] for b in dm.train_dataloader().iterables["prompts"]][:4]
    assert training != drawn[:4], "the refill stream is not the training stream"
    for used in (2, 4, 5):  # mid pass, at a pass end, inside the next pass
        dm = setup()
        for _ in range(used):
            dm.refill_prompts()
        state = dm.state_dict()
        resumed = setup(state)
        assert resumed.state_dict() == state, "a loaded position is kept until the stream is used"
        assert [resumed.refill_prompts()["prompts"] for _ in range(7 - used)] == drawn[used:], used
