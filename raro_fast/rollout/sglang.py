"""SGLang behind the engine interface: in-process (`sglang.Engine`, colocated on the training GPU) and as a server
(HTTP, on its own GPUs or nodes).

SGLang is imported only when one of these is built. Requests and responses follow SGLang's documented formats:
  generate: input_ids + sampling_params + return_logprob → per request `output_ids` and `meta_info` with
    `output_token_logprobs` [(logprob, token_id, text), ...] and `finish_reason` {"type": "stop"|"length"|"abort"}.
    The log-probs are those of the temperature-scaled distribution SGLang sampled from, comparable with the
    trainer's recompute at the same temperature — as long as SGLANG_RETURN_ORIGINAL_LOGPROB is not set.
  weights, colocated: `update_weights_from_tensor(named_tensors=[serialized bucket per TP rank],
    load_format="flattened_bucket", flush_cache=<last bucket only>)`, the bucket handed over by CUDA IPC.
  weights, server: pause_generation → per bucket `/update_weights_from_distributed` + one broadcast → continue.
  Since SGLang 0.5.21 both kinds of update are refused outside a weight-update session: a sync runs between
  `begin_weight_update` and `end_weight_update` wherever the engine has them.
  memory (colocated only): `release_memory_occupation` / `resume_memory_occupation` with tags "kv_cache", "weights".
SGLang >= 0.5.6 is required: older servers ignore load_format="flattened_bucket" on the broadcast path and would wait
for one broadcast per tensor (a hang). tests/weight_sync/test_sglang_source.py checks all of the above against
SGLang's own code and request classes (the version .ci/run installs).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import urllib.error
import urllib.request
import uuid
from typing import Callable, Iterable, Iterator

import torch
from packaging.version import InvalidVersion, Version

from raro_fast.prompts import completion_decoder
from raro_fast.rollout.engine import Completion, NonFiniteLogitsError, SamplingParams, check_memory_tags
from raro_fast.weight_sync.broadcast import broadcast_weights, open_weight_group
from raro_fast.weight_sync.buckets import Bucket, iter_buckets, with_last

INSTALL_HINT = "pip install 'raro-fast[sglang]' (GPU nodes only), or use --rollout.backend embedded"
MIN_VERSION = Version("0.5.6")
SESSION_VERSION = Version("0.5.21")  # from here on, updates outside begin/end_weight_update are refused


def check_version(version: str | None, where: str) -> Version:
    try:
        parsed = Version(str(version)) if version is not None else None
    except InvalidVersion:
        parsed = None
    # A release candidate or dev build of X is built from main after X's features landed: compare releases only
    # (0.5.21rc0 >= 0.5.21 is False to packaging, and a server that refuses updates outside a session got none).
    parsed = Version(".".join(map(str, parsed.release))) if parsed is not None else None
    if parsed is None or parsed < MIN_VERSION:
        raise ValueError(f"{where} runs SGLang {version or '(version unknown)'}; raro-fast needs >= {MIN_VERSION} "
                         f"(weight sync by flattened buckets): {INSTALL_HINT}")
    return parsed


@contextlib.contextmanager
def weight_update_session(begin: Callable[[], object] | None, end: Callable[[], object] | None) -> Iterator[None]:
    """Run a sync inside SGLang's weight-update session (begin/end None: an SGLang from before sessions). A sync
    that fails still closes the session, so the engine is not left refusing the next one; its error is the one
    raised."""
    if begin is None or end is None:
        yield
        return
    try:
        _check_result(begin(), "begin_weight_update")
    except RuntimeError as refused:
        # A trainer that died inside a sync leaves its session open on a long-lived server: close it, open ours.
        with contextlib.suppress(Exception):
            end()
        try:
            _check_result(begin(), "begin_weight_update")
        except RuntimeError:
            raise refused from None
        print(f"warning: SGLang refused a weight-update session ({refused}); closed the open one and began anew",
              file=sys.stderr)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            end()
        raise
    _check_result(end(), "end_weight_update")


def require_sglang(backend: str):
    try:
        import sglang
    except ImportError as e:
        raise ValueError(f"rollout.backend={backend!r} needs SGLang, which is not installed ({e}): {INSTALL_HINT}") from None
    check_version(getattr(sglang, "__version__", None), f"rollout.backend={backend!r}: the installed sglang package")
    return sglang


def engine_kwargs(*, model_path: str, dtype: str, mem_fraction: float, tp_size: int, seed: int, gpu_id: int) -> dict:
    """`sglang.Engine(**kwargs)` (its ServerArgs) for a colocated engine: token ids in and out, memory it can
    release (enable_memory_saver) so the trainer has the GPU during the update."""
    return dict(model_path=model_path, skip_tokenizer_init=True, dtype=dtype, mem_fraction_static=mem_fraction,
                tp_size=tp_size, random_seed=seed, base_gpu_id=gpu_id, enable_memory_saver=True)


def sampling_params_json(params: SamplingParams, stop_token_ids: Iterable[int]) -> dict:
    """SGLang's `sampling_params` for one request. No per-request seed: n copies of a prompt with one seed
    would sample the same tokens; the engine's `random_seed` drives sampling instead. Every other filter is set
    off explicitly (top-k, min-p, penalties): the trainer scores softmax(z / T) with top-p only, and an SGLang that
    fills unset fields from the model's generation_config.json (its `sampling_defaults`) would sample otherwise."""
    return {
        "max_new_tokens": params.max_new_tokens,
        "temperature": max(params.temperature, 0.0),
        "top_p": params.top_p,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "stop_token_ids": sorted(set(stop_token_ids) | set(params.stop_token_ids)),
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }


