"""Loading a policy and its tokenizer the way a user's own checkpoint is loaded; switching its dropout off."""

from __future__ import annotations

import re
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


# attribute names of dropout probabilities: attention_dropout, hidden_dropout, resid_pdrop, embd_pdrop,
# attn_pdrop, summary_first_dropout, hidden_dropout_prob, layerdrop, drop_path_rate, ... (never *keep*)
_RATE_NAME = re.compile(r"dropout|pdrop|layerdrop|drop_path|drop_prob")
_AS_LOADED: dict[int, list[tuple[tuple[str, ...], float]]] = {}  # id(config) -> (path, value) zeroed there


def _is_rate(name: str, value) -> bool:
    return (
        isinstance(value, float)
        and 0.0 < value < 1.0
        and "keep" not in name.lower()
        and _RATE_NAME.search(name.lower()) is not None
    )


def disable_dropout_in_model(model) -> int:
    """Switch dropout off in ``model`` (TRL's name) and return how many places were switched off.

    A model kept in train() mode stays deterministic only if every dropout probability is 0, so this
    sets ``p = 0`` on every ``torch.nn.Dropout`` (and its variants; peft's ``lora_dropout`` too), and
    zeroes the float dropout probabilities that attention implementations and some forwards read
    directly, while training (``self.attention_dropout``, ``config.attention_dropout``, ``resid_pdrop``,
    ...): on every module and on the model's config and its sub-configs. The zeroed config values are
    remembered, so an export writes the config as it was loaded (see :func:`config_as_loaded`).
    """
    import weakref

    import torch
    from transformers import PretrainedConfig

    count = 0
    configs: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            count += 1
        for name, value in list(vars(module).items()):
            if _is_rate(name, value):
                setattr(module, name, 0.0)
                count += 1
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            configs[id(config)] = config

    def zero(config, path: tuple[str, ...], seen: list) -> None:
        for name, value in list(vars(config).items()):
            if isinstance(value, PretrainedConfig):
                zero(value, (*path, name), seen)
            elif _is_rate(name, value):
                setattr(config, name, 0.0)
                seen.append(((*path, name), value))

    for key, config in configs.items():
        zeroed: list = []
        zero(config, (), zeroed)
        count += len(zeroed)
        if zeroed:
            if key not in _AS_LOADED:
                weakref.finalize(config, _AS_LOADED.pop, key, None)
            _AS_LOADED.setdefault(key, []).extend(zeroed)
    return count


def config_as_loaded(config):
    """``config`` with the dropout probabilities :func:`disable_dropout_in_model` zeroed put back (a
    copy), or ``config`` itself if it zeroed none: what an exported checkpoint should carry."""
    import copy

    zeroed = _AS_LOADED.get(id(config))
    if not zeroed:
        return config
    config = copy.deepcopy(config)
    for path, value in zeroed:
        owner = config
        for name in path[:-1]:
            owner = getattr(owner, name)
        setattr(owner, path[-1], value)
    return config


def apply_lora(model, lora: dict):
    """Wrap ``model`` with peft LoRA adapters (``lora``: LoraConfig arguments); the base is frozen.

    Raises ValueError naming ``model.lora`` for arguments peft refuses, and for adapters the export and
    the vLLM weight sync could not merge into plain weights (:func:`lit_align.adapters.check_mergeable`)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("model.lora needs peft: pip install 'lit-align[lora]' (or pip install peft)") from e
    try:
        config = LoraConfig(**{"task_type": "CAUSAL_LM", **dict(lora)})
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.lora={dict(lora)!r}: {e}") from e
    from lit_align.adapters import check_mergeable

    model = get_peft_model(model, config)
    check_mergeable(model)
    return model
