"""Paired data: each training prompt row carries the demonstration(s) of that very prompt (LUFFY, HPT,
Prefix-RFT), asked for by the method with ``pair_demonstrations(k)`` / ``demonstrations_per_prompt``."""

import json

import pytest
import torch

from lit_align.data import embedded
from lit_align.data.datamodule import MixedDataModule
from lit_align.data.loading import DataError

NEW_KEYS = {"demo_ids", "demo_mask", "demonstrations"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _dm(ckpt, k=None, **kw):
    kw = {"val_data": None, "expert_batch_size": 2, "prompt_batch_size": 3, "seed": 0, **kw}
    dm = MixedDataModule(model_name_or_path=ckpt, **kw)
    dm.setup("fit")
    if k is not None:
        dm.pair_demonstrations(k)
    return dm


def _prompt_batches(dm):
    """Every prompt batch of one pass of the training loader."""
    return list(dm.train_dataloader().iterables["prompts"])


def _demos_of(dm, batch):
    """prompt -> the demonstrations' decoded tokens (pad dropped, EOS kept), per row of a paired batch."""
    tok, out = dm.tokenizer, {}
    assert batch["demo_ids"].shape == batch["demo_mask"].shape and batch["demo_ids"].dtype == torch.long
    for prompt, ids, mask, texts in zip(
        batch["prompts"], batch["demo_ids"], batch["demo_mask"], batch["demonstrations"]
    ):
        decoded = [tok.decode(row[m.bool()]) for row, m in zip(ids, mask)]
        assert decoded == [t + tok.eos_token for t in texts]  # the texts are the demonstrations' tokens
        assert all((row[~m.bool()] == tok.pad_token_id).all() for row, m in zip(ids, mask))  # right-padded
        assert all(m[: int(m.sum())].all() for m in mask)
        out[prompt] = texts
    return out


def test_pairing_by_identical_prompt_text(ckpt, tmp_path):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)])
    expert = _jsonl(
        tmp_path / "e.jsonl",
        [{"prompt": f"{i}+1=", "response": str(i + 1) * (1 + i % 3)} for i in reversed(range(6))]
        + [{"prompt": "9+9=", "response": "18"}],  # a demonstration of no training prompt: unused
    )
    dm = _dm(ckpt, 1, prompt_data=prompts, expert_data=expert)
    seen = {}
    for batch in _prompt_batches(dm):
        assert batch["demo_ids"].shape[:2] == (3, 1) and len(batch["demonstrations"]) == 3
        seen |= _demos_of(dm, batch)
    assert seen == {f"{i}+1=": [str(i + 1) * (1 + i % 3)] for i in range(6)}


