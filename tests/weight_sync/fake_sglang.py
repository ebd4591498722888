"""Stand-ins for SGLang that speak its documented formats (python/sglang/srt/entrypoints/engine.py, http_server.py,
weight_sync/tensor_bucket.py), backed by an embedded engine so sampled log-probs are real. Test-only."""
from __future__ import annotations

import base64
import json
import pickle
import sys
import threading
import types
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from packaging.version import InvalidVersion, Version

from raro_fast.rollout.engine import SamplingParams
from raro_fast.weight_sync.broadcast import open_weight_group, receive_bucket


@dataclass
class FlattenedTensorMetadata:  # SGLang's fields
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


class MultiprocessingSerializer:  # SGLang's name; pickle stands in for its CUDA-IPC-aware pickler
    @staticmethod
    def serialize(obj, output_str=False):
        data = pickle.dumps(obj)
        return base64.b64encode(data).decode() if output_str else data

    @staticmethod
    def deserialize(data):
        return pickle.loads(base64.b64decode(data) if isinstance(data, str) else data)


VERSION = "0.5.23"


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return Version(version).release  # SGLang's release candidates carry their release's endpoints
    except InvalidVersion:
        return ()


def sglang_output(c, max_new_tokens, weight_version):
    """What SGLang answers per request with return_logprob=True. Its `Req.check_finished` tests the length limit
    before the stop tokens: an end token that comes as the last allowed token is reported as "length"."""
    finish = ({"type": "length", "length": max_new_tokens} if len(c.token_ids) >= max_new_tokens
              else {"type": "stop", "matched": c.token_ids[-1]} if c.finish_reason == "stop"
              else {"type": "length", "length": max_new_tokens})
    return {"text": c.text, "output_ids": list(c.token_ids),
            "meta_info": {"id": "r", "prompt_tokens": len(c.prompt_ids), "completion_tokens": len(c.token_ids),
                          "finish_reason": finish, "weight_version": weight_version,
                          "output_token_logprobs": [[lp, t, None] for lp, t in zip(c.logprobs, c.token_ids)]}}


def run_generate(inner, input_ids, sampling_params, weight_version="default"):
    assert set(sampling_params) >= {"max_new_tokens", "temperature", "top_p", "stop_token_ids"}, sampling_params
    params = SamplingParams(max_new_tokens=sampling_params["max_new_tokens"], temperature=sampling_params["temperature"],
                            top_p=sampling_params["top_p"], seed=0)
    outs = inner.generate(input_ids, params)
    return [sglang_output(c, params.max_new_tokens, weight_version) for (c,) in outs]


SESSION_REFUSAL = "{} must run between begin_weight_update() and end_weight_update()"  # SGLang >= 0.5.21's answer


class MemoryTags:
    """SGLang's bookkeeping of released memory: resuming what is not released fails (its scheduler's
    `offload_tags.remove`), as does releasing what already is (its memory saver pauses a region once)."""

    def __init__(self):
        self.released = set()

    def release(self, tags):
        assert not self.released & set(tags), f"release_memory_occupation: {sorted(self.released & set(tags))} already released"
        self.released |= set(tags)

    def resume(self, tags):
        assert set(tags) <= self.released, f"resume_memory_occupation: {sorted(set(tags) - self.released)} not released"
        self.released -= set(tags)


class FakeEngineBeforeSessions:
    """`sglang.Engine` 0.5.6-0.5.20: generate, update_weights_from_tensor (flattened_bucket), memory occupation."""

    def __init__(self, inner=None, **server_args):
        self.inner = inner
        self.server_args = server_args
        self.calls = []
        self.sampling_params = []  # each generate call's, as sent
        self._received = []
        self.memory = MemoryTags()

    def _refusal(self, what):
        return None

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False, **kw):
        assert return_logprob is True and all(isinstance(t, int) for p in input_ids for t in p)
        self.calls.append(("generate", len(input_ids)))
        self.sampling_params.append(sampling_params)
        return run_generate(self.inner, input_ids, sampling_params)

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        if (refused := self._refusal("update_weights_from_tensor")) is not None:
            self.calls.append(("update_weights_from_tensor", "refused"))
            return False, refused
        assert load_format == "flattened_bucket" and isinstance(named_tensors, list) and all(isinstance(s, str) for s in named_tensors)
        payload = MultiprocessingSerializer.deserialize(named_tensors[0])
        assert set(payload) == {"flattened_tensor", "metadata"}
        assert all(type(m) is FlattenedTensorMetadata for m in payload["metadata"])
        flat = payload["flattened_tensor"]
        assert flat.dtype == torch.uint8 and flat.dim() == 1
        # SGLang's reconstruct_tensors: slice, view as dtype, reshape
        self._received += [(m.name, flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape).clone()) for m in payload["metadata"]]
        self.calls.append(("update_weights_from_tensor", len(payload["metadata"]), flush_cache, len(named_tensors)))
        if flush_cache:
            self.inner.update_weights(self._received, version=self.inner.weight_version + 1)
            self._received = []
        return True, "Success"

    def release_memory_occupation(self, tags=None):
        self.memory.release(tags)
        self.calls.append(("release_memory_occupation", tuple(tags)))

    def resume_memory_occupation(self, tags=None):
        self.memory.resume(tags)
        self.calls.append(("resume_memory_occupation", tuple(tags)))

    def shutdown(self):
        pass


class FakeEngine(FakeEngineBeforeSessions):
    """`sglang.Engine` >= 0.5.21: updates only inside a begin_weight_update()/end_weight_update() session."""

    session_open = False

    def _refusal(self, what):
        return None if self.session_open else SESSION_REFUSAL.format(what)

    def begin_weight_update(self, selector="all"):
        self.calls.append(("begin_weight_update",))
        if self.session_open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session_open = True
        return True, "Success"

    def end_weight_update(self):
        self.calls.append(("end_weight_update",))
        if not self.session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session_open = False
        return True, "Success"


