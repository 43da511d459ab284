import json
from pathlib import Path

import pytest

from lit_align.data import embedded
from lit_align.data.datamodule import MixedDataModule
from lit_align.data.loading import DataError


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_embedded_expert_errors_are_systematic(task):
    wrong = embedded.error_pairs(0.25)
    assert len(wrong) == 25 and all(a + b >= 10 for a, b in wrong)  # every wrong pair carries
    rows = _rows(task["train"])
    bad = [r for r in rows if r["response"] != r["answer"]]
    assert 0.2 < len(bad) / len(rows) < 0.3
    for r in bad:  # always the same mistake: the ones carry is dropped
        a, b = map(int, r["prompt"][:-1].split("+"))
        assert (a % 10, b % 10) in wrong and int(r["response"]) == a + b - 10
    assert embedded.error_pairs(0.0) == set()
    with pytest.raises(ValueError, match="expert_error_rate"):
        embedded.error_pairs(0.6)


def test_embedded_splits_are_disjoint_and_complete(task):
    splits = {k: {r["prompt"] for r in _rows(v)} for k, v in task.items()}
    assert len(splits["val"]) == 500 and len(splits["meta"]) == 500
    assert not (splits["val"] & splits["train"]) and not (splits["meta"] & splits["train"])
    assert not (splits["val"] & splits["meta"])
    assert sum(len(s) for s in splits.values()) == 100 * 100


def _dm(ckpt, **kw):
    dm = MixedDataModule(model_name_or_path=ckpt, expert_batch_size=4, prompt_batch_size=3, val_batch_size=5, **kw)
    dm.setup("fit")
    return dm


def test_mixed_batches_mask_the_prompt_and_pad_prompts_left(ckpt):
    dm = _dm(ckpt)
    batch, _, _ = next(iter(dm.train_dataloader()))
    expert, prompts = batch["expert"], batch["prompts"]
    assert expert["input_ids"].shape[0] == 4 and prompts["prompt_ids"].shape[0] == 3
    tok = dm.tokenizer
    for ids, labels, mask in zip(expert["input_ids"], expert["labels"], expert["attention_mask"]):
        text = tok.decode(ids[mask.bool()])
        prompt, response = text.split("=")
        kept = labels[labels != -100]
        assert tok.decode(kept) == response  # the labels are exactly the demonstration + EOS
        assert response.endswith(tok.eos_token)
    assert (prompts["prompt_mask"][:, -1] == 1).all()  # left padding: last column always real
    for ids, ans in zip(prompts["prompt_ids"], prompts["answers"]):
        a, b = tok.decode(ids, skip_special_tokens=True)[:-1].split("+")
        assert int(a) + int(b) == int(ans)
    val = next(iter(dm.val_dataloader()))
    assert "expert" in val and len(val["answers"]) == 5


def test_shuffling_is_seeded(ckpt, monkeypatch):
    first = lambda dm: next(iter(dm.train_dataloader()))[0]["prompts"]["prompts"]  # noqa: E731
    assert first(_dm(ckpt, seed=1)) == first(_dm(ckpt, seed=1))
    assert first(_dm(ckpt, seed=1)) != first(_dm(ckpt, seed=2))
    # without data.seed the order follows the run's seed_everything
    import lightning as L

    L.seed_everything(1)
    assert first(_dm(ckpt)) == first(_dm(ckpt, seed=1))
    L.seed_everything(2)
    assert first(_dm(ckpt)) == first(_dm(ckpt, seed=2))


def test_null_streams_are_left_out(ckpt):
    dm = _dm(ckpt, prompt_data=None)
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"expert"}
    with pytest.raises(ValueError, match="nothing to train on"):
        MixedDataModule(model_name_or_path=ckpt, expert_data=None, prompt_data=None)


def _write(path, lines):
    path.write_text("".join(lines))
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_user_files_with_custom_columns(ckpt, tmp_path, suffix):
    import datasets

    rows = [{"question": f"{i}+1=", "solution": str(i + 1), "target": str(i + 1)} for i in range(6)]
    path = str(tmp_path / f"d{suffix}")
    ds = datasets.Dataset.from_list(rows)
    {".jsonl": lambda: ds.to_json(path), ".csv": lambda: ds.to_csv(path), ".parquet": lambda: ds.to_parquet(path)}[
        suffix
    ]()
    dm = _dm(
        ckpt,
        expert_data=path,
        prompt_data=path,
        val_data=path,
        prompt_column="question",
        response_column="solution",
        answer_column="target",
    )
    assert len(dm.expert_rows) == 6 and dm.prompt_rows[0]["answer"] == "1"


def test_meta_completions_come_from_the_chosen_column(ckpt, tmp_path):
    """AMFT's held-out NLL scores the meta rows' completions: the expert's by default, the verified
    answers with meta_response_column=answer (numbers included), never the expert's wrong ones."""
    rows = [{"prompt": f"{i}+109=", "response": str(i), "answer": i + 109} for i in range(6)]  # an expert always wrong
    path = _write(tmp_path / "meta.jsonl", [json.dumps(r) + "\n" for r in rows])
    tok_text = lambda dm, row: dm.tokenizer.decode(row["response_ids"])  # noqa: E731
    plain = _dm(ckpt, meta_data=path)
    assert [tok_text(plain, r) for r in plain.meta_rows] == [f"{i}{plain.tokenizer.eos_token}" for i in range(6)]
    verified = _dm(ckpt, meta_data=path, meta_response_column="answer")
    assert [tok_text(verified, r) for r in verified.meta_rows] == [
        f"{i + 109}{verified.tokenizer.eos_token}" for i in range(6)
    ]
    assert verified.expert_rows[0]["response_ids"] == plain.expert_rows[0]["response_ids"]  # training data untouched
    meta = next(iter(verified.train_dataloader()))[0]["meta"]
    labels = meta["expert"]["labels"]
    answers = sorted(int(verified.tokenizer.decode(row[row != -100], skip_special_tokens=True)) for row in labels)
    assert answers == [i + 109 for i in range(6)]
    with pytest.raises(DataError, match=r"meta\.jsonl: missing column 'solution'.*meta_response_column"):
        _dm(ckpt, meta_data=path, meta_response_column="solution")
    with pytest.raises(ValueError, match="data.meta_response_column"):
        MixedDataModule(model_name_or_path=ckpt, meta_response_column="")


def test_chat_template_is_applied_when_present(ckpt, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}=={% endif %}"
    )
    tok.save_pretrained(d)
    dm = _dm(str(d))
    assert dm.tokenizer.decode(dm.prompt_rows[0]["prompt_ids"]).endswith("===")
    off = _dm(str(d), use_chat_template=False)
    assert not off.tokenizer.decode(off.prompt_rows[0]["prompt_ids"]).endswith("===")