def test_pairing_asked_for_after_setup_happens_when_the_loader_is_built(ckpt, tmp_path):
    """The model's setup runs after the data module's: setting the attribute then pairs lazily; set before
    setup(), it pairs in setup() (and a data problem stops setup)."""
    rows = [{"prompt": f"{i}+2=", "response": str(i + 2), "answer": str(i + 2)} for i in range(4)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    dm = _dm(ckpt, prompt_data=path, expert_data=path)
    dm.demonstrations_per_prompt = 1
    batch = _prompt_batches(dm)[0]
    assert NEW_KEYS <= set(batch)
    assert _demos_of(dm, batch) == {p: [str(int(p.split("+")[0]) + 2)] for p in batch["prompts"]}
    early = MixedDataModule(model_name_or_path=ckpt, prompt_data=path, expert_data=path, val_data=None)
    early.pair_demonstrations(1)  # before setup: waits for the encoded rows
    assert early._paired is None
    early.setup("fit")
    assert early._paired is not None and len(early._paired[1]) == 4
    bad = MixedDataModule(model_name_or_path=ckpt, prompt_data=path, expert_data=path, val_data=None)
    bad.demonstrations_per_prompt = 2  # one demonstration per prompt only
    with pytest.raises(DataError, match="fewer than 2 demonstration"):
        bad.setup("fit")
    with pytest.raises(ValueError, match="demonstrations_per_prompt=-1"):
        dm.pair_demonstrations(-1)


def test_pairing_by_an_id_column(ckpt, tmp_path):
    """Ids pair rows whose prompt texts differ (here the expert's carry a leading zero); an id may have several
    expert rows (demonstrations); numbers and their text compare equal."""
    prompts = _jsonl(tmp_path / "p.jsonl", [{"qid": i, "prompt": f"{i}+3=", "answer": str(i + 3)} for i in range(3)])
    expert = _jsonl(
        tmp_path / "e.jsonl",
        [
            {"qid": "2", "prompt": "02+3=", "response": "5"},
            {"qid": "0", "prompt": "00+3=", "response": "3"},
            {"qid": "1", "prompt": "01+3=", "response": "4"},
            {"qid": "1", "prompt": "01+3=", "response": "44"},
        ],
    )
    dm = _dm(ckpt, 1, prompt_data=prompts, expert_data=expert, pair_by="qid")
    (batch,) = _prompt_batches(dm)
    assert _demos_of(dm, batch) == {"0+3=": ["3"], "1+3=": ["4"], "2+3=": ["5"]}
    with pytest.raises(
        DataError,
        match=r"(?s)p\.jsonl: 2 prompt rows with fewer than 2 demonstration.*row 1, column 'qid' \(id '0'\), "
        r"prompt '0\+3=': 1 found.*row 3, column 'qid' \(id '2'\)",
    ):
        _dm(ckpt, 2, prompt_data=prompts, expert_data=expert, pair_by="qid")
    # by prompt text the leading zeros pair nothing
    with pytest.raises(DataError, match=r"p\.jsonl: 3 prompt rows with fewer than 1 demonstration"):
        _dm(ckpt, 1, prompt_data=prompts, expert_data=expert)


def test_an_id_column_missing_from_either_file_is_named(ckpt, tmp_path):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"qid": i, "prompt": f"{i}+3=", "answer": str(i + 3)} for i in range(3)])
    no_ids = _jsonl(tmp_path / "e.jsonl", [{"prompt": f"{i}+3=", "response": str(i + 3)} for i in range(3)])
    with pytest.raises(
        DataError, match=r"(?s)e\.jsonl: rows 1-3: missing column 'qid' \(expert_data\); data\.pair_by='qid'"
    ):
        _dm(ckpt, 1, prompt_data=prompts, expert_data=no_ids, pair_by="qid")
    with pytest.raises(DataError, match=r"p\.jsonl: rows 1-3: missing column 'id' \(prompt_data\)"):
        _dm(ckpt, 1, prompt_data=prompts, expert_data=no_ids, pair_by="id")
    partial = _jsonl(
        tmp_path / "e2.jsonl", [{"qid": 0, "prompt": "0+3=", "response": "3"}, {"prompt": "1+3=", "response": "4"}]
    )
    with pytest.raises(DataError, match=r"(?s)e2\.jsonl: 1 rows without a usable id.*row 2, column 'qid' is missing"):
        _dm(ckpt, 1, prompt_data=prompts, expert_data=partial, pair_by="qid")
    _dm(ckpt, prompt_data=prompts, expert_data=no_ids, pair_by="qid")  # k = 0: pair_by is never read
    with pytest.raises(ValueError, match="data.pair_by"):
        MixedDataModule(model_name_or_path=ckpt, pair_by="")


def test_duplicate_ids_in_the_prompt_file_are_named(ckpt, tmp_path):
    rows = [{"qid": q, "prompt": f"{i}+4=", "answer": str(i + 4)} for i, q in enumerate(["a", "b", "a", "c", "b"])]
    prompts = _jsonl(tmp_path / "p.jsonl", rows)
    expert = _jsonl(tmp_path / "e.jsonl", [{"qid": q, "prompt": "1+4=", "response": "5"} for q in "abc"])
    with pytest.raises(
        DataError,
        match=r"(?s)p\.jsonl: 2 prompt rows whose id repeats.*row 3, column 'qid': id 'a' is also on row 1.*"
        r"row 5, column 'qid': id 'b' is also on row 2.*data\.pair_by='qid'",
    ):
        _dm(ckpt, 1, prompt_data=prompts, expert_data=expert, pair_by="qid")


