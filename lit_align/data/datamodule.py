"""MixedDataModule: every training step gets expert demonstrations and prompts, side by side."""
from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch.utils.data import DataLoader

from lit_align.data import embedded
from lit_align.data.loading import DataError, load_table, validate_rows
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


class MixedDataModule(L.LightningDataModule):
    """Expert demonstrations (for SFT) and prompts with reference answers (for RL) in one batch.

    Each training batch is ``{"expert": ..., "prompts": ...}`` (either key is absent when its data
    is switched off with ``null``), drawn through Lightning's CombinedLoader with independent batch
    sizes; the shorter stream cycles. Validation rows carry a prompt, the reference answer and,
    when present, the expert's demonstration.

    Args:
        model_name_or_path: checkpoint whose tokenizer is used (linked to the model's by the CLI).
        expert_data: file (.jsonl/.json/.parquet/.csv) or hub data set with prompt + response
            columns, or ``"embedded"`` for the default addition task; ``null`` for none.
        prompt_data: file or hub data set with prompt + answer columns (``"embedded"``, ``null``).
        val_data: held-out file with prompt + answer (+ response for val/expert_nll).
        meta_data: a second held-out file (prompt + answer + response) that AMFT's meta-objective
            reads during training, as batch key ``"meta"``; ``null`` for methods that need none.
        prompt_column, response_column, answer_column: column names in your files.
        expert_batch_size: demonstrations per step, per device.
        prompt_batch_size: prompts per step, per device (each is sampled num_generations times).
        use_chat_template: wrap prompts in the tokenizer's chat template when it has one.
        max_prompt_length, max_response_length: token limits; ``overlong`` says what to do with
            rows beyond them: ``error`` (stop at set-up, naming the row), ``truncate`` (keep the
            end of the prompt / start of the response) or ``skip`` (drop the row). Counts are
            reported.
        expert_error_rate: share of embedded problems the embedded expert gets wrong.
        seed: shuffling seed.
    """

    def __init__(
        self,
        model_name_or_path: str = "embedded",
        expert_data: str | None = "embedded",
        prompt_data: str | None = "embedded",
        val_data: str | None = "embedded",
        meta_data: str | None = None,
        prompt_column: str = "prompt",
        response_column: str = "response",
        answer_column: str = "answer",
        expert_batch_size: int = 32,
        prompt_batch_size: int = 16,
        val_batch_size: int = 100,
        meta_batch_size: int = 32,
        use_chat_template: bool = True,
        max_prompt_length: int = 512,
        max_response_length: int = 1024,
        overlong: Literal["error", "truncate", "skip"] = "error",
        expert_error_rate: float = 0.25,
        trust_remote_code: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        for name in ("expert_batch_size", "prompt_batch_size", "val_batch_size", "meta_batch_size", "max_prompt_length", "max_response_length"):
            if locals()[name] < 1:
                raise ValueError(f"data.{name}={locals()[name]} must be >= 1")
        if overlong not in ("error", "truncate", "skip"):
            raise ValueError(f"data.overlong={overlong!r}: choose one of ['error', 'truncate', 'skip']")
        if expert_data is None and prompt_data is None:
            raise ValueError("data.expert_data and data.prompt_data are both null: nothing to train on")
        self.save_hyperparameters()
        self.tokenizer = None
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------------ set-up
    def _source(self, value: str, split: str) -> str:
        if value == embedded.EMBEDDED_NAME:
            return embedded.ensure_task(self.hparams.expert_error_rate)[split]
        return value

    def _encode_prompt(self, text: str) -> list[int]:
        tok = self.tokenizer
        if self.hparams.use_chat_template and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return tok(text, add_special_tokens=True)["input_ids"]

    def _encode(self, source: str, split: str, need: dict[str, str]) -> list[dict]:
        rows, label = load_table(self._source(source, split), split)
        validate_rows(rows, label, need)
        hp = self.hparams
        eos = self.tokenizer.eos_token_id
        out, dropped, cut = [], 0, 0
        for i, row in enumerate(rows, start=1):
            item = {"prompt": row[need["prompt"]]}
            ids = self._encode_prompt(item["prompt"])
            resp = None
            if "response" in need or (hp.response_column in row and isinstance(row.get(hp.response_column), str)):
                resp = self.tokenizer(row[hp.response_column], add_special_tokens=False)["input_ids"] + [eos]
            too_long = len(ids) > hp.max_prompt_length or (resp is not None and len(resp) > hp.max_response_length)
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
                ids = ids[-hp.max_prompt_length:]
                resp = resp[: hp.max_response_length] if resp is not None else None
            item["prompt_ids"] = ids
            if resp is not None:
                item["response_ids"] = resp
            if "answer" in need or hp.answer_column in row:
                item["answer"] = str(row.get(hp.answer_column, ""))
            out.append(item)
        if dropped or cut:
            rank_zero_warn(f"{label}: {dropped} rows skipped and {cut} rows truncated as longer than the token limits")
        self.stats[f"{split}_{source}_skipped"] = dropped
        self.stats[f"{split}_{source}_truncated"] = cut
        if not out:
            raise DataError(f"{label}: no usable rows left after applying data.overlong={hp.overlong!r}")
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.model_name_or_path, hp.trust_remote_code)
        cols = {"prompt": hp.prompt_column}
        self.expert_rows = (
            self._encode(hp.expert_data, "train", {**cols, "response": hp.response_column}) if hp.expert_data else None
        )
        self.prompt_rows = (
            self._encode(hp.prompt_data, "train", {**cols, "answer": hp.answer_column}) if hp.prompt_data else None
        )
        self.val_rows = self._encode(hp.val_data, "val", {**cols, "answer": hp.answer_column}) if hp.val_data else None
        self.meta_rows = (
            self._encode(hp.meta_data, "meta", {**cols, "answer": hp.answer_column, "response": hp.response_column})
            if hp.meta_data
            else None
        )
        if self.val_rows and self.prompt_rows:
            train_prompts = {r["prompt"] for r in self.prompt_rows}
            overlap = sum(r["prompt"] in train_prompts for r in self.val_rows)
            if overlap:
                rank_zero_warn(f"{overlap} validation prompts also appear in the training prompts")

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
        pad = self.tokenizer.pad_token_id
        batch = {
            "prompt_ids": _pad([r["prompt_ids"] for r in rows], pad, left=True),
            "prompt_mask": _pad([[1] * len(r["prompt_ids"]) for r in rows], 0, left=True),
            "prompts": [r["prompt"] for r in rows],
            "answers": [r.get("answer", "") for r in rows],
        }
        return batch

    def collate_val(self, rows: list[dict]) -> dict:
        batch = self.collate_prompts(rows)
        with_demo = [r for r in rows if "response_ids" in r]
        if len(with_demo) == len(rows):
            batch["expert"] = self.collate_expert(rows)
        return batch

    def _loader(self, rows, batch_size, collate, shuffle) -> DataLoader:
        gen = torch.Generator().manual_seed(self.hparams.seed) if shuffle else None
        return DataLoader(
            _Rows(rows),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(rows) >= batch_size,
            collate_fn=collate,
            generator=gen,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self):
        hp = self.hparams
        loaders = {}
        if self.expert_rows:
            loaders["expert"] = self._loader(self.expert_rows, hp.expert_batch_size, self.collate_expert, True)
        if self.prompt_rows:
            loaders["prompts"] = self._loader(self.prompt_rows, hp.prompt_batch_size, self.collate_prompts, True)
        if self.meta_rows:
            loaders["meta"] = self._loader(self.meta_rows, hp.meta_batch_size, self.collate_val, True)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self):
        if not self.val_rows:
            return []
        return self._loader(self.val_rows, self.hparams.val_batch_size, self.collate_val, False)

    def test_dataloader(self):
        return self.val_dataloader()
