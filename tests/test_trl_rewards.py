"""Rewards as users bring them (issue 15): TRL-style functions and weights in a run, their TensorBoard
metrics, special tokens in the text rewards see, and configs/math_chord_phi.yaml end to end on GSM8K-format
data with a chat checkpoint."""

import math
import shutil
from pathlib import Path

import pytest
import torch

from lit_align import GRPOModule
from lit_align.cli import main
from lit_align.events import read_scalars
from lit_align.rollout import completion_texts


def test_trl_style_rewards_with_weights_log_trls_metric_names(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            "configs/grpo.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            "--model.init_args.num_generations=2",
            "--data.init_args.prompt_batch_size=4",
            "--model.init_args.reward=[_rewards.char_count_reward, _rewards.LengthMatchReward]",
            "--model.init_args.reward_weights=[1.0, 0.5]",
        ]
    )
    s = read_scalars(cli.trainer.log_dir)
    names = [
        "train/rewards/char_count_reward/mean",
        "train/rewards/char_count_reward/std",
        "train/rewards/LengthMatchReward/mean",
        "train/rewards/LengthMatchReward/std",
    ]
    assert set(names) <= set(s), sorted(k for k in s if "reward" in k)
    chars, length = s[names[0]][0][1], s[names[2]][0][1]
    assert s["train/reward_mean"][0][1] == pytest.approx(1.0 * chars + 0.5 * length, abs=1e-5)  # the weighted total
    assert cli.model.rewards.names == ["char_count_reward", "LengthMatchReward"]


def _with_answer_token(ckpt, tmp_path) -> tuple[str, int]:
    """The embedded checkpoint with an added special token ``<answer>``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_special_tokens({"additional_special_tokens": ["<answer>"]})
    model = AutoModelForCausalLM.from_pretrained(d)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d), tok.convert_tokens_to_ids("<answer>")


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens_false_passes_a_sampled_special_token_to_the_reward(ckpt, tmp_path, skip):
    path, answer_id = _with_answer_token(ckpt, tmp_path)
    seen = []

    def tag_reward(completions, **kwargs):  # a reward that checks a tag token
        seen.extend(completions)
        return [float("<answer>" in c) for c in completions]

    module = GRPOModule(
        model_name_or_path=path, num_generations=2, max_new_tokens=3, reward=[tag_reward], skip_special_tokens=skip
    )
    head = module.model.lm_head
    sampler = torch.nn.Linear(head.in_features, head.out_features, bias=True)  # a policy that always says <answer>
    with torch.no_grad():
        sampler.weight.zero_()
        sampler.bias.fill_(-30.0)
        sampler.bias[answer_id] = 30.0
    module.model.lm_head = sampler
    ids = module.tokenizer("12+3=")["input_ids"]
    batch = {
        "prompt_ids": torch.tensor([ids]),
        "prompt_mask": torch.ones(1, len(ids), dtype=torch.long),
        "prompts": ["12+3="],
        "answers": ["15"],
        "columns": {},
    }
    _, rewards, _ = module.rollout_and_score(batch)
    assert seen == (["", ""] if skip else ["<answer><answer><answer>"] * 2)
    assert rewards.tolist() == ([0.0, 0.0] if skip else [1.0, 1.0])


def test_completion_texts_keep_special_tokens_but_cut_the_end_token(chat_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_ckpt)
    start, end, pad = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    body = tok("72", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[start, *body, end, pad], [*body, start, pad, pad]])
    mask = torch.tensor([[1] * (len(body) + 2) + [0], [1] * (len(body) + 1) + [0, 0]])
    assert completion_texts(tok, ids, mask, end, skip_special_tokens=True) == ["72", "72"]
    assert completion_texts(tok, ids, mask, end, skip_special_tokens=False) == ["<|im_start|>72", "72<|im_start|>"]


def test_math_chord_phi_recipe_runs_offline_on_gsm8k_format_files(chat_ckpt, tmp_path):
    """configs/math_chord_phi.yaml as the README runs it offline: a GSM8K-format JSONL (worked solutions ending in
    #### N, commas in some N) and a small random Qwen2 chat checkpoint; 3 updates at tiny lengths."""
    from _gsm8k import gsm8k_rows, write_jsonl

    from lit_align.rewards import MathAnswerReward

    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(24))
    cli = main(
        [
            "fit",
            "--config",
            "configs/math_chord_phi.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            f"--model.init_args.model_name_or_path={chat_ckpt}",
            "--model.init_args.max_new_tokens=8",
            "--model.init_args.num_generations=2",
            "--model.init_args.micro_batch_size=2",
            "--model.init_args.generation_batch_size=4",
            f"--data.init_args.expert_data={data}",
            f"--data.init_args.prompt_data={data}",
            f"--data.init_args.val_data={data}",
            "--data.init_args.expert_batch_size=4",
            "--data.init_args.prompt_batch_size=2",
            "--data.init_args.val_batch_size=4",
            "--data.init_args.max_response_length=48",
        ]
    )
    assert cli.trainer.global_step == 3
    s = read_scalars(cli.trainer.log_dir)
    assert s["data/demo_reward_rate"] == [(0, 1.0)], "the self-check accepts every sampled demonstration"
    for name in ("MathAnswerReward", "ThinkFormatReward"):
        assert len(s[f"train/rewards/{name}/mean"]) == 3
    assert all(math.isfinite(v) for _, v in s["train/loss"]) and "val/accuracy" in s
    assert cli.model.rewards.names == ["MathAnswerReward", "ThinkFormatReward"]
    assert cli.model.rewards.weights.tolist() == pytest.approx([1.0, 0.1])
    dm = cli.datamodule
    text = dm.tokenizer.decode(dm.prompt_rows[0]["prompt_ids"])
    assert text.startswith("<|im_start|>system\nThink step by step") and text.endswith("<|im_start|>assistant\n")
    rows = dm.expert_rows  # every demonstration scores 1.0 against its own extracted answer
    assert len(rows) == 24 and any("," in r["answer"] for r in rows)
    demos = MathAnswerReward()([r["prompt"] for r in rows], [r["response"] for r in rows], [r["answer"] for r in rows])
    assert demos.tolist() == [1.0] * 24
    assert Path(cli.trainer.log_dir, "hf_model", "config.json").is_file()


