"""The sampler part: completions of prompts from lit-align's HF sampler or a colocated vLLM engine.

One interface, :meth:`Sampler.sample`: prompts (B, P) -> a :class:`~lit_align.rollout.Rollout` of B x G
rows, sampled with the module's settings only (never the checkpoint's generation config). With
``rollout_engine: vllm``, each rank builds one colocated :class:`lit_align.vllm_engine.VLLMEngine` at fit
start, pushes the policy's full weights into it before sampling whenever an optimizer step changed them
(gathered from FSDP2 shards, LoRA merged), and keeps it until fit ends. The engine's token ids become the
same Rollout the HF path returns: ``old_logp`` and ``entropy`` from the trainer's own forward (so the
first update of a rollout batch has ratio 1 whatever the engine's numerics), the engine's log-probs kept
as ``sampler_logp``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from lit_align import losses
from lit_align.core.engine import forward_groups
from lit_align.core.policy import Completions, Policy
from lit_align.core.world import World
from lit_align.rollout import (
    Rollout,
    check_prefix,
    completion_texts,
    generate,
    prefix_positions,
    sampling_overrides,
    sampling_settings,
    vocab_size_of,
)


@dataclass
class SamplerSettings:
    """The sampling settings (TRL's names; see :class:`lit_align.modules.policy.PolicyModule`)."""

    num_generations: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    generation_batch_size: int | None = None
    skip_special_tokens: bool = True
    rollout_engine: str = "hf"
    model_name_or_path: str = "embedded"
    micro_batch_size: int | None = None  # rows per trainer-side forward (the engine's old_logp)
    length_buckets: int = 4
    vllm_gpu_memory_utilization: float = 0.3
    vllm_kv_cache_memory_bytes: int | None = None
    vllm_max_model_length: int | None = None
    vllm_tensor_parallel_size: int = 1
    vllm_enable_sleep_mode: bool = False
    vllm_importance_sampling_correction: bool = False
    vllm_importance_sampling_cap: float = 3.0


def decoding(settings) -> dict:
    """The decoding knobs :func:`lit_align.rollout.generate` and the engine take, from ``settings``."""
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return {name: getattr(settings, name) for name in names}


class Sampler:
    """G completions per prompt from the HF sampler or this rank's vLLM engine.

    Args:
        policy: the :class:`~lit_align.core.policy.Policy` it samples (and, for the engine, scores).
        settings: a :class:`SamplerSettings`, or anything with its fields as attributes (the module's
            hparams: the sampler then reads them as they are at each call).
    """

    def __init__(self, policy: Policy, settings: SamplerSettings):
        self.policy, self.settings = policy, settings
        self.engine = None  # the VLLMEngine while fit runs with rollout_engine=vllm
        self.stale = True  # the policy's weights changed since the engine last got them
        self._logged = False
        self._fallbacks_said: set[str] = set()

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        prompts: dict,
        world: World,
        greedy: bool = False,
        num_generations: int | None = None,
        prefix_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
    ) -> Rollout:
        """``num_generations`` (default G) completions per prompt (``prompts["prompt_ids"]`` /
        ``["prompt_mask"]`` (B, P), left-padded), or one greedy one; ``generation_batch_size`` rows at a
        time, synced over ranks under FSDP2; by the vLLM engine when it runs and the prompts fit it.

        ``prefix_ids`` / ``prefix_mask`` (B * G, L), right-padded, one row per output row (prompt i's g-th
        sample is row i * G + g): each completion starts with its row's given prefix and the policy continues
        it (:func:`lit_align.rollout.generate`); ``Rollout.prefix_mask`` marks the given positions, whose
        ``old_logp`` / ``entropy`` are the policy's, as for sampled tokens. The first call logs which sampler
        runs and which checkpoint fields were overridden.

        ``old_logp`` and ``entropy`` (B * G, T) are the training forward's, so the first update of a rollout
        batch has ratio 1: for the vLLM engine always from :meth:`trainer_logprobs`; for the HF sampler its
        decode loop's own where the loop rounds like the training forward (:func:`decode_matches_training`:
        float32), otherwise (bf16 or fp16 weights, autocast, TF32) from :meth:`trainer_logprobs` too, one
        more no-grad forward over the rows."""
        s, model = self.settings, self.policy.model
        G = s.num_generations if num_generations is None else num_generations
        if isinstance(G, bool) or not isinstance(G, numbers.Integral) or G < 1:  # 0 used to mean the default
            raise ValueError(
                f"sample(num_generations={num_generations!r}): at least 1 completion per prompt "
                f"(None: model.num_generations={s.num_generations})"
            )
        if prefix_ids is None and prefix_mask is not None:
            raise ValueError("prefix_mask is given without prefix_ids: pass the prefix tokens too, or neither")
        if prefix_ids is not None:  # here, so that both samplers refuse the same prefixes before any work
            rows = prompts["prompt_ids"].shape[0] * (1 if greedy else G)
            check_prefix(prefix_ids, prefix_mask, rows, vocab_size_of(model))
        prefix = {} if prefix_ids is None else {"prefix_ids": prefix_ids, "prefix_mask": prefix_mask}
        if self._engine_serves(prompts, world):
            rollout = self._engine_sample(prompts, greedy, G, world, **prefix)
        else:
            rollout = generate(
                model,
                self.policy.tokenizer,
                prompts["prompt_ids"],
                prompts["prompt_mask"],
                num_generations=G,
                greedy=greedy,
                synced_gpus=world.synced_generation,
                generation_batch_size=s.generation_batch_size,
                skip_special_tokens=s.skip_special_tokens,
                **decoding(s),
                **prefix,
            )
            if not decode_matches_training(model):  # bf16 / autocast / TF32: the training forward's numbers
                T = 1.0 if greedy else s.temperature
                rollout.old_logp, rollout.entropy = self.trainer_logprobs(Completions.of(rollout), T, world)
        self._say_once(rollout)
        return rollout

    def _say_once(self, rollout: Rollout) -> None:
        if self._logged:
            return
        self._logged = True
        from lightning.pytorch.utilities import rank_zero_info

        model, tok = self.policy.model, self.policy.tokenizer
        overridden = sampling_overrides(model, sampling_settings(model, tok, **decoding(self.settings)))
        ends = ", ".join(repr(tok.convert_ids_to_tokens(i)) for i in self.policy.eos_ids or [])
        rank_zero_info(
            f"lit_align sampling: {rollout.sampler} sampler; completions end at {ends or 'max_new_tokens only'}; "
            + (
                "the checkpoint's generation config sets "
                + ", ".join(f"{name}={old!r} (sampling with {new!r})" for name, (old, new) in overridden.items())
                + ": overridden by model.* settings"
                if overridden
                else "no checkpoint sampling field overridden"
            )
        )

    def truncated(self, rollout: Rollout) -> torch.Tensor:
        """(B,) True for completions that reached max_new_tokens without an end token."""
        lengths = rollout.completion_mask.sum(-1)
        full = lengths >= self.settings.max_new_tokens
        eos = self.policy.eos_ids
        if not eos or rollout.completion_ids.shape[1] == 0:
            return full
        last = rollout.completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        return full & ~torch.isin(last, torch.as_tensor(eos, device=last.device))

    # ------------------------------------------------------------------ the vLLM engine's life cycle
    def start(self, world: World, rank: tuple[int, int] | None) -> None:
        """Build this rank's engine from the policy's checkpoint (fit start; every rank at once).
        ``rank``: (global, local) rank under several processes, None in one.

        A checkpoint vLLM does not implement, or one whose engine cannot run a one-token greedy probe,
        samples with the HF sampler (said once). Sampling settings the engine refuses raise a ValueError
        naming the flag here, before any update, rather than at the first rollout
        (:meth:`VLLMEngine.check_settings` before the engine is built, :meth:`VLLMEngine.check_request`
        after; the engine is closed first)."""
        s = self.settings
        if s.rollout_engine != "vllm" or self.engine is not None:
            return
        from lit_align.adapters import unties_embeddings
        from lit_align.hf import _resolve
        from lit_align.vllm_engine import VLLMEngine

        model = self.policy.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        reason = VLLMEngine.unsupported(base.config) if vllm_importable() else None
        if reason:
            self._fallback(reason)
            return
        settings = sampling_settings(model, self.policy.tokenizer, **decoding(s))  # what every rollout asks for
        VLLMEngine.check_settings(settings, s.num_generations)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.engine = VLLMEngine(
            _resolve(s.model_name_or_path),
            dtype=dtype,
            gpu_memory_utilization=s.vllm_gpu_memory_utilization,
            kv_cache_memory_bytes=s.vllm_kv_cache_memory_bytes,
            max_model_length=s.vllm_max_model_length,
            tensor_parallel_size=s.vllm_tensor_parallel_size,
            enable_sleep_mode=s.vllm_enable_sleep_mode,
            max_num_seqs=s.generation_batch_size,
            seed=int(torch.initial_seed() % (2**31)),
            rank=rank,
            untie_embeddings=unties_embeddings(model),
        )
        try:
            self.engine.probe()
        except Exception as e:  # noqa: BLE001  (whatever the engine cannot run: the HF sampler samples)
            engine, self.engine = self.engine, None
            engine.close()
            self._fallback(f"the vLLM engine cannot run this checkpoint ({type(e).__name__}: {str(e)[:200]})")
            return
        try:
            self.engine.check_request(settings, s.num_generations)
        except ValueError:
            self.stop()
            raise
        self.stale = True  # a resumed or LoRA-wrapped policy differs from the checkpoint's files (an untied engine
        # holds placeholder weights): the first sampling loads the policy's
        if s.vllm_enable_sleep_mode and self.engine.on_cpu:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("model.vllm_enable_sleep_mode: vLLM's CPU engine has no sleep mode; it stays loaded")

    def stop(self) -> None:
        """Shut this rank's engine down (fit end), leaving the trainer's process group intact."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    def weights_changed(self) -> None:
        """An optimizer step changed the policy: the engine gets the new weights before it samples again."""
        self.stale = True

    def _fallback(self, reason: str) -> None:
        """Say once, on rank 0, that the HF sampler samples instead of the engine, and why."""
        if reason not in self._fallbacks_said:
            self._fallbacks_said.add(reason)
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"model.rollout_engine=vllm: {reason}; sampling with lit-align's HF sampler instead")

    def _engine_serves(self, prompts: dict, world: World) -> bool:
        """True when this rank's engine serves ``prompts``; otherwise the HF sampler does (said once).
        Under FSDP2 every rank takes the same path (the HF sampler's forwards are collectives there)."""
        if self.engine is None:
            return False
        reason = self.engine.cannot_sample(prompts["prompt_mask"], self.settings.max_new_tokens)
        if world.sharded and world.ranks.world > 1:
            if world.ranks.maxes([float(reason is not None)])[0] > 0:
                reason = reason or "another rank's prompts do not fit the vLLM engine"
        if reason:
            self._fallback(reason)
        return reason is None

    @torch.no_grad()
    def _engine_sample(
        self,
        prompts: dict,
        greedy: bool,
        num_generations: int,
        world: World,
        prefix_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
    ) -> Rollout:
        """G completions per prompt from the vLLM engine: token ids and ``sampler_logp`` from the engine;
        ``old_logp`` and ``entropy`` (B*G, T) from the trainer's forward at the sampling temperature (1 when
        greedy); the texts from the ids by :func:`lit_align.rollout.completion_texts`, as on the HF path."""
        engine, s = self.engine, self.settings
        if self.stale:
            engine.load_weights(self.policy.streamed_weights())
            self.stale = False
        settings = sampling_settings(self.policy.model, self.policy.tokenizer, greedy=greedy, **decoding(s))
        G = 1 if greedy else num_generations
        # sampled: a seed from the global stream (seed_everything reproduces it); greedy: none, so a greedy call
        # (validation's answers) draws nothing, as on the HF path, and leaves the training stream as it was
        seed = None if greedy else int(torch.randint(0, 2**31 - 1, (1,)))
        ids, mask, sampler_logp = engine.generate(
            prompts["prompt_ids"],
            prompts["prompt_mask"],
            settings,
            G,
            seed,
            prefix_ids=prefix_ids,
            prefix_mask=prefix_mask,
        )
        engine.sleep()
        prompt_ids = prompts["prompt_ids"].repeat_interleave(G, dim=0)
        prompt_mask = prompts["prompt_mask"].repeat_interleave(G, dim=0)
        T = 1.0 if greedy else s.temperature
        old_logp, entropy = self.trainer_logprobs(Completions(prompt_ids, prompt_mask, ids, mask), T, world)
        # the HF path's decode of the same ids (vLLM detokenizes nothing: detokenize=False), so rewards see the
        # same text for the same tokens whichever sampler drew them, skip_special_tokens included
        tok, eos, pad = self.policy.tokenizer, settings["eos_token_id"], settings["pad_token_id"]
        texts = completion_texts(tok, ids, mask, eos, s.skip_special_tokens, pad) if len(ids) else []
        given = (
            None
            if prefix_ids is None
            else prefix_positions(torch.ones_like(prefix_ids) if prefix_mask is None else prefix_mask, mask)
        )
        return Rollout(prompt_ids, prompt_mask, ids, mask, old_logp, entropy, texts, "vllm", sampler_logp, given)

    @torch.no_grad()
    def trainer_logprobs(self, rows: Completions, temperature: float, world: World):
        """Log-probs of the completion tokens and entropies (N, T), float32, 0 on padding, from the
        training forward (:meth:`Policy.logprobs`, the policy in its training mode, dropout off) over the
        step engine's forward passes (micro-batches split by length). Under FSDP2 every rank runs as many
        forwards as the rank with the most micro-batches."""
        ids, mask = rows.completion_ids, rows.completion_mask
        logp = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        entropy = torch.zeros_like(logp)
        buckets = 1 if world.sharded else self.settings.length_buckets
        batches = forward_groups(mask, self.settings.micro_batch_size, buckets) if ids.shape[1] else []
        rounds = len(batches)
        if world.sharded and world.ranks.world > 1:
            rounds = int(world.ranks.maxes([float(len(batches))])[0])
        for k in range(rounds):
            stand_in = k >= len(batches)  # a rank with fewer micro-batches joins the others' forwards
            if not batches:  # no rows at all on this rank: a one-token stand-in
                p = rows.prompt_ids
                self.policy.logits(p.new_zeros(1, 2), rows.prompt_mask.new_ones(1, 2), start=0)
                continue
            part = batches[0 if stand_in else k].to(ids.device)
            scored = self.policy.logprobs(rows, part, temperature)
            if stand_in:
                continue
            width = scored.targets.shape[1]
            m = mask[part, :width].float()
            logp[part, :width] = scored.logp.float() * m
            entropy[part, :width] = losses.entropy_from_logits(scored.logits, temperature).float() * m
        return logp, entropy

    # ------------------------------------------------------------------ what the losses and logs read
    @staticmethod
    def metrics(rollout: Rollout) -> dict:
        """``sampler_logp_diff`` and ``sampler_logp_diff_max``: mean and max over the tokens the engine
        sampled (:func:`engine_tokens`) of |sampler log-prob - trainer log-prob| (nats) of a vLLM rollout;
        {} for the HF sampler."""
        if rollout.sampler_logp is None:
            return {}
        m = engine_tokens(rollout)
        diff = (rollout.sampler_logp - rollout.old_logp).abs()[m]
        if diff.numel() == 0:
            return {"sampler_logp_diff": torch.tensor(0.0), "sampler_logp_diff_max": torch.tensor(0.0)}
        return {"sampler_logp_diff": diff.mean(), "sampler_logp_diff_max": diff.max()}

    def importance_weights(self, rollout: Rollout, rows: torch.Tensor, width: int) -> torch.Tensor | None:
        """TRL's truncated importance-sampling weights min(exp(old_logp - sampler_logp), cap) of rows
        ``rows``, (b, width), when ``vllm_importance_sampling_correction`` is on and the rollout came from
        the engine; None otherwise."""
        s = self.settings
        if not s.vllm_importance_sampling_correction or rollout.sampler_logp is None:
            return None
        diff = rollout.old_logp[rows, :width] - rollout.sampler_logp[rows, :width]
        weights = torch.exp(diff).clamp(max=s.vllm_importance_sampling_cap)
        sampled = engine_tokens(rollout)[rows, :width]  # elsewhere the engine sampled nothing: no correction
        return torch.where(sampled, weights, torch.ones_like(weights))


def engine_tokens(rollout: Rollout) -> torch.Tensor:
    """(N, T) bool: the completion tokens the sampler drew: all of them but the given ones, which are a
    prefix's (``prefix_mask``: Prefix-RFT's, UFT's) and every token of an off-policy row without a prefix
    (a group's demonstration, :func:`lit_align.core.groups.mix`: LUFFY, SRFT, HPT soft), whose log-probs are
    0 or given behaviour log-probs, never the engine's. An off-policy row with a prefix (Prefix-RFT's
    hybrid rows) keeps its sampled continuation."""
    m = rollout.completion_mask.bool()
    given = torch.zeros_like(m) if rollout.prefix_mask is None else rollout.prefix_mask.bool()
    if rollout.off_policy is not None:
        demonstration = rollout.off_policy.to(m.device) & ~given.any(-1)
        given = given | demonstration.unsqueeze(-1)
    return m & ~given


def decode_matches_training(model) -> bool:
    """True when the HF sampler's log-probs equal the training forward's to float32 rounding (about 1e-6),
    so its ``old_logp`` can stand: every weight of ``model`` float32 or float64, no autocast on their device
    (Lightning's ``precision: bf16-mixed`` / ``16-mixed``) and float32 matmuls at full precision
    (``torch.get_float32_matmul_precision() == "highest"``, the default; "high" / "medium" allow TF32 / bf16).

    Otherwise a KV-cache decode step (one query row against the cache) and the full forward over prompt +
    completion round differently: with bf16 weights the first, strictly on-policy update had max |ratio - 1|
    up to 0.31 and clip_ratio 0.0013 (issue 22; transformers#31267 is the same effect in HF generate), so
    the sampler then takes ``old_logp`` from the training forward, as for the vLLM engine. In float32 on the
    CPU that forward would add a quarter to a third to a GRPO update (sampling + forward-backward, the
    embedded model), so float32 keeps the loop's log-probs."""
    exact = (torch.float32, torch.float64)
    devices = set()
    for p in model.parameters():
        if p.dtype not in exact:
            return False
        devices.add(p.device.type)
    if any(_autocast(d) for d in devices):
        return False
    return torch.get_float32_matmul_precision() == "highest"


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): nothing is autocast there
        return False


def vllm_importable() -> bool:
    """vLLM can be imported (without it, building the engine raises an ImportError with the install line)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None  # not a bare folder named vllm on sys.path