def install(monkeypatch):
    """Make `import sglang` (and the submodules the adapter uses) find the stand-ins."""
    mods = {name: types.ModuleType(name) for name in
            ("sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.weight_sync", "sglang.srt.weight_sync.tensor_bucket")}
    mods["sglang"].Engine = FakeEngine
    mods["sglang"].__version__ = VERSION
    mods["sglang.srt.utils"].MultiprocessingSerializer = MultiprocessingSerializer
    mods["sglang.srt.weight_sync.tensor_bucket"].FlattenedTensorMetadata = FlattenedTensorMetadata
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)


def plain_weight_group(monkeypatch):
    """Both ends of a FakeServer's weight group live in this one process, where SGLang's group registry (used by
    open_weight_group whenever sglang is importable) admits one member per group name: use the plain group."""
    monkeypatch.setitem(sys.modules, "sglang.srt.utils", None)  # `from sglang.srt.utils import ...` fails


class FakeServer:
    """An SGLang HTTP server's RL endpoints; weights arrive over a gloo weight group as in server mode."""

    ENDPOINTS = {"/generate", "/pause_generation", "/continue_generation", "/init_weights_update_group",
                 "/update_weights_from_distributed", "/release_memory_occupation", "/resume_memory_occupation"}
    SESSION_ENDPOINTS = {"/begin_weight_update", "/end_weight_update"}  # SGLang >= 0.5.21

    def __init__(self, inner, version=VERSION, api_key=None, server_args=None, key_refusal=401):
        self.inner, self.calls, self.group, self.received, self.api_key = inner, [], None, [], api_key
        self.key_refusal = key_refusal  # 401 for a missing key; 403 for a key without admin rights
        # /server_info also lists the server's arguments (tp_size, dp_size, ...); a real one sends them all
        self.server_args = {"tp_size": 1, "dp_size": 1, "pp_size": 1, "enable_deterministic_inference": False,
                            **(server_args or {})}
        self.version, self.weight_version = version, "default"  # SGLang's weight version before any update
        self.sessions = version is not None and _version_tuple(version) >= (0, 5, 21)
        self.session_open, self.memory, self.group_names = False, MemoryTags(), set()
        # SGLang's scheduler loads weight updates one at a time, in the order they came. The trainer now announces
        # one bucket at a time (broadcast_weights), but this server answers each request on its own thread, and the
        # lock keeps a load from overlapping another even if a sender ever posts ahead (it once did: CI saw "no new
        # value for ['model.layers.1.mlp.down_proj.weight']").
        self.update_lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, obj, code=200):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _refused_without_key(self):
                if server.api_key is None or self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return False
                self._reply({"error": "Unauthorized"}, server.key_refusal)  # SGLang's api-key middleware
                return True

            def do_GET(self):
                server.calls.append((self.path, None))
                if self._refused_without_key():
                    return
                if self.path == "/server_info" and server.version is not None:
                    return self._reply({"model_path": "fake", "version": server.version, **server.server_args})
                self._reply({"detail": "Not Found"}, 404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                server.calls.append((self.path, body))
                if self._refused_without_key():
                    return
                if self.path not in server.ENDPOINTS | (server.SESSION_ENDPOINTS if server.sessions else set()):
                    return self._reply({"detail": "Not Found"}, 404)
                out = server.handle(self.path, body)
                # SGLang answers a refused request with HTTP 400 and {"success": false, "message": ...}
                self._reply(out, 400 if isinstance(out, dict) and out.get("success") is False else 200)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, path, body):
        if path == "/generate":
            assert body["return_logprob"] is True
            return run_generate(self.inner, body["input_ids"], body["sampling_params"], self.weight_version)
        if path == "/init_weights_update_group":
            assert set(body) == {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
            if body["group_name"] in self.group_names:  # torch's refusal, which SGLang passes on
                return {"success": False, "message": "Failed to initialize custom process group: The specified group "
                                                     "name has already been created, please use a different group name."}
            self.group_names.add(body["group_name"])
            self.group = open_weight_group(master_address=body["master_address"], master_port=body["master_port"],
                                           rank=body["rank_offset"], world_size=body["world_size"],
                                           group_name=body["group_name"], backend=body["backend"], timeout_s=60)
            return {"success": True, "message": "group ready"}
        if path == "/begin_weight_update":
            if self.session_open:
                return {"success": False, "message": "a weight-update session is already open"}
            self.session_open = True
            return {"success": True, "message": "Success"}
        if path == "/end_weight_update":
            if not self.session_open:
                return {"success": False, "message": "no weight-update session is open"}
            self.session_open = False
            return {"success": True, "message": "Success"}
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            try:
                (self.memory.release if path.startswith("/release") else self.memory.resume)(body["tags"])
            except AssertionError as e:  # SGLang's scheduler fails there; answered as an error here, not a hang-up
                return {"success": False, "message": str(e)}
        if path == "/update_weights_from_distributed":
            if self.sessions and not self.session_open:  # refused before it joins the broadcast, as SGLang does
                return {"success": False, "message": SESSION_REFUSAL.format("update_weights_from_distributed")}
            assert body["load_format"] == "flattened_bucket"
            with self.update_lock:
                self.received += receive_bucket(self.group, body)
                if body["flush_cache"]:
                    self.inner.update_weights(self.received, version=int(body["weight_version"]))
                    self.weight_version = body["weight_version"]
                    self.received = []
            return {"success": True, "message": "Succeeded to update parameter online."}
        return {"success": True, "message": ""}

    def close(self):
        self.httpd.shutdown()
