"""LoRA adapters (peft): the one merge of a peft policy into plain Hugging Face weights.

Every path that needs the policy as plain weights goes through :func:`merged_state_dict`: the export at
fit end (``HFExport``), ``python -m lit_align.export`` from a checkpoint (over a parameter-free skeleton)
and the vLLM engine's weight sync (:meth:`lit_align.core.policy.Policy.streamed_weights`). It equals
peft's own ``merge_and_unload()`` for LoRA, DoRA (the magnitude vector rescales each output row:
W' = m / ||W + dW||_row * (W + dW), arXiv 2402.09353; dropping it was unsloth-zoo PR 828) and
``modules_to_save`` (the trained copy replaces the layer; dropping it was unsloth PR 9331), because it
runs peft's own code on each layer (``get_delta_weight``, the DoRA variant's ``merge_safe``), over the
gathered tensors it is given instead of the live ones, so the policy in training is left as it is.

What it cannot merge is refused by :func:`check_mergeable` when the adapters are applied, before any
training: another LoRA variant, a LoRA on a layer type peft does not merge (``target_parameters``,
attention), ``trainable_token_indices``, a ``lora_bias`` on a layer without a bias.
"""

from __future__ import annotations

import torch

PEFT_PREFIX = "base_model.model."
PEFT_PARTS = (".lora_", ".base_layer.", ".modules_to_save.", ".original_module.")  # in peft names only


def _lora_kinds():
    """(layer types merged by ``get_delta_weight``, variant types merged by their ``merge_safe``)."""
    from peft.tuners.lora import layer, variants

    layers = (layer.Linear, layer.Embedding, layer._ConvNd)
    dora = (variants.DoraLinearVariant, variants._DoraConvNdVariant)  # DoraEmbeddingVariant is a DoraLinearVariant
    return layers, dora


def _adapters(module) -> list[str]:
    """The adapters of a LoRA layer that its forward applies (peft merges the same ones)."""
    own = set(module.lora_A) | set(getattr(module, "lora_embedding_A", {}))
    return [a for a in module.active_adapters if a in own]