def generate_request(prompts: list[list[int]], params: SamplingParams, stop_token_ids: Iterable[int]) -> dict:
    """The body of `POST /generate`, also `sglang.Engine.generate`'s keyword arguments: one request per prompt."""
    return {"input_ids": prompts, "sampling_params": sampling_params_json(params, stop_token_ids), "return_logprob": True}


def completion_from_output(output: dict, prompt: list[int], *, decode: Callable[[list[int]], str], weight_version: int,
                           stop_ids: Iterable[int] = (), where: str = "SGLang", verify_version: bool = False) -> Completion:
    """One SGLang response item → a Completion. Tokens and log-probs come from the same (logprob, id) pairs so
    they cannot fall out of step; an aborted request counts as unfinished ("length"). A "length" whose last token is
    one of `stop_ids` (the request's stop tokens) finished: SGLang checks the length limit before the stop tokens, so
    an answer whose end token came as the last allowed one was reported cut off, where the embedded engines call it
    finished (found by review: its answer was dropped, reward 0). With `verify_version`, a
    response whose `meta_info.weight_version` (set by our last sync) differs from `weight_version` is an error:
    the engine answered with weights other than the trainer's."""
    try:
        meta = output["meta_info"]
        pairs = meta["output_token_logprobs"]
        reason = meta["finish_reason"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: response lacks {e} (was return_logprob=True sent?): {str(output)[:200]}") from None
    # SGLang ends a request whose logits hold NaN as a "stop" matched "NaN happened", with token -1 and a NaN
    # log-prob (null over HTTP); read as a finished answer, diverged weights went on training (found by review,
    # 0.5.23). The embedded engines raise this where they meet such logits.
    matched = reason.get("matched") if isinstance(reason, dict) else None
    if (matched == "NaN happened" or any(p[1] is not None and int(p[1]) < 0 for p in pairs)
            or any(p[0] is not None and not math.isfinite(float(p[0])) for p in pairs)):
        raise NonFiniteLogitsError(f"{where}: the engine's logits were not finite (finish_reason {reason!r}): its "
                                   "weights have diverged, nothing can be sampled")
    missing = [i for i, p in enumerate(pairs) if p[0] is None]
    if missing:
        raise ValueError(f"{where}: no log-prob for output tokens at positions {missing[:8]} (their log-probs are "
                         f"needed for the importance ratio): {str(output)[:200]}")
    token_ids = [int(p[1]) for p in pairs]
    logprobs = [float(p[0]) for p in pairs]
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in ("stop", "length", "abort"):
        raise ValueError(f"{where}: unknown finish_reason {reason!r}")
    reported = meta.get("weight_version")
    if verify_version and reported is not None and str(reported) != str(weight_version):
        raise RuntimeError(f"{where}: answered with weight version {reported!r}, but the trainer last synced version "
                           f"{weight_version}: the engine holds stale weights")
    stopped = kind == "stop" or (kind == "length" and bool(token_ids) and token_ids[-1] in set(stop_ids))
    return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason="stop" if stopped else "length",
                      text=decode(token_ids), weight_version=weight_version, prompt_ids=list(prompt))


