"""HPT (Hybrid Post-Training): per prompt, SFT on its demonstration when few of its G samples are correct,
GRPO on its samples otherwise.

- the demonstration rows of a paired prompt batch (core.groups.demonstration_labelled) are the rows the data
  module's expert stream builds for the same prompt and response.
"""

import json

import pytest
import torch

from lit_align import MixedDataModule
from lit_align.core import groups


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
