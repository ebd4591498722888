"""Our SGLang adapter's requests and payloads through SGLang's OWN parsing code (not stand-ins), on CPU.

Run by test_sglang_source.py in a subprocess with SGLang importable: `import sglang` patches transformers at import,
which must not leak into the other tests. Prints one JSON line of what was checked; any mismatch raises.
What this cannot reach without a GPU: the CUDA IPC handle (a CPU tensor travels by file descriptor here) and the
engine's model loading.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import sglang  # noqa: E402
from sglang.api.v1.api_types import (FinishAbort, FinishLength, FinishStop, GenerateMetaInfo,  # noqa: E402
                                     GenerateResponse, LogprobEntry)
from sglang.srt.entrypoints.api_contract import generate_contract_error  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.srt.utils.common import (MultiprocessingSerializer, init_custom_process_group,  # noqa: E402
                                     normalize_serialized_named_tensor_payloads)
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata  # noqa: E402

from gloo_worker import tiny_model  # noqa: E402
from raro_fast.model.policy import PolicyModel  # noqa: E402
from raro_fast.rollout.engine import SamplingParams  # noqa: E402
from raro_fast.rollout.sglang import (check_version, completion_from_output, engine_kwargs,  # noqa: E402
                                      flattened_bucket_payload, generate_request)
from raro_fast.weight_sync.broadcast import broadcast_weights, open_weight_group, update_request  # noqa: E402
from raro_fast.weight_sync.buckets import iter_buckets, with_last  # noqa: E402
from raro_fast.weight_sync.source import hf_named_tensors  # noqa: E402


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    """A tiny Qwen2's HF-named weights in bf16 (tied lm_head left out, as the trainer sends them), then odd shapes and
    every dtype a state dict can hold."""
    g = torch.Generator().manual_seed(0)
    out = list(hf_named_tensors(PolicyModel(tiny_model(3)), dtype=torch.bfloat16))
    out += [("scalar", torch.randn((), generator=g)), ("odd.f64", torch.randn(3, 5, 7, generator=g, dtype=torch.float64)),
            ("odd.f16", torch.randn(1, 9, generator=g).half()), ("empty.bf16", torch.empty(0, 4, dtype=torch.bfloat16)),
            ("ids.i64", torch.randint(-2**40, 2**40, (4, 3), generator=g)), ("mask.bool", torch.rand(5, generator=g) > 0.5),
            ("u8", torch.randint(0, 255, (6,), generator=g, dtype=torch.uint8)),
            ("col", torch.randn(8, 6, generator=g).t())]  # non-contiguous
    return out


def same(got: list[tuple[str, torch.Tensor]], want: list[tuple[str, torch.Tensor]]) -> None:
    assert [n for n, _ in got] == [n for n, _ in want], ([n for n, _ in got], [n for n, _ in want])
    for (name, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name  # bit-exact


def check_buckets() -> dict:
    tensors = named_tensors()
    by_name = dict(tensors)
    buckets = 0
    for bucket, last in with_last(iter_buckets(tensors, bucket_bytes=4096)):
        want = [(m.name, by_name[m.name]) for m in bucket.metas]
        # Colocated: what sglang.Engine.update_weights_from_tensor does with the payload we hand it, up to loading.
        (raw,) = normalize_serialized_named_tensor_payloads([flattened_bucket_payload(bucket)])
        payload = MultiprocessingSerializer.deserialize(raw)  # SGLang's SafeUnpickler: rejects foreign classes
        assert set(payload) == {"flattened_tensor", "metadata"}, set(payload)
        metas = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                         end_idx=m.end_idx, numel=m.numel) for m in payload["metadata"]]
        same(FlattenedTensorBucket(flattened_tensor=payload["flattened_tensor"], metadata=metas).reconstruct_tensors(), want)
        # Server mode: the receiver allocates from our JSON body alone; the broadcast fills it with our bytes.
        body = json.loads(json.dumps(update_request(bucket, group_name="g", flush_cache=last, weight_version=7)))
        received = FlattenedTensorBucket.empty(body["names"], body["dtypes"], body["shapes"], "cpu")
        assert [(m.name, m.start_idx, m.end_idx, m.numel) for m in received.get_metadata()] == \
               [(m.name, m.start_idx, m.end_idx, m.numel) for m in bucket.metas]
        received.get_flattened_tensor().copy_(bucket.flat)
        same(received.reconstruct_tensors(), want)
        buckets += 1
    # the serializer must refuse what is not SGLang's: proves the unpickler above was the strict one
    try:
        MultiprocessingSerializer.deserialize(MultiprocessingSerializer.serialize({"m": Path("x")}))
    except RuntimeError as e:
        assert "Blocked unsafe global" in str(e), e
    else:
        raise AssertionError("SGLang's SafeUnpickler accepted a foreign class")
    return {"buckets": buckets, "tensors": len(tensors)}


def check_generate() -> dict:
    prompts = [[5, 9, 2], [7, 7, 40, 11]]
    cases = [SamplingParams(), SamplingParams(max_new_tokens=7, temperature=0.6, top_p=0.9, stop_token_ids=(4, 9)),
             SamplingParams(temperature=0.0, n=4, seed=3)]
    for params in cases:
        body = json.loads(json.dumps(generate_request(prompts, params, [1])))
        error = generate_contract_error(body)
        assert error is None, (body, error)
    assert generate_contract_error({"input_ids": prompts, "sampling_params": {"max_new_tokenz": 3}}) is not None

    def response(finish, version) -> dict:
        meta = GenerateMetaInfo(id="r", prompt_tokens=3, completion_tokens=2, finish_reason=finish, weight_version=version,
                                output_token_logprobs=[LogprobEntry(logprob=-0.5, token_id=3, text=None),
                                                       LogprobEntry(logprob=-1.25, token_id=1, text=None)])
        return json.loads(json.dumps(GenerateResponse(text="x", output_ids=[3, 1], meta_info=meta).to_json_value()))

    for finish, kind in ((FinishStop(matched=1), "stop"), (FinishLength(length=2), "length"),
                         (FinishAbort(message="paused"), "length")):
        c = completion_from_output(response(finish, "5"), [9], decode=str, weight_version=5, verify_version=True)
        assert (c.token_ids, c.logprobs, c.finish_reason) == ([3, 1], [-0.5, -1.25], kind), c
    try:
        completion_from_output(response(FinishStop(matched=1), "4"), [9], decode=str, weight_version=5, verify_version=True)
    except RuntimeError as e:
        assert "stale weights" in str(e)
    else:
        raise AssertionError("a response from weight version 4 passed as version 5")
    return {"sampling_cases": len(cases), "finish_kinds": 3}


def check_engine_args() -> dict:
    """sglang.Engine(**kwargs) builds ServerArgs(**kwargs): an unknown or renamed argument is a TypeError there."""
    kwargs = engine_kwargs(model_path="m", dtype="bfloat16", mem_fraction=0.35, tp_size=2, seed=5, gpu_id=1)
    args = ServerArgs(**kwargs)
    assert {k: getattr(args, k) for k in kwargs} == kwargs, args
    return {"engine_args": len(kwargs)}


GROUP = "raro_fast_weights"


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def receive_as_sglang_server(port: int, fd_in: int, fd_out: int) -> None:
    """SGLang's server side of server-mode weight sync, from SGLang's own pieces: its group
    (init_custom_process_group, as /init_weights_update_group builds it), then per announced bucket its receive
    buffer (FlattenedTensorBucket.empty), one broadcast from rank 0, and its reconstruction — the steps of
    SGLang's `_receive_bucketed_weights_from_distributed`. Bodies come as JSON lines (the HTTP requests' bodies)."""
    group = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=1,
                                      group_name=GROUP, timeout=datetime.timedelta(seconds=120))
    received: dict[str, torch.Tensor] = {}
    with os.fdopen(fd_in) as inbox, os.fdopen(fd_out, "w") as outbox:
        for line in inbox:
            body = json.loads(line)
            bucket = FlattenedTensorBucket.empty(body["names"], body["dtypes"], body["shapes"], "cpu")
            torch.distributed.broadcast(bucket.get_flattened_tensor(), src=0, group=group)
            received.update((name, t.clone()) for name, t in bucket.reconstruct_tensors())
            reply = {"success": True, "buckets": 1}
            if body["flush_cache"]:
                reply |= {"digest": digest(received), "weight_version": body.get("weight_version")}
            outbox.write(json.dumps(reply) + "\n")
            outbox.flush()
            if body["flush_cache"]:
                return


def send_as_trainer(port: int, fd_in: int, fd_out: int) -> None:
    """Our trainer's side, unchanged: open_weight_group + broadcast_weights, announcing each bucket as a JSON line."""
    group = open_weight_group(master_address="127.0.0.1", master_port=port, rank=0, world_size=2, group_name=GROUP,
                              backend="gloo", timeout_s=120)
    tensors = named_tensors()
    replies = []
    with os.fdopen(fd_in) as inbox, os.fdopen(fd_out, "w") as outbox:
        def announce(body):
            outbox.write(json.dumps(body) + "\n")
            outbox.flush()
            answer = []

            def wait(timeout=None):  # the receiver answers once the bucket is in: read that line once
                if not answer:
                    answer.append(json.loads(inbox.readline()))
                    replies.append(answer[0])
            return wait

        sent = broadcast_weights(group, tensors, group_name=GROUP, bucket_bytes=4096, announce=announce, weight_version=3)
    last = replies[-1]
    assert all(r["success"] for r in replies) and last["weight_version"] == "3", replies
    assert last["digest"] == digest(dict(tensors)), "SGLang's receiver rebuilt other weights than were sent"
    print(json.dumps({"buckets": len(replies), "bytes": sent, "digest_equal": True}))


if __name__ == "__main__" and len(sys.argv) > 1:
    role, port, fd_in, fd_out = sys.argv[1], *map(int, sys.argv[2:5])
    {"receive": receive_as_sglang_server, "send": send_as_trainer}[role](port, fd_in, fd_out)
    # The work is done and reported; leave without interpreter finalisation, where a live gloo group can abort the
    # process ("terminate called without an active exception", seen once in CI after a passing sync).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
elif __name__ == "__main__":
    check_version(sglang.__version__, "the sglang package under test")
    print(json.dumps({"sglang": sglang.__version__, **check_buckets(), **check_generate(),
                      **check_engine_args()}))
