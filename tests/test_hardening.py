"""Hardening (issue 7): one bad row, completion, reward call or update must neither kill a long run
nor let it silently learn garbage. Each test feeds the bad input through a public entry point
(train.py's CLI, or the DataModule / module constructors) and asserts on the error text or on
the logged counters, and that training goes on where the policy says it should."""

import json
import math
import pickle
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_align.cli import check_run_config, main
from lit_align.controller import ScalarMu
from lit_align.data.datamodule import MixedDataModule
from lit_align.data.loading import DataError
from lit_align.events import read_scalars
from lit_align.modules.chord import CHORDModule
from lit_align.modules.grpo import GRPOModule
from lit_align.modules.policy import NonFiniteError
from lit_align.modules.sft import SFTModule
from lit_align.rewards import MathAnswerReward, RewardError, RewardFunction, score_safely
from lit_align.weighting import ConstantMu, LinearMu, ReferenceMu

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _fit(config: str, save_dir: Path, *extra: str):
    return main(
        ["fit", "--config", f"configs/{config}.yaml", *QUIET, f"--trainer.logger.init_args.save_dir={save_dir}", *extra]
    )


def _last(scalars: dict, name: str) -> float:
    return scalars[name][-1][1]


# ============================================================== 1. data, row by row


def test_every_bad_row_is_reported_with_file_row_and_column(ckpt, tmp_path):
    rows = [
        {"prompt": "1+1=", "response": "2"},
        {"prompt": "   ", "response": "2"},  # empty
        {"response": "3"},  # missing
        {"prompt": "2+2=", "response": ["4"]},  # wrong type
        {"prompt": "3+3=\ud800", "response": "6"},  # lone surrogate: not encodable text
    ]
    path = tmp_path / "expert.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:3]) + '{"prompt": "2+2=", "response": 4.5}\n'
        '{"prompt": "2+2=", "response": true}\n'
    )
    with pytest.raises(DataError) as e:
        MixedDataModule(model_name_or_path=ckpt, expert_data=str(path), prompt_data=None, val_data=None).setup("fit")
    msg = str(e.value)
    assert "expert.jsonl: 3 invalid fields in 3 of 5 rows" in msg
    assert "row 2, column 'prompt' is empty" in msg and "row 3, column 'prompt' is missing" in msg
    assert "row 5, column 'response' expected a string, got bool" in msg and "invalid_rows=skip" in msg
    # a lone surrogate escape parses as JSON but is no text: named by line and column
    _jsonl(path, rows)
    with pytest.raises(DataError, match=r"expert\.jsonl: line 5, column 'prompt' holds an unpaired surrogate"):
        MixedDataModule(model_name_or_path=ckpt, expert_data=str(path), prompt_data=None, val_data=None).setup("fit")


def _write_bad_utf8(path: Path) -> None:
    good, bad = b"1+1=", b"\xff\xfe+1="
    if path.suffix == ".parquet":
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        offsets = pa.py_buffer(np.array([0, len(good), len(good) + len(bad)], dtype="int32").tobytes())
        prompts = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(good + bad)])
        pq.write_table(pa.table({"prompt": prompts, "response": ["2", "2"]}), path)
    elif path.suffix == ".csv":
        path.write_bytes(b"prompt,response\n" + good + b",2\n" + bad + b",2\n")
    elif path.suffix == ".json":
        path.write_bytes(
            b'[{"prompt": "' + good + b'", "response": "2"},\n {"prompt": "' + bad + b'", "response": "2"}]\n'
        )
    else:
        path.write_bytes(b'{"prompt": "' + good + b'", "response": "2"}\n{"prompt": "' + bad + b'", "response": "2"}\n')


@pytest.mark.parametrize(
    "suffix,where",
    [(".jsonl", "line 2"), (".json", "line 2"), (".csv", "line 3"), (".parquet", "row 2, column 'prompt'")],
)
def test_non_utf8_bytes_are_named_in_every_format(ckpt, tmp_path, suffix, where):
    path = tmp_path / f"expert{suffix}"
    _write_bad_utf8(path)
    dm = MixedDataModule(model_name_or_path=ckpt, expert_data=str(path), prompt_data=None, val_data=None)
    with pytest.raises(DataError, match=rf"expert\{suffix}: {where} is not valid UTF-8"):
        dm.setup("fit")