def needs_solution(completions, solution, **kwargs):
    """A TRL-style reward that takes a ``solution`` column (absent from the data in the test below)."""
    return [1.0 for _ in completions]


def test_the_self_check_says_when_the_reward_itself_fails(ckpt):
    """A reward function that raises on every demonstration (here: a column the data lacks) under
    reward_errors=zero scores them 0; the self-check's judge says the function failed, so a user does not
    go looking for a wrong answer column."""
    from lit_align.modules.grpo import GRPOModule

    module = GRPOModule(model_name_or_path=ckpt, reward=[needs_solution], reward_errors="zero")
    with pytest.warns(
        UserWarning, match=r"self-check: the reward failed on 2 of 2 demonstrations .*reward_errors raise"
    ):
        verdicts = module.heldout.judge_demonstrations(
            ["1+2=", "3+4="], ["3", "7"], ["3", "7"], columns={"answer": ["3", "7"]}
        )
    assert verdicts.tolist() == [False, False]


@pytest.mark.parametrize("method", ["grpo", "amft"])
def test_trainer_state_log_metric_and_async_functions_in_a_run(method, tmp_path):
    """What TRL passes reward functions (issue 22): trainer_state with the update count (AMFT's controller steps not
    counted; with steps_per_generation 2, rollouts are scored at updates 0 and 2), log_metric's values as
    train/<name> per update and val/<name>, log_extra's column in the samples the monitor shows; and an async
    function awaited."""
    import _rewards

    _rewards.SEEN_STATES.clear()
    extra = {
        "grpo": ["--model.init_args.steps_per_generation=2", "--data.init_args.prompt_batch_size=4"],
        "amft": [
            "--model.init_args.warmup_sft_steps=0",
            "--model.init_args.meta_interval=2",
            "--data.init_args.expert_batch_size=4",
            "--data.init_args.prompt_batch_size=2",
            "--data.init_args.meta_batch_size=2",
        ],
    }[method]
    cli = main(
        [
            "fit",
            "--config",
            f"configs/{method}.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_steps=4",
            "--trainer.log_every_n_steps=1",
            "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            "--model.init_args.num_generations=2",
            "--model.init_args.max_new_tokens=3",
            "--model.init_args.reward=[_rewards.curriculum_reward, _rewards.async_char_count_reward]",
            "--data.init_args.retention_data=null",
            "--data.init_args.val_batch_size=4",
            "--trainer.callbacks+=lit_align.callbacks.AlignmentMonitor",
            "--trainer.callbacks.every_n_steps=1",
            *extra,
        ]
    )
    assert cli.trainer.global_step == 4
    scored = [0, 2] if method == "grpo" else [0, 1, 2, 3]
    # the set-up self-check's call, the rollouts', then validation's two (greedy answers, demonstrations)
    assert [step for step, _, _ in _rewards.SEEN_STATES] == [0, *scored, 4, 4]
    assert all(max_steps == 4 for _, max_steps, _ in _rewards.SEEN_STATES)
    per_epoch = cli.trainer.num_training_batches
    assert [epoch for _, _, epoch in _rewards.SEEN_STATES] == pytest.approx([s / per_epoch for s in [0, *scored, 4, 4]])
    s = read_scalars(cli.trainer.log_dir)
    assert s["train/curriculum_step"] == [(step, float(seen)) for step, seen in zip(range(4), _steps_logged(scored))]
    assert s["val/curriculum_step"] == [(3, 4.0)]  # logged at the last update's step, as val/accuracy
    chars, async_chars = s["train/rewards/curriculum_reward/mean"], s["train/rewards/async_char_count_reward/mean"]
    assert chars == async_chars and all(v >= 0 for _, v in chars)  # both score len / 10: the async one was awaited
    samples = cli.model.last_samples
    assert samples["extra"]["characters"] == [len(c) for c in samples["completions"]]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(Path(cli.trainer.log_dir).glob("events.out.tfevents.*"))), {"tensors": 0})
    events.Reload()
    table = events.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | completion | reward | characters |")
    assert table.splitlines()[2].endswith(f"| {len(samples['completions'][0])} |")


