"""Loading a policy and its tokenizer the way a user's own checkpoint is loaded."""
from __future__ import annotations

from pathlib import Path

from lit_align.data.embedded import EMBEDDED_NAME, resolve_model_path


def _resolve(model_name_or_path: str) -> str:
    path = resolve_model_path(model_name_or_path)
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") > 1
    if looks_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(
            f"model_name_or_path={model_name_or_path!r}: directory does not exist "
            f"(give a Hugging Face checkpoint directory, a hub id, or {EMBEDDED_NAME!r})"
        )
    return str(Path(path).expanduser()) if looks_local else path


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False):
    """AutoTokenizer with left padding (for generation) and a pad token (EOS if none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_resolve(model_name_or_path), trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{model_name_or_path}: the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_name_or_path: str, trust_remote_code: bool = False, dtype: str | None = None):
    """AutoModelForCausalLM from a checkpoint directory, a hub id, or the embedded model."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(_resolve(model_name_or_path), **kwargs)
