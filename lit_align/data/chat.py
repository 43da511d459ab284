"""Chat turns: the token a demonstration ends with, read from the tokenizer's chat template.

A prompt rendered by a chat template asks for an assistant turn, and the template ends such a turn with its
own token (ChatML ``<|im_end|>``, Llama-3 ``<|eot_id|>``, Gemma ``<end_of_turn>``), which is not always the
tokenizer's EOS: a Qwen base checkpoint's EOS is ``<|endoftext|>`` beside a ChatML template. A demonstration
that ends with the EOS there teaches the policy to stop with a token it never produces in chat (TRL PR 3299,
which added ``SFTConfig.eos_token`` for it). :func:`end_token` decides the one token that ends every
demonstration (expert rows, the demonstrations paired with prompt rows) and at which rollouts stop.
"""

from __future__ import annotations

_PROBE = "lit-align-end-of-turn-probe"  # assistant content no template edits (no whitespace to trim)


def template_end_token(tokenizer) -> int | None:
    """The token the chat template ends an assistant turn with: the first special or added token in what the
    template renders after the assistant's content in a one-turn conversation (user, then assistant). None
    when it renders no such token there (a template that appends plain text, or nothing).

    Raises:
        Exception: whatever the template raises on a user / assistant pair (the caller names the setting).
    """
    turn = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}]
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    at = text.rfind(_PROBE)
    if at < 0:
        return None
    after = tokenizer(text[at + len(_PROBE) :], add_special_tokens=False)["input_ids"]
    marks = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    return next((i for i in after if i in marks), None)


def end_token(tokenizer, eos_token: str, chat: bool) -> tuple[int, str]:
    """The token every demonstration ends with, and where it comes from (for the start-up log).

    Args:
        tokenizer: the run's tokenizer.
        eos_token: ``data.eos_token``: ``template`` (the chat template's end of turn where a template is
            applied to prompts; the EOS where none is, or where the template ends a turn with no special
            token), ``eos`` (the tokenizer's EOS), or a token of the tokenizer's vocabulary (``<|im_end|>``).
        chat: whether prompts go through the chat template.

    Raises:
        ValueError naming ``data.eos_token``: a named token outside the vocabulary; a template that cannot
        render a user / assistant pair; no EOS where the EOS is asked for.
    """
    if eos_token not in ("template", "eos"):
        vocab = tokenizer.get_vocab()
        if eos_token not in vocab:
            raise ValueError(
                f"data.eos_token={eos_token!r} is not a token of the tokenizer of {tokenizer.name_or_path}: give one "
                f"of its tokens (e.g. {tokenizer.eos_token!r}), 'template' (the chat template's end of turn) or 'eos'"
            )
        return vocab[eos_token], f"data.eos_token={eos_token!r}"
    if eos_token == "template" and chat:
        try:
            end = template_end_token(tokenizer)
        except Exception as e:  # noqa: BLE001  (a template that cannot render the pair: say which, and how out)
            raise ValueError(
                f"data.eos_token='template': the chat template of {tokenizer.name_or_path} cannot render a user / "
                f"assistant exchange ({type(e).__name__}: {e}); set data.eos_token to the token an assistant turn "
                f"ends with, or to 'eos'"
            ) from e
        if end is not None:
            return end, f"the chat template's end of turn {tokenizer.convert_ids_to_tokens(end)!r}"
    why = " (the chat template ends a turn with no special token)" if eos_token == "template" and chat else ""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer of {tokenizer.name_or_path} has no EOS token to end demonstrations with: set "
            f"data.eos_token to one of its tokens"
        )
    return tokenizer.eos_token_id, f"the tokenizer's EOS {tokenizer.eos_token!r}{why}"