def test_all_invalid_or_all_overlong_data_is_an_error_not_an_empty_epoch(ckpt, tmp_path):
    blank = _jsonl(tmp_path / "blank.jsonl", [{"prompt": " ", "response": "2"}, {"prompt": "", "response": "3"}])
    with pytest.raises(DataError, match=r"blank\.jsonl: 2 invalid fields: none of the 2 rows is usable"):
        MixedDataModule(
            model_name_or_path=ckpt, expert_data=blank, prompt_data=None, val_data=None, invalid_rows="skip"
        ).setup("fit")
    long = _jsonl(tmp_path / "long.jsonl", [{"prompt": "1+1=" * 10, "response": "2"}])
    with pytest.raises(DataError, match=r"long\.jsonl: no usable rows left after applying data.overlong='skip'"):
        MixedDataModule(
            model_name_or_path=ckpt,
            expert_data=long,
            prompt_data=None,
            val_data=None,
            max_prompt_length=8,
            overlong="skip",
        ).setup("fit")


@pytest.fixture(scope="module")
def dirty_run(tmp_path_factory):
    """One short GRPO run through train.py's CLI on dirty data with a reward that fails on half the items.

    Training prompts (prompt_batch_size=4, so every step sees the same 4 usable rows, G=2):
    two good rows, one whose reward call raises, one whose reward is NaN; plus one overlong row
    (skipped), an empty prompt and a missing answer (invalid, skipped). The held-out file shares
    one prompt with the training file, and has a row whose reward raises.
    """
    d = tmp_path_factory.mktemp("dirty")
    prompts = _jsonl(
        d / "prompts.jsonl",
        [
            {"prompt": "12+3=", "answer": "15"},
            {"prompt": "20+4=", "answer": "24"},
            {"prompt": "7+7=", "answer": "raise"},
            {"prompt": "8+1=", "answer": "nan"},
            {"prompt": "1+1=" * 10, "answer": "2"},
            {"prompt": "   ", "answer": "3"},
            {"prompt": "3+3="},
        ],
    )
    val = _jsonl(
        d / "val.jsonl",
        [
            {"prompt": "12+3=", "answer": "15"},
            {"prompt": "30+30=", "answer": "60"},
            {"prompt": "5+5=", "answer": "raise"},
        ],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _fit(
            "grpo",
            d,
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=1",
            "--model.init_args.num_generations=2",
            "--model.init_args.reward=_rewards.FlakyReward",
            "--model.init_args.reward_errors=zero",
            f"--data.init_args.prompt_data={prompts}",
            f"--data.init_args.val_data={val}",
            "--data.init_args.prompt_batch_size=4",
            "--data.init_args.val_batch_size=8",
            "--data.init_args.max_prompt_length=16",
            "--data.init_args.overlong=skip",
            "--data.init_args.invalid_rows=skip",
        )
    return SimpleNamespace(
        cli=cli, scalars=read_scalars(cli.trainer.log_dir), warnings=[str(w.message) for w in caught]
    )


def test_skipped_and_duplicate_rows_are_warned_and_logged(dirty_run):
    s, warned = dirty_run.scalars, "\n".join(dirty_run.warnings)
    assert _last(s, "data/invalid_rows") == 2 and _last(s, "data/prompts_invalid_rows") == 2
    assert _last(s, "data/skipped_rows") == 1 and _last(s, "data/heldout_duplicates") == 1
    # a count of 0 and the rows kept are no chart (issue 22): they are in the hyper-parameters and the text table
    assert "data/truncated_rows" not in s and "data/prompts_rows" not in s
    hparams = dirty_run.cli.trainer.logger.hparams
    assert hparams["data/truncated_rows"] == 0 and hparams["data/skipped_rows"] == 1
    assert hparams["data/prompts_rows"] == 4 and hparams["data/val_rows"] == 3
    (row,) = [line for line in dirty_run.cli.datamodule.summary().splitlines() if line.startswith("| prompts |")]
    assert row.endswith("/prompts.jsonl | 4 | 2 | 1 | 0 |"), row
    assert "prompts.jsonl: 2 invalid fields; 2 rows skipped" in warned
    assert "row 6, column 'prompt' is empty" in warned and "row 7, column 'answer' is missing" in warned
    assert "prompts.jsonl: 1 rows skipped and 0 rows truncated" in warned
    assert "val.jsonl (val_data): 1 of its 3 rows have a prompt that also appears in the training data" in warned


# ============================================================== 2. rewards


def test_flaky_reward_is_counted_and_training_finishes(dirty_run):
    trainer, s = dirty_run.cli.trainer, dirty_run.scalars
    assert trainer.global_step == 3, "every update was applied: failed items score 0"
    # 2 failing prompts x G=2 per step, cumulative over the run
    assert [v for _, v in s["train/reward_errors"]] == [4.0, 8.0, 12.0]
    assert dirty_run.cli.model.reward_errors == 12
    assert all(math.isfinite(v) for _, v in s["train/reward_mean"]) and "val/accuracy" in s
    ckpt = torch.load(
        Path(trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True
    )  # 5. weights_only loads it
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())


def _prompt_batch(ckpt, tmp_path, rows):
    dm = MixedDataModule(
        model_name_or_path=ckpt,
        expert_data=None,
        prompt_data=_jsonl(tmp_path / "p.jsonl", rows),
        val_data=None,
        prompt_batch_size=len(rows),
    )
    dm.setup("fit")
    batch, _, _ = next(iter(dm.train_dataloader()))
    return batch["prompts"]


def test_raise_policy_names_the_offending_prompt_and_completion(ckpt, tmp_path):
    from _rewards import FlakyReward

    batch = _prompt_batch(ckpt, tmp_path, [{"prompt": "12+3=", "answer": "15"}, {"prompt": "7+7=", "answer": "raise"}])
    module = GRPOModule(model_name_or_path=ckpt, num_generations=2, max_new_tokens=3, reward=FlakyReward())
    with pytest.raises(RewardError, match=r"reward service unavailable.*prompt='7\+7=', completion="):
        module.rollout_and_score(batch)


class _Sleepy(RewardFunction):
    def __call__(self, prompts, completions, answers):
        if "hang" in answers:
            time.sleep(2.0)
        return torch.zeros(len(completions))


def test_a_hanging_reward_hits_the_per_call_time_limit(ckpt):
    rollout = SimpleNamespace(completions=["1", "2"])
    zero = GRPOModule(
        model_name_or_path=ckpt, num_generations=2, reward=_Sleepy(), reward_timeout_s=0.2, reward_errors="zero"
    )
    start = time.perf_counter()
    rewards, n_errors = zero.score(["1+1=", "2+2="], rollout, ["2", "hang"])
    assert time.perf_counter() - start < 1.5 and n_errors == 2 and rewards.tolist() == [0.0, 0.0]
    strict = GRPOModule(model_name_or_path=ckpt, num_generations=2, reward=_Sleepy(), reward_timeout_s=0.2)
    with pytest.raises(RewardError, match=r"exceeded timeout_s=0.2.*prompt='1\+1='"):
        strict.score(["1+1=", "2+2="], rollout, ["2", "hang"])


FRAGMENTS = ["\\boxed{", "{", "}", "9", "**9", "1,000", ".5", "/7", "\\frac{", "\x00", "\x1b[2J", "-", "e999", "\ud800"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FRAGMENTS), st.integers(1, 5000)), min_size=1, max_size=6))
def test_builtin_checker_withstands_hostile_completions_fast(parts):
    """Long runs of brace openers, 10k-digit numbers, 9**9**9, control characters: 0 or 1, no error, fast."""
    completion = "".join(fragment * n for fragment, n in parts)
    start = time.perf_counter()
    rewards, n_errors = score_safely(MathAnswerReward(timeout_s=1.0), ["q"], [completion], ["9"], "raise", 5.0)
    assert time.perf_counter() - start < 1.0
    assert n_errors == 0 and rewards.item() in (0.0, 1.0)


