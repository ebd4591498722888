"""The continuous-batching rollout engine: transformers' own paged KV cache and scheduler (the
`ContinuousBatchingManager` that `model.generate_batch` runs), in the trainer's process.

Like the embedded engine it holds its own copy of the weights and takes new ones in place. What transformers adds
is the scheduling: requests join and leave the running batch token by token over a paged cache, with CUDA graphs
for the decode step where the attention is flash attention. On CPU it is slower than the embedded engine
(benchmarks/rollout_cpu_real_model.py, SmolLM2-135M on 2 cores: 104-115 against about 200 tokens/s); on a GPU,
benchmarks/bench_rollout.py measures both.

This file drives the manager itself (`init_continuous_batching`, `add_request`, `start`, `get_result`, `stop`)
rather than calling `generate_batch`, for two reasons. `generate_batch` starts the generation loop before it
queues the requests, so the loop's first batch holds however many were queued by then: batch composition decides
which random numbers each request draws, and a seeded call would not repeat itself. And its manager is either
rebuilt per call or sized for the first call only; here one manager (and its cache) lives across calls until
`release_memory`, and is rebuilt when a call needs a bigger cache or other sampling settings (where transformers
can hold its loop while a call is queued, `ContinuousBatchingManager.pause`: 5.24, not 5.17, which gets a manager
per call).
"""
from __future__ import annotations

import inspect
import re
from typing import Iterable

import torch
from transformers import GenerationConfig, PreTrainedModel

from raro_fast.rollout.embedded import copy_weights_in_place
from raro_fast.rollout.engine import (Completion, NonFiniteLogitsError, SamplingParams, check_memory_tags,
                                      check_prompts)

# What this engine uses of transformers' continuous batching; all present in transformers 5.17 (the GPU machine's)
# and 5.24 (where it was written and tested).
_CONFIG_FIELDS = ("return_logprobs", "per_request_processors", "num_blocks", "max_batch_tokens")
_MANAGER_METHODS = ("add_request", "start", "stop", "get_result", "is_running", "warmup", "destroy")
_MODEL_METHODS = ("init_continuous_batching", "destroy_cached_continuous_batching_manager")
# Where transformers keeps a model's one manager (read only to tell whether another engine's is there).
_CACHED_MANAGER = "_cached_continuous_batching_manager"

# transformers builds its temperature processor only when the manager's default temperature is not 1.0. Every
# request here carries its own temperature (so policy and critic calls at different temperatures share one
# manager and one cache), which makes this default one that is never applied.
_UNUSED_DEFAULT_TEMPERATURE = 0.5

# transformers sizes a batch from the machine's free memory (60% of RAM on CPU) and, for sdpa attention, allocates
# a mask of max_batch_tokens x (cache tokens + max_batch_tokens) up front: gigabytes on CPU for no gain. Prefill in
# 512-token slices keeps it to megabytes. On CUDA transformers' own sizing, which counts the mask, is kept.
_CPU_MAX_BATCH_TOKENS = 512

# Text of the error torch.multinomial raises on NaN/inf probabilities, which the generation loop passes on.
_NON_FINITE = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)


def continuous_batching_unavailable() -> str | None:
    """Why the installed transformers cannot run this engine, in one line; None when it can."""
    import transformers

    version = getattr(transformers, "__version__", "?")
    try:
        from transformers.generation import ContinuousBatchingConfig
        from transformers.generation.continuous_batching import ContinuousBatchingManager, ContinuousMixin
    except ImportError:
        return f"transformers {version} has no continuous batching (model.generate_batch); it needs >= 5.17"
    fields = inspect.signature(ContinuousBatchingConfig).parameters
    missing = [f"ContinuousBatchingConfig.{f}" for f in _CONFIG_FIELDS if f not in fields]
    missing += [f"ContinuousBatchingManager.{m}" for m in _MANAGER_METHODS if not hasattr(ContinuousBatchingManager, m)]
    missing += [f"ContinuousMixin.{m}" for m in _MODEL_METHODS if not hasattr(ContinuousMixin, m)]
    if missing:
        return f"transformers {version}'s continuous batching lacks {', '.join(missing)}; it needs >= 5.17"
    return None