def test_missing_file_is_named(ckpt, tmp_path):
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        _dm(ckpt, expert_data=str(tmp_path / "nope.jsonl"))


def test_missing_column_names_file_and_column(ckpt, tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "1+1=", "answer": "2"}\n'])
    with pytest.raises(DataError, match=r"d\.jsonl: missing column 'response'"):
        _dm(ckpt, expert_data=path)


def test_malformed_line_names_file_and_line(ckpt, tmp_path):
    good = '{"prompt": "1+1=", "response": "2", "answer": "2"}\n'
    path = _write(tmp_path / "bad.jsonl", [good, good, '{"prompt": "1+\n'])
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        _dm(ckpt, expert_data=path)


def test_empty_dataset_and_empty_field(ckpt, tmp_path):
    with pytest.raises(DataError, match="empty"):
        _dm(ckpt, expert_data=_write(tmp_path / "empty.jsonl", []))
    path = _write(
        tmp_path / "blank.jsonl", ['{"prompt": "1+1=", "response": "2"}\n', '{"prompt": " ", "response": "2"}\n']
    )
    with pytest.raises(DataError, match=r"row 2, column 'prompt' is empty"):
        _dm(ckpt, expert_data=path, prompt_data=None)


def test_overlong_rows_error_truncate_or_skip(ckpt, tmp_path):
    rows = [
        '{"prompt": "1+1=", "response": "2", "answer": "2"}\n',
        '{"prompt": "111111111+1=", "response": "2", "answer": "2"}\n',
    ]
    path = _write(tmp_path / "long.jsonl", rows)
    kw = dict(expert_data=path, prompt_data=path, val_data=None, max_prompt_length=6)
    with pytest.raises(DataError, match="row 2 is longer than max_prompt_length=6"):
        _dm(ckpt, **kw)
    assert len(_dm(ckpt, overlong="skip", **kw).expert_rows) == 1
    cut = _dm(ckpt, overlong="truncate", **kw)
    assert len(cut.expert_rows) == 2 and len(cut.expert_rows[1]["prompt_ids"]) == 6


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MixedDataModule(model_name_or_path=str(tmp_path / "no_model")).setup("fit")


# ------------------------------------------------------------------ data as published (GSM8K), chat templates
GSM8K = dict(prompt_column="question", response_column="answer", answer_column="answer")


def _gsm8k(tmp_path, n=12, name="gsm8k.jsonl"):
    from _gsm8k import gsm8k_rows, write_jsonl

    return write_jsonl(tmp_path / name, gsm8k_rows(n))


def test_answer_pattern_takes_the_reference_answer_from_worked_solutions(chat_ckpt, tmp_path):
    path = _gsm8k(tmp_path)
    dm = _dm(chat_ckpt, expert_data=path, prompt_data=path, val_data=path, answer_pattern=r"####\s*(.+)", **GSM8K)
    answers = [r["answer"] for r in dm.prompt_rows]
    assert answers[:3] == ["82", "5,698", "36,500"]  # commas kept: the reward reads them
    assert dm.expert_rows[0]["response"].endswith("#### 82")  # the demonstration is the whole worked solution
    assert dm.prompt_rows[0]["columns"]["answer"].endswith("#### 82")  # TRL-style rewards see the raw column
    batch = next(iter(dm.train_dataloader()))[0]["prompts"]
    assert set(batch["columns"]) == {"answer"} and len(batch["columns"]["answer"]) == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(path).read() + json.dumps({"question": "What is 2+2?", "answer": "It is 4."}) + "\n")
    with pytest.raises(
        DataError,
        match=r"(?s)bad\.jsonl: 1 rows whose answer does not match.*row 13, column 'answer' "
        r"does not match data\.answer_pattern",
    ):
        _dm(chat_ckpt, expert_data=None, prompt_data=str(bad), val_data=None, answer_pattern=r"####\s*(.+)", **GSM8K)
    with pytest.warns(UserWarning, match=r"row 13, column 'answer' does not match"):
        skipped = _dm(
            chat_ckpt,
            expert_data=None,
            prompt_data=str(bad),
            val_data=None,
            answer_pattern=r"####\s*(.+)",
            invalid_rows="skip",
            **GSM8K,
        )
    assert len(skipped.prompt_rows) == 12 and skipped.stats["data/invalid_rows"] == 1
    with pytest.raises(ValueError, match=r"data.answer_pattern='####' has 0 groups"):
        MixedDataModule(model_name_or_path=chat_ckpt, answer_pattern="####")


def test_system_prompt_goes_through_the_chat_template(chat_ckpt, ckpt, tmp_path):
    path = _gsm8k(tmp_path)
    dm = _dm(
        chat_ckpt, expert_data=None, prompt_data=path, val_data=None, system_prompt="Reason, then answer.", **GSM8K
    )
    text = dm.tokenizer.decode(dm.prompt_rows[0]["prompt_ids"])
    assert text.startswith("<|im_start|>system\nReason, then answer.<|im_end|>\n<|im_start|>user\nMark sold 65")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="data.system_prompt is set but no chat template is applied"):
        _dm(ckpt, system_prompt="Reason, then answer.")  # the embedded tokenizer has no chat template


def test_truncating_a_long_prompt_keeps_the_chat_template_header_and_generation_prompt(chat_ckpt, tmp_path):
    from _gsm8k import write_jsonl

    long = "Natalia sold clips. " * 60 + "How many clips did Natalia sell altogether?"
    path = write_jsonl(tmp_path / "long.jsonl", [{"question": long, "answer": "#### 72"}])
    dm = _dm(
        chat_ckpt,
        expert_data=None,
        prompt_data=path,
        val_data=None,
        max_prompt_length=40,
        overlong="truncate",
        system_prompt="Be brief.",
        **GSM8K,
    )
    ids = dm.prompt_rows[0]["prompt_ids"]
    text = dm.tokenizer.decode(ids)
    assert len(ids) <= 40 and dm.stats["data/truncated_rows"] == 1
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")  # the header survives
    assert text.endswith("How many clips did Natalia sell altogether?<|im_end|>\n<|im_start|>assistant\n")
    assert len(ids) >= 36, "the cut keeps as much of the user's text as fits"
    with pytest.raises(
        DataError, match=r"long\.jsonl: row 1: the prompt template alone .* raise data.max_prompt_length"
    ):
        _dm(
            chat_ckpt,
            expert_data=None,
            prompt_data=path,
            val_data=None,
            max_prompt_length=8,
            overlong="truncate",
            system_prompt="Be brief.",
            **GSM8K,
        )


def _judge(*args):
    from lit_align.rewards import MathAnswerReward, RewardSet

    prompts, completions, answers, completion_ids, columns = args
    return RewardSet([MathAnswerReward()]).correct(
        prompts, completions, answers, completion_ids=completion_ids, columns=columns
    )[0]