def _steps_logged(scored: list[int]) -> list[int]:
    """Per update 0..3, the step of the rollouts it trained on (their metrics are logged with every update)."""
    return [max(s for s in scored if s <= step) for step in range(4)]


def test_a_log_metric_name_that_lit_align_logs_itself_is_an_error(ckpt):
    """log_metric("loss", ...) would replace train/loss in the logs (or be replaced): it stops, naming the metric."""
    import _rewards

    from lit_align.modules.policy import REWARD_LOGGED

    module = GRPOModule(model_name_or_path=ckpt, reward=[_rewards.curriculum_reward])
    metrics = {"loss": torch.tensor(1.0), "reward_mean": torch.tensor(0.5)}
    with pytest.raises(ValueError, match=r"log_metric\('loss', \.\.\.\), but train/loss is a metric lit-align logs"):
        module.log_metrics({**metrics, REWARD_LOGGED: {"loss": torch.tensor(2.0)}})


# ------------------------------------------------------------------ TRL's conversational rows, as TRL passes them
def test_a_reward_set_gives_trl_style_functions_a_conversational_rows_messages():
    """TRL's GRPOTrainer passes, for conversational prompts, ``prompts`` as the message lists and ``completions`` as
    ``[{"role": "assistant", "content": text}]``; a text row keeps its strings, and lit-align's own interface
    (prompts, completions, answers) always gets strings."""
    import _rewards

    from lit_align.rewards import RewardSet, ThinkFormatReward

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    parity = _rewards.ParityReward()
    rewards = RewardSet([_rewards.any_text_reward, parity])
    _rewards.SEEN_CALLS.clear()
    rewards.score(["<rendered>", "3+3="], ["4", "6"], ["4", "6"], prompt_messages=[conversation, None])
    assert _rewards.SEEN_CALLS == [([conversation, "3+3="], [[{"role": "assistant", "content": "4"}], "6"])]
    assert parity.calls == [(["<rendered>", "3+3="], ["4", "6"])]
    # TRL's docs' conversational reward, and its verdict where it is the only function
    four = RewardSet([_rewards.contains_four_reward])
    scores = four.score(["a", "b"], ["it is 4", "5"], ["4", "4"], prompt_messages=[conversation, conversation])
    assert scores.total.tolist() == [1.0, 0.0]
    correct, _ = four.correct(["a", "b"], ["4", "5"], ["4", "4"], prompt_messages=[conversation, conversation])
    assert correct.tolist() == [True, False]
    # lit-align's own TRL-style built-in reads TRL's conversational completions as TRL's think_format_reward does
    think = RewardSet([ThinkFormatReward()]).score(
        ["a", "b"], ["<think>2+2</think>4", "4"], ["4", "4"], prompt_messages=[conversation, None]
    )
    assert think.total.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"prompt_messages has 1 entries for 2 completions"):
        rewards.score(["a", "b"], ["4", "5"], ["4", "4"], prompt_messages=[conversation])