def _group(flat: list[Completion], n: int) -> list[list[Completion]]:
    return [flat[i * n : (i + 1) * n] for i in range(len(flat) // n)]


class SGLangEngine:
    """`sglang.Engine` in the trainer's process, on the trainer's GPU (one engine per trainer rank, TP inside).

    Weight sync hands each flattened bucket over by CUDA IPC. A bucket buffer is never written after it is handed
    over (a fresh one per bucket); PyTorch's IPC reference counting keeps its memory alive until the engine has
    released it, so dropping our reference early is safe.
    """

    takes_checkpoint_names = True  # SGLang's loaders match checkpoint names (weight_sync.source.checkpoint_renamer)
    # The trained model's positions (`make_engine` sets them): what does not fit is not asked for, as with the
    # in-process engines; SGLang refuses a whole call for one request past its context (found by review).
    context_limit: int | None = None

    def __init__(self, *, model_path: str, tokenizer, dtype: str, mem_fraction: float, tp_size: int,
                 bucket_bytes: int, seed: int, gpu_id: int, end_ids: list[int] | None = None, engine=None) -> None:
        if engine is None:
            sgl = require_sglang("sglang")
            engine = sgl.Engine(**engine_kwargs(model_path=model_path, dtype=dtype, mem_fraction=mem_fraction,
                                                tp_size=tp_size, seed=seed, gpu_id=gpu_id))
        self.engine = engine
        self.tp_size = tp_size
        self.bucket_bytes = bucket_bytes
        self.stop_ids = list(end_ids or [tokenizer.eos_token_id])  # end_token_ids(model, tokenizer)
        self.decode = completion_decoder(tokenizer)
        self.weight_version = 0
        self.half_synced: int | None = None  # the version of a sync that failed midway (see `refuse_half_synced`)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        refuse_half_synced(self)
        flat = [p for p in prompts for _ in range(params.n)]
        stop_ids = self.stop_ids + list(params.stop_token_ids)
        outs = self.engine.generate(**generate_request(flat, params, self.stop_ids))
        return _group([completion_from_output(o, p, decode=self.decode, weight_version=self.weight_version,
                                              stop_ids=stop_ids)
                       for o, p in zip(outs, flat, strict=True)], params.n)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        # SGLang >= 0.5.21 has (and requires) the session; older engines have neither method
        self.half_synced = version  # until the last bucket is in: SGLang loads each as it comes
        with weight_update_session(getattr(self.engine, "begin_weight_update", None),
                                   getattr(self.engine, "end_weight_update", None)):
            for bucket, last in with_last(iter_buckets(named_tensors, self.bucket_bytes)):
                serialized = flattened_bucket_payload(bucket)
                result = self.engine.update_weights_from_tensor(named_tensors=[serialized] * self.tp_size,
                                                                load_format="flattened_bucket", flush_cache=last)
                _check_result(result, "update_weights_from_tensor")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.weight_version, self.half_synced = version, None

    def release_memory(self, tags: tuple[str, ...] = ("kv_cache",)) -> None:
        self.engine.release_memory_occupation(tags=list(check_memory_tags(tags)))

    def resume_memory(self, tags: tuple[str, ...] = ("kv_cache",)) -> None:
        self.engine.resume_memory_occupation(tags=list(check_memory_tags(tags)))

    def shutdown(self) -> None:
        self.engine.shutdown()


def flattened_bucket_payload(bucket: Bucket) -> str:
    """One bucket as `update_weights_from_tensor(load_format="flattened_bucket")` takes it, per TP rank: SGLang's
    MultiprocessingSerializer (a CUDA IPC handle for a GPU buffer) over {"flattened_tensor", "metadata"}. The
    metadata uses SGLang's own class: its SafeUnpickler admits no other."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    payload = {"flattened_tensor": bucket.flat, "metadata": [FlattenedTensorMetadata(**vars(m)) for m in bucket.metas]}
    return MultiprocessingSerializer.serialize(payload, output_str=True)


def refuse_half_synced(engine) -> None:
    """A sync that failed midway left the engine with some new buckets and the old version (SGLang loads each bucket
    as it comes): sampling from it would label half-new weights as old ones (found by review)."""
    if engine.half_synced is not None:
        raise RuntimeError(f"the SGLang engine holds part of weight version {engine.half_synced} (a sync failed midway) "
                           f"under version {engine.weight_version}; sync every weight again before sampling")


def _check_result(result, what: str) -> None:
    # SGLang answers (success, message) tuples in-process and {"success": ..., "message": ...} over HTTP.
    if isinstance(result, dict):
        ok, message = result.get("success", True), result.get("message", "")
    elif isinstance(result, (tuple, list)) and result and isinstance(result[0], bool):
        ok, message = result[0], result[1] if len(result) > 1 else ""
    else:
        return
    if not ok:
        raise RuntimeError(f"SGLang {what} failed: {message}")


class SGLangServerEngine:
    """An SGLang server reached over HTTP (its own GPUs or nodes). Trainer rank 0 owns the weight-sync group;
    other ranks only generate (and take part in the FSDP gathers that feed rank 0)."""

    takes_checkpoint_names = True  # SGLang's loaders match checkpoint names (weight_sync.source.checkpoint_renamer)
    context_limit: int | None = None  # as SGLangEngine's

    def __init__(self, *, url: str, tokenizer, bucket_bytes: int, sync_rank: bool, server_ranks: int,
                 group_address: str, group_port: int, group_backend: str = "nccl", timeout_s: float = 600.0,
                 end_ids: list[int] | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        self.sync_rank = sync_rank
        self.server_ranks = server_ranks
        self.group_address, self.group_port, self.group_backend = group_address, group_port, group_backend
        # One name per trainer start: a restarted trainer's group must not reuse the name its dead predecessor
        # registered on a long-lived server (torch refuses a group name twice).
        self.group_name = f"raro_fast_weights_{uuid.uuid4().hex[:12]}"
        self.group = None
        self.stop_ids = list(end_ids or [tokenizer.eos_token_id])  # end_token_ids(model, tokenizer)
        self.decode = completion_decoder(tokenizer)
        self.weight_version = 0
        self.half_synced: int | None = None  # the version of a sync that failed midway (see `refuse_half_synced`)
        self._check_server()

    def _check_server(self) -> None:
        """Fail at start, naming the URL, if nothing answers there or the server is too old for bucketed broadcasts."""
        where = f"the SGLang server at {self.url} (rollout.sglang_url)"
        try:
            info = self._get("/server_info")
        except RuntimeError as e:  # an HTTP error: something answers, but not SGLang >= 0.5.6
            raise ValueError(f"{where} has no usable /server_info ({e}); raro-fast needs SGLang >= {MIN_VERSION}") from None
        self.version = check_version(info.get("version") if isinstance(info, dict) else None, where)
        # SGLang's weight sync from a trainer asserts dp_size 1, and gives pipeline stages the same ranks; a group
        # of the wrong size hung until the timeout. Its deterministic mode seeds every request alike, so the n
        # samples of a prompt came back identical and every GRPO advantage was 0 (found by review, 0.5.23).
        for name in ("dp_size", "pp_size"):
            if info.get(name, 1) != 1:
                raise ValueError(f"{where} runs with {name} {info[name]}: weight sync from a trainer needs "
                                 f"{name} 1 (tensor parallelism only)")
        if "tp_size" in info and info["tp_size"] != self.server_ranks:
            raise ValueError(f"{where} runs on {info['tp_size']} tensor-parallel GPUs, but rollout.server_ranks is "
                             f"{self.server_ranks}: set it to {info['tp_size']}")
        if info.get("enable_deterministic_inference"):
            raise ValueError(f"{where} was started with --enable-deterministic-inference, which gives every request "
                             "the same sampling seed: the n samples of a prompt would be identical; start it without")

    # -- HTTP ----------------------------------------------------------------------------------------------------
    def _request(self, path: str, body: dict | None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):  # SGLang's answer to a request without the key it was started with
                raise ValueError(f"the SGLang server at {self.url} (rollout.sglang_url) refused {path} with HTTP {e.code}: "
                                 f"it was started with --api-key or --admin-api-key, and raro-fast sends no key; start "
                                 f"it without them, on a network only the trainer reaches") from None
            raise RuntimeError(f"SGLang server {self.url}{path}: HTTP {e.code}: {e.read().decode()[:300]}") from None
        except (urllib.error.URLError, OSError) as e:
            # reached, but slow (a read times out bare, a connection inside URLError): "cannot reach" sent users to
            # check an address that answers
            if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
                raise RuntimeError(f"the SGLang server at {self.url} did not answer {path} within {self.timeout_s:g} "
                                   "s (a rollout batch larger than it serves in that time?)") from None
            raise ValueError(f"cannot reach the SGLang server at {self.url}{path} (rollout.sglang_url): {e}") from None
        try:
            return json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            return {"message": text}

    def _get(self, path: str):
        return self._request(path, None)

    def _post(self, path: str, body: dict):
        out = self._request(path, body)
        _check_result(out, path)
        return out

    # -- engine interface ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        refuse_half_synced(self)
        flat = [p for p in prompts for _ in range(params.n)]
        if not flat:
            return [[] for _ in prompts]
        outs = self._post("/generate", generate_request(flat, params, self.stop_ids))
        if isinstance(outs, dict):  # a single request answers with an object, a batch with a list
            outs = [outs]
        # our syncs set the server's weight version, so every answer after the first sync must carry ours
        return _group([completion_from_output(o, p, decode=self.decode, weight_version=self.weight_version,
                                              stop_ids=self.stop_ids + list(params.stop_token_ids),
                                              where=f"SGLang server {self.url}/generate",
                                              verify_version=self.weight_version > 0)
                       for o, p in zip(outs, flat, strict=True)], params.n)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if not self.sync_rank:
            for _ in named_tensors:  # the gathers are collectives: take part, send nothing
                pass
            self.weight_version = version
            return
        if self.group is None:
            self._open_group()
        sessions = self.version >= SESSION_VERSION
        begin = (lambda: self._post("/begin_weight_update", {})) if sessions else None
        end = (lambda: self._post("/end_weight_update", {})) if sessions else None
        self._post("/pause_generation", {"mode": "abort"})
        self.half_synced = version  # until the last bucket is in: the server loads each as it comes
        try:
            with weight_update_session(begin, end):
                broadcast_weights(self.group, named_tensors, group_name=self.group_name, bucket_bytes=self.bucket_bytes,
                                  announce=lambda body: self._post_in_background("/update_weights_from_distributed", body),
                                  weight_version=version)
        finally:
            self._post("/continue_generation", {})
        self.weight_version, self.half_synced = version, None

    def _post_in_background(self, path: str, body: dict) -> Callable[..., None]:
        """POST without waiting (the server answers only once the collective that follows is done); the returned
        wait(timeout) joins (for at most `timeout` seconds) and re-raises any failure in the caller's thread."""
        box: dict = {}

        def call():
            try:
                box["out"] = self._post(path, body)
            except BaseException as e:  # re-raised in the trainer's thread by wait()
                box["error"] = e

        thread = threading.Thread(target=call, daemon=True)
        thread.start()

        def wait(timeout: float | None = None):
            thread.join(timeout)
            if "error" in box:
                raise box["error"]

        return wait

    def _open_group(self) -> None:
        body = {"master_address": self.group_address, "master_port": self.group_port, "rank_offset": 1,
                "world_size": self.server_ranks + 1, "group_name": self.group_name, "backend": self.group_backend}
        wait = self._post_in_background("/init_weights_update_group", body)  # both sides block until all have joined
        try:
            self.group = open_weight_group(master_address=self.group_address, master_port=self.group_port, rank=0,
                                           world_size=self.server_ranks + 1, group_name=self.group_name,
                                           backend=self.group_backend, timeout_s=self.timeout_s)
        except Exception:
            # A server that refused to join left us to time out: its answer names the cause. A failure here (the
            # port taken) is not the server's: it was reported as a slow server, after its whole timeout (review).
            wait(timeout=5.0)
            raise
        wait()

    def release_memory(self, tags: tuple[str, ...] = ("kv_cache",)) -> None:
        self._post("/release_memory_occupation", {"tags": list(check_memory_tags(tags))})

    def resume_memory(self, tags: tuple[str, ...] = ("kv_cache",)) -> None:
        self._post("/resume_memory_occupation", {"tags": list(check_memory_tags(tags))})
