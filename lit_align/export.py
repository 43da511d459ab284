"""Export a policy as a Hugging Face directory, from a live module or from any training checkpoint.

    python -m lit_align.export CKPT OUT_DIR [--base PATH_OR_HUB_ID]

CKPT is a Lightning checkpoint written by ``train.py fit`` (``last.ckpt``, a ``best-...ckpt``, or
the directory of a sharded ``fsdp2`` checkpoint). OUT_DIR receives the weights (adapters merged into
them by :func:`lit_align.adapters.merged_state_dict`: LoRA, DoRA, modules_to_save; a trained output
layer on a tied checkpoint is written untied), the model config, the generation config and the
tokenizer, and loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``. The base model's
config and tokenizer come from the checkpoint's ``model_name_or_path`` unless ``--base`` names
another copy (e.g. when the run was trained on another machine).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def save_hf_dir(
    config,
    generation_config,
    tokenizer,
    state: dict[str, torch.Tensor],
    target: str | Path,
    trust_remote_code: bool = False,
    untie: bool = False,
) -> Path:
    """Write ``state`` (plain HF names, whole tensors) as a from_pretrained-able directory.

    The weights go through a parameter-free skeleton (built on the meta device from ``config``), so
    this works whatever wraps the live model (FSDP2 shards, peft) and from a bare state dict.
    Refuses (ValueError, nothing written) when a weight holds NaN or inf.

    Tied weights (``tie_word_embeddings``: lm_head = embed_tokens) are written once. With ``untie`` (the
    policy trains its output layer apart from its input embedding: :func:`lit_align.adapters.unties_embeddings`),
    or when ``state`` holds two different matrices for them, the config is written with
    ``tie_word_embeddings: false`` and both matrices, so that each loads as trained.
    """
    from transformers import AutoModelForCausalLM

    from lit_align.adapters import untied_config

    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"not exporting to {target}: non-finite values in {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    state = {k: v.contiguous() for k, v in state.items()}
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    tied: dict[int, list[str]] = {}  # the names of each parameter, several where tied
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    tied = {k: names for k, names in tied.items() if len(names) > 1}
    differ = any(
        not torch.equal(state[a], state[b])
        for names in tied.values()
        for a, b in zip(names, names[1:])
        if a in state and b in state
    )
    if tied and (untie or differ):
        config = untied_config(config)
        for names in tied.values():  # a name the state leaves out loads as its former twin
            given = next((state[n] for n in names if n in state), None)
            state.update({n: given for n in names if n not in state and given is not None})
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    else:
        for names in tied.values():
            for name in names[1:]:
                if name in state and names[0] in state:
                    del state[name]
    if generation_config is not None:
        skeleton.generation_config = generation_config
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    skeleton.save_pretrained(target, state_dict=state)
    tokenizer.save_pretrained(target)
    return target


def save_module(pl_module, target: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """Save a PolicyModule's policy (``state`` from its ``full_state_dict()``) and tokenizer."""
    from lit_align.adapters import unties_embeddings
    from lit_align.hf import config_as_loaded

    model = pl_module.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # the config as loaded: the dropout probabilities disable_dropout zeroed for training put back
    return save_hf_dir(
        config_as_loaded(base.config),
        getattr(base, "generation_config", None),
        pl_module.tokenizer,
        state,
        target,
        pl_module.hparams.get("trust_remote_code", False),
        untie=unties_embeddings(model),
    )


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint as a dict: a ``.ckpt`` file, or a sharded (distributed) directory."""
    path = Path(path)
    if path.is_dir():
        from lightning.fabric.utilities.consolidate_checkpoint import _load_distributed_checkpoint
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        checkpoint = _load_distributed_checkpoint(path)
        meta = path / _METADATA_FILENAME
        if meta.is_file():
            checkpoint.update(torch.load(meta, map_location="cpu", weights_only=True))
        return checkpoint
    return torch.load(path, map_location="cpu", weights_only=True)


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Export the policy saved in a training checkpoint to a Hugging Face directory."""
    from transformers import AutoConfig, GenerationConfig

    from lit_align.hf import _resolve, load_tokenizer

    checkpoint = load_checkpoint(ckpt)
    hp = dict(checkpoint.get("hyper_parameters") or {})
    name = base or hp.get("model_name_or_path")
    if not name:
        raise ValueError(f"{ckpt}: no model_name_or_path in its hyper_parameters; pass --base PATH_OR_HUB_ID")
    remote = bool(hp.get("trust_remote_code", False))
    source = _resolve(name)
    config = AutoConfig.from_pretrained(source, trust_remote_code=remote)
    try:
        generation_config = GenerationConfig.from_pretrained(source)
    except OSError:
        generation_config = GenerationConfig.from_model_config(config)
    tokenizer = load_tokenizer(name, remote)
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if data:  # the run's rollouts also stopped where its demonstrations ended (data.eos_token): so does the export
        _add_end_token(generation_config, tokenizer, data)
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise ValueError(f"{ckpt}: its state_dict holds no policy weights (keys starting with 'model.')")
    untie = False
    if hp.get("lora"):
        from transformers import AutoModelForCausalLM

        from lit_align.adapters import merged_state_dict, unties_embeddings
        from lit_align.hf import apply_lora

        with torch.device("meta"):
            skeleton = apply_lora(AutoModelForCausalLM.from_config(config, trust_remote_code=remote), hp["lora"])
        state, untie = merged_state_dict(skeleton, state), unties_embeddings(skeleton)
    return save_hf_dir(config, generation_config, tokenizer, state, out_dir, remote, untie)


def _add_end_token(generation_config, tokenizer, data: dict) -> None:
    """Append the token the run's demonstrations ended with (from the data module's saved settings, as
    :meth:`lit_align.core.policy.Policy.add_end_token` does at set-up) to ``generation_config.eos_token_id``.
    A checkpoint written before ``data.eos_token`` existed ended them with the EOS."""
    from lit_align.data.chat import end_token

    chat = bool(data.get("use_chat_template", True) and getattr(tokenizer, "chat_template", None))
    end, _ = end_token(tokenizer, data.get("eos_token", "eos"), chat)
    eos = generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and not eos:
        eos = [tokenizer.eos_token_id]
    if end not in eos:
        generation_config.eos_token_id = [*eos, end]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_align.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="Lightning checkpoint (.ckpt file or sharded checkpoint directory)")
    parser.add_argument("out_dir", help="directory to write the Hugging Face model and tokenizer to")
    parser.add_argument(
        "--base", default=None, help="base model (config + tokenizer) if not the checkpoint's model_name_or_path"
    )
    args = parser.parse_args(argv)
    out = export_checkpoint(args.ckpt, args.out_dir, args.base)
    print(f"exported {args.ckpt} -> {out}")


if __name__ == "__main__":
    main()
