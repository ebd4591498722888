"""The embedded rollout engine: batched transformers generation with a KV cache, in the trainer's process.

It holds its own copy of the weights (as SGLang would), so the trainer's update and the engine's sampling are
separate, and `update_weights` is a real hand-over that the trainer–engine log-prob gap checks.
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Iterable

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer

from raro_fast.rollout.engine import (Completion, NonFiniteLogitsError, SamplingParams, check_memory_tags,
                                      check_prompts)


class EmbeddedEngine:
    # Finished rows leave the decode batch once they are this fraction of it (copying the cache costs a little;
    # > 1: never). Measured on the default job's critic batches: generation 2.14 -> 1.61 s a step on 2 cores.
    drop_finished_at: float = 0.25

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        pad_token_id: int,
        eos_token_ids: list[int],
        decode: callable,
        batch_size: int = 64,
    ) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.decode = decode
        self.batch_size = batch_size
        self.weight_version = 0
        # transformers 5.24 renamed the KV-cache argument and output field past_key_values -> cache (the old
        # name goes in 5.40); the project supports releases on both sides of the rename.
        forward_params = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in forward_params else "past_key_values"
        # Prefill needs the logits of the last prompt position only (the others would be B x prompt x vocab floats).
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}

    @classmethod
    def from_tokenizer(cls, model: PreTrainedModel, tokenizer, *, batch_size: int = 64) -> "EmbeddedEngine":
        """Pad and decoding from a Hugging Face tokenizer; end tokens from it and the model's generation config."""
        from raro_fast.model.hf import end_token_ids
        from raro_fast.prompts import completion_decoder

        return cls(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=end_token_ids(model, tokenizer),
                   decode=completion_decoder(tokenizer), batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        check_prompts(prompts, params, getattr(self.model, "config", None))
        out: list[Completion] = []
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(params.seed)
        # At most batch_size rows at a time, each prompt's n samples in one batch where they fit (its prefill is
        # shared), else in batches of batch_size of them.
        if params.n > self.batch_size:
            for p in prompts:
                for done in range(0, params.n, self.batch_size):
                    part = replace(params, n=min(self.batch_size, params.n - done))
                    out.extend(self._generate_batch([p], part, gen))
        else:
            per_batch = self.batch_size // params.n
            for start in range(0, len(prompts), per_batch):
                out.extend(self._generate_batch(prompts[start : start + per_batch], params, gen))
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, gen) -> list[Completion]:
        """params.n samples of each prompt, as rows prompt-major. The prompts are prefilled once and their KV
        cache repeated n times: the n rows of a prompt would compute the same prefill n times."""
        device = self.device
        width = max(len(p) for p in prompts)
        # Left padding keeps every prompt's last token in the same column, where generation continues.
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        n = params.n
        cache = reserved_cache(self.model.config, params.max_new_tokens)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **self._last_logits, **({self._cache_name: cache} if cache else {}))
        past = getattr(outputs, self._cache_name)
        prefill_logits = outputs.logits[:, -1, :]
        if n > 1:  # transformers' caches repeat in place (every release the project supports, >= 4.56)
            past.batch_repeat_interleave(n)
            prefill_logits, attention_mask, position_ids = (
                x.repeat_interleave(n, dim=0) for x in (prefill_logits, attention_mask, position_ids))
        rows = [p for p in prompts for _ in range(n)]

        stop_ids = torch.tensor(self.eos_token_ids + list(params.stop_token_ids), device=device)
        greedy = params.temperature <= 0
        temperature = 1.0 if greedy else params.temperature
        tokens, logprobs = [], []
        finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        # The rows still decoded (the cache, mask and positions hold these only): finished rows are dropped once
        # they are `drop_finished_at` of them, so one long answer does not keep the whole batch decoding.
        active = torch.arange(len(rows), device=device)
        step_pos, step_mask = position_ids, attention_mask
        logits = prefill_logits.float()
        for t in range(params.max_new_tokens):
            if t:
                outputs = self.model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos,
                                     use_cache=True, **{self._cache_name: past})
                past = getattr(outputs, self._cache_name)
                logits = outputs.logits[:, -1, :].float()
                if len(active) < len(rows):  # every row is still sampled, so the random stream is what it was
                    logits = torch.zeros(len(rows), logits.shape[-1], device=device).index_copy_(0, active, logits)
            logp = torch.log_softmax(logits / temperature, dim=-1)
            if not bool(torch.isfinite(logp).all()):
                raise NonFiniteLogitsError(f"the rollout engine's model (weight version {self.weight_version}) "
                                           "gives non-finite next-token logits")
            if greedy:
                nxt = logp.argmax(-1)
            else:
                nxt = _sample(logp, params.top_p, gen)
            nxt = torch.where(finished, torch.full_like(nxt, self.pad_token_id), nxt)
            tokens.append(nxt)
            logprobs.append(logp.gather(-1, nxt[:, None]).squeeze(-1))
            finished |= torch.isin(nxt, stop_ids)
            if bool(finished.all()):
                break
            done = finished[active]
            finished_rows = int(done.sum())
            if finished_rows and finished_rows >= self.drop_finished_at * len(active):
                keep = (~done).nonzero().squeeze(1)
                past.batch_select_indices(keep)
                active, step_pos, step_mask = active[keep], step_pos[keep], step_mask[keep]
            step_ids = nxt[active][:, None]
            step_pos = step_pos[:, -1:] + 1
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
        tok = torch.stack(tokens, 1).cpu().tolist()
        lps = torch.stack(logprobs, 1).cpu().tolist()
        stops = set(stop_ids.tolist())
        results = []
        for i, p in enumerate(rows):
            ids, lp = tok[i], lps[i]
            end = next((j for j, t in enumerate(ids) if t in stops), None)
            if end is None:
                ids, lp, reason = ids, lp, "length"
            else:
                ids, lp, reason = ids[: end + 1], lp[: end + 1], "stop"
            results.append(
                Completion(
                    token_ids=ids,
                    logprobs=lp,
                    finish_reason=reason,
                    text=self.decode(ids),
                    weight_version=self.weight_version,
                    prompt_ids=list(p),
                )
            )
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        copy_weights_in_place(self.model, named_tensors)
        self.weight_version = version

    def release_memory(self, tags: tuple[str, ...] = ("kv_cache",)) -> None:
        # The KV cache lives only inside `generate`; weights stay (they are small wherever this engine is used).
        check_memory_tags(tags)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self, tags: tuple[str, ...] = ("kv_cache",)) -> None:
        check_memory_tags(tags)