def test_a_prompt_without_a_demonstration_is_named(ckpt, tmp_path):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i}+5=", "answer": str(i + 5)} for i in range(4)])
    expert = _jsonl(tmp_path / "e.jsonl", [{"prompt": f"{i}+5=", "response": str(i + 5)} for i in (0, 1, 3)])
    with pytest.raises(
        DataError,
        match=r"(?s)p\.jsonl: 1 prompt rows with fewer than 1 demonstration.*row 3, column 'prompt', prompt '2\+5=': "
        r"0 found.*data\.pair_by='prompt'.*e\.jsonl \(expert_data\)",
    ):
        _dm(ckpt, 1, prompt_data=prompts, expert_data=expert)
    long = "1" * 80 + "+5="  # the prompt's text is abbreviated
    prompts = _jsonl(tmp_path / "p2.jsonl", [{"prompt": "0+5=", "answer": "5"}, {"prompt": long, "answer": "1"}])
    with pytest.raises(DataError, match=r"row 2, column 'prompt', prompt '1{57}\.\.\.': 0 found"):
        _dm(ckpt, 1, prompt_data=prompts, expert_data=expert)
    with pytest.raises(ValueError, match="data.prompt_data is null"):
        _dm(ckpt, 1, prompt_data=None, expert_data=expert)


def test_one_file_of_prompt_response_answer_serves_both_streams(ckpt, tmp_path):
    """A prompt row's own response column is its demonstration: expert_data may be null."""
    rows = [{"prompt": f"{i}+6=", "response": str(i + 6), "answer": str(i + 6)} for i in range(5)]
    rows[2]["response"] = " "  # a blank response is no demonstration
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        DataError, match=r"(?s)row 3, column 'prompt', prompt '2\+6=': 0 found.*data.expert_data is null"
    ):
        _dm(ckpt, 1, prompt_data=path, expert_data=None)
    del rows[2]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    dm = _dm(ckpt, 1, prompt_data=path, expert_data=None, prompt_batch_size=2)
    seen = {}
    for batch in _prompt_batches(dm):
        seen |= _demos_of(dm, batch)
    assert seen == {r["prompt"]: [r["response"]] for r in rows}
    # the same file as both streams: the own response and the identical expert row count once
    with pytest.raises(DataError, match=r"4 prompt rows with fewer than 2 demonstration"):
        _dm(ckpt, 2, prompt_data=path, expert_data=path)


def test_k_2_takes_the_first_two_demonstrations_in_file_order(ckpt, tmp_path):
    prompts = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "1+7=", "answer": "8", "response": "8"},
            {"prompt": "2+7=", "answer": "9"},
            {"prompt": "3+7=", "answer": "10"},
        ],
    )
    expert = _jsonl(
        tmp_path / "e.jsonl",
        [
            {"prompt": "3+7=", "response": "10"},
            {"prompt": "1+7=", "response": "88"},
            {"prompt": "2+7=", "response": "9"},
            {"prompt": "3+7=", "response": "100"},
            {"prompt": "1+7=", "response": "888"},
            {"prompt": "2+7=", "response": "9"},  # identical to an earlier one: counted once
            {"prompt": "2+7=", "response": "99"},
            {"prompt": "3+7=", "response": "1000"},
        ],
    )
    dm = _dm(ckpt, 2, prompt_data=prompts, expert_data=expert)
    (batch,) = _prompt_batches(dm)
    assert batch["demo_ids"].shape == (3, 2, 4)  # "100" + EOS is the longest
    assert batch["demo_mask"].sum(-1).tolist() == [[len(t) + 1 for t in texts] for texts in batch["demonstrations"]]
    # the prompt row's own response first, then the expert's rows in file order
    assert _demos_of(dm, batch) == {"1+7=": ["8", "88"], "2+7=": ["9", "99"], "3+7=": ["10", "100"]}
    with pytest.raises(
        DataError, match=r"1 prompt rows with fewer than 3.*\n  row 2, column 'prompt', prompt '2\+7=': 2 found"
    ):
        dm.pair_demonstrations(3)  # "9" twice counts once