# ============================================================== 3. numerics

# these runs count the reward's calls: the set-up self-check (one more call) is off
NUMERIC = [
    "--trainer.limit_val_batches=0",
    "--model.init_args.num_generations=2",
    "--model.init_args.advantage_norm=none",
    "--data.init_args.prompt_batch_size=2",
    "--model.init_args.reward=_rewards.ExplodingReward",
    "--data.init_args.demo_check_rows=0",
]


def test_a_non_finite_update_is_skipped_counted_and_training_continues(tmp_path):
    cli = _fit("grpo", tmp_path, *NUMERIC, "--trainer.max_steps=3", "--model.init_args.reward.init_args.explode_on=[1]")
    s = read_scalars(cli.trainer.log_dir)
    assert cli.trainer.global_step == 3 and cli.model.reward.calls == 4, "the skipped batch did not count as an update"
    assert _last(s, "train/skipped_steps") == 1
    losses = [v for _, v in s["train/loss"]]
    assert len(losses) == 4 and sum(not math.isfinite(v) for v in losses) == 1, (
        "the skipped step's statistics are logged"
    )
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_consecutive_non_finite_updates_stop_the_run_with_a_clear_message(tmp_path):
    with pytest.raises(
        NonFiniteError, match="2 consecutive updates had a non-finite loss or gradient.*max_consecutive_skips"
    ):
        _fit(
            "grpo",
            tmp_path,
            *NUMERIC,
            "--trainer.max_steps=5",
            "--model.init_args.reward.init_args.from_call=0",
            "--model.init_args.max_consecutive_skips=2",
        )
    assert not list(tmp_path.rglob("*.ckpt"))


