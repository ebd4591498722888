"""One side of the two-process weight-sync test (run as a script by test_broadcast.py).

  trainer  PORT OUT: holds a tiny Qwen2 model, changes its weights twice, and after each change streams them as
                     flattened buckets over gloo (weight versions 1 and 2); saves what it sent as safetensors.
  receiver PORT OUT: an embedded engine with other weights; rebuilds each sync from the buckets, loads it, then
                     samples greedily and saves its completion, its log-probs and its weights per version.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen2Config

from raro_fast.rollout.embedded import EmbeddedEngine
from raro_fast.rollout.engine import SamplingParams
from raro_fast.weight_sync.broadcast import (broadcast_weights, channel_announce, close_channel, open_weight_group,
                                             serve_weight_updates)
from raro_fast.weight_sync.source import hf_named_tensors

PROMPT = [5, 9, 2, 33, 17, 8]


def tiny_model(seed):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


class RecordingEngine(EmbeddedEngine):
    def __init__(self, model, out: Path):
        super().__init__(model, pad_token_id=0, eos_token_ids=[1], decode=str, batch_size=4)
        self.out = out

    def update_weights(self, named_tensors, version):
        super().update_weights(named_tensors, version)
        (c,) = self.generate([PROMPT], SamplingParams(max_new_tokens=12, temperature=0.0))[0]
        (self.out / f"receiver_v{version}.json").write_text(json.dumps(
            {"token_ids": c.token_ids, "logprobs": c.logprobs, "weight_version": c.weight_version}))
        save_file({k: v.clone().contiguous() for k, v in self.model.state_dict().items()}, self.out / f"receiver_v{version}.safetensors")


def main(role: str, port: int, out: Path) -> None:
    group = open_weight_group(master_address="127.0.0.1", master_port=port, rank=0 if role == "trainer" else 1,
                              world_size=2, group_name="test_weights", backend="gloo", timeout_s=120)
    if role == "receiver":
        n = serve_weight_updates(group, RecordingEngine(tiny_model(seed=99), out))
        (out / "receiver_done.json").write_text(json.dumps({"syncs": n}))
        return
    model = tiny_model(seed=1)
    for version in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        sent = broadcast_weights(group, hf_named_tensors(model), group_name="test_weights", bucket_bytes=4096,
                                 announce=channel_announce(group), weight_version=version)
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, out / f"trainer_v{version}.safetensors")
        (out / f"trainer_v{version}.json").write_text(json.dumps({"bytes_sent": sent}))
    close_channel(group)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
