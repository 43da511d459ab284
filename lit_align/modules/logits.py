"""The policy's (and the frozen reference's) logits, only where a loss reads them.

A mixin of :class:`lit_align.modules.policy.PolicyModule`: through Hugging Face's ``logits_to_keep``,
the LM head only at the positions that predict the tokens a loss scores. The rows of one call are one
forward pass; grouping rows of similar length (``length_buckets``) is the step engine's
(:func:`lit_align.modules.engine.forward_groups`), so no pass assembles logits of several groups.
"""

from __future__ import annotations

import torch

from lit_align.rollout import accepts_logits_to_keep, position_ids_from_mask


class PolicyLogits:
    """Logits of ``self.model`` / ``self.ref_model`` for the loss terms."""

    def _forward_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None
    ) -> torch.Tensor:
        """The policy's logits (B, S, V); with ``start``, only those that predict tokens start + 1 .. S - 1
        (B, S - 1 - start, V), i.e. ``logits[:, start:-1]``, and the LM head runs only there when the
        model takes ``logits_to_keep`` (see :meth:`_kept_logits`)."""

        def forward(ids, mask, keep):
            positions = position_ids_from_mask(mask)
            return self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **keep
            ).logits

        return self._kept_logits(forward, input_ids, attention_mask, start, accepts_logits_to_keep(self.model))

    @staticmethod
    def _kept_logits(
        forward, ids: torch.Tensor, mask: torch.Tensor, start: int | None, keeps_logits: bool
    ) -> torch.Tensor:
        """One pass of ``forward(ids, mask, keep)``: every position's logits (``start`` None, ``keep``
        ``{}``), or only those at positions ``start`` .. S - 2 (B, S - 1 - start, V), the ones that predict
        tokens start + 1 .. S - 1 (a completion's tokens, for start = prompt width - 1). Where the model
        takes ``logits_to_keep`` (``keeps_logits``) ``keep`` is ``{"logits_to_keep": those positions}``
        (a 1-D index tensor), so the LM head and the logits exist only there; otherwise it computes every
        position and the rest are sliced off. Same values either way: the hidden states, and so the
        logits, do not depend on which positions are kept."""
        if start is None:
            return forward(ids, mask, {})
        if keeps_logits:
            keep = torch.arange(start, max(ids.shape[1] - 1, start + 1), device=ids.device)
            return forward(ids, mask, {"logits_to_keep": keep})[:, : ids.shape[1] - 1 - start]
        return forward(ids, mask, {})[:, start:-1]

    def _ref_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None
    ) -> torch.Tensor:
        """Logits of the frozen reference: the separate model, or under LoRA the adapter-free policy.
        ``start`` as in :meth:`_forward_logits`."""
        model = self.ref_model if self.ref_model is not None else self.model

        def forward(ids, mask, keep):
            kwargs = dict(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
            )
            if self.ref_model is not None:
                return self.ref_model(**kwargs, **keep).logits
            with self.model.disable_adapter():
                return self.model(**kwargs, **keep).logits

        return self._kept_logits(forward, input_ids, attention_mask, start, accepts_logits_to_keep(model))