def test_non_finite_weights_never_reach_a_checkpoint(tmp_path):
    # an infinite learning rate: the first update is applied (its loss and gradient are finite) and
    # turns every weight into NaN; the checkpoint after the next validation is refused
    with pytest.raises(NonFiniteError, match=r"refusing to save a checkpoint at step 1: .*state_dict\.model\."):
        _fit(
            "sft",
            tmp_path,
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=1",
            "--trainer.limit_val_batches=1",
            "--data.init_args.expert_batch_size=4",
            "--data.init_args.val_batch_size=4",
            "--model.init_args.optimizer.init_args.lr=.inf",
        )
    assert not list(tmp_path.rglob("*.ckpt"))


# ============================================================== 4. configuration


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda c: GRPOModule(model_name_or_path=c, num_generations=1), "num_generations=1: GRPO needs at least 2"),
        (
            lambda c: CHORDModule(model_name_or_path=c, num_generations=1),
            "num_generations=1: CHORD's GRPO term needs at least 2",
        ),
        (
            lambda c: SFTModule(model_name_or_path=c, max_new_tokens=0),
            r"model.max_new_tokens=0 is out of range: it must be an integer >= 1",
        ),
        (
            lambda c: SFTModule(model_name_or_path=c, epsilon_low=1.5),
            r"model.epsilon_low=1.5 is out of range: it must be in \[0, 1\)",
        ),
        (
            lambda c: SFTModule(model_name_or_path=c, epsilon_high=-0.1),
            r"model.epsilon_high=-0.1 .* a finite number >= 0",
        ),
        (
            lambda c: SFTModule(model_name_or_path=c, gradient_clip=float("nan")),
            r"model.gradient_clip=nan .* finite number >= 0",
        ),
        (
            lambda c: SFTModule(model_name_or_path=c, reward_timeout_s=0),
            r"model.reward_timeout_s=0 .* null or a finite number > 0",
        ),
        (
            lambda c: SFTModule(model_name_or_path=c, reward_errors="ignore"),
            r"model.reward_errors='ignore': choose one of \['raise', 'zero'\]",
        ),
        (lambda c: SFTModule(model_name_or_path=c, model_dtype="fp8"), r"model.model_dtype='fp8': choose one of"),
        (
            lambda c: SFTModule(model_name_or_path=c, max_consecutive_skips=0),
            r"model.max_consecutive_skips=0 .* an integer >= 1",
        ),
        (lambda c: ConstantMu(1.5), r"ConstantMu.mu must be a number in \[0, 1\]"),
        (lambda c: ReferenceMu(decay_steps=-1), r"ReferenceMu.decay_steps must be an integer >= 0"),
        (lambda c: LinearMu(total_steps=2.5), r"LinearMu.total_steps must be an integer >= 0"),
        (lambda c: ScalarMu(mu_min=0.9, mu_max=0.1), "mu_min must be < mu_max"),
        (
            lambda c: MixedDataModule(model_name_or_path=c, prompt_batch_size=0),
            r"data.prompt_batch_size=0 must be an integer >= 1",
        ),
        (
            lambda c: MixedDataModule(model_name_or_path=c, overlong="drop"),
            r"data.overlong='drop': choose one of \['error', 'truncate', 'skip'\]",
        ),
        (
            lambda c: MixedDataModule(model_name_or_path=c, invalid_rows="ignore"),
            r"data.invalid_rows='ignore': choose one of",
        ),
        (
            lambda c: MixedDataModule(model_name_or_path=c, batch_scope="node"),
            r"data.batch_scope='node': choose one of",
        ),
    ],
)
def test_arguments_are_validated_when_built(ckpt, build, match):
    with pytest.raises(ValueError, match=match):
        build(ckpt)