def check_mergeable(peft_model, setting: str = "model.lora") -> None:
    """Raise ValueError (naming ``setting`` and the layer) if :func:`merged_state_dict` cannot turn
    ``peft_model`` into plain weights: called where the adapters are applied, so that a run is refused
    before it trains rather than failing in its export."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    layers, dora = _lora_kinds()
    what = "so the export and the vLLM weight sync could not merge it into plain weights"
    for name, module in peft_model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            nested = [
                n for n, m in module.named_modules() if n and isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))
            ]
            if nested:
                raise ValueError(f"{setting}: {name} is both in modules_to_save and adapted ({nested[0]}), {what}")
        elif isinstance(module, LoraLayer):
            if not isinstance(module, layers):
                raise ValueError(
                    f"{setting}: {name} is a peft {type(module).__name__} LoRA layer, {what} "
                    "(LoRA and DoRA on Linear, Embedding and Conv layers are supported)"
                )
            if len(_adapters(module)) > 1:
                raise ValueError(
                    f"{setting}: {name} has several active adapters {_adapters(module)}; merging takes one"
                )
            for adapter in _adapters(module):
                variant = module.lora_variant.get(adapter)
                if variant is not None and not isinstance(variant, dora):
                    raise ValueError(
                        f"{setting}: {name} uses the LoRA variant {type(variant).__name__}, {what} "
                        "(plain LoRA and DoRA, use_dora: true, are supported)"
                    )
                if module.lora_bias.get(adapter) and getattr(module.get_base_layer(), "bias", None) is None:
                    raise ValueError(
                        f"{setting}: lora_bias on {name}, whose base layer has no bias: the merged layer would need "
                        "one, which the model's architecture does not have; set lora_bias: false"
                    )
        elif isinstance(module, (AuxiliaryTrainingWrapper, BaseTunerLayer)):
            raise ValueError(
                f"{setting}: {name} is wrapped by peft's {type(module).__name__} (e.g. trainable_token_indices), "
                f"{what}; use modules_to_save for a layer to train in full"
            )


def _with_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], fn):
    """``fn(module)`` with ``module``'s parameters and buffers named in ``tensors`` (relative names) replaced
    by those tensors for the call (``torch.func.functional_call``): peft's layer code run on gathered or
    float32 copies, the live parameters (FSDP2 shards, meta tensors of a skeleton) untouched and back in
    place afterwards. Whatever the call caches on the module (DoRA's weight norm) is dropped."""

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = module

        def forward(self):
            return fn(self.layer)

    caches = getattr(module, "_caches", None)
    cached = set(caches) if caches is not None else set()
    try:
        return torch.func.functional_call(Call(), {f"layer.{k}": v for k, v in tensors.items()}, (), strict=False)
    finally:
        for key in set(caches or ()) - cached:
            caches.pop(key, None)


@torch.no_grad()
def merged_state_dict(peft_model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain Hugging Face weights of a peft model: its adapters merged as peft's ``merge_and_unload``.

    ``state``: the peft model's whole (gathered, unsharded) tensors under its own names
    (``base_model.model.<hf name>``, ``...base_layer.weight``, ``...lora_A.<adapter>.weight``,
    ``...lora_magnitude_vector.<adapter>.weight``, ``...modules_to_save.<adapter>.weight``); ``peft_model``
    gives the structure only (its tensors may be sharded or on the meta device, and are never changed).
    Returns ``{hf name: tensor}``:

    - a LoRA layer: W + dW per active adapter, dW = peft's ``get_delta_weight`` (scaling * B @ A, rsLoRA's
      scaling too); DoRA: the variant's ``merge_safe``, m / ||W + dW|| * (W + dW); ``lora_bias``: b +
      scaling * b_B. Computed in float32, rounded once to the base weight's dtype.
    - a ``modules_to_save`` layer: the active adapter's trained copy (the original where the forward uses it).
    - everything else as given.

    Raises ValueError for a layer :func:`check_mergeable` refuses, or if a peft name is left over.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    check_mergeable(peft_model)
    _, dora = _lora_kinds()
    state = dict(state)
    for name, module in peft_model.named_modules():
        prefix = f"{name}."
        if isinstance(module, ModulesToSaveWrapper):
            own = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
            active = module.active_adapters
            trained = not module.disable_adapters and active and all(a in module._adapters for a in active)
            source = f"modules_to_save.{active[0]}." if trained else "original_module."
            state.update({prefix + k[len(source) :]: v for k, v in own.items() if k.startswith(source)})
        elif isinstance(module, LoraLayer):
            own = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
            base = {k[len("base_layer.") :]: v for k, v in own.items() if k.startswith("base_layer.")}
            as32 = {k: v.float() if v.is_floating_point() else v for k, v in own.items()}
            weight = as32["base_layer.weight"]
            bias = as32.get("base_layer.bias")
            for adapter in _adapters(module):
                variant = module.lora_variant.get(adapter)
                if isinstance(variant, dora):  # the norm is taken over the unmerged base weight, as in forward

                    def merge(layer, adapter=adapter, variant=variant, weight=weight):
                        return variant.merge_safe(layer, adapter, weight.clone())

                    weight = _with_tensors(module, as32, merge)
                else:
                    weight = weight + _with_tensors(module, as32, lambda layer, a=adapter: layer.get_delta_weight(a))
                if module.lora_bias.get(adapter):
                    bias = bias + as32[f"lora_B.{adapter}.bias"] * module.scaling[adapter]
            base["weight"] = weight.to(base["weight"].dtype)
            if bias is not None:
                base["bias"] = bias.to(base["bias"].dtype)
            state.update({prefix + k: v for k, v in base.items()})
    left = [k for k in state if any(part in k for part in PEFT_PARTS)]
    if left:
        raise ValueError(f"merging the adapters left peft weights that have no Hugging Face name: {left[:5]}")
    return {k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}


def unties_embeddings(model) -> bool:
    """True when ``model`` (a peft model or a plain one) has a checkpoint with tied input and output
    embeddings (``tie_word_embeddings``) whose adapters let the two differ: a ``modules_to_save`` copy or a
    LoRA on either of them (peft's ``ensure_weight_tying`` keeps them tied). Its merged weights then hold
    two matrices, and the export and the vLLM engine untie them (peft's ``merge_and_unload`` does the same).
    """
    if not hasattr(model, "peft_config"):  # a plain model's tied layers are one parameter
        return False
    base = model.get_base_model()
    if not getattr(base.config, "tie_word_embeddings", False):
        return False
    try:
        inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    if inputs is None or outputs is None:
        return False
    return _effective_weight(inputs) is not _effective_weight(outputs)


def _effective_weight(module):
    """What a layer's forward multiplies by: the same object for two tied layers, a distinct one for a
    layer whose adapters change it (a LoRA layer stands for its own merged weight)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        active = module.active_adapters
        if not module.disable_adapters and active and all(a in module._adapters for a in active):
            return _effective_weight(module.modules_to_save[active[0]])
        return _effective_weight(module.original_module)
    if isinstance(module, LoraLayer):
        return module if _adapters(module) else module.get_base_layer().weight
    return module.weight


def untied_config(config):
    """A copy of a Hugging Face ``config`` with ``tie_word_embeddings`` off (its text config's too)."""
    import copy

    config = copy.deepcopy(config)
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config and hasattr(text, "tie_word_embeddings"):
        text.tie_word_embeddings = False
    return config