class ContinuousEngine:
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        pad_token_id: int,
        eos_token_ids: list[int],
        decode: callable,
        keep_cache: bool = True,
    ) -> None:
        """`keep_cache`: keep the manager and its KV cache between calls (until `release_memory`). Queuing a whole
        call before the loop takes any of it then needs `ContinuousBatchingManager.pause` (in transformers 5.24,
        not in 5.17); without it a manager is built per call, its requests queued before its loop starts."""
        reason = continuous_batching_unavailable()
        if reason:
            raise RuntimeError(f"rollout.backend='continuous': {reason}")
        from transformers.generation.continuous_batching import ContinuousBatchingManager

        if not all(hasattr(model, m) for m in _MODEL_METHODS):
            raise ValueError(f"rollout.backend='continuous': {type(model).__name__} has no continuous batching "
                             "(not a transformers generation model)")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.decode = decode
        self.keep_cache = keep_cache and hasattr(ContinuousBatchingManager, "pause")
        self.weight_version = 0
        self._manager = None
        self._manager_key: tuple | None = None
        self._manager_blocks: int | None = 0  # cache blocks it was sized for (None: all memory allows)
        self._calls = 0
        # Checked at the start too: a model loaded with non-finite weights met the CUDA assert below (review)
        self._weights_finite = self._finite_weights()

    @classmethod
    def from_tokenizer(cls, model: PreTrainedModel, tokenizer, *, end_ids: list[int] | None = None,
                       keep_cache: bool = True) -> "ContinuousEngine":
        """Pad and decoding from a Hugging Face tokenizer; end tokens `end_ids`, else the tokenizer's and the model's
        generation config's."""
        from raro_fast.model.hf import end_token_ids
        from raro_fast.prompts import completion_decoder

        return cls(model, pad_token_id=tokenizer.pad_token_id,
                   eos_token_ids=end_ids if end_ids is not None else end_token_ids(model, tokenizer),
                   decode=completion_decoder(tokenizer), keep_cache=keep_cache)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def holds_kv_cache(self) -> bool:
        return self._manager is not None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        check_prompts(prompts, params, getattr(self.model, "config", None))
        if not self._weights_finite:
            # Checked here, not met in the loop: on CUDA, sampling from NaN probabilities is a device-side assert
            # that takes the process down with it.
            raise NonFiniteLogitsError(f"the rollout engine's model (weight version {self.weight_version}) has "
                                       "non-finite weights: nothing can be sampled")
        flat = [p for p in prompts for _ in range(params.n)]
        if not flat:
            return [[] for _ in prompts]
        outputs = self._run(flat, params)
        stops = set(self.eos_token_ids) | set(params.stop_token_ids)
        completions = []
        for p, out in zip(flat, outputs):
            ids = list(out.generated_tokens)
            completions.append(Completion(
                token_ids=ids,
                logprobs=[float(x) for x in out.logprobs],
                # transformers stops a request at its first end token and keeps it, as the interface wants.
                finish_reason="stop" if ids and ids[-1] in stops else "length",
                text=self.decode(ids),
                weight_version=self.weight_version,
                prompt_ids=list(p),
            ))
        greedy = params.temperature <= 0
        if not greedy and params.top_p < 1.0:
            # transformers' log-probs are of the distribution it sampled from, after its top-p processor: here they
            # must be before top-p truncation (the trainer's recompute is), so they are recomputed.
            self._recompute_logprobs(completions, params.temperature)
        if not all(_finite(c.logprobs) for c in completions):
            raise NonFiniteLogitsError(f"the rollout engine's model (weight version {self.weight_version}) gives "
                                       "non-finite next-token logits")
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _run(self, flat: list[list[int]], params: SamplingParams) -> list:
        """One transformers GenerationOutput per prompt of `flat`, in order. Their log-probs are
        log_softmax(logits / temperature) of the sampled token (fp32; log_softmax(logits) when greedy): with no
        top-k and no top-p processor, temperature is the only thing between the logits and transformers' softmax."""
        greedy = params.temperature <= 0
        key = (greedy, None if greedy or params.top_p >= 1.0 else float(params.top_p))
        page = _page_size()
        blocks = sum(-(-(len(p) + params.max_new_tokens) // page) for p in flat)
        if self._manager is not None and (key != self._manager_key or
                                          (self._manager_blocks is not None and blocks > self._manager_blocks)):
            self._close_manager()
        manager = self._open_manager(key, blocks)
        stop_ids = list(dict.fromkeys(self.eos_token_ids + list(params.stop_token_ids)))
        per_request = {} if greedy else {"temperature": float(params.temperature)}
        request_ids = [f"call{self._calls}-{i}" for i in range(len(flat))]
        self._calls += 1

        def queue_all() -> None:
            for rid, p in zip(request_ids, flat):
                if manager.add_request(list(p), request_id=rid, max_new_tokens=params.max_new_tokens,
                                       eos_token_id=stop_ids, **per_request) is None:
                    raise RuntimeError(f"transformers' continuous batching refused request {rid} (see its log)")

        seeded = params.seed is not None
        outputs = None
        # The loop samples with the process's default generators; a seeded call draws from its own seed and leaves
        # the trainer's random state as it found it (as the embedded engine's own generator does).
        with torch.random.fork_rng(devices=_cuda_indices(self.device), enabled=seeded):
            if seeded:
                _seed_generators(params.seed, self.device)
            try:
                if self.keep_cache:
                    manager.start()
                    # The loop waits while the whole call is queued, so its first batch is the same every time.
                    with manager.pause():
                        queue_all()
                else:
                    queue_all()
                    manager.start()
                outputs = _collect(manager, request_ids)
            finally:
                # A manager whose call went wrong is not trusted with the next one.
                keep = self.keep_cache and outputs is not None and all(o.error is None for o in outputs)
                manager.stop(block=True, keep_for_next_session=keep)
                if not keep:
                    self._close_manager()
        failed = [o for o in outputs if o.error is not None]
        if failed:
            if _NON_FINITE.search(failed[0].error) or not self._finite_weights():
                raise NonFiniteLogitsError(f"the rollout engine's model (weight version {self.weight_version}) "
                                           f"gives non-finite next-token logits ({failed[0].error})")
            raise RuntimeError(f"transformers' continuous batching failed {len(failed)} of {len(outputs)} requests: "
                               f"{failed[0].error}")
        return outputs

    def _open_manager(self, key: tuple, blocks: int):
        """The manager for sampling settings `key` with room for `blocks` cache blocks: the one kept from the last
        call where it fits, else a new one (transformers holds at most one per model)."""
        from transformers.generation import ContinuousBatchingConfig

        greedy, top_p = key
        gen = GenerationConfig(do_sample=not greedy, temperature=None if greedy else _UNUSED_DEFAULT_TEMPERATURE,
                               top_k=None, top_p=top_p, num_return_sequences=1, eos_token_id=self.eos_token_ids,
                               pad_token_id=self.pad_token_id)
        cached = getattr(self.model, _CACHED_MANAGER, None)
        if self._manager is not None and cached is self._manager:
            # The kept manager; asking for it again is what switches the model back to the attention continuous
            # batching runs (stop() restores the model's own).
            manager = self.model.init_continuous_batching(generation_config=gen)
            assert manager is self._manager, "transformers built a new manager instead of handing back the kept one"
            return manager
        self._manager, self._manager_key, self._manager_blocks = None, None, 0  # another engine's replaced it
        if cached is not None:
            # Another engine's on this model: transformers would hand it back with that engine's sampling settings,
            # ignoring ours (found by review: a top-p 1 engine sampled the nucleus of an earlier one at 0.3).
            self.model.destroy_cached_continuous_batching_manager()
        fields = inspect.signature(ContinuousBatchingConfig).parameters
        # Prefix caching is off: a prefix cached by an earlier call would change how this call's prefill is cut
        # into batches, and with it each request's random draws. The cache is sized to hold the whole call at once
        # (every request's prompt + max_new_tokens), so no safety margin needs holding back.
        wanted = dict(return_logprobs=True, per_request_processors=True, allow_block_sharing=False,
                      num_blocks=blocks, safety_margin=0.0)
        if self.device.type != "cuda":
            wanted["max_batch_tokens"] = _CPU_MAX_BATCH_TOKENS
        for sized in (True, False):
            if not sized:
                # More than free memory holds: as much as transformers' sizing gives; its scheduler then runs the
                # call in waves.
                wanted.update(num_blocks=None, safety_margin=None)
            cb = ContinuousBatchingConfig(**{k: v for k, v in wanted.items() if k in fields})
            manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
            try:
                # Builds the cache here, where an error surfaces, not in the loop's thread. Building it reseeds the
                # process's default generators (transformers' set_tp_seed): kept away from the trainer's.
                with torch.random.fork_rng(devices=_cuda_indices(self.device)):
                    manager.warmup()
            except ValueError:
                manager.destroy()
                if not sized:
                    raise
                continue
            self._manager, self._manager_key, self._manager_blocks = manager, key, blocks if sized else None
            return manager
        raise AssertionError("unreachable")

    def _close_manager(self) -> None:
        if self._manager is None:
            return
        self.model.destroy_cached_continuous_batching_manager()
        self._manager.destroy()
        # The last reference to the manager goes here; its batch processor's __del__ collects garbage and empties
        # the CUDA cache, so the KV cache's memory is back before this returns.
        self._manager, self._manager_key, self._manager_blocks = None, None, 0

    @torch.no_grad()
    def _recompute_logprobs(self, completions: list[Completion], temperature: float) -> None:
        """Teacher-forced log-probs at `temperature` of each completion's tokens, written over its own."""
        device, max_tokens = self.device, 4096  # bounds the [sequences, length, vocab] logits of one forward
        start = 0
        while start < len(completions):
            end, width = start, 0
            while end < len(completions):
                w = len(completions[end].prompt_ids) + len(completions[end].token_ids)
                if end > start and max(width, w) * (end - start + 1) > max_tokens:
                    break
                width, end = max(width, w), end + 1
            chunk = completions[start:end]
            # Right padding: causal attention never lets a real token see the pad after it.
            ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, c in enumerate(chunk):
                seq = c.prompt_ids + c.token_ids
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)
            for i, c in enumerate(chunk):
                p, n = len(c.prompt_ids), len(c.token_ids)
                rows = logp[i, p - 1 : p - 1 + n]
                c.logprobs = rows.gather(-1, torch.tensor(c.token_ids, device=device)[:, None]).squeeze(-1).tolist()
            start = end

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        # In place, with the loop stopped (it runs only inside `generate`): the kept cache and any CUDA graph the
        # manager captured keep pointing at the same parameter storage.
        copy_weights_in_place(self.model, named_tensors)
        self._weights_finite = self._finite_weights()
        self.weight_version = version

    def _finite_weights(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def release_memory(self, tags: tuple[str, ...] = ("kv_cache",)) -> None:
        # The KV cache goes with the manager that owns it; the next `generate` builds both again. Weights stay.
        check_memory_tags(tags)
        if "kv_cache" in tags:
            self._close_manager()

    def resume_memory(self, tags: tuple[str, ...] = ("kv_cache",)) -> None:
        # Nothing to take back now: the cache is rebuilt by the next `generate`, sized for that call.
        check_memory_tags(tags)


def _collect(manager, request_ids: list[str]) -> list:
    """Every request's finished output, in `request_ids` order; raises if the loop dies with requests left."""
    pending, results = set(request_ids), {}
    while pending:
        out = manager.get_result(timeout=1.0)
        if out is None:
            if not manager.is_running():
                raise RuntimeError(f"transformers' continuous-batching loop stopped with {len(pending)} requests "
                                   "unfinished (its log above says why)")
            continue
        if out.request_id in pending and out.is_finished():
            results[out.request_id] = out
            pending.discard(out.request_id)
    return [results[r] for r in request_ids]


def _page_size() -> int:
    """Tokens per cache block (`page_size`; `block_size` in transformers 5.17)."""
    from transformers.generation import ContinuousBatchingConfig

    default = ContinuousBatchingConfig()
    return getattr(default, "page_size", None) or default.block_size


def _cuda_indices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _seed_generators(seed: int, device: torch.device) -> None:
    """Seed the generators transformers' loop samples with: the CPU default one, and the model's GPU's."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _finite(xs: list[float]) -> bool:
    return all(x == x and abs(x) != float("inf") for x in xs)
