"""The policy part: the model, its frozen reference, the tokenizer, and the one log-probs forward.

Every path that needs log-probs of target tokens goes through :meth:`Policy.logprobs`: rollout rows
(prompt + completion, :class:`Completions`), demonstrations (input ids with labels, :class:`Labelled`),
prefix rows (a completion whose first tokens were given), held-out rows and the vLLM engine's
trainer-side ``old_logp``. The LM head runs only at the positions that predict a target (Hugging
Face's ``logits_to_keep``), so no (B, S, V) tensor exists for the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_align import losses
from lit_align.rollout import _eos_ids, accepts_logits_to_keep, position_ids_from_mask


@dataclass
class Completions:
    """Rows laid out as a left-padded prompt then a right-padded completion (a :class:`Rollout`'s layout).

    Shapes: ``prompt_ids`` / ``prompt_mask`` (N, P); ``completion_ids`` / ``completion_mask`` (N, T).
    The targets of row i are its completion tokens; a forward over rows ``rows`` is cut to their longest
    completion.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    @classmethod
    def of(cls, rollout) -> Completions:
        return cls(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)

    def width(self, rows: torch.Tensor) -> int:
        """Completion columns the rows ``rows`` need (at least 1)."""
        return max(int(self.completion_mask[rows].sum(-1).max()), 1)

    def inputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
        """(input ids (b, S), attention mask (b, S), start, targets (b, S - 1 - start), target mask): the
        logits at positions ``start`` .. S - 2 predict the targets."""
        width = self.width(rows)
        completion = self.completion_ids[rows, :width]
        ids = torch.cat([self.prompt_ids[rows], completion], 1)
        att = torch.cat([self.prompt_mask[rows], self.completion_mask[rows, :width].to(self.prompt_mask.dtype)], 1)
        return ids, att, self.prompt_ids.shape[1] - 1, completion, self.completion_mask[rows, :width]


@dataclass
class Labelled:
    """Rows laid out as right-padded input ids with labels (-100 outside the response): demonstrations.

    Shapes: ``input_ids`` / ``attention_mask`` / ``labels`` (N, S). A forward over rows ``rows`` is cut to
    their longest row, and the LM head runs from the first response position of any of them on.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, expert: dict) -> Labelled:
        return cls(expert["input_ids"], expert["attention_mask"], expert["labels"])

    @property
    def target_mask(self) -> torch.Tensor:
        """(N, S - 1): the response tokens, the targets of positions 0 .. S - 2."""
        return self.labels[:, 1:] != -100

    def inputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
        """As :meth:`Completions.inputs`; targets are the labels (clamped to valid ids where -100)."""
        mask = self.attention_mask[rows]
        width = max(int(((mask != 0).cumsum(-1) * (mask != 0)).amax()), 2)  # right padding: longest row
        width = int(max(width, int((mask != 0).sum(-1).max())))
        labels = self.labels[rows][:, 1:width]
        has = labels != -100
        start = int(torch.where(has.any(0))[0].min()) if bool(has.any()) else 0  # first label column
        labels = self.labels[rows][:, start + 1 : width]
        tokens = labels != -100
        return self.input_ids[rows][:, :width], mask[:, :width], start, labels.clamp(min=0), tokens


@dataclass
class Scored:
    """One forward's result: ``logits`` (b, T, V) predicting ``targets`` (b, T), ``mask`` (b, T) the target
    tokens that count, ``logp`` (b, T) their log-probs (float32, with the graph unless under no_grad)."""

    logits: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor


class Policy:
    """The model being trained, its frozen reference (None at ``beta = 0``; the adapter-free policy under
    LoRA) and its tokenizer.

    Args:
        model: the causal LM (registered on the module that owns it; this part only reads it).
        tokenizer: its tokenizer (left padding, a pad token).
        ref_model: a separate frozen reference, or None (no KL term, or LoRA: the adapters disabled).
    """

    def __init__(self, model, tokenizer, ref_model=None):
        self.model, self.tokenizer, self.ref_model = model, tokenizer, ref_model
        self._sharded: bool | None = None  # set: overrides the check (a model sharded by other means)

    # ------------------------------------------------------------------ the forward
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """The policy's logits (B, S, V); with ``start``, only those that predict tokens start + 1 .. S - 1
        (B, S - 1 - start, V), i.e. ``logits[:, start:-1]``, with the LM head run only there when the
        model takes ``logits_to_keep`` (see :func:`kept_logits`)."""

        def forward(ids, mask, keep):
            positions = position_ids_from_mask(mask)
            return self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **keep
            ).logits

        return kept_logits(forward, input_ids, attention_mask, start, accepts_logits_to_keep(self.model))

    def ref_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None
    ) -> torch.Tensor:
        """Logits of the frozen reference: the separate model, or under LoRA the adapter-free policy."""
        model = self.ref_model if self.ref_model is not None else self.model

        def forward(ids, mask, keep):
            kwargs = dict(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
            )
            if self.ref_model is not None:
                return self.ref_model(**kwargs, **keep).logits
            with self.model.disable_adapter():
                return self.model(**kwargs, **keep).logits

        return kept_logits(forward, input_ids, attention_mask, start, accepts_logits_to_keep(model))

    def logprobs(
        self,
        rows_of: Completions | Labelled,
        rows: torch.Tensor,
        temperature: float = 1.0,
        consume: bool = False,
        reference: bool = False,
    ) -> Scored:
        """Log-probs of the targets of rows ``rows`` of ``rows_of`` at ``temperature``, from one forward.

        ``consume``: the backward writes the logits' gradient over the logits (see
        :func:`lit_align.losses.token_logprobs`): only where this loss alone reads them. ``reference``:
        the frozen reference's log-probs (no graph).
        """
        ids, att, start, targets, mask = rows_of.inputs(rows)
        if reference:
            with torch.no_grad():
                logits = self.ref_logits(ids, att, start=start)
                return Scored(logits, targets, mask, losses.token_logprobs(logits, targets, temperature))
        logits = self.logits(ids, att, start=start)
        return Scored(logits, targets, mask, losses.token_logprobs(logits, targets, temperature, consume=consume))

    # ------------------------------------------------------------------ what other parts read
    @property
    def eos_ids(self) -> list[int] | None:
        """The end tokens of a completion (the generation config's, else the tokenizer's)."""
        return _eos_ids(self.model, self.tokenizer)

    def add_end_token(self, token_id: int) -> None:
        """Make ``token_id`` end completions too: appended to the model's generation config ``eos_token_id``
        (the checkpoint's own end tokens kept first), which both samplers stop at and an export writes. The
        data's demonstrations end with it (``data.eos_token``), so rollouts must stop there as well; TRL's
        SFTTrainer does the same with its ``eos_token``."""
        eos = self.eos_ids or []
        if token_id not in eos:
            self.model.generation_config.eos_token_id = [*eos, int(token_id)]

    @property
    def sharded(self) -> bool:
        """True once the policy is sharded with FSDP2 (``--trainer.strategy=fsdp2``)."""
        if self._sharded is not None:
            return self._sharded
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.model, FSDPModule)

    @sharded.setter
    def sharded(self, value: bool | None) -> None:
        self._sharded = value

    def trainable(self) -> tuple[list[str], list[torch.Tensor]]:
        """Names and tensors of the parameters being trained (all, or the LoRA adapters)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's weights as whole CPU tensors under Hugging Face names, adapters merged
        (:func:`lit_align.adapters.merged_state_dict`, the merge the vLLM weight sync uses too).

        Under sharding this is a collective (every rank must call it) and only rank 0 gets the weights
        (the other ranks get an empty dict)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return self._merged(state) if state else state

    def streamed_weights(self):
        """(name, whole tensor) of the policy's weights: FSDP2 shards gathered one tensor at a time on
        every rank (a collective: all ranks iterate together); with adapters, all gathered first and
        merged as :meth:`full_state_dict` merges them."""
        state = self.model.state_dict()
        if hasattr(self.model, "peft_config"):
            full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in state.items()}
            yield from self._merged(full).items()
            return
        for name, tensor in state.items():
            yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()

    def _merged(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (whole tensors, the model's own names) as plain Hugging Face weights."""
        if not hasattr(self.model, "peft_config"):
            return state
        from lit_align.adapters import merged_state_dict

        return merged_state_dict(self.model, state)


def kept_logits(forward, ids: torch.Tensor, mask: torch.Tensor, start: int | None, keeps_logits: bool) -> torch.Tensor:
    """One pass of ``forward(ids, mask, keep)``: every position's logits (``start`` None, ``keep`` ``{}``),
    or only those at positions ``start`` .. S - 2 (B, S - 1 - start, V), the ones that predict tokens
    start + 1 .. S - 1 (a completion's tokens, for start = prompt width - 1). Where the model takes
    ``logits_to_keep`` (``keeps_logits``) ``keep`` is ``{"logits_to_keep": those positions}`` (a 1-D index
    tensor), so the LM head and the logits exist only there; otherwise it computes every position and the
    rest are sliced off. Same values either way: the hidden states do not depend on which are kept."""
    if start is None:
        return forward(ids, mask, {})
    if keeps_logits:
        keep = torch.arange(start, max(ids.shape[1] - 1, start + 1), device=ids.device)
        return forward(ids, mask, {"logits_to_keep": keep})[:, : ids.shape[1] - 1 - start]
    return forward(ids, mask, {})[:, start:-1]
