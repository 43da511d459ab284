"""The policy's (and the frozen reference's) logits, only where a loss reads them.

A mixin of :class:`lit_align.modules.policy.PolicyModule`: forwards over groups of rows of similar
length (``length_buckets``) and, through Hugging Face's ``logits_to_keep``, the LM head only at the
positions that predict the tokens a loss scores.
"""
from __future__ import annotations

import torch

from lit_align.rollout import accepts_logits_to_keep, length_groups, position_ids_from_mask


class PolicyLogits:
    """Logits of ``self.model`` / ``self.ref_model`` for the loss terms."""

    def _forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """The policy's logits (B, S, V); with ``start``, only those that predict tokens start + 1 .. S - 1
        (B, S - 1 - start, V), i.e. ``logits[:, start:-1]``, and the LM head runs only there when the
        model takes ``logits_to_keep`` (see :meth:`_by_length`)."""
        def forward(ids, mask, keep):
            positions = position_ids_from_mask(mask)
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **keep).logits

        return self._by_length(forward, input_ids, attention_mask, start, accepts_logits_to_keep(self.model))

    def _by_length(self, forward, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None,
                   keeps_logits: bool = False) -> torch.Tensor:
        """``forward(ids, mask, keep)`` -> logits, run over groups of rows of similar length
        (``length_buckets``), each cut to its longest row. The result is one tensor in the batch's row
        order, zero at the positions after a row's group width (never attended, so never read by a
        loss), and differentiable: its gradient reaches every group's forward.

        ``start`` None: the logits at every position (B, S, V); ``keep`` is ``{}``. ``start`` s: only the
        logits at positions s .. S - 2 (B, S - 1 - s, V), those that predict tokens s + 1 .. S - 1 (a
        completion's tokens, for s = prompt width - 1). With ``keeps_logits`` (the model's forward takes
        ``logits_to_keep``), a pass of width w gets ``keep = {"logits_to_keep": positions s .. w - 2}``
        (a 1-D index tensor), so the LM head and the logits exist only there; otherwise it computes every
        position and the rest are sliced off. Same values either way: the hidden states, and so the
        logits, do not depend on which positions are kept."""
        run = lambda ids, mask: self._kept_logits(forward, ids, mask, start, keeps_logits)  # noqa: E731
        groups = None if self._sharded() else length_groups(attention_mask, self.hparams.length_buckets)
        if groups is None:
            return run(input_ids, attention_mask)
        pieces = [(rows, run(input_ids[rows, :width], attention_mask[rows, :width])) for rows, width in groups]
        first = pieces[0][1]
        S = input_ids.shape[1] if start is None else input_ids.shape[1] - 1 - start
        logits = first.new_zeros(input_ids.shape[0], S, first.shape[-1])
        for rows, piece in pieces:
            logits[rows, : piece.shape[1]] = piece
        return logits

    @staticmethod
    def _kept_logits(forward, ids: torch.Tensor, mask: torch.Tensor, start: int | None, keeps_logits: bool) -> torch.Tensor:
        """One pass of ``forward(ids, mask, keep)``: every position's logits (``start`` None), or those
        at positions ``start`` .. S - 2, through ``logits_to_keep`` when the model takes it (``keeps_logits``)."""
        if start is None:
            return forward(ids, mask, {})
        if keeps_logits:
            keep = torch.arange(start, max(ids.shape[1] - 1, start + 1), device=ids.device)
            return forward(ids, mask, {"logits_to_keep": keep})[:, : ids.shape[1] - 1 - start]
        return forward(ids, mask, {})[:, start:-1]

    def _ref_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """Logits of the frozen reference: the separate model, or under LoRA the adapter-free policy.
        ``start`` as in :meth:`_forward_logits`."""
        model = self.ref_model if self.ref_model is not None else self.model

        def forward(ids, mask, keep):
            kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
            if self.ref_model is not None:
                return self.ref_model(**kwargs, **keep).logits
            with self.model.disable_adapter():
                return self.model(**kwargs, **keep).logits

        return self._by_length(forward, input_ids, attention_mask, start, accepts_logits_to_keep(model))