def test_self_check_catches_an_answer_column_of_worked_solutions(chat_ckpt, tmp_path):
    path = _gsm8k(tmp_path, n=30)
    wrong = _dm(chat_ckpt, expert_data=path, prompt_data=path, val_data=None, **GSM8K)  # no answer_pattern
    with pytest.warns(
        UserWarning,
        match=r"(?s)SELF-CHECK FAILED.*data.answer_column='answer' and "
        r"data.answer_pattern=None.*A rejected row: reference answer '.*#### ",
    ):
        rate = wrong.check_demonstrations(_judge)
    assert rate <= 0.05 and wrong.stats["data/demo_reward_rate"] == rate
    right = _dm(chat_ckpt, expert_data=path, prompt_data=path, val_data=None, answer_pattern=r"####\s*(.+)", **GSM8K)
    assert right.check_demonstrations(_judge) == 1.0
    assert (
        _dm(
            chat_ckpt, expert_data=path, prompt_data=path, val_data=None, demo_check_rows=0, **GSM8K
        ).check_demonstrations(_judge)
        is None
    )


def test_a_prompt_rows_long_worked_solution_neither_skips_nor_counts_it(ckpt, tmp_path):
    """GSM8K-style files name one column as both response and answer: prompt rows then carry a worked
    solution they do not train on. Its length must not skip the prompt (overlong=skip) or report the
    prompt as truncated; demonstrations still are."""
    rows = [
        '{"prompt": "1+1=", "response": "' + "1+1=2 " * 40 + '#### 2", "answer": "2"}\n',
        '{"prompt": "2+2=", "response": "4", "answer": "4"}\n',
    ]
    path = _write(tmp_path / "long_solution.jsonl", rows)
    dm = _dm(ckpt, expert_data=path, prompt_data=path, val_data=None, overlong="skip", max_response_length=8)
    assert len(dm.prompt_rows) == 2 and dm.stats["data/prompts_skipped_rows"] == 0
    assert dm.stats["data/prompts_truncated_rows"] == 0
    assert len(dm.expert_rows) == 1 and dm.stats["data/expert_skipped_rows"] == 1


def test_a_truncated_demonstration_is_judged_on_what_is_left(chat_ckpt, tmp_path):
    """The self-check and the correct / incorrect split judge the demonstration as trained on: cut to
    max_response_length before its '#### N', it no longer holds the answer."""
    path = _gsm8k(tmp_path, n=6)
    full = _dm(chat_ckpt, expert_data=path, prompt_data=path, val_data=None, answer_pattern=r"####\s*(.+)", **GSM8K)
    assert all("####" in r["response"] for r in full.expert_rows)
    cut = _dm(
        chat_ckpt,
        expert_data=path,
        prompt_data=path,
        val_data=None,
        answer_pattern=r"####\s*(.+)",
        overlong="truncate",
        max_response_length=8,
        **GSM8K,
    )
    assert all("####" not in r["response"] and len(r["response"]) < 60 for r in cut.expert_rows)


# ------------------------------------------------------------------ the end token of demonstrations (data.eos_token)
def _ends(expert: dict) -> list[int]:
    """The last trained token (label) of each row of a collated expert batch."""
    return [row[row != -100][-1].item() for row in expert["labels"]]


def test_demonstrations_end_as_the_chat_template_ends_a_turn(base_chat_ckpt, tmp_path):
    """A base checkpoint (EOS <|endoftext|>) whose tokenizer has the ChatML template (Qwen base models, TRL PR
    3299): prompts are chat turns, so a demonstration ends as the template ends an assistant turn, with
    <|im_end|>, in the expert stream and in the held-out rows val/expert_nll scores. data.eos_token picks the
    tokenizer's EOS or a named token instead; without a template applied the EOS it is."""
    path = _gsm8k(tmp_path)
    kw = dict(expert_data=path, prompt_data=path, val_data=path, answer_pattern=r"####\s*(.+)", **GSM8K)
    dm = _dm(base_chat_ckpt, **kw)
    tok = dm.tokenizer
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert tok.eos_token == "<|endoftext|>" and eos != im_end
    expert = next(iter(dm.train_dataloader()))[0]["expert"]
    assert _ends(expert) == [im_end] * 4
    assert all(eos not in row[row != -100].tolist() for row in expert["labels"])
    row = dm.expert_rows[0]  # prompt + demonstration: the template's own rendering of the exchange
    turn = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    assert tok.decode(row["prompt_ids"] + row["response_ids"]) + "\n" == tok.apply_chat_template(turn, tokenize=False)
    assert _ends(next(iter(dm.val_dataloader()))["expert"]) == [im_end] * 5
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    for setting, end in (("eos", eos), ("<|endoftext|>", eos), ("<|im_start|>", im_start), ("template", im_end)):
        assert _ends(dm.collate_expert(_dm(base_chat_ckpt, eos_token=setting, **kw).expert_rows)) == [end] * 12
    assert _ends(dm.collate_expert(_dm(base_chat_ckpt, use_chat_template=False, **kw).expert_rows)) == [eos] * 12
    with pytest.raises(ValueError, match=r"data.eos_token='<\|eot_id\|>' is not a token of the tokenizer of "):
        _dm(base_chat_ckpt, eos_token="<|eot_id|>", **kw)
    with pytest.raises(ValueError, match=r"data.eos_token=''"):
        MixedDataModule(model_name_or_path=base_chat_ckpt, eos_token="")


# Llama-3's and Gemma's chat templates as their tokenizers ship them, and one that appends the EOS (Zephyr's way)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
EOS_APPENDED = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, end",
    [
        (LLAMA3, "<|eot_id|>"),
        (GEMMA, "<end_of_turn>"),  # followed by a newline the demonstration does not train on
        (EOS_APPENDED, "<|endoftext|>"),
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "<|endoftext|>"),  # no turn end: the EOS
    ],
    ids=["llama3", "gemma", "eos-appended", "no-end"],
)
def test_the_end_of_turn_is_read_from_any_chat_template(base_chat_ckpt, tmp_path, template, end):
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(f"{base_chat_ckpt}/config.json", d)
    tok = AutoTokenizer.from_pretrained(base_chat_ckpt)
    turns = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": turns})
    tok.chat_template = template
    tok.save_pretrained(d)
    path = _gsm8k(tmp_path, n=4)
    dm = _dm(str(d), expert_data=path, prompt_data=None, val_data=None, **GSM8K)
    assert _ends(dm.collate_expert(dm.expert_rows)) == [dm.tokenizer.convert_tokens_to_ids(end)] * 4