@pytest.mark.parametrize("checkpoint", ["ckpt", "base_chat_ckpt"])
def test_demo_ids_are_the_tokens_the_expert_row_trains_on(checkpoint, request, tmp_path):
    """Placed after the prompt's real tokens, a demonstration is the sequence SFT trains on, with the same labels
    and the same end token: the EOS without a chat template, the template's end of turn with one (a base
    checkpoint's ChatML: <|im_end|>, not its EOS <|endoftext|>), in the rows HPT's SFT term trains on too."""
    from lit_align.core import groups

    ckpt = request.getfixturevalue(checkpoint)
    rows = [{"prompt": f"{i}+{i}=", "response": str(2 * i) + "0" * (i % 4), "answer": str(2 * i)} for i in range(7)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    dm = _dm(ckpt, 1, prompt_data=path, expert_data=path, prompt_batch_size=7)
    end = dm.tokenizer.eos_token_id if checkpoint == "ckpt" else dm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    (batch,) = _prompt_batches(dm)
    expert = dm.collate_expert(dm.expert_rows)
    by_prompt = {r["prompt"]: i for i, r in enumerate(dm.expert_rows)}
    for b, prompt in enumerate(batch["prompts"]):
        e = by_prompt[prompt]
        labels, mask = expert["labels"][e], expert["attention_mask"][e].bool()
        demo = batch["demo_ids"][b, 0][batch["demo_mask"][b, 0].bool()]
        assert torch.equal(demo, labels[labels != -100])
        prompt_ids = batch["prompt_ids"][b][batch["prompt_mask"][b].bool()]
        assert torch.equal(torch.cat([prompt_ids, demo]), expert["input_ids"][e][mask])
        assert demo[-1].item() == end
    # the rows HPT's SFT term builds from the paired batch are the expert stream's rows of those prompts
    labelled = groups.demonstration_labelled(batch, 1, dm.tokenizer.pad_token_id)
    _same(labelled, dm.collate_expert([dm.expert_rows[by_prompt[p]] for p in batch["prompts"]]))


def test_an_overlong_own_response_counts_only_when_truncating(ckpt, tmp_path):
    rows = [{"prompt": "1+1=", "response": "2" * 20, "answer": "2"}, {"prompt": "2+2=", "response": "4", "answer": "4"}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(prompt_data=path, expert_data=None, max_response_length=8)
    with pytest.raises(
        DataError, match=r"row 1, column 'prompt', prompt '1\+1=': 0 found \(its own 'response' is longer"
    ):
        _dm(ckpt, 1, overlong="skip", **kw)
    dm = _dm(ckpt, 1, overlong="truncate", **kw)
    (batch,) = _prompt_batches(dm)
    cut = dm._paired[1][0]["demo_ids"][0]
    assert cut == [dm.tokenizer.convert_tokens_to_ids("2")] * 8  # the start of the response, as an expert row's cut
    expert = _dm(ckpt, prompt_data=None, expert_data=path, overlong="truncate", max_response_length=8).expert_rows
    assert expert[0]["response_ids"] == cut


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            _same(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_k_0_leaves_batches_unchanged_and_pairing_keeps_the_data_position(ckpt):
    """The default (embedded) configuration: no new keys at k = 0; paired, the same rows in the same order."""

    def batches(dm, n=4):
        loader = dm.train_dataloader()
        return [b for b, _, _ in (x for _, x in zip(range(n), loader))]

    plain = batches(_dm(ckpt))
    for b in plain:
        assert set(b["prompts"]) == {"prompt_ids", "prompt_mask", "prompts", "answers", "columns"}
    undone = _dm(ckpt, 1)
    undone.pair_demonstrations(0)
    paired = batches(_dm(ckpt, 1))
    for a, b, c in zip(plain, batches(undone), paired):
        _same(a, b)
        _same(a["expert"], c["expert"])
        _same(a["prompts"], {k: v for k, v in c["prompts"].items() if k not in NEW_KEYS})
        assert set(c["prompts"]) - set(a["prompts"]) == NEW_KEYS
    # the data position survives a restart with pairing on, as without
    dm = _dm(ckpt, 1)
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it), next(it)
    state = loader.iterables["prompts"].state_dict()
    resumed = _dm(ckpt, 1).train_dataloader().iterables["prompts"]
    resumed.load_state_dict(state)
    _same(next(iter(resumed)), next(it)[0]["prompts"])


def test_the_embedded_task_pairs_each_prompt_with_the_experts_demonstration(ckpt):
    """Prompt and expert streams of the embedded task share train.jsonl: every prompt row carries the
    expert's (deterministic, sometimes wrong) demonstration of its problem."""
    dm = _dm(ckpt, 1)  # expert_data: embedded, prompt_data: embedded
    assert {r["prompt"] for r in dm.prompt_rows} == {r["prompt"] for r in dm.expert_rows}
    wrong = embedded.error_pairs(dm.hparams.expert_error_rate)
    rows = dm._paired[1]
    assert len(rows) == len(dm.prompt_rows)
    for row in rows:
        a, b = map(int, row["prompt"][:-1].split("+"))
        assert row["demonstrations"] == [embedded.expert_answer(a, b, wrong)]
    expert = {r["prompt"]: r["response_ids"] for r in dm.expert_rows}
    assert all(row["demo_ids"] == [expert[row["prompt"]]] for row in rows)
    with pytest.raises(DataError, match="fewer than 2 demonstration"):  # one demonstration per problem
        dm.pair_demonstrations(2)


def test_conversational_prompts_pair_by_the_prompt_the_template_renders(base_chat_ckpt, tmp_path):
    """TRL's conversational rows pair by the prompt as the chat template renders it: a prompt-only row (column
    'prompt') with the 'messages' rows whose messages before the last assistant turn are that prompt, and with
    a text row whose prompt renders the same (one user turn), but not when its own system message differs."""
    questions = [f"Natalia sold {a} clips in April and {a + 1} in May. How many clips altogether?" for a in (3, 4, 5)]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    conversations[2].insert(0, {"role": "system", "content": "Count carefully."})
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": c, "answer": str(i)} for i, c in enumerate(conversations)])
    replies = [f"{2 * a + 1} clips." for a in (3, 4, 5)]
    chats = [
        {"messages": [*c, {"role": "assistant", "content": r}]} for c, r in reversed(list(zip(conversations, replies)))
    ]
    dm = _dm(
        base_chat_ckpt, 1, prompt_data=prompts, expert_data=_jsonl(tmp_path / "chats.jsonl", chats), prompt_batch_size=3
    )
    tok = dm.tokenizer
    (batch,) = _prompt_batches(dm)
    got = {}
    for prompt, ids, mask, texts in zip(
        batch["prompts"], batch["demo_ids"], batch["demo_mask"], batch["demonstrations"]
    ):
        assert tok.decode(ids[0][mask[0].bool()]) == texts[0] + "<|im_end|>"
        got[prompt] = texts
    render = lambda c: tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)  # noqa: E731
    assert got == {render(c): [r] for c, r in zip(conversations, replies)}
    text = _jsonl(tmp_path / "text.jsonl", [{"prompt": q, "response": r} for q, r in zip(questions, replies)])
    with pytest.raises(
        DataError,
        match=r"1 prompt rows with fewer than 1 demonstration.*\n  row 3, column 'prompt', prompt 'Natalia sold 5 clips "
        r"in April and 6 in May. How many clip...': 0 found",
    ):
        _dm(base_chat_ckpt, 1, prompt_data=prompts, expert_data=text)
    conversations[2].pop(0)  # now one user turn, as the text rows: all pair
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": c, "answer": str(i)} for i, c in enumerate(conversations)])
    (batch,) = _prompt_batches(_dm(base_chat_ckpt, 1, prompt_data=prompts, expert_data=text, prompt_batch_size=3))
    assert dict(zip(batch["prompts"], batch["demonstrations"])) == {
        render(c): [r] for c, r in zip(conversations, replies)
    }