def test_conversational_data_reaches_trl_style_rewards_as_trl_passes_it_in_a_fit(chat_ckpt, tmp_path):
    """GRPO on TRL's prompt-only conversational rows (a system message, then the question), validated on TRL's
    'messages' rows (an earlier exchange, the question, the worked answer): the rollouts, the self-check, the
    greedy answers, pass@k's samples and the demonstrations' verdicts call TRL-style functions with each row's
    messages and ``[{"role": "assistant", "content": text}]``, where a function reading ``c[0]["content"]`` used
    to fail (TypeError under reward_errors=raise); lit-align's RewardFunction keeps getting the rendered texts."""
    import _rewards
    from _gsm8k import gsm8k_rows, write_jsonl

    problems = gsm8k_rows(8)
    system = {"role": "system", "content": "Answer with a number."}
    train = [[system, {"role": "user", "content": r["question"]}] for r in problems[:4]]
    val = [
        [
            {"role": "user", "content": "How many clips?"},
            {"role": "assistant", "content": "Twelve."},
            {"role": "user", "content": r["question"]},
        ]
        for r in problems[4:]
    ]
    answers = [r["answer"].split("#### ")[1] for r in problems]
    prompt_data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "answer": a} for p, a in zip(train, answers)])
    val_rows = [
        {"messages": [*p, {"role": "assistant", "content": r["answer"]}], "answer": a}
        for p, r, a in zip(val, problems[4:], answers[4:])
    ]
    val_data = write_jsonl(tmp_path / "val.jsonl", val_rows)
    _rewards.SEEN_CALLS.clear()
    cli = main(
        [
            "fit",
            "--config",
            "configs/grpo.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            f"--model.init_args.model_name_or_path={chat_ckpt}",
            "--model.init_args.num_generations=2",
            "--model.init_args.max_new_tokens=4",
            "--model.init_args.pass_at_k=[2]",
            "--model.init_args.reward=[_rewards.contains_four_reward, _rewards.last_turn_reward, _rewards.ParityReward]",
            f"--data.init_args.prompt_data={prompt_data}",
            f"--data.init_args.val_data={val_data}",
            "--data.init_args.retention_data=null",
            "--data.init_args.prompt_batch_size=2",
            "--data.init_args.val_batch_size=2",
        ]
    )
    assert cli.trainer.global_step == 2
    s = read_scalars(cli.trainer.log_dir)
    assert len(s["train/rewards/contains_four_reward/mean"]) == 2 and "val/accuracy" in s and "val/pass@2" in s
    seen_prompts = [p for prompts, _ in _rewards.SEEN_CALLS for p in prompts]
    seen_completions = [c for _, completions in _rewards.SEEN_CALLS for c in completions]
    assert all(p in train or p in val for p in seen_prompts), seen_prompts[:2]  # system message, earlier turns kept
    assert any(p in train for p in seen_prompts) and any(p in val for p in seen_prompts)
    assert all(
        isinstance(c, list) and len(c) == 1 and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
        for c in seen_completions
    )
    demos = {r["messages"][-1]["content"] for r in val_rows}  # the self-check and the demonstrations' verdicts
    assert demos <= {c[0]["content"] for c in seen_completions}
    parity = cli.model.rewards.functions[2]
    assert parity.calls and all(isinstance(x, str) for prompts, texts in parity.calls for x in prompts + texts)
    assert all(p.startswith("<|im_start|>") for prompts, _ in parity.calls for p in prompts)  # the rendered prompt


def test_text_rows_keep_strings_and_a_mixed_group_scores_every_row_with_its_prompts_messages(chat_ckpt, tmp_path):
    """Plain-text prompt rows reach TRL-style functions as strings, in rollouts and in validation; in a LUFFY
    group (samples and the prompt's demonstration) every row, the demonstration included, gets its prompt's
    messages and its text as the assistant message."""
    import _rewards
    from _gsm8k import gsm8k_rows, write_jsonl

    from lit_align import LUFFYModule, MixedDataModule
    from lit_align.core import groups

    problems = gsm8k_rows(2)
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": r["question"], "answer": "1"} for r in problems])
    conversations = [[{"role": "user", "content": r["question"]}] for r in problems]
    conv = [
        {"prompt": m, "completion": [{"role": "assistant", "content": r["answer"]}], "answer": "1"}
        for m, r in zip(conversations, problems)
    ]
    conv = write_jsonl(tmp_path / "conv.jsonl", conv)
    module = LUFFYModule(
        model_name_or_path=chat_ckpt, num_generations=3, max_new_tokens=3, reward=[_rewards.any_text_reward]
    )

    def data(path):
        dm = MixedDataModule(model_name_or_path=chat_ckpt, expert_data=None, prompt_data=path, val_data=path)
        dm.setup("fit")
        return dm

    plain = data(text)
    batch = plain.collate_prompts(plain.val_rows)
    assert "prompt_messages" not in batch
    _rewards.SEEN_CALLS.clear()
    module.heldout.greedy_verdicts(batch, module.world)
    assert _rewards.SEEN_CALLS[-1] == (batch["prompts"], _rewards.SEEN_CALLS[-1][1])
    assert all(isinstance(c, str) for c in _rewards.SEEN_CALLS[-1][1])
    chat = data(conv)
    chat.pair_demonstrations(1)  # each prompt's own completion
    batch = chat.collate_prompts(chat._paired[1])
    assert batch["prompt_messages"] == conversations
    rollout, _, _ = module.rollout_and_score(batch)
    prompts, completions = _rewards.SEEN_CALLS[-1]
    of = groups.group_ids(rollout, 3).tolist()
    assert len(prompts) == 6 and prompts == [conversations[i] for i in of]
    assert completions == [[{"role": "assistant", "content": c}] for c in rollout.completions]
    assert {completions[i][0]["content"] for i in range(6) if groups.off_policy(rollout)[i]} == {
        r["answer"] for r in problems
    }