# ------------------------------------------------------------------ TRL's conversational rows (lists of messages)
def _chat_rows(n=6):
    """GSM8K problems as TRL's conversational "language modeling" rows: a system message, an earlier exchange,
    then the problem and its worked solution as the last assistant turn; ``answer`` the solution too."""
    from _gsm8k import gsm8k_rows

    return [
        {
            "messages": [
                {"role": "system", "content": "Solve the problem."},
                {"role": "user", "content": "Natalia sold 12 clips."},
                {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ],
            "answer": r["answer"],
        }
        for r in gsm8k_rows(n)
    ]


CHAT = dict(answer_column="answer", answer_pattern=r"####\s*(.+)")  # TRL's columns, read with no column set


def test_trl_messages_rows_train_their_last_assistant_turn(base_chat_ckpt, tmp_path):
    """A 'messages' column of message lists (TRL's language-modeling rows) used to stop at set-up ("expected
    a string, got list"). The chat template renders the system message and the earlier turns into the prompt;
    the last assistant turn is the demonstration, ending as the template ends a turn. As prompt rows, the same
    file gives the rendered prompt with the reference answer (and the last turn as the row's own demonstration)."""
    from _gsm8k import write_jsonl

    rows = _chat_rows()
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    dm = _dm(base_chat_ckpt, expert_data=path, prompt_data=path, val_data=None, **CHAT)
    tok = dm.tokenizer
    for row, r in zip(dm.expert_rows, rows):
        whole = tok.apply_chat_template(r["messages"], tokenize=False)
        assert tok.decode(row["prompt_ids"] + row["response_ids"]) + "\n" == whole  # system, earlier turns, reply
        assert tok.decode(row["response_ids"]) == r["messages"][-1]["content"] + "<|im_end|>"
        assert row["prompt"] == tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
    expert = next(iter(dm.train_dataloader()))[0]["expert"]
    assert _ends(expert) == [tok.convert_tokens_to_ids("<|im_end|>")] * 4
    assert [r["answer"] for r in dm.prompt_rows][:3] == ["82", "5,698", "36,500"]
    assert [r["prompt_ids"] for r in dm.prompt_rows] == [r["prompt_ids"] for r in dm.expert_rows]
    assert [r["response"] for r in dm.prompt_rows] == [r["messages"][-1]["content"] for r in rows]
    assert dm.stats["data/invalid_rows"] == 0


def test_trl_prompt_only_and_prompt_completion_rows(base_chat_ckpt, tmp_path):
    """TRL's "prompt-only" (prompt: messages) and "prompt-completion" (prompt: messages, completion: [the
    assistant message]) rows, in JSONL and in Parquet (Arrow's lists of structs, as a hub data set comes): a
    one-turn conversation is the same prompt as its text; a row's own system message is kept, data.system_prompt
    goes before the others."""
    import datasets
    from _gsm8k import gsm8k_rows, write_jsonl

    plain = gsm8k_rows(4)
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": r["question"], "response": r["answer"]} for r in plain])
    rows = [
        {
            "prompt": [{"role": "user", "content": r["question"]}],
            "completion": [{"role": "assistant", "content": r["answer"]}],
        }
        for r in plain
    ]
    rows[1]["prompt"].insert(0, {"role": "system", "content": "Show your work.", "name": "teacher"})  # a key of its own
    conv = write_jsonl(tmp_path / "conv.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "conv.parquet"))
    kw = dict(prompt_data=None, val_data=None, system_prompt="Be exact.")  # TRL's columns, read with no column set
    by_text = _dm(base_chat_ckpt, expert_data=text, **kw)
    tok = by_text.tokenizer
    for source in (conv, str(tmp_path / "conv.parquet")):
        got = _dm(base_chat_ckpt, expert_data=source, **kw).expert_rows
        assert got[1]["prompt"].startswith("<|im_start|>system\nShow your work.<|im_end|>\n<|im_start|>user\n")
        assert got[1]["response_ids"] == by_text.expert_rows[1]["response_ids"]
        # Arrow gives every message the keys any message has (None where absent): the template sees the row's own
        assert got[1]["messages"][0]["name"] == "teacher" and all("name" not in m for m in got[0]["messages"])
        for i in (0, 2, 3):  # no system message of their own: data.system_prompt, as for a text prompt
            want = by_text.expert_rows[i]
            assert got[i]["prompt_ids"] == want["prompt_ids"] and got[i]["response_ids"] == want["response_ids"]
            assert tok.decode(got[i]["prompt_ids"]).startswith("<|im_start|>system\nBe exact.<|im_end|>")
    only = [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in plain]
    only = write_jsonl(tmp_path / "prompts.jsonl", only)
    prompts = _dm(base_chat_ckpt, expert_data=None, prompt_data=only, val_data=only, answer_pattern=r"####\s*(.+)")
    assert [r["answer"] for r in prompts.val_rows] == [r["answer"].split("#### ")[1] for r in plain]
    assert all("response_ids" not in r for r in prompts.prompt_rows)  # nothing to demonstrate: a prompt only


def test_malformed_conversational_rows_are_named(base_chat_ckpt, ckpt, tmp_path):
    """Each bad row is named by file, row and column, before any training; invalid_rows=skip drops them."""
    from _gsm8k import write_jsonl

    good = _chat_rows(2)
    bad = [
        {"messages": [{"content": "2+2?"}, {"role": "assistant", "content": "4"}], "answer": "4"},
        {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"},
        {"messages": [{"role": "system", "content": "Hi."}, {"role": "assistant", "content": "4"}], "answer": "4"},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " "}], "answer": "4"},
        {"messages": [], "answer": "4"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", good + bad)
    kw = dict(expert_data=path, prompt_data=None, val_data=None, prompt_column="messages")
    with pytest.raises(
        DataError,
        match=r"bad\.jsonl: 2 invalid fields.*\n  row 3, column 'messages' holds a conversation whose message 1 has "
        r"no 'role'\n  row 7, column 'messages' is an empty conversation",
    ):
        _dm(base_chat_ckpt, **kw)
    with pytest.raises(
        DataError,
        match=r"(?s)turns\.jsonl: 3 rows without a usable prompt and demonstration.*"
        r"row 3, column 'messages' does not end with an assistant turn: an expert row's demonstration.*"
        r"row 4, column 'messages': the prompt \(the messages before the demonstration\) ends with a system message.*"
        r"row 5, column 'messages': its last assistant turn \(the demonstration\) is empty",
    ):
        _dm(base_chat_ckpt, **{**kw, "expert_data": write_jsonl(tmp_path / "turns.jsonl", good + bad[1:4])})
    with pytest.warns(UserWarning, match=r"row 4, column 'messages' does not end with an assistant turn"):
        skipped = _dm(base_chat_ckpt, invalid_rows="skip", **kw)
    assert len(skipped.expert_rows) == 2 and skipped.stats["data/invalid_rows"] == 5
    user, assistant = ({"role": r, "content": "4"} for r in ("user", "assistant"))
    completion = [
        {"prompt": [user], "completion": [assistant]},
        {"prompt": [user], "completion": [user]},
        {"prompt": [user, assistant], "completion": [assistant]},
    ]
    completion = write_jsonl(tmp_path / "completion.jsonl", completion)
    with pytest.raises(
        DataError,
        match=r"(?s)row 2, column 'completion' holds 1 message\(s\) with roles \['user'\]: a demonstration there is "
        r"one assistant message.*row 3, column 'prompt' ends with an assistant turn and column 'completion' holds a "
        r"demonstration too",
    ):
        _dm(base_chat_ckpt, expert_data=completion, prompt_data=None, val_data=None, response_column="completion")
    with pytest.raises(
        DataError, match=r"bad\.jsonl: column 'messages' holds conversations .* \(data.use_chat_template is false\)"
    ):
        _dm(base_chat_ckpt, use_chat_template=False, **kw)
    with pytest.raises(
        DataError, match=r"bad\.jsonl: column 'messages' holds conversations .* \(the tokenizer has none\)"
    ):
        _dm(ckpt, **kw)  # the embedded tokenizer has no chat template


def test_a_conversation_cell_that_is_not_a_list_is_named(base_chat_ckpt, tmp_path):
    """In a file of TRL 'messages' rows, a row whose cell is text or a number instead of a list of messages has
    no demonstration: it is named by file, row and column (invalid_rows=skip drops it), where set-up stopped with
    "TypeError: object of type 'NoneType' has no len()" even under invalid_rows=skip. The same in a
    prompt-completion file whose completion column is empty on that row."""
    from _gsm8k import write_jsonl

    good = _chat_rows(3)
    path = write_jsonl(tmp_path / "cells.jsonl", good + [{"messages": "2+2?"}, {"messages": 5}])
    kw = dict(prompt_data=None, val_data=None)
    with pytest.raises(
        DataError,
        match=r"(?s)cells\.jsonl: 2 rows without a usable prompt and demonstration in 5 rows:\n"
        r"  row 4, column 'messages' holds text, not a list of messages, and no demonstration.*"
        r"  row 5, column 'messages' holds text, not a list of messages, and no demonstration",
    ):
        _dm(base_chat_ckpt, expert_data=path, **kw)
    with pytest.warns(UserWarning, match=r"row 4, column 'messages' holds text"):
        skipped = _dm(base_chat_ckpt, expert_data=path, invalid_rows="skip", **kw)
    assert len(skipped.expert_rows) == 3 and skipped.stats["data/invalid_rows"] == 2
    user, assistant = ({"role": r, "content": "4"} for r in ("user", "assistant"))
    pairs = [{"prompt": [user], "completion": [assistant]}, {"prompt": "2+2?", "completion": [assistant]}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs + [{"prompt": "3+3?", "completion": None}])
    with pytest.raises(
        DataError, match=r"pairs\.jsonl: 1 invalid fields in 1 of 3 rows:\n  row 3, column 'completion'"
    ):
        _dm(base_chat_ckpt, expert_data=pairs, **kw)
    # a text prompt beside a message-list completion is a demonstration as in a text file: kept
    assert len(_dm(base_chat_ckpt, expert_data=pairs, invalid_rows="skip", **kw).expert_rows) == 2


def test_a_message_role_outside_the_chat_roles_is_named(base_chat_ckpt, tmp_path):
    """Roles are TRL's and the HF chat templates' system, user, assistant and tool (TRL's data_utils refuses
    others): a misspelt "assistent" or a capitalised "User" was accepted and rendered as it is (ChatML prints any
    role), training on a turn the model never sees in use. Named by file, row, column and role; invalid_rows=skip
    drops the row. The same in a prompt-only file, where a "User" turn was taken as the question to answer."""
    from _gsm8k import write_jsonl

    good = _chat_rows(3)
    user, answer = {"role": "user", "content": "2+2?"}, {"role": "assistent", "content": "4"}
    bad = [
        {"messages": [user, answer], "answer": "4"},
        {"messages": [{**user, "role": "User"}, {**answer, "role": "assistant"}], "answer": "4"},
    ]
    path = write_jsonl(tmp_path / "roles.jsonl", good + bad)
    kw = dict(prompt_data=None, val_data=None)
    with pytest.raises(
        DataError,
        match=r"(?s)roles\.jsonl: 2 invalid fields in 2 of 5 rows:\n"
        r"  row 4, column 'messages' holds a conversation whose message 2 has role 'assistent', not one of "
        r"'system', 'user', 'assistant', 'tool'\n"
        r"  row 5, column 'messages' holds a conversation whose message 1 has role 'User', not one of .*\(roles are "
        r"lower case: 'user'\)",
    ):
        _dm(base_chat_ckpt, expert_data=path, **kw)
    with pytest.warns(UserWarning, match=r"row 4, column 'messages' .* role 'assistent'"):
        skipped = _dm(base_chat_ckpt, expert_data=path, invalid_rows="skip", **kw)
    assert len(skipped.expert_rows) == 3 and skipped.stats["data/invalid_rows"] == 2
    only = [
        {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"},
        {"prompt": [{"role": "User", "content": "3+3?"}], "answer": "6"},
    ]
    only = write_jsonl(tmp_path / "only.jsonl", only)
    with pytest.raises(DataError, match=r"only\.jsonl: 1 invalid fields.*\n  row 2, column 'prompt' .* role 'User'"):
        _dm(base_chat_ckpt, expert_data=None, prompt_data=only, val_data=None)


def test_a_file_that_mixes_messages_rows_and_prompt_rows_names_the_odd_rows(base_chat_ckpt, tmp_path):
    """A 'messages' file with a row in prompt/response columns was read from 'prompt', and every messages row was
    reported "column 'prompt' is missing": the row in the other format is named, with the format of the file's
    other rows (invalid_rows=skip drops it and reads the rest). The same in a prompt file of prompt/answer rows with
    one 'messages' row."""
    from _gsm8k import write_jsonl

    good = _chat_rows(4)
    path = write_jsonl(
        tmp_path / "mixed.jsonl", good[:2] + [{"prompt": "2+2?", "response": "4", "answer": "4"}] + good[2:]
    )
    kw = dict(prompt_data=None, val_data=None)
    with pytest.raises(
        DataError,
        match=r"mixed\.jsonl: 1 rows in another format than the file's other rows:\n  row 3 holds column 'prompt' "
        r"\(text prompt rows\), where the file's other 4 rows hold column 'messages' \(TRL's conversational rows\)",
    ) as error:
        _dm(base_chat_ckpt, expert_data=path, **kw)
    assert "column 'prompt' is missing" not in str(error.value)
    with pytest.warns(UserWarning, match=r"row 3 holds column 'prompt'"):
        skipped = _dm(base_chat_ckpt, expert_data=path, invalid_rows="skip", **kw)
    assert len(skipped.expert_rows) == 4 and skipped.stats["data/invalid_rows"] == 1
    assert skipped.row_numbers["expert"] == [1, 2, 4, 5]
    plain = [{"prompt": f"{i}+{i}?", "answer": str(2 * i)} for i in range(3)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", plain + [good[0]])
    with pytest.raises(
        DataError,
        match=r"prompts\.jsonl: 1 rows in another format .*\n  row 4 holds column 'messages' \(TRL's conversational "
        r"rows\), where the file's other 3 rows hold column 'prompt'",
    ):
        _dm(base_chat_ckpt, expert_data=None, prompt_data=prompts, val_data=None)


def test_truncating_a_conversation_drops_its_earliest_turns_first(base_chat_ckpt, tmp_path):
    """overlong=truncate keeps the end of a conversation: its earliest exchanges go (the system message stays,
    the prompt still starts at a user turn), then the start of its last message's text."""
    from _gsm8k import write_jsonl

    history = [
        m
        for k in range(6)
        for m in ({"role": "user", "content": f"Natalia sold {k} clips."}, {"role": "assistant", "content": "Noted."})
    ]
    last = {"role": "user", "content": "How many clips did Natalia sell altogether?"}
    row = {"prompt": [{"role": "system", "content": "Be brief."}, *history, last], "answer": "#### 15"}
    path = write_jsonl(tmp_path / "long.jsonl", [row])
    kw = dict(expert_data=None, prompt_data=path, val_data=None, overlong="truncate", answer_pattern=r"####\s*(.+)")
    dm = _dm(base_chat_ckpt, max_prompt_length=512, **kw)
    tok, full = dm.tokenizer, len(dm.prompt_rows[0]["prompt_ids"])

    def rendered(messages):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    system = row["prompt"][0]
    # the conversation that drops the fewest whole exchanges and fits
    fits = next(
        text
        for k in range(1, 7)
        if len(tok(text := rendered([system, *history[2 * k :], last]), add_special_tokens=False)["input_ids"])
        <= full - 20
    )
    ids = _dm(base_chat_ckpt, max_prompt_length=full - 20, **kw).prompt_rows[0]["prompt_ids"]
    assert tok.decode(ids) == fits and "Natalia sold 0 clips" not in fits and "Natalia sold 5 clips" in fits
    alone = len(tok(rendered([system, last]), add_special_tokens=False)["input_ids"])  # no exchange left
    short = _dm(base_chat_ckpt, max_prompt_length=alone - 3, **kw).prompt_rows[0]["prompt_ids"]
    text = tok.decode(short)
    assert len(short) <= alone - 3 and "Natalia sold" not in text and "How many" not in text
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(" altogether?<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- the multi-skill base checkpoint
def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_base_checkpoint_build_is_deterministic_per_seed(tmp_path):
    import torch

    recipe = {**embedded.BASE_RECIPE, "steps": 3}
    before = _rng_states()
    a = embedded.build_base_checkpoint(tmp_path / "a", recipe)
    assert _same_rng(before, _rng_states()), "the build leaves the caller's RNG streams alone (issue 22)"
    b = embedded.build_base_checkpoint(tmp_path / "b", recipe)
    c = embedded.build_base_checkpoint(tmp_path / "c", {**recipe, "seed": 1})
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    fresh = _weights(embedded.build_checkpoint(tmp_path / "fresh"))
    assert any(not torch.equal(wa[k], fresh[k]) for k in wa), "the base checkpoint is trained, not the initialisation"
    info = json.loads((a / "base_recipe.json").read_text())
    assert info["recipe"] == recipe and set(info["heldout_accuracy"]) == set(embedded.SKILLS)


def test_base_checkpoint_is_cached_and_keyed_by_its_recipe(monkeypatch):
    from lit_align.hf import load_model, load_tokenizer

    first = embedded.ensure_base_checkpoint()  # the test session's LIT_ALIGN_BASE_STEPS (conftest)
    assert first.startswith(str(embedded.cache_dir())) and embedded.resolve_model_path("embedded-base") == first
    monkeypatch.setattr(embedded, "build_base_checkpoint", lambda *a: pytest.fail("cached: must not rebuild"))
    assert embedded.ensure_base_checkpoint() == first
    monkeypatch.setenv(embedded.BASE_STEPS_ENV, str(embedded.base_steps() + 1))
    built = []
    monkeypatch.setattr(
        embedded, "build_base_checkpoint", lambda d, recipe: built.append(recipe) or d.mkdir(exist_ok=True)
    )
    assert embedded.ensure_base_checkpoint() != first and built[0]["steps"] == embedded.base_steps()
    # loaded back the way a user's checkpoint is
    monkeypatch.undo()
    assert load_model("embedded-base").num_parameters() > 0 and load_tokenizer("embedded-base")("1+2=")["input_ids"]


def test_base_steps_setting_is_checked(monkeypatch):
    monkeypatch.setenv(embedded.BASE_STEPS_ENV, "0")
    with pytest.raises(ValueError, match="LIT_ALIGN_BASE_STEPS"):
        embedded.ensure_base_checkpoint()
    monkeypatch.setenv(embedded.BASE_STEPS_ENV, "many")
    with pytest.raises(ValueError, match="LIT_ALIGN_BASE_STEPS"):
        embedded.base_steps()


def test_instruct_checkpoint_is_deterministic_per_seed_and_cached(tmp_path, monkeypatch):
    """``embedded-instruct[-<seed>]`` (issue 25): one base per seed, each build the same for its seed (noisy
    targets included), cached under its recipe's key, and every seed holding out the retention sets the runs are
    scored on (seed 0's), not problems of its own."""
    import torch

    from lit_align.hf import load_model

    # a few updates, twice per seed: the same weights; another seed: other weights
    recipe = {**embedded.instruct_recipe(1), "steps": 3}
    before = _rng_states()
    a = embedded.build_base_checkpoint(tmp_path / "a", recipe)
    assert _same_rng(before, _rng_states()), "the build leaves the caller's RNG streams alone (issue 22)"
    b = embedded.build_base_checkpoint(tmp_path / "b", recipe)
    c = embedded.build_base_checkpoint(tmp_path / "c", {**recipe, "seed": 2})
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and any(not torch.equal(wa[k], wc[k]) for k in wa)
    # the noisy targets are part of the recipe: without them the same seed trains other weights
    plain = {**recipe, "answer_noise": 0.0, "carry_correct": 1.0}
    plain = _weights(embedded.build_base_checkpoint(tmp_path / "plain", plain))
    assert any(not torch.equal(wa[k], plain[k]) for k in wa)

    # by name, through the cache (the test session's LIT_ALIGN_BASE_STEPS): one directory per seed, built once
    zero = embedded.resolve_model_path("embedded-instruct")
    assert zero == embedded.resolve_model_path("embedded-instruct-0") == embedded.ensure_instruct_checkpoint(0)
    one = embedded.resolve_model_path("embedded-instruct-1")
    assert len({zero, one, embedded.ensure_base_checkpoint()}) == 3 and one.startswith(str(embedded.cache_dir()))
    assert any(not torch.equal(v, _weights(Path(one))[k]) for k, v in _weights(Path(zero)).items())
    info = json.loads((Path(one) / "base_recipe.json").read_text())
    assert info["recipe"] == embedded.instruct_recipe(1) and info["recipe"]["steps"] == embedded.base_steps()
    monkeypatch.setattr(embedded, "build_base_checkpoint", lambda *a: pytest.fail("cached: must not rebuild"))
    assert embedded.resolve_model_path("embedded-instruct-1") == one
    monkeypatch.undo()
    assert load_model("embedded-instruct-1").num_parameters() > 0

    # seed 1's pre-training holds out seed 0's retention sets (those of data.retention_data: embedded)
    pretrain = {p for p, _ in embedded.base_rows(embedded.instruct_recipe(1))}
    for path in embedded.ensure_retention().values():
        assert not ({r["prompt"] for r in _rows(path)} & pretrain)


def test_noisy_pretraining_targets_are_near_misses():
    """The pre-training targets of a noisy recipe, drawn afresh each time a problem is drawn: a carrying addition
    is right with probability ``carry_correct`` and otherwise drops the carry (the expert's mistake); a carry-free
    one is a near miss (tens digit one off, never below 0) with probability ``answer_noise``; other skills are
    untouched."""
    import random
    from collections import Counter

    recipe = {**embedded.BASE_RECIPE, "addition": "with_ones_carry", "carry_correct": 0.25, "answer_noise": 0.2}
    rng = random.Random(0)
    carry = Counter(embedded.drawn_answer("37+48=", "85", recipe, rng) for _ in range(2000))
    assert set(carry) == {"85", "75"} and 400 < carry["85"] < 600
    free = Counter(embedded.drawn_answer("34+52=", "86", recipe, rng) for _ in range(2000))
    assert set(free) == {"86", "76", "96"} and 1500 < free["86"] < 1700 and 150 < free["76"] < 250
    assert {embedded.drawn_answer("3+4=", "7", recipe, rng) for _ in range(100)} == {"7", "17"}
    assert {embedded.drawn_answer(p, a, recipe, rng) for p, a in [("73-28=", "45"), ("408=", "804")]} == {"45", "804"}
    assert {embedded.near_miss("105", rng) for _ in range(50)} == {"95", "115"}
    # the pre-training rows: the carrying additions join, the task's held-out ones never do
    rows = {p for p, _ in embedded.base_rows(recipe)}
    adds = {p for p in rows if "+" in p}
    assert any(embedded.ones_carry(p) for p in adds) and not (adds & embedded.task_heldout_prompts())
    assert len(adds) == 10_000 - len(embedded.task_heldout_prompts())


def test_bad_base_recipe_fields_are_named():
    with pytest.raises(ValueError, match="answer_noise=1.0"):
        embedded.ensure_base_checkpoint({**embedded.BASE_RECIPE, "answer_noise": 1.0})
    with pytest.raises(ValueError, match="label_smoothing=-0.1"):
        embedded.ensure_base_checkpoint({**embedded.BASE_RECIPE, "label_smoothing": -0.1})
    with pytest.raises(ValueError, match="carry_correct=1.5"):
        embedded.ensure_base_checkpoint({**embedded.BASE_RECIPE, "addition": "with_ones_carry", "carry_correct": 1.5})
    with pytest.raises(ValueError, match="split_seed='0'"):
        embedded.ensure_base_checkpoint({**embedded.BASE_RECIPE, "split_seed": "0"})
    with pytest.raises(ValueError, match="carry_correct needs addition='with_ones_carry'"):
        embedded.ensure_base_checkpoint({**embedded.BASE_RECIPE, "carry_correct": 0.5})
    with pytest.raises(ValueError, match="addition='all'"):
        embedded.ensure_base_checkpoint({**embedded.BASE_RECIPE, "addition": "all"})


def test_bad_instruct_names_are_named():
    with pytest.raises(ValueError, match="model_name_or_path='embedded-instruct-x'"):
        embedded.resolve_model_path("embedded-instruct-x")
    with pytest.raises(ValueError, match="model_name_or_path='embedded-instruct--1'"):
        embedded.resolve_model_path("embedded-instruct--1")
    assert embedded.resolve_model_path("embedded-instructions") == "embedded-instructions"  # not the name: as is
    with pytest.raises(ValueError, match="embedded-instruct seed=-1"):
        embedded.ensure_instruct_checkpoint(-1)


def test_retention_sets_are_absent_from_every_training_stream(ckpt, task):
    """No held-out problem of a retention skill is pre-trained on (base checkpoint) or post-trained on (the
    task's expert, prompt and meta streams); no held-out addition problem is pre-trained on either."""
    pretrain = {p for p, _ in embedded.base_rows()}
    files = embedded.ensure_retention()
    assert list(files) == list(embedded.RETENTION_SKILLS)
    post = {r["prompt"] for split in ("train", "meta") for r in _rows(task[split])}
    for skill, path in files.items():
        held = {r["prompt"]: r["answer"] for r in _rows(path)}
        assert len(held) == embedded.BASE_RECIPE["num_retention"]
        assert not (set(held) & pretrain) and not (set(held) & post)
        assert held == dict(embedded.retention_split(skill, len(held))[0])  # the same rows the recipe holds out
        rest = {p for p, _ in embedded.retention_split(skill, len(held))[1]}
        assert rest <= pretrain and len(rest) + len(held) == len(embedded.skill_problems(skill))
    assert not ({r["prompt"] for split in ("val", "meta") for r in _rows(task[split])} & pretrain)
    adds = [p for p in pretrain if "+" in p]  # the base's addition: no carry out of the ones digit
    assert adds and all(sum(int(x[-1]) for x in p[:-1].split("+")) < 10 for p in adds)
    # through the data module: one loader per skill after the val loader, no row shared with a training stream
    dm = _dm(ckpt, meta_data="embedded", retention_data="embedded")
    assert list(dm.retention_rows) == list(embedded.RETENTION_SKILLS) and dm.stats["data/heldout_duplicates"] == 0
    train = {r["prompt"] for rows in (dm.expert_rows, dm.prompt_rows, dm.meta_rows) for r in rows}
    assert all(not ({r["prompt"] for r in rows} & train) for rows in dm.retention_rows.values())
    loaders = dm.val_dataloader()
    assert len(loaders) == 3 and [next(iter(lo))["retention"] for lo in loaders[1:]] == list(embedded.RETENTION_SKILLS)


def test_bad_retention_data_is_named(ckpt):
    with pytest.raises(ValueError, match="data.retention_data"):
        MixedDataModule(model_name_or_path=ckpt, retention_data="subtraction.jsonl")
    with pytest.raises(ValueError, match="data.retention_data.*skill name"):
        MixedDataModule(model_name_or_path=ckpt, retention_data={"a/b": "x.jsonl"})
    with pytest.raises(ValueError, match="data.retention_data.*skill name '..'"):
        MixedDataModule(
            model_name_or_path=ckpt, retention_data={"..": "x.jsonl"}
        )  # it would name a tag val/retention/..
    with pytest.raises(ValueError, match="embedded skill"):
        embedded.skill_problems("division")


def test_embedded_retention_sets_with_another_tokenizer_stop_set_up(chat_ckpt, ckpt, tmp_path):
    """The README's own-data command on configs/chord_phi.yaml kept its retention_data: embedded, so a user's chat
    checkpoint was greedily decoded on 600 digit-string prompts of the embedded model's skills at every validation
    (and in Lightning's sanity check), and val/retention/* of 0 headed the run's last line. Set-up now stops, naming
    the flag; a copy of the embedded checkpoint (an SFT export for stage two) keeps them."""
    import shutil

    path = _gsm8k(tmp_path)
    own = dict(expert_data=path, prompt_data=path, val_data=path, answer_pattern=r"####\s*(.+)", **GSM8K)
    with pytest.raises(DataError, match=r"data.retention_data=embedded: .*chat_ckpt.* set data.retention_data to null"):
        _dm(chat_ckpt, retention_data="embedded", **own)
    assert _dm(chat_ckpt, retention_data=None, **own).retention_rows == {}
    export = shutil.copytree(ckpt, tmp_path / "hf_model")
    assert list(_dm(str(export), retention_data="embedded").retention_rows) == list(embedded.RETENTION_SKILLS)


def test_a_retention_file_is_named_by_its_skill_and_its_overlap_with_training_is_counted(ckpt, tmp_path):
    from lit_align.data.loading import DataError

    with pytest.raises(DataError, match=r"data.retention_data\['trivia'\]: .*missing.jsonl does not exist"):
        _dm(ckpt, retention_data={"trivia": str(tmp_path / "missing.jsonl")})
    bad = tmp_path / "cols.jsonl"
    bad.write_text('{"question": "1-1=", "answer": "0"}\n')
    with pytest.raises(DataError, match=r"data.retention_data\['cols'\]: .*missing column 'prompt'"):
        _dm(ckpt, retention_data={"cols": str(bad)})
    # a retention row whose prompt is also a training prompt: warned about and counted, not a crash
    train_prompt = _dm(ckpt).expert_rows[0]["prompt"]
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        json.dumps({"prompt": train_prompt, "answer": "0"})
        + "\n"
        + json.dumps({"prompt": "98-1=", "answer": "97"})
        + "\n"
    )
    with pytest.warns(
        UserWarning, match=r"dup.jsonl \(retention_data\): 1 of its 2 rows have a prompt that also appears"
    ):
        dm = _dm(ckpt, retention_data={"dup": str(dup)})
    assert dm.stats["data/heldout_duplicates"] == 1


def test_embedded_retention_sets_keep_their_own_columns_beside_a_users_files(ckpt, tmp_path):
    """README's own-data command with a recipe that sets retention_data: embedded: the user's column names and
    answer_pattern describe the user's files; the embedded retention sets (prompt, answer) are read as written."""
    rows = [{"question": f"{a}+{a}=", "answer": f"{a}+{a} is {2 * a}\n#### {2 * a}"} for a in range(10, 20)]
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = _dm(
        ckpt,
        expert_data=str(path),
        prompt_data=str(path),
        val_data=str(path),
        retention_data="embedded",
        prompt_column="question",
        response_column="answer",
        answer_column="answer",
        answer_pattern=r"####\s*(.+)",
    )
    assert [r["answer"] for r in dm.prompt_rows][:2] == ["20", "22"]  # the pattern still reads the user's files
    for skill, path in embedded.ensure_retention().items():
        want = {r["prompt"]: r["answer"] for r in _rows(path)}
        assert {r["prompt"]: r["answer"] for r in dm.retention_rows[skill]} == want


# ----------------------------------------------------------------------------- building assets and the caller's RNG
def _rng_states():
    """torch's CPU generator, Python's and NumPy's global states, and the CUDA seed torch has queued for a CUDA
    not yet initialised (``torch.manual_seed`` queues one even on a machine without a GPU)."""
    import random

    import numpy as np
    import torch

    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    queued = [c if c is None else c[0] for c in tracker.get_calls()] if tracker is not None else None
    return torch.get_rng_state(), random.getstate(), np.random.get_state(), queued


def _same_rng(a, b) -> bool:
    import numpy as np
    import torch

    return (
        torch.equal(a[0], b[0])
        and a[1] == b[1]
        and all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a[2], b[2]))
        and a[3] == b[3]
    )


@pytest.mark.parametrize("build", [embedded.ensure_checkpoint, embedded.ensure_task, embedded.ensure_retention])
def test_building_an_asset_into_a_fresh_cache_leaves_the_callers_rng_alone(build, tmp_path, monkeypatch):
    """The embedded checkpoint seeded torch while it was built, so a run's first step in a fresh cache drew other
    samples than every later run with the same seed (issue 22): each asset builds under its own RNG streams (the
    base checkpoint: test_base_checkpoint_build_is_deterministic_per_seed)."""
    import random

    import numpy as np
    import torch
    from lightning.pytorch import seed_everything

    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path))
    seed_everything(1234, verbose=False)
    torch.rand(3), random.random(), np.random.rand()  # a stream in use, not just seeded
    before = _rng_states()
    path = build()
    assert _same_rng(before, _rng_states()), f"{build.__name__} changed the caller's RNG state"
    assert str(path if isinstance(path, str) else next(iter(path.values()))).startswith(str(tmp_path))


def test_a_runs_first_step_is_the_same_in_a_fresh_and_a_warm_cache(tmp_path, monkeypatch):
    """configs/grpo.yaml, one update, twice with the same seed: first into an empty cache (the checkpoint and the
    data are built), then with the cache warm. Issue 22: completion length 3.6875 vs 3.671875."""
    from lit_align.cli import main
    from lit_align.events import read_scalars

    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path / "cache"))
    logged = []
    for run in ("fresh", "warm"):
        cli = main(
            [
                "fit",
                "--config",
                "configs/grpo.yaml",
                f"--trainer.logger.init_args.save_dir={tmp_path / run}",
                "--trainer.max_steps=1",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--trainer.enable_checkpointing=false",
                "--model.init_args.num_generations=4",
                "--data.init_args.prompt_batch_size=8",
                "--data.init_args.retention_data=null",
            ]
        )
        s = read_scalars(cli.trainer.log_dir)
        logged.append({k: s[k] for k in ("train/completion_length", "train/loss", "train/grad_norm")})
    assert logged[0] == logged[1]
