"""FSDP2 (`raro_fast.parallelize`) on CPU processes over gloo, in subprocesses (a process group must not leak
into the other tests). With bf16 compute, the packed batch reaches the model as packed, so RARO's per-token
temperatures divide the logits at full precision (FSDP2 casts every float tensor of a root's inputs to the
compute dtype by default, the temperatures too: 0.3 -> 0.30078); and on two ranks the gradients are averaged in
fp32, not in bf16."""
import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path


def test_fsdp_bf16_keeps_the_per_token_temperatures(tmp_path, free_port):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["temperature_dtype"] == "torch.float64"
    assert result["max_error"] < 1e-4, result
    assert result["max_abs_logprob"] > 1.0  # logits large enough that a 0.3% temperature error shows
    assert result["layer_units"] == result["layers"] == 2  # one FSDP unit per decoder layer, not one for the model


def test_fsdp_bf16_averages_two_ranks_gradients_in_fp32(tmp_path):
    """Two ranks, each its own packed batch, bf16 compute. Every gradient is the mean of the ranks' gradients
    (within bf16 compute: each rank's is also computed here without FSDP, in bf16), and it is reduced in fp32: a
    mean of two bf16 gradients needs more than bf16's 8 bits in about half its elements, which a bf16 reduction
    (`reduce_dtype` left to the compute dtype) rounds away, in every element."""
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           __file__, "two-ranks", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result) == 26  # every parameter of the 2-layer model, the root unit's (embeddings, norm) too
    for name, r in result.items():
        assert r["dtype"] == "torch.float32", name
        assert r["ranks_differ"] > 0.1 * r["scale"], name  # a rank's own gradient is not the mean
        assert r["error"] <= 0.02 * r["scale"], (name, r)
        assert r["beyond_bf16"] > 0.25, (name, r)


def _worker(out: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    import raro_fast.model.policy as policy
    from torch.distributed.fsdp import FSDPModule

    from raro_fast.distributed import Dist
    from raro_fast.parallelize import parallelize
    from test_packing import logprobs_at_token_temperatures, policy_and_critic_batch

    dist.init_process_group("gloo", rank=0, world_size=1)
    model, mb = policy_and_critic_batch()
    seen = {}
    kernel = policy.linear_logprobs

    def recording(hidden, weight, targets, *, temperature, **kw):  # what the model hands the fused kernel
        seen.update(hidden=hidden.detach(), weight=weight.detach(), temperature=temperature)
        return kernel(hidden, weight, targets, temperature=temperature, **kw)

    policy.linear_logprobs = recording
    pm = parallelize(policy.PolicyModel(model), list(model.model.layers),
                     Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), compute_dtype=torch.bfloat16)
    with torch.no_grad():
        logprobs, _ = pm(mb, temperature=1.0)
    weight = seen["weight"]
    weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
    want, keep = logprobs_at_token_temperatures(seen["hidden"], weight, mb)  # the batch's exact temperatures
    Path(out).write_text(json.dumps({
        "temperature_dtype": str(getattr(seen["temperature"], "dtype", None)),
        "max_error": float((logprobs.double() - want)[keep].abs().max()),
        "max_abs_logprob": float(want[keep].abs().max()),
        "layers": len(model.model.layers),
        "layer_units": sum(isinstance(layer, FSDPModule) for layer in model.model.layers),
    }))
    dist.destroy_process_group()


def _two_rank_worker(out: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    from raro_fast.distributed import Dist, shutdown
    from raro_fast.model.policy import PolicyModel
    from raro_fast.parallelize import parallelize
    from test_packing import pack, random_samples, tiny_qwen

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_qwen(seed=6)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    samples = random_samples(4, random.Random(5 + rank), with_logprobs=False)
    mb = pack(samples, num_sequences=4, num_tokens=sum(x.num_targets for x in samples))

    def gradients(pm):
        logprobs, _ = pm(mb)
        (-(logprobs * (mb.targets != -100)).sum()).backward()
        return {n: p.grad for n, p in pm.named_parameters()}

    d = Dist(rank=rank, world_size=world, local_rank=0, device=torch.device("cpu"))
    own = {n: g.float() for n, g in gradients(PolicyModel(copy.deepcopy(model).bfloat16())).items()}
    sharded = gradients(parallelize(PolicyModel(model), list(model.model.layers), d, compute_dtype=torch.bfloat16))
    result = {}
    for name, g in sharded.items():
        dtype, g = str(g.dtype), g.full_tensor()
        mean = own[name].clone()
        dist.all_reduce(mean)
        mean /= world
        result[name] = {"dtype": dtype, "scale": float(mean.abs().max()), "error": float((g - mean).abs().max()),
                        "ranks_differ": float((own[name] - mean).abs().max()),
                        "beyond_bf16": float((g != g.bfloat16().float()).float().mean())}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    # the trainer's own teardown: FSDP2's reference cycles collected first, or gloo may abort the process at exit
    # (1 run in 8 here did: "terminate called without an active exception")
    del sharded, model
    shutdown(d)


if __name__ == "__main__":
    if sys.argv[1] == "two-ranks":
        _two_rank_worker(sys.argv[2])
    else:
        _worker(sys.argv[1])
