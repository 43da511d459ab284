"""MixedDataModule: every training step gets expert demonstrations and prompts, side by side."""

from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from lit_align.core import settings as S
from lit_align.data import embedded
from lit_align.data.chat import end_token
from lit_align.data.loading import DataError, load_table, messages_problem, report, validate_rows
from lit_align.hf import load_tokenizer


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _pad(seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
    """Stack token lists into a (N, longest) tensor, padding on the left or the right."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            span = slice(width - len(s), width) if left else slice(0, len(s))
            out[i, span] = torch.tensor(s, dtype=torch.long)
    return out


def _abbreviate(text: str, width: int = 60) -> str:
    """``repr`` of ``text``, cut to its first ``width`` characters with an ellipsis."""
    return repr(text if len(text) <= width else text[: width - 3] + "...")


class MixedDataModule(L.LightningDataModule):
    """Expert demonstrations (for SFT) and prompts with reference answers (for RL) in one batch.

    Each training batch is ``{"expert": ..., "prompts": ...}`` (either key is absent when its data
    is switched off with ``null``), drawn through Lightning's CombinedLoader with independent batch
    sizes; the shorter stream cycles. Validation rows carry a prompt, the reference answer and,
    when present, the expert's demonstration.

    Paired demonstrations: methods that use a prompt's own demonstration (LUFFY, HPT, Prefix-RFT)
    ask for k of them per prompt with :meth:`pair_demonstrations` (or by setting
    ``demonstrations_per_prompt``, which the module reads when the training loader is built). Each
    training prompt row is then paired once, at set-up, with its demonstrations (``pair_by``) and
    ``batch["prompts"]`` also carries ``demo_ids`` (B, k, D), ``demo_mask`` (B, k, D) and
    ``demonstrations`` (B lists of k texts); see :meth:`collate_prompts`. At k = 0 (the default)
    nothing is paired and the batches are those of an unpaired run.

    Args:
        model_name_or_path: checkpoint whose tokenizer is used (linked to the model's by the CLI).
        expert_data: file (.jsonl/.json/.parquet/.csv) or hub data set with prompt + response
            columns, or ``"embedded"`` for the default addition task; ``null`` for none.
        prompt_data: file or hub data set with prompt + answer columns (``"embedded"``, ``null``).
        val_data: held-out file with prompt + answer (+ response for val/expert_nll).
        meta_data: a second held-out file (prompt + answer + response) that AMFT's meta-objective
            reads during training, as batch key ``"meta"``; ``null`` for methods that need none.
        prompt_column, response_column, answer_column: column names in your files. Rows may also be TRL's
            conversational rows (lists of ``{"role", "content"}`` messages, rendered by the chat template): a
            prompt cell holding a conversation is the prompt, its system message and earlier turns included,
            and, where its last message is an assistant turn, that turn is the row's demonstration (TRL's
            "language modeling" rows); a response cell ``[{"role": "assistant", "content": ...}]`` is that
            message (TRL's "prompt-completion" rows). A file without the prompt column but with TRL's
            ``messages`` column is read from ``messages``; one without the response column but with TRL's
            ``completion`` column takes its demonstrations from ``completion``. A conversation's prompt text
            (``prompts`` in batches, what lit-align's reward functions, pairing and the held-out check read) is
            its rendering by the template, with the generation prompt (TRL-style reward functions get its
            messages, batch key ``prompt_messages``, as TRL passes them); ``system_prompt`` goes before conversations without a
            system message of their own. Malformed conversations (a message without role or content, a role
            other than system, user, assistant or tool, an
            expert row whose conversation does not end with an assistant turn, a prompt that ends without a
            user turn, ...) go through ``invalid_rows``, named by file, row and column, as do the rows of a
            file that mixes ``messages`` rows with prompt-column rows that are in the smaller group.
        pair_by: how a prompt row finds its demonstrations when a method asks for them (see
            :meth:`pair_demonstrations`; unused otherwise). ``"prompt"`` (default): the expert rows
            (``expert_data``) whose prompt text is identical to the prompt row's (the text as read,
            no normalisation: the module applies none to prompts; where either file holds conversations,
            the prompts as the chat template renders them, so a one-turn conversation pairs with its
            text). Any other value names an id column present in both ``prompt_data`` and
            ``expert_data``: the expert rows with the prompt row's id (ids compare as text, numbers as ``str()`` writes them; one prompt row
            per id, an expert file may hold several rows per id). Either way a prompt row's own
            ``response_column``, when its file has one (prompt + response + answer), is its first
            demonstration, so one file can serve both streams and ``expert_data`` may be null.
        retention_data: held-out sets of skills the post-training data does not contain, each logged
            as ``val/retention/<skill>`` (greedy accuracy: the share of prompts whose answer the reward
            accepts, as val/accuracy). A mapping skill name -> file with prompt + answer columns, or
            ``"embedded"`` for the embedded base checkpoint's skills (subtraction, reversal: their
            held-out problems, never trained on by the base checkpoint or the embedded task);
            ``null`` (default): none. A skill name is letters, digits, ``_``, ``.`` or ``-``.
        meta_response_column: the column of ``meta_data`` read as its completions (what AMFT's
            ``expert_nll`` objective scores); None (default): ``response_column``, the expert's
            demonstrations. Name the answer column (``answer``) where the reference answer is a
            whole completion (short-answer tasks): the objective then scores verified answers, not
            the expert's possibly wrong ones.
        expert_batch_size: demonstrations per step (per device, or in all, see ``batch_scope``).
        prompt_batch_size: prompts per step (each is sampled num_generations times on the device
            that holds it, so G needs no divisibility of its own).
        val_batch_size, meta_batch_size: held-out rows per validation / meta batch.
        batch_scope: ``per_device`` (the batch sizes above are per device, Lightning's usual
            meaning) or ``global`` (they are totals for all devices: each must be divisible by the
            number of devices, and each device gets its share, so a recipe keeps its batch when
            the device count changes).
        answer_pattern: a regular expression with one group, searched in the answer column of every
            file that has one; the group is the reference answer (GSM8K: ``'####\s*(.+)'`` takes
            ``1,234`` from a worked solution ending in ``#### 1,234``). A row it does not match goes
            through ``invalid_rows``, named by file, row and column. Empty (default): the column as it is.
        system_prompt: a system message put before every prompt through the chat template (needs a
            tokenizer with one and ``use_chat_template``). Empty (default): no system message.
        use_chat_template: wrap prompts in the tokenizer's chat template when it has one (conversational
            rows need it: without one they stop set-up, naming the file and column).
        eos_token: the token every demonstration ends with (TRL's name; TRL PR 3299), and at which rollouts
            stop besides the checkpoint's EOS (the policy module adds it to the model's generation config
            at set-up, so an exported checkpoint stops there too). ``template`` (default): where the chat
            template is applied, the token it ends an assistant turn with (ChatML ``<|im_end|>``, Llama-3
            ``<|eot_id|>``, Gemma ``<end_of_turn>``), read by rendering a one-turn exchange; the tokenizer's
            EOS where no template is applied or the template ends a turn with no special token. ``eos``:
            the tokenizer's EOS (a Qwen base model's ``<|endoftext|>``). Any other value: a token of the
            tokenizer's vocabulary. Set-up stops naming this setting for a token outside the vocabulary.
            The token chosen is ``self.end_token_id``, logged at set-up.
        max_prompt_length, max_response_length: token limits; ``overlong`` says what to do with
            rows beyond them: ``error`` (stop at set-up, naming the row), ``truncate`` (keep the
            end of the prompt's own text, cut before the chat template is applied so its header and
            generation prompt always survive; the start of the response) or ``skip`` (drop the row).
        demo_check_rows: the set-up self-check (run by the policy module at fit start): this many
            demonstrations that have a reference answer (expert rows, else held-out rows with a
            response) are scored against their own answers with the configured reward; the share
            accepted is logged as ``data/demo_reward_rate``. 0: no check.
        demo_check_threshold: below this share the check warns loudly, naming the columns and a
            failing row (a wrong answer column or pattern makes every reward 0).
        invalid_rows: what to do with rows whose fields are missing, empty, of a wrong type or not
            valid Unicode: ``error`` (stop at set-up with a report naming file, row and column) or
            ``skip`` (drop them, with the same report as a warning). A file with no usable row
            is always an error.
            Every count (``data/invalid_rows``, ``data/skipped_rows``, ``data/truncated_rows``,
            ``data/heldout_duplicates``, and ``data/<stream>_rows`` kept) is kept in ``self.stats``,
            added to the logged hyper-parameters and shown in a text table (:meth:`summary`); the
            problem counts that are not 0 are also logged as scalars at step 0.
        expert_error_rate: share of embedded problems the embedded expert gets wrong.
        seed: shuffling seed; None (default) follows the run's ``seed_everything``.
    """

    def __init__(
        self,
        model_name_or_path: str = "embedded",
        expert_data: str | None = "embedded",
        prompt_data: str | None = "embedded",
        val_data: str | None = "embedded",
        meta_data: str | None = None,
        retention_data: str | dict[str, str] | None = None,
        prompt_column: str = "prompt",
        response_column: str = "response",
        answer_column: str = "answer",
        meta_response_column: str | None = None,
        pair_by: str = "prompt",
        expert_batch_size: int = 32,
        prompt_batch_size: int = 16,
        val_batch_size: int = 100,
        meta_batch_size: int = 32,
        answer_pattern: str = "",  # str, not str | None: jsonargparse reads '####...' in a union as a YAML comment
        system_prompt: str = "",
        use_chat_template: bool = True,
        eos_token: str = "template",
        max_prompt_length: int = 512,
        max_response_length: int = 1024,
        overlong: Literal["error", "truncate", "skip"] = "error",
        invalid_rows: Literal["error", "skip"] = "error",
        batch_scope: Literal["per_device", "global"] = "per_device",
        demo_check_rows: int = 64,
        demo_check_threshold: float = 0.5,
        expert_error_rate: float = 0.25,
        trust_remote_code: bool = False,
        num_workers: int = 0,
        seed: int | None = None,
    ):
        super().__init__()
        args = locals()
        for name in (
            "expert_batch_size",
            "prompt_batch_size",
            "val_batch_size",
            "meta_batch_size",
            "max_prompt_length",
            "max_response_length",
        ):
            if not isinstance(args[name], int) or isinstance(args[name], bool) or args[name] < 1:
                raise ValueError(f"data.{name}={args[name]!r} must be an integer >= 1")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} must be an integer >= 0")
        if not 0.0 <= expert_error_rate <= 0.45:
            raise ValueError(f"data.expert_error_rate={expert_error_rate!r} must lie in [0, 0.45]")
        S.check(MixedDataModule.__init__, args, prefix="data")  # the Literal settings' choices
        for name in ("prompt_column", "response_column", "answer_column", "meta_response_column"):
            if name == "meta_response_column" and args[name] is None:
                continue  # None: the response column
            if not isinstance(args[name], str) or not args[name]:
                raise ValueError(f"data.{name}={args[name]!r} must be a non-empty column name")
        if not isinstance(eos_token, str) or not eos_token:
            raise ValueError(
                f"data.eos_token={eos_token!r} must be 'template' (the chat template's end of turn), 'eos' or a token"
            )
        if not isinstance(pair_by, str) or not pair_by:
            raise ValueError(f"data.pair_by={pair_by!r} must be 'prompt' (identical prompt text) or an id column name")
        answer_pattern, system_prompt = answer_pattern or None, system_prompt or None
        if answer_pattern is not None:
            try:
                groups = re.compile(answer_pattern).groups
            except (re.error, TypeError) as e:
                raise ValueError(f"data.answer_pattern={answer_pattern!r} is not a regular expression: {e}") from None
            if groups != 1:
                raise ValueError(
                    f"data.answer_pattern={answer_pattern!r} has {groups} groups; it needs exactly one, the answer "
                    f"(e.g. '####\\s*(.+)' for GSM8K)"
                )
        if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
            raise ValueError(f"data.system_prompt={system_prompt!r} must be a string with text, or empty (none)")
        if not isinstance(demo_check_rows, int) or isinstance(demo_check_rows, bool) or demo_check_rows < 0:
            raise ValueError(f"data.demo_check_rows={demo_check_rows!r} must be an integer >= 0 (0: no check)")
        if not isinstance(demo_check_threshold, (int, float)) or not 0.0 <= demo_check_threshold <= 1.0:
            raise ValueError(f"data.demo_check_threshold={demo_check_threshold!r} must lie in [0, 1]")
        if isinstance(retention_data, str) and retention_data != embedded.EMBEDDED_NAME:
            raise ValueError(
                f"data.retention_data={retention_data!r}: give a mapping skill -> file (e.g. "
                f"{{subtraction: sub.jsonl}}), {embedded.EMBEDDED_NAME!r}, or null"
            )
        if isinstance(retention_data, dict):
            for skill, path in retention_data.items():
                if not isinstance(skill, str) or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", skill):
                    raise ValueError(
                        f"data.retention_data: skill name {skill!r} must be letters, digits, '_', '.' or '-', "
                        f"not starting with '.'"
                    )
                if not isinstance(path, str) or not path:
                    raise ValueError(f"data.retention_data[{skill!r}]={path!r} must be a file or data set name")
        elif retention_data is not None and not isinstance(retention_data, str):
            raise ValueError(
                f"data.retention_data={retention_data!r} must be a mapping skill -> file, 'embedded', or null"
            )
        if expert_data is None and prompt_data is None:
            raise ValueError("data.expert_data and data.prompt_data are both null: nothing to train on")
        self.save_hyperparameters()
        self.tokenizer = None
        self.end_token_id: int | None = None  # the token demonstrations end with (eos_token), set at set-up
        self.stats: dict[str, int] = {}  # data/... counts, see ``invalid_rows``
        self.labels: dict[str, str] = {}  # stream -> file or data set it came from
        self.demo_checked = 0  # demonstrations the set-up self-check scored (check_demonstrations)
        self.batch_sizes: dict[str, int] = {}  # per-device batch size of each stream
        self.retention_rows: dict[str, list[dict]] = {}  # skill -> its held-out rows (retention_data)
        # each training batch is yielded this many times, with a "repeat" index: the policy module sets
        # it to its updates per rollout batch (steps_per_generation x num_iterations) at set-up
        self.batch_repeats = 1
        # demonstrations each training prompt row carries (batch keys demo_ids, demo_mask, demonstrations); a
        # method that needs them sets it at fit set-up, through pair_demonstrations(k) or directly. 0: none
        self.demonstrations_per_prompt = 0
        self.row_numbers: dict[str, list[int]] = {}  # stream -> row number in its file (from 1) of each kept row
        self.prompt_columns: dict[str, str] = {}  # stream -> the column its prompts came from (TRL's: messages)
        self._paired: tuple[int, list[dict]] | None = None  # (k, the prompt rows with their k demonstrations)
        # the refill stream of dynamic sampling (refill_prompts): [loader, its live iterator], built on first use;
        # a checkpoint's position of it waits in _refill_state until then
        self._refill: list | None = None
        self._refill_state: dict | None = None

    # ------------------------------------------------------------------ set-up
    def retention_sources(self) -> dict[str, str]:
        """Skill -> file of each ``retention_data`` set (the embedded ones written on first use)."""
        value = self.hparams.retention_data
        if value is None:
            return {}
        return embedded.ensure_retention() if value == embedded.EMBEDDED_NAME else dict(value)

    def _source(self, value: str, split: str) -> str:
        if value == embedded.EMBEDDED_NAME:
            return embedded.ensure_task(self.hparams.expert_error_rate)[split]
        return value

    def _chat(self) -> bool:
        return bool(self.hparams.use_chat_template and getattr(self.tokenizer, "chat_template", None))

    def _messages(self, prompt: str | list[dict]) -> list[dict]:
        """The chat messages of a prompt: a text as one user message; a conversation (TRL's list of messages)
        as it is. ``system_prompt`` goes first where the conversation has no system message of its own."""
        hp = self.hparams
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if hp.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": hp.system_prompt})
        return messages

    def _prompt_messages(self, rows: list[dict]) -> list[list[dict] | None]:
        """Per row, the messages its prompt was rendered from (``system_prompt`` included, as :meth:`_messages`)
        where it came from conversational data, else None: what TRL passes reward functions as ``prompts``."""
        # copies: a reward function that edits what it is given leaves the data rows as they are
        return [[dict(m) for m in self._messages(r["messages"])] if "messages" in r else None for r in rows]

    def _apply_template(self, prompt: str | list[dict], tokenize: bool):
        tok, hp = self.tokenizer, self.hparams
        messages = self._messages(prompt)
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize)
        except Exception as e:
            if not (hp.system_prompt and messages[0]["content"] == hp.system_prompt):
                raise
            raise DataError(f"data.system_prompt: the tokenizer's chat template refused a system message: {e}") from e

    def _encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        """Token ids of a prompt (a text, or TRL's conversation: a list of messages, whose system message and
        earlier turns the template renders): through the chat template (with ``system_prompt``) when it is
        used, with the generation prompt that asks for the assistant's turn."""
        if self._chat():
            ids = self._apply_template(prompt, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def _render(self, prompt: str | list[dict]) -> str:
        """The prompt as the model reads it: the chat template's text (with the generation prompt) when one
        is applied, the text itself otherwise."""
        return self._apply_template(prompt, tokenize=False) if self._chat() else prompt

    def _truncated_prompt(self, prompt: str | list[dict], ids: list[int], label: str, row: int) -> list[int]:
        """``ids`` (the encoded ``prompt``) cut to max_prompt_length, keeping the end of the prompt's own text
        so that the chat template's header and generation prompt (or the BOS) stay: a conversation first
        loses its earliest turns (system messages kept; it then starts at a user turn), then the start of
        its last message's text; a text loses its first tokens. Each cut is encoded again."""
        limit, tok = self.hparams.max_prompt_length, self.tokenizer
        if isinstance(prompt, list):
            system = [m for m in prompt if m["role"] == "system"]
            turns = [m for m in prompt if m["role"] != "system"]
            while len(ids) > limit and len(turns) > 1:
                turns = turns[1:]
                while len(turns) > 1 and turns[0]["role"] != "user":
                    turns = turns[1:]
                ids = self._encode_prompt(system + turns)
            if len(ids) <= limit:
                return ids
            text, last = turns[-1]["content"], turns[-1]

            def encode(cut: str) -> list[int]:
                return self._encode_prompt([*system, *turns[:-1], {**last, "content": cut}])
        else:
            text, encode = prompt, self._encode_prompt
        content = tok(text, add_special_tokens=False)["input_ids"]
        keep = len(content) - (len(ids) - limit)
        for _ in range(8):  # a cut can merge tokens differently at its edge: shorten until it fits
            if keep <= 0:
                raise DataError(
                    f"{label}: row {row}: the prompt template alone (chat template / special tokens) takes "
                    f"{len(ids) - len(content)} of max_prompt_length={limit} tokens; raise data.max_prompt_length"
                )
            ids = encode(tok.decode(content[-keep:]))
            if len(ids) <= limit:
                return ids
            keep -= len(ids) - limit
        return ids[-limit:]  # pragma: no cover - a tokenizer whose edits never converge

    def _odd_format_rows(self, rows: list[dict], label: str, prompt_column: str) -> frozenset[int]:
        """Row numbers (from 1) of the rows in the file's minority format, where a file mixes TRL's ``messages``
        rows with rows holding ``prompt_column`` (and no ``messages``); the majority is the file's format (on a
        tie, that of its first row). Those rows go through ``invalid_rows``, each named with the other rows'
        format: read by either column alone, every row of the other format would be reported missing it.

        Raises:
            DataError: such rows under ``invalid_rows=error`` (under ``skip`` a warning lists them).
        """
        if prompt_column == "messages":
            return frozenset()
        holds = {"messages": [], prompt_column: []}  # rows holding one of the two columns only
        for i, row in enumerate(rows, start=1):
            has_prompt, has_messages = row.get(prompt_column) is not None, row.get("messages") is not None
            if has_prompt != has_messages:
                holds["messages" if has_messages else prompt_column].append(i)
        by, other = holds["messages"], holds[prompt_column]
        if not by or not other:
            return frozenset()
        if len(by) < len(other) or (len(by) == len(other) and other[0] < by[0]):
            by, other = other, by
        file_column = "messages" if by is holds["messages"] else prompt_column
        odd_column = prompt_column if file_column == "messages" else "messages"

        def form(column: str, i: int) -> str:
            if column == "messages" or isinstance(rows[i - 1][column], list):
                return "TRL's conversational rows"
            return "text prompt rows"

        problems = [
            f"row {i} holds column {odd_column!r} ({form(odd_column, i)}), where the file's other {len(by)} "
            f"rows hold column {file_column!r} ({form(file_column, by[0])})"
            for i in other
        ]
        what = "rows in another format than the file's other rows"
        if self.hparams.invalid_rows == "error":
            raise DataError(
                report(label, problems, what)
                + f"\nA file holds rows of one format: write these rows with column {file_column!r} as the others, "
                f"or set data.invalid_rows=skip to drop them (they are counted and logged)."
            )
        rank_zero_warn(report(label, problems, what + "; skipped"))
        return frozenset(other)

    def _turns(
        self, valid: list[tuple[int, dict]], label: str, prompt_column: str, response_column: str, required: bool
    ) -> tuple[list[tuple[int, dict]], dict[int, tuple]]:
        """Each row's prompt and demonstration, in TRL's formats as in plain text: row number -> (prompt: a text
        or a list of messages, demonstration text or None). A conversation ending with an assistant turn
        ("messages", TRL's language-modeling rows) is the prompt of its earlier messages and the demonstration
        of that turn; a ``response_column`` holding ``[{"role": "assistant", "content": ...}]`` (TRL's
        prompt-completion rows) is the demonstration of that message. Rows that cannot be read so (no
        demonstration where ``required``, a prompt ending without a user turn, two demonstrations, ...) go
        through ``invalid_rows``, named by file, row and column."""
        kept, turns, problems = [], {}, []
        for i, row in valid:
            prompt, given = row[prompt_column], row.get(response_column)
            where = f"row {i}, column {prompt_column!r}"
            response, problem = None, None
            if isinstance(given, list):
                problem = messages_problem(given)
                if problem is None and (len(given) != 1 or given[0]["role"] != "assistant"):
                    problem = f"holds {len(given)} message(s) with roles {[m['role'] for m in given]}"
                if problem is None and not given[0]["content"].strip():
                    problem = "holds an empty assistant message"
                if problem is not None:
                    problem = (
                        f"row {i}, column {response_column!r} {problem}: a demonstration there is one assistant "
                        f"message (TRL's completion: [{{'role': 'assistant', 'content': ...}}])"
                    )
                else:
                    response = given[0]["content"]
            elif isinstance(given, str):
                response = given
            if problem is None and isinstance(prompt, list):
                # Arrow gives every message each key any message has, None where absent: drop those again
                prompt = [{k: v for k, v in m.items() if v is not None} for m in prompt]
                if prompt[-1]["role"] == "assistant":
                    if response is not None:
                        problem = (
                            f"{where} ends with an assistant turn and column {response_column!r} holds a "
                            f"demonstration too: keep one of them"
                        )
                    elif not prompt[-1]["content"].strip():
                        problem = f"{where}: its last assistant turn (the demonstration) is empty"
                    else:
                        response, prompt = prompt[-1]["content"], prompt[:-1]
                if problem is None and (not prompt or prompt[-1]["role"] in ("assistant", "system")):
                    ends = f"ends with a {prompt[-1]['role']} message" if prompt else "has nothing before it"
                    problem = (
                        f"{where}: the prompt (the messages before the demonstration) {ends}; it must end with a "
                        f"user (or tool) turn"
                    )
            if problem is None and required and response is None:
                # a text cell passes validation as a prompt, but in a file of conversations with no response
                # column (validation then does not ask for one) it leaves the row without a demonstration
                what = (
                    "does not end with an assistant turn"
                    if isinstance(prompt, list)
                    else "holds text, not a list of messages, and no demonstration"
                )
                problem = (
                    f"{where} {what}: an expert row's demonstration is the last assistant turn of its "
                    f"conversation (TRL's 'messages'), or its {response_column!r} column"
                )
            if problem is not None:
                problems.append(problem)
                continue
            turns[i] = (prompt, response)
            kept.append((i, row))
        if problems:
            if self.hparams.invalid_rows == "error":
                raise DataError(
                    report(label, problems, f"rows without a usable prompt and demonstration in {len(valid)} rows")
                    + "\nFix the rows, or set data.invalid_rows=skip to drop them (they are counted and logged)."
                )
            rank_zero_warn(report(label, problems, "rows without a usable prompt and demonstration; skipped"))
            if not kept:
                raise DataError(report(label, problems, "rows: none has a usable prompt and demonstration"))
        return kept, turns

    def _answers(
        self, valid: list[tuple[int, dict]], label: str, column: str, use_pattern: bool = True
    ) -> tuple[list[tuple[int, dict]], dict, list[str]]:
        """Reference answers of the rows: ``answer_pattern``'s group from ``column`` (or the column as it
        is; always so without ``use_pattern``). Returns the rows kept, row number -> answer, and a problem
        line per row it did not match."""
        hp = self.hparams
        pattern = re.compile(hp.answer_pattern) if hp.answer_pattern and use_pattern else None
        kept, answers, problems = [], {}, []
        for i, row in valid:
            if column not in row or row[column] is None:
                kept.append((i, row))
                continue
            value = str(row[column])
            if pattern is not None:
                m = pattern.search(value)
                if m is None or not (m.group(1) or "").strip():
                    problems.append(
                        f"row {i}, column {column!r} does not match data.answer_pattern={hp.answer_pattern!r}: "
                        f"{value[-80:]!r}"
                    )
                    continue
                value = m.group(1).strip()
            answers[i] = value
            kept.append((i, row))
        if problems:
            if hp.invalid_rows == "error":
                raise DataError(
                    report(
                        label, problems, f"rows whose answer does not match data.answer_pattern in {len(valid)} rows"
                    )
                    + "\nFix data.answer_pattern or data.answer_column, or set data.invalid_rows=skip to drop the rows."
                )
            rank_zero_warn(report(label, problems, "rows whose answer does not match data.answer_pattern; skipped"))
            if not kept:
                raise DataError(report(label, problems, "rows: none matches data.answer_pattern"))
        return kept, answers, problems

    def _encode(
        self,
        source: str,
        split: str,
        need: dict[str, str],
        stream: str,
        flags: dict[str, str] | None = None,
        own_columns: bool = False,
    ) -> list[dict]:
        """Rows of ``source`` with the ``role -> column`` fields in ``need`` validated and tokenized;
        ``flags``: the data module argument that names a role's column, where not ``<role>_column``.
        ``own_columns``: a file lit-align wrote (the embedded retention sets), read by its own column names
        (``need``'s) with its answers as written: the user's column names and ``answer_pattern`` describe
        the user's files, not it."""
        rows, label = load_table(self._source(source, split), split)
        hp = self.hparams
        odd = frozenset() if own_columns else self._odd_format_rows(rows, label, need["prompt"])
        kept_rows = [r for i, r in enumerate(rows, start=1) if i not in odd]
        need, present = dict(need), set().union(*kept_rows)
        if odd:  # Arrow gave the rows kept the other format's columns, as None: they are not the file's columns
            present = {k for r in kept_rows for k, v in r.items() if v is not None}
        column = need.get("response", "response" if own_columns else hp.response_column)
        if not own_columns:  # a file in TRL's formats reads as TRL reads it (its columns are not ours)
            if need["prompt"] not in present and "messages" in present:
                need["prompt"] = "messages"  # "language modeling" rows: a conversation, its last turn the reply
            if column == hp.response_column and column not in present and "completion" in present:
                column = "completion"  # "prompt-completion" rows
                if "response" in need:
                    need["response"] = column
        check = dict(need)
        if any(isinstance(r.get(need["prompt"]), list) for r in kept_rows):  # TRL's conversational rows
            if not self._chat():
                why = "data.use_chat_template is false" if not hp.use_chat_template else "the tokenizer has none"
                raise DataError(
                    f"{label}: column {need['prompt']!r} holds conversations (lists of messages), which only a chat "
                    f"template renders, and none is applied ({why}): use a tokenizer with a chat template and "
                    f"data.use_chat_template=true, or give the prompts as text"
                )
            if "response" in check and all(r.get(column) is None for r in kept_rows):
                del check["response"]  # TRL's "messages" rows: each conversation's last assistant turn
        valid, problems = validate_rows(
            rows, label, check, hp.invalid_rows, flags, messages=("prompt", "response"), skip=odd
        )
        if problems:
            rank_zero_warn(report(label, problems, f"invalid fields; {len(kept_rows) - len(valid)} rows skipped"))
        valid, turns = self._turns(valid, label, need["prompt"], column, required="response" in need)
        answer_column = need.get("answer", hp.answer_column) if own_columns else hp.answer_column
        valid, answers, unmatched = self._answers(valid, label, answer_column, use_pattern=not own_columns)
        end = self.end_token_id
        out, numbers, dropped, cut = [], [], 0, 0
        for i, row in valid:
            prompt, text = turns[i]
            conversation = isinstance(prompt, list)
            try:
                ids = self._encode_prompt(prompt)
                # a conversation's text is its rendering: what the model reads, system message and earlier turns
                item = {"prompt": self._render(prompt), "messages": prompt} if conversation else {"prompt": prompt}
            except DataError:
                raise
            except Exception as e:
                if not conversation:
                    raise
                raise DataError(
                    f"{label}: row {i}, column {need['prompt']!r}: the chat template cannot render this conversation "
                    f"({type(e).__name__}: {e})"
                ) from e
            resp = None
            if text is not None:
                resp = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [end]
                full = len(resp)
            # only a response the stream needs (demonstrations) makes a row too long; an optional one (a prompt
            # or held-out row's worked solution) is cut to max_response_length and never skips or counts the row
            required = "response" in need
            too_long = len(ids) > hp.max_prompt_length or (required and len(resp) > hp.max_response_length)
            if resp is not None and not required:
                resp = resp[: hp.max_response_length]
            if too_long:
                if hp.overlong == "error":
                    raise DataError(
                        f"{label}: row {i} is longer than max_prompt_length={hp.max_prompt_length} / "
                        f"max_response_length={hp.max_response_length} tokens (prompt {len(ids)}, "
                        f"response {len(resp) if resp else 0}); raise the limits or set data.overlong to truncate or skip"
                    )
                if hp.overlong == "skip":
                    dropped += 1
                    continue
                cut += 1
                if len(ids) > hp.max_prompt_length:
                    ids = self._truncated_prompt(prompt, ids, label, i)
                resp = resp[: hp.max_response_length] if resp is not None else None
            item["prompt_ids"] = ids
            if resp is not None:
                item["response_ids"] = resp
                # the demonstration's text as trained on, for the verifier's verdict (the self-check, the
                # correct / incorrect split): a truncated one is judged on what is left of it
                item["response"] = text if len(resp) == full else self.tokenizer.decode(resp, skip_special_tokens=True)
            if i in answers or "answer" in need:
                item["answer"] = answers.get(i, "")
            # the data set's other columns, passed to TRL-style reward functions as keyword arguments
            item["columns"] = {k: v for k, v in row.items() if k != need["prompt"]}
            out.append(item)
            numbers.append(i)
        if dropped or cut:
            rank_zero_warn(f"{label}: {dropped} rows skipped and {cut} rows truncated as longer than the token limits")
        if not out:
            raise DataError(f"{label}: no usable rows left after applying data.overlong={hp.overlong!r}")
        self.labels[stream] = label
        self.row_numbers[stream] = numbers
        self.prompt_columns[stream] = need["prompt"]
        invalid = len(rows) - len(valid)
        for key, n in (
            ("rows", len(out)),
            ("invalid_rows", invalid),
            ("skipped_rows", dropped),
            ("truncated_rows", cut),
        ):
            self.stats[f"data/{stream}_{key}"] = n
            if key != "rows":
                self.stats[f"data/{key}"] = self.stats.get(f"data/{key}", 0) + n
        return out

    @property
    def seed(self) -> int:
        """The shuffling seed: ``data.seed``, else the run's seed_everything, else 0."""
        if self.hparams.seed is not None:
            return self.hparams.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        hp = self.hparams
        self._split_batch_sizes()
        self.tokenizer = load_tokenizer(hp.model_name_or_path, hp.trust_remote_code)
        if hp.system_prompt and not self._chat():
            why = (
                "data.use_chat_template is false"
                if not hp.use_chat_template
                else f"the tokenizer of {hp.model_name_or_path} has none"
            )
            raise ValueError(
                f"data.system_prompt is set but no chat template is applied ({why}): unset it, or use a chat model"
            )
        if hp.retention_data == embedded.EMBEDDED_NAME and not embedded.is_embedded_tokenizer(self.tokenizer):
            # the configs' retention sets are the embedded checkpoint's held-out skills, digit strings in its own
            # tokenizer: on another model every validation decodes 600 prompts that measure nothing
            raise DataError(
                f"data.retention_data=embedded: the embedded retention sets ({', '.join(embedded.RETENTION_SKILLS)}) "
                f"are held-out skills of the embedded model, in its digit tokenizer, and {hp.model_name_or_path} "
                f"has another tokenizer: set data.retention_data to null (--data.init_args.retention_data null), or "
                f"to your own skill -> file mapping"
            )
        self.end_token_id, source = end_token(self.tokenizer, hp.eos_token, self._chat())
        rank_zero_info(f"lit_align data: demonstrations end with token {self.end_token_id}, {source}")
        cols = {"prompt": hp.prompt_column}
        self.stats = {f"data/{key}": 0 for key in ("invalid_rows", "skipped_rows", "truncated_rows")}
        self.expert_rows = (
            self._encode(hp.expert_data, "train", {**cols, "response": hp.response_column}, "expert")
            if hp.expert_data
            else None
        )
        self.prompt_rows = (
            self._encode(hp.prompt_data, "train", {**cols, "answer": hp.answer_column}, "prompts")
            if hp.prompt_data
            else None
        )
        self.val_rows = (
            self._encode(hp.val_data, "val", {**cols, "answer": hp.answer_column}, "val") if hp.val_data else None
        )
        self.meta_rows = (
            self._encode(
                hp.meta_data,
                "meta",
                {**cols, "answer": hp.answer_column, "response": hp.meta_response_column or hp.response_column},
                "meta",
                {"response": "meta_response_column"} if hp.meta_response_column else None,
            )
            if hp.meta_data
            else None
        )
        self.retention_rows = {}
        own = hp.retention_data == embedded.EMBEDDED_NAME  # lit-align's files: columns prompt, answer
        for skill, source in self.retention_sources().items():
            need = {"prompt": "prompt", "answer": "answer"} if own else {**cols, "answer": hp.answer_column}
            try:
                self.retention_rows[skill] = self._encode(source, "val", need, f"retention/{skill}", own_columns=own)
            except DataError as e:
                raise DataError(f"data.retention_data[{skill!r}]: {e}") from e
        self._check_heldout_overlap()
        self._log_stats()
        self._paired = None
        if self.demonstrations_per_prompt:  # asked for before set-up: pair now that the rows are encoded
            self.pair_demonstrations()

    def _world_size(self) -> int:
        trainer = self.trainer
        return int(trainer.world_size) if trainer is not None else 1

    def _split_batch_sizes(self) -> None:
        """Per-device batch sizes; under ``batch_scope=global`` each total must divide among devices."""
        hp, world = self.hparams, self._world_size()
        for stream in ("expert", "prompt", "val", "meta"):
            name, size = f"{stream}_batch_size", self.hparams[f"{stream}_batch_size"]
            if hp.batch_scope == "global":
                if size % world:
                    raise ValueError(
                        f"data.{name}={size} is a global batch size (data.batch_scope=global) and must be divisible "
                        f"by the {world} devices: use a multiple of {world} (e.g. {max(world, size - size % world)}), "
                        f"or set data.batch_scope=per_device"
                    )
                size //= world
            self.batch_sizes[stream] = size

    def _check_heldout_overlap(self) -> None:
        """Warn (and count) held-out rows whose prompt is also a training prompt."""
        train = [(s, rows) for s, rows in (("expert", self.expert_rows), ("prompts", self.prompt_rows)) if rows]
        total = 0
        heldout = [
            ("val", self.val_rows),
            ("meta", self.meta_rows),
            *((f"retention/{skill}", rows) for skill, rows in self.retention_rows.items()),
        ]
        heldout = [(stream, rows) for stream, rows in heldout if rows]
        keys = self._prompt_keys(*(rows for _, rows in train + heldout))
        seen = {key for rows in keys[: len(train)] for key in rows}
        for (stream, rows), held in zip(heldout, keys[len(train) :]):
            overlap = sum(key in seen for key in held)
            total += overlap
            if overlap:
                sources = " and ".join(sorted({self.labels[s] for s, _ in train}))
                rank_zero_warn(
                    f"{self.labels[stream]} ({stream.split('/')[0]}_data): {overlap} of its {len(rows)} rows have a prompt that "
                    f"also appears in the training data ({sources}); held-out scores on them are not held out"
                )
        self.stats["data/heldout_duplicates"] = total

    def _prompt_keys(self, *streams: list[dict]) -> list[list[str]]:
        """The prompt of each row of each stream as pairing and the held-out check compare prompts: its text as
        read (no normalisation), or, where a row of any of ``streams`` is a conversation (TRL's rows), the chat
        template's rendering of each row (a conversation's text already is; a text renders as one user turn),
        so a conversation and a text that render the same are the same prompt."""
        if not any("messages" in r for rows in streams for r in rows):
            return [[r["prompt"] for r in rows] for rows in streams]
        return [[r["prompt"] if "messages" in r else self._render(r["prompt"]) for r in rows] for rows in streams]

    # ------------------------------------------------------------------ paired demonstrations
    def pair_demonstrations(self, k: int | None = None) -> None:
        """Pair every training prompt row with ``k`` demonstrations of that very prompt (``pair_by``).

        Sets ``demonstrations_per_prompt`` to ``k`` (None: keep its value). A method that needs paired
        data (LUFFY, HPT, Prefix-RFT) calls ``datamodule.pair_demonstrations(k)`` in its ``setup``
        (which Lightning runs after this module's), so a data problem stops the run there; setting
        ``datamodule.demonstrations_per_prompt = k`` instead pairs when :meth:`train_dataloader` is
        first called, still before any training step. Called before :meth:`setup`, the pairing waits
        for the rows to be encoded. The pairing is done once per k (not per batch); k = 0 undoes it.

        A prompt row's demonstrations, in this order, identical ones (same tokens) counted once: its
        own ``response_column`` (when its file has one and it is not blank), then the rows of
        ``expert_data`` with the same prompt text (``pair_by="prompt"``) or the same id (``pair_by``
        an id column) in file order. With more than k the first k are kept. A demonstration's tokens
        are what an expert row of that prompt and response trains on: its response tokens + end token (the
        ``labels != -100`` of :meth:`collate_expert`'s row); a prompt row's own response longer than
        ``max_response_length`` counts only with ``overlong=truncate`` (cut, as the expert stream cuts
        it), as error / skip keep no such demonstration. The prompt rows and their order are unchanged, so the data
        position (``ResumableLoader``) is that of an unpaired run.

        Raises:
            ValueError: k is not an integer >= 0; k > 0 with ``data.prompt_data`` null.
            DataError (a ValueError), naming the file, row (counted from 1, as every data error) and
            column: a prompt row with fewer than k demonstrations (with ``data.pair_by`` and the
            prompt's text, abbreviated); an id column (``data.pair_by``) absent from the prompt or the
            expert file, or missing / not a string or number on a row; an id repeated in the prompt file.
        """
        if k is not None:
            self.demonstrations_per_prompt = k
        k = self.demonstrations_per_prompt
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"demonstrations_per_prompt={k!r} must be an integer >= 0 (0: no paired demonstrations)")
        if k == 0:
            self._paired = None
            return
        if self.tokenizer is None or (self._paired is not None and self._paired[0] == k):
            return  # not set up yet (setup() pairs), or already paired for this k
        if not self.prompt_rows:
            raise ValueError(
                f"the method pairs each prompt with {k} demonstration(s), but data.prompt_data is null: no prompt rows"
            )
        hp = self.hparams
        by_text = hp.pair_by == "prompt"
        expert = self.expert_rows or []
        if by_text:
            prompt_keys, expert_keys = self._prompt_keys(self.prompt_rows, expert)
        else:
            prompt_keys = self._pair_ids("prompts")
            expert_keys = self._pair_ids("expert") if expert else []
            self._check_unique_ids(prompt_keys)
        by_key: dict = {}
        for row, key in zip(expert, expert_keys):
            by_key.setdefault(key, []).append(row)
        end, paired, short = self.end_token_id, [], []
        for row, key, number in zip(self.prompt_rows, prompt_keys, self.row_numbers["prompts"]):
            own = [row] if "response_ids" in row and row.get("response", "").strip() else []
            # a prompt row's own response is cut at max_response_length (it loses its end token): a demonstration
            # only where overlong=truncate keeps cut demonstrations (error / skip keep none in the expert stream)
            too_long = bool(own) and row["response_ids"][-1] != end and hp.overlong != "truncate"
            demos = {}  # response tokens -> text, first occurrence first
            for source in ([] if too_long else own) + by_key.get(key, []):
                demos.setdefault(tuple(source["response_ids"]), source["response"])
                if len(demos) == k:
                    break
            if len(demos) < k:
                column = (
                    f"column {self.prompt_columns['prompts']!r}" if by_text else f"column {hp.pair_by!r} (id {key!r})"
                )
                why = (
                    f" (its own {hp.response_column!r} is longer than max_response_length={hp.max_response_length}, "
                    f"kept only with data.overlong=truncate)"
                    if too_long
                    else ""
                )
                # a conversation's rendering starts with the template's header: show its last turn instead
                shown = row["messages"][-1]["content"] if "messages" in row else row["prompt"]
                short.append(f"row {number}, {column}, prompt {_abbreviate(shown)}: {len(demos)} found{why}")
                continue
            paired.append({**row, "demo_ids": [list(ids) for ids in demos], "demonstrations": list(demos.values())})
        if short:
            match = "identical prompt text" if by_text else f"the same {hp.pair_by!r}"
            where = (
                f"the rows of {self.labels['expert']} (expert_data) with {match}"
                if expert
                else "no expert rows (data.expert_data is null)"
            )
            raise DataError(
                report(
                    self.labels["prompts"],
                    short,
                    f"prompt rows with fewer than {k} demonstration(s), which the method needs for every prompt",
                )
                + f"\ndata.pair_by={hp.pair_by!r}: a prompt's demonstrations are its own {hp.response_column!r} "
                f"column (data.response_column) and {where}. Add demonstrations for these prompts, drop the "
                f"prompts from data.prompt_data, or set data.pair_by to the column that pairs them."
            )
        self._paired = (k, paired)

    def _pair_ids(self, stream: str) -> list:
        """The ``pair_by`` id of every row of a stream (numbers as text); DataError naming file, rows and column
        when the column is absent from the file or missing / not a string or number on a row."""
        hp = self.hparams
        column, label, numbers = hp.pair_by, self.labels[stream], self.row_numbers[stream]
        rows = self.prompt_rows if stream == "prompts" else self.expert_rows
        flag = "prompt_data" if stream == "prompts" else "expert_data"
        values = [r["prompt"] if column == hp.prompt_column else r["columns"].get(column) for r in rows]
        if all(v is None for v in values):
            found = sorted({hp.prompt_column}.union(*(r["columns"] for r in rows)))
            raise DataError(
                f"{label}: rows {numbers[0]}-{numbers[-1]}: missing column {column!r} ({flag}); data.pair_by="
                f"{column!r} names the id column that pairs prompts with demonstrations and must be in both "
                f"data.prompt_data and data.expert_data. Columns found: {found}. Set data.pair_by to the id "
                f"column, or to 'prompt' to pair by identical prompt text."
            )
        keys, problems = [], []
        for value, number in zip(values, numbers):
            if value is None:
                problems.append(f"row {number}, column {column!r} is missing")
            elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
                problems.append(
                    f"row {number}, column {column!r}: expected a string or number, got {type(value).__name__}"
                )
            keys.append(str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value)
        if problems:
            raise DataError(report(label, problems, f"rows without a usable id (data.pair_by={column!r}, {flag})"))
        return keys

    def _check_unique_ids(self, keys: list) -> None:
        """DataError naming file, rows and column when an id (``pair_by``) repeats in the prompt file."""
        column, first, problems = self.hparams.pair_by, {}, []
        for key, number in zip(keys, self.row_numbers["prompts"]):
            if key in first:
                problems.append(f"row {number}, column {column!r}: id {key!r} is also on row {first[key]}")
            else:
                first[key] = number
        if problems:
            raise DataError(
                report(self.labels["prompts"], problems, "prompt rows whose id repeats an earlier row's")
                + f"\ndata.pair_by={column!r} pairs each prompt row by its id: give every prompt row its own id (the "
                f"expert file may hold several rows per id, several demonstrations)."
            )

    def check_demonstrations(self, judge: Callable[..., torch.Tensor]) -> float | None:
        """The set-up self-check: score up to ``demo_check_rows`` demonstrations (a seeded sample of the
        expert rows that have a reference answer, else of the held-out rows with a response) against
        their own answers. ``judge(prompts, completions, answers, completion_ids, columns)`` returns a
        bool tensor (N,): which are accepted; where a sampled row came from conversational data it is also given
        ``prompt_messages=`` (one entry per row, None for a text row, as :meth:`collate_prompts`). The share accepted is returned, kept in
        ``stats["data/demo_reward_rate"]`` and logged at step 0; below ``demo_check_threshold`` a
        warning names the columns and a failing row. None (nothing logged) when there is nothing to check."""
        hp = self.hparams
        if hp.demo_check_rows == 0:
            return None
        for stream, rows in (("expert", self.expert_rows), ("val", self.val_rows), ("meta", self.meta_rows)):
            rows = [r for r in rows or [] if "answer" in r and "response" in r]
            if rows:
                break
        else:
            return None
        rows = random.Random(self.seed).sample(rows, min(hp.demo_check_rows, len(rows)))
        keys = list(dict.fromkeys(k for r in rows for k in r["columns"]))
        conversational = {}  # TRL-style functions get a conversation's messages, as in training
        if any("messages" in r for r in rows):
            conversational["prompt_messages"] = self._prompt_messages(rows)
        verdicts = judge(
            [r["prompt"] for r in rows],
            [r["response"] for r in rows],
            [r["answer"] for r in rows],
            [r["response_ids"] for r in rows],
            {k: [r["columns"].get(k) for r in rows] for k in keys},
            **conversational,
        )
        verdicts = [bool(v) for v in verdicts.tolist()]
        rate = sum(verdicts) / len(verdicts)
        self.stats["data/demo_reward_rate"] = rate
        self.demo_checked = len(verdicts)
        trainer = self.trainer
        for logger in trainer.loggers if trainer is not None else []:
            logger.log_metrics({"data/demo_reward_rate": rate}, step=0)
        if rate < hp.demo_check_threshold:
            bad = rows[verdicts.index(False)]
            column = "meta_response_column" if stream == "meta" and hp.meta_response_column else "response_column"
            rank_zero_warn(
                f"\n{'!' * 100}\nSELF-CHECK FAILED: the reward accepts only {rate:.0%} of {len(rows)} demonstrations of "
                f"{self.labels[stream]} ({stream}_data) scored against their own reference answers (threshold "
                f"{hp.demo_check_threshold:.0%}). Every reward may be 0 in training. Check data.answer_column="
                f"{hp.answer_column!r} and data.answer_pattern={hp.answer_pattern!r} (demonstrations: data.{column}="
                f"{hp.meta_response_column if column == 'meta_response_column' else hp.response_column!r}). A rejected row: "
                f"reference answer {bad['answer'][:200]!r}, demonstration ending {bad['response'][-200:]!r}. (If a warning "
                f"above says the reward failed on demonstrations, the reward functions are the cause, not the data.)"
                f"\n{'!' * 100}"
            )
        return rate

    PROBLEM_COUNTS = ("invalid_rows", "skipped_rows", "truncated_rows", "heldout_duplicates")

    def _log_stats(self) -> None:
        """Log the problem counts that are not 0 (``data/*invalid_rows``, ``*skipped_rows``, ``*truncated_rows``,
        ``heldout_duplicates``) once, at step 0, to every logger of the trainer (if any): a chart a user
        should look at. The row counts and the zeros are set-up facts, read once: they go to the
        hyper-parameters (:attr:`hparams_initial`) and the text table (:meth:`summary`), not to charts
        (issue 22: a clean run opened TensorBoard on a page of single-point charts, most of them 0)."""
        problems = {k: float(v) for k, v in self.stats.items() if v and k.endswith(self.PROBLEM_COUNTS)}
        trainer = self.trainer
        for logger in trainer.loggers if trainer is not None and problems else []:
            logger.log_metrics(problems, step=0)

    @property
    def hparams_initial(self):
        """The constructor's arguments, and after :meth:`setup` the data counts (``stats``, ``data/*``), which
        Lightning logs as the run's hyper-parameters (hparams.yaml, TensorBoard's HPARAMS tab) at fit start,
        after every ``setup``: runs can be compared on them. ``hparams`` (what a checkpoint stores) is unchanged."""
        initial = super().hparams_initial
        initial.update(self.stats)
        return initial

    def summary(self) -> str:
        """The data counts as Markdown, for TensorBoard's text tab (``AlignmentMonitor`` writes it at fit start):
        one table row per stream (source, rows kept, invalid, skipped and truncated rows), then the held-out
        prompts also found in the training data and the set-up self-check's share (``data/demo_reward_rate``).
        Empty before :meth:`setup`."""
        if not self.labels:
            return ""
        get = self.stats.get
        lines = ["| stream | source | rows | invalid | skipped | truncated |", "|---|---|---|---|---|---|"]
        for stream, label in self.labels.items():
            counts = (
                get(f"data/{stream}_{key}", 0) for key in ("rows", "invalid_rows", "skipped_rows", "truncated_rows")
            )
            source = label.replace("|", r"\|")  # a "|" in a file name would end the cell
            lines.append(f"| {stream} | {source} | " + " | ".join(str(n) for n in counts) + " |")
        lines += ["", f"held-out prompts also in the training data: {get('data/heldout_duplicates', 0)}"]
        rate = get("data/demo_reward_rate")
        if rate is not None:
            lines.append(
                f"demonstrations the reward accepts against their own answers (self-check): {rate:.0%} of "
                f"{self.demo_checked}"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ batches
    def collate_expert(self, rows: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        seqs = [r["prompt_ids"] + r["response_ids"] for r in rows]
        labels = [[-100] * len(r["prompt_ids"]) + r["response_ids"] for r in rows]
        return {
            "input_ids": _pad(seqs, pad, left=False),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0, left=False),
            "labels": _pad(labels, -100, left=False),
        }

    def collate_prompts(self, rows: list[dict]) -> dict:
        """A batch of prompt rows: ``prompt_ids`` / ``prompt_mask`` (B, P) left-padded with the pad id (mask 1
        on real tokens), ``prompts`` and ``answers`` (B texts), ``columns`` (the data set's other columns, B
        values each). Where a row came from conversational data (TRL's lists of messages), ``prompt_messages`` (B
        entries): each such row's prompt messages as the chat template rendered them (its system message and
        earlier turns, ``system_prompt`` first where it has no system message), None for a text row; TRL-style
        reward functions get them as ``prompts`` (:class:`lit_align.rewards.RewardSet`). A batch of text rows
        has no such key. Rows paired by :meth:`pair_demonstrations` (k > 0) add ``demo_ids`` (B, k, D) long, each
        demonstration's response tokens + end token (``eos_token``) right-padded with the pad id to the
        batch's longest D, ``demo_mask`` (B, k, D) long, 1 on real tokens, and ``demonstrations`` (B lists of k texts), in
        the pairing's order; ``prompt_ids[b]``'s real tokens followed by ``demo_ids[b, j]``'s are the
        sequence an expert row of that prompt and demonstration trains on (:meth:`collate_expert`)."""
        pad = self.tokenizer.pad_token_id
        batch = {
            "prompt_ids": _pad([r["prompt_ids"] for r in rows], pad, left=True),
            "prompt_mask": _pad([[1] * len(r["prompt_ids"]) for r in rows], 0, left=True),
            "prompts": [r["prompt"] for r in rows],
            "answers": [r.get("answer", "") for r in rows],
            # the data set's other columns (rows built by hand may have none)
            "columns": {
                k: [r.get("columns", {}).get(k) for r in rows]
                for k in dict.fromkeys(k for r in rows for k in r.get("columns", {}))
            },
        }
        if any("messages" in r for r in rows):
            batch["prompt_messages"] = self._prompt_messages(rows)
        if rows and all("demo_ids" in r for r in rows):  # paired rows (pair_demonstrations): their k demonstrations
            demos = [ids for r in rows for ids in r["demo_ids"]]
            shape = (len(rows), len(rows[0]["demo_ids"]), -1)
            batch["demo_ids"] = _pad(demos, pad, left=False).view(shape)
            batch["demo_mask"] = _pad([[1] * len(ids) for ids in demos], 0, left=False).view(shape)
            batch["demonstrations"] = [list(r["demonstrations"]) for r in rows]
        return batch

    def collate_val(self, rows: list[dict]) -> dict:
        batch = self.collate_prompts(rows)
        with_demo = [r for r in rows if "response_ids" in r]
        if len(with_demo) == len(rows):
            batch["expert"] = self.collate_expert(rows)
            if all("response" in r for r in rows):  # the demonstrations' text, for the verifier
                batch["responses"] = [r["response"] for r in rows]
        return batch

    def _loader(self, rows, batch_size, collate, shuffle, seed: int | None = None, repeats: int | None = None):
        if shuffle:  # training streams: order from (seed, pass), position saved in checkpoints
            trainer = self.trainer
            replicas = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
            return ResumableLoader(
                _Rows(rows),
                batch_size,
                collate,
                seed=self.seed if seed is None else seed,
                num_workers=self.hparams.num_workers,
                drop_last=len(rows) // self._world_size() >= batch_size,
                repeats=self.batch_repeats if repeats is None else repeats,
                **replicas,
            )
        # a generator of its own: creating an iterator must not draw from the global RNG (exact resume)
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            _Rows(rows),
            batch_size=batch_size,
            shuffle=shuffle,
            # each device sees len / world rows: keep a short last batch rather than an empty epoch
            drop_last=shuffle and len(rows) // self._world_size() >= batch_size,
            collate_fn=collate,
            generator=gen,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self):
        bs = self.batch_sizes
        loaders = {}
        if self.expert_rows:
            loaders["expert"] = self._loader(self.expert_rows, bs["expert"], self.collate_expert, True)
        if self.prompt_rows:
            loaders["prompts"] = self._loader(self._training_prompt_rows(), bs["prompt"], self.collate_prompts, True)
        if self.meta_rows:
            loaders["meta"] = self._loader(self.meta_rows, bs["meta"], self.collate_val, True)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _training_prompt_rows(self) -> list[dict]:
        """The training prompt rows, paired with their demonstrations when a method asked for them."""
        if self.demonstrations_per_prompt:  # set by the method after setup(): pair now (once per k)
            self.pair_demonstrations()
            return self._paired[1]
        return self.prompt_rows

    # the refill stream's order: pass k is shuffled with seed + REFILL_SEED_OFFSET + k, never one of the training
    # stream's (seed + k) within any run's number of passes
    REFILL_SEED_OFFSET = 1 << 30

    def refill_prompts(self) -> dict:
        """The next batch of the refill stream: more training prompts for DAPO's dynamic sampling
        (``model.dynamic_sampling``), which replaces the groups it drops with groups of these prompts.

        The stream holds the training prompt rows (paired as the training stream's), batched as
        ``prompt_batch_size`` on each device and split over ranks as the training stream is, in an order of
        its own (pass k shuffled with ``seed + REFILL_SEED_OFFSET + k``); it never ends (a new pass follows
        the last). It is a stream apart so that the training stream keeps its batches, passes and epochs:
        drawing refills from it would run it dry before the epoch's batch count, which ends Lightning's epoch
        early and restarts the other streams there. Its position (``{"pass", "batches", "given"}``, as a
        :class:`ResumableLoader`'s) is in :meth:`state_dict`, which Lightning writes into checkpoints (rank
        0's: every rank draws as many refill batches), so a resumed run draws the uninterrupted run's batches.

        Raises:
            ValueError: no training prompt rows (``data.prompt_data`` null) or :meth:`setup` not run yet.
        """
        if self._refill is None:
            if not getattr(self, "prompt_rows", None):
                raise ValueError(
                    "dynamic sampling refills rollout batches with more training prompts: data.prompt_data is null "
                    "(or the data module is not set up)"
                )
            seed = self.seed + self.REFILL_SEED_OFFSET
            loader = self._loader(
                self._training_prompt_rows(), self.batch_sizes["prompt"], self.collate_prompts, True, seed, 1
            )
            if self._refill_state:
                loader.load_state_dict(self._refill_state)
            self._refill = [loader, iter(loader)]
        loader, it = self._refill
        try:
            return next(it)
        except StopIteration:  # the end of a pass: the next one, in its own order
            self._refill[1] = iter(loader)
            return next(self._refill[1])

    def state_dict(self) -> dict:
        """The refill stream's position (:meth:`refill_prompts`), once it has been used or loaded; {} before."""
        if self._refill is not None:
            return {"refill_prompts": self._refill[0].state_dict()}
        return {"refill_prompts": self._refill_state} if self._refill_state else {}

    def load_state_dict(self, state: dict) -> None:
        self._refill_state, self._refill = state.get("refill_prompts"), None

    def collate_retention(self, rows: list[dict], skill: str) -> dict:
        """A batch of a retention set: prompt rows (as :meth:`collate_prompts`) with ``"retention": skill``."""
        return {**self.collate_prompts(rows), "retention": skill}

    def val_dataloader(self):
        """The held-out loader (val_data), then one loader per retention skill (in ``retention_data``'s
        order); a single loader when there is no retention set."""
        loaders = (
            [self._loader(self.val_rows, self.batch_sizes["val"], self.collate_val, False)] if self.val_rows else []
        )
        for skill, rows in self.retention_rows.items():
            collate = functools.partial(self.collate_retention, skill=skill)
            loaders.append(self._loader(rows, self.batch_sizes["val"], collate, False))
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self):
        return self.val_dataloader()