class ReservedKVLayer(DynamicLayer):
    """A full-attention KV-cache layer that decodes into spare room: its keys and values are views of buffers
    with `reserve` more positions, so a decode step writes one position instead of copying the whole cache
    (DynamicLayer concatenates, which took a third of the default job's critic generation on CPU). The views hold
    the same numbers a concatenation would, so generation is unchanged to the last bit. The prefill, and any
    batch_select/repeat of the rows (which make new tensors), go through DynamicLayer; the next decode step moves
    them into fresh buffers."""

    def __init__(self, reserve: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reserve = reserve
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is None or self.keys.numel() == 0:  # the prefill (4.56's layers have no is_initialized)
            return super().update(key_states, value_states, *args, **kwargs)
        length, new = self.keys.shape[-2], key_states.shape[-2]
        buffers = self._buffers
        if (buffers is None or buffers[0].data_ptr() != self.keys.data_ptr()
                or buffers[0].shape[:-2] != self.keys.shape[:-2] or buffers[0].shape[-2] < length + new):
            room = length + max(new, self.reserve)
            buffers = tuple(x.new_empty(*x.shape[:-2], room, x.shape[-1]) for x in (self.keys, self.values))
            buffers[0][..., :length, :] = self.keys
            buffers[1][..., :length, :] = self.values
            self._buffers = buffers
        buffers[0][..., length : length + new, :] = key_states
        buffers[1][..., length : length + new, :] = value_states
        self.keys, self.values = buffers[0][..., : length + new, :], buffers[1][..., : length + new, :]
        return self.keys, self.values


def reserved_cache(config, max_new_tokens: int) -> DynamicCache | None:
    """The model's own DynamicCache with its full-attention layers made `ReservedKVLayer`s (sliding-window and
    other layer kinds stay as transformers builds them); None where this transformers builds no layers up front,
    and the model then makes its own cache."""
    try:
        cache = DynamicCache(config=config)
    except TypeError:  # a release whose DynamicCache takes no config
        return None
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    cache.layers = [ReservedKVLayer(max_new_tokens) if type(layer) is DynamicLayer else layer for layer in layers]
    return cache


@torch.no_grad()
def copy_weights_in_place(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy new values (Hugging Face names) into `model`'s own parameters, which keep their storage: no reload, and
    anything that holds a parameter's address (a captured CUDA graph) stays valid. Every parameter must get one."""
    # state_dict names include tied aliases (lm_head.weight), which an HF state dict sends too.
    params = model.state_dict(keep_vars=True)
    seen = set()
    for name, tensor in named_tensors:
        if name not in params:
            raise KeyError(f"update_weights: the engine's model has no parameter named {name!r}")
        if tensor.shape != params[name].shape:  # copy_ broadcasts: a [H] vector filled every row of an embedding
            raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, the engine's "
                             f"{tuple(params[name].shape)}")
        params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        seen.add(name)
    missing = {n for n, _ in model.named_parameters()} - seen - _tied_aliases(model, seen)
    if missing:
        raise KeyError(f"update_weights: no new value for {sorted(missing)[:5]}")


def _tied_aliases(model: torch.nn.Module, seen: set[str]) -> set[str]:
    """Parameter names that share storage with a name already updated (tied embeddings)."""
    by_ptr: dict[int, set[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(t.data_ptr(), set()).add(name)
    return {n for names in by_ptr.values() if names & seen for n in names}


def _sample(logp: torch.Tensor, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    # Sampling on the CPU generator keeps runs reproducible across devices.
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logp.device)