def test_global_batch_sizes_must_divide_across_devices(ckpt):
    dm = MixedDataModule(model_name_or_path=ckpt, batch_scope="global", expert_batch_size=8, prompt_batch_size=3)
    dm.trainer = SimpleNamespace(world_size=2, loggers=[])
    with pytest.raises(
        ValueError, match=r"data.prompt_batch_size=3 is a global batch size .* divisible by the 2 devices"
    ):
        dm.setup("fit")
    dm = MixedDataModule(
        model_name_or_path=ckpt, batch_scope="global", expert_batch_size=8, prompt_batch_size=4, val_batch_size=6
    )
    dm.trainer = SimpleNamespace(world_size=2, loggers=[])
    dm.setup("fit")
    assert dm.batch_sizes == {"expert": 4, "prompt": 2, "val": 3, "meta": 16}


def test_unknown_strategy_names_the_known_ones_before_loading_anything(tmp_path):
    with pytest.raises(
        ValueError, match=r"trainer.strategy='dpp' is not a known strategy: choose one of \['auto', 'ddp'.*'fsdp'"
    ):
        _fit("sft", tmp_path, "--trainer.strategy=dpp")


# ============================================================== 5. loading


class _Boom:
    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.write_text, (Path(self.sentinel), "pwned"))


def test_checkpoints_load_weights_only(tmp_path):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Boom(str(sentinel))}}, evil, pickle_protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _fit("sft", tmp_path, f"--ckpt_path={evil}")
    assert not sentinel.exists()
    from jsonargparse import Namespace

    config = Namespace(trainer=Namespace(strategy="auto"), weights_only=None)
    check_run_config(config)
    assert config.weights_only is True
    config = Namespace(trainer=Namespace(strategy="ddp"), weights_only=False)  # an explicit choice stays
    check_run_config(config)
    assert config.weights_only is False


def test_remote_code_stays_off_unless_set(ckpt, tmp_path):
    import shutil

    d = tmp_path / "custom"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(
        model_type="custom_llama", auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    )
    (d / "config.json").write_text(json.dumps(cfg))
    sentinel = tmp_path / "pwned"
    (d / "custom.py").write_text(f"open({str(sentinel)!r}, 'w').write('pwned')\n")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SFTModule(model_name_or_path=str(d))
    assert not sentinel.exists()


def test_data_paths_are_read_never_executed(ckpt, tmp_path):
    sentinel = tmp_path / "pwned"
    script = tmp_path / "data.py"
    script.write_text(f"open({str(sentinel)!r}, 'w').write('pwned')\n")
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "dataset.py").write_text(script.read_text())
    for source in (script, folder):
        with pytest.raises(DataError, match="unsupported data file type"):
            MixedDataModule(model_name_or_path=ckpt, expert_data=str(source), prompt_data=None, val_data=None).setup(
                "fit"
            )
    assert not sentinel.exists()


def test_hf_export_refuses_non_finite_weights(ckpt, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from lit_align.export import save_hf_dir
    from lit_align.hf import load_model

    state = {k: v.clone() for k, v in load_model(ckpt).state_dict().items()}
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key][0, 0] = float("nan")
    target = tmp_path / "hf"
    with pytest.raises(ValueError, match="non-finite values in .*q_proj"):
        save_hf_dir(AutoConfig.from_pretrained(ckpt), None, AutoTokenizer.from_pretrained(ckpt), state, target)
    assert not target.exists()


@pytest.mark.parametrize(
    "cls, batch, missing", [(GRPOModule, {"expert": {}}, "prompts rows"), (SFTModule, {"prompts": {}}, "expert rows")]
)
def test_an_update_whose_terms_all_lack_rows_stops_instead_of_training_nothing(ckpt, cls, batch, missing):
    """GRPO with data.prompt_data null (or SFT with expert_data null) used to run every update with loss 0
    and no gradient, silently; the first update now names the missing data."""
    from lit_align.core.update import Update

    module = cls(model_name_or_path=ckpt, num_generations=2)
    rollouts = (lambda: {}) if "prompts" in batch else None
    u = Update(0, batch, batch.get("expert"), rollouts, module.policy, module.rl_settings)
    with pytest.raises(ValueError, match=rf"nothing to train on.*{missing} \(data\.\w+_data is null\?\)"):
        module.run_loss(module.loss(u), u)
