"""FSDP2 (`raro_fast.parallelize`) on one CPU process over gloo, in a subprocess (a process group must not leak
into the other tests): with bf16 compute, the packed batch reaches the model as packed, so RARO's per-token
temperatures divide the logits at full precision. FSDP2 casts every float tensor of a root's inputs to the
compute dtype by default, the temperatures too (0.3 -> 0.30078)."""
import json
import os
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


if __name__ == "__main__":
    _worker(sys.argv[1])