# ----------------------------------------------------------------------------- resumable training loaders
class _PassSampler(DistributedSampler):
    """DistributedSampler (so Lightning keeps it under DDP/FSDP) whose pass number is set by its loader
    (Lightning's ``set_epoch`` is ignored) and which can start a pass after ``skip`` of its indices."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        pass  # ResumableLoader counts passes itself (a cycled stream makes several per epoch)

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])


class ResumableLoader(DataLoader):
    """A shuffling training DataLoader whose position survives a restart.

    Pass k's order is a function of (seed, k) alone (``torch.randperm`` seeded ``seed + k``, split
    over ranks as DistributedSampler does), and ``state_dict()`` is ``{"pass": k, "batches": n}``,
    the batches this rank has consumed in pass k. Lightning stores it in every checkpoint (the fit
    loop's ``combined_loader`` state) and after ``load_state_dict`` the next pass resumes after
    those n batches, so a resumed run trains on exactly the batches an uninterrupted run would.
    A stream that CombinedLoader cycles starts a new pass (new order) each time it is exhausted.
    With ``repeats`` k > 1 each batch is yielded k times as ``{**batch, "repeat": r}`` (r = 0 .. k - 1:
    one rollout batch, k policy updates); the state then also counts the repeats given of the current
    batch, so a checkpoint taken between two of them resumes at the next one.
    Workers' base seed comes from the loader's own generator, never from the global RNG.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        collate_fn,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
        num_workers: int = 0,
        repeats: int = 1,
    ):
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=_PassSampler(dataset, num_replicas, rank, seed),
            drop_last=drop_last,
            collate_fn=collate_fn,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
        self.passes, self.batches, self._resuming = -1, 0, False
        self.repeats, self.given = repeats, 0  # each batch is yielded ``repeats`` times; ``given`` of them so far

    def __len__(self) -> int:
        return super().__len__() * self.repeats

    def __iter__(self):
        batches = super().__len__()
        partial = self._resuming and 0 < self.given < self.repeats  # stopped inside a batch's repeats
        if not self._resuming or (self.batches >= batches and not partial):
            self.passes, self.batches, self.given, partial = self.passes + 1, 0, 0, False
        self._resuming = False
        if partial:
            self.batches -= 1  # yield that batch again, from the repeat where it stopped
        self.sampler.epoch = self.passes
        self.sampler.skip = self.batches * self.batch_size
        return self._counted(super().__iter__(), self.given if partial else 0)

    def _counted(self, batches, first: int):
        for batch in batches:
            self.batches += 1
            for r in range(first, self.repeats):
                self.given = r + 1
                yield batch if self.repeats == 1 else {**batch, "repeat": r}
            first = 0

    def state_dict(self) -> dict:
        return {"pass": self.passes, "batches": self.batches, "given": self.given}

    def load_state_dict(self, state: dict) -> None:
        self.passes, self.batches, self._resuming = int(state["pass"]), int(state["batches"]), True
        self.given = int(state.get("given", 0))
