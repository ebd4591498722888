"""A saved model or checkpoint gets the modes a plain write would (found by a newcomer's walk-through: mkdtemp's
0700 and safetensors' 0600 made model.safetensors, optimizer.safetensors and the RNG files private to their writer)."""
import os
import stat

import torch

from raro_fast.checkpoint import save_checkpoint
from raro_fast.distributed import Dist
from raro_fast.model.hf import build_embedded_model, load_project_tokenizer
from raro_fast.model.policy import PolicyModel


def test_a_checkpoint_and_its_model_are_readable_as_the_umask_says(tmp_path):
    tok = load_project_tokenizer()
    hf = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                              max_position=64, seed=0)
    model = PolicyModel(hf)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    old = os.umask(0o027)  # not the usual 022: the modes follow the umask, not a fixed 0644
    try:
        final = save_checkpoint(tmp_path, 1, model=model, hf_model=hf, tokenizer=tok, optimizer=optimizer,
                                trainer_state={"step": 1}, d=Dist(rank=0, world_size=1, local_rank=0,
                                                                  device=torch.device("cpu")))
    finally:
        os.umask(old)
    paths = [final, *final.rglob("*")]
    names = {p.name for p in paths}
    assert {"model.safetensors", "optimizer.safetensors", "rng_rank0.safetensors", "manifest.json"} <= names
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == (0o750 if p.is_dir() else 0o640), p
