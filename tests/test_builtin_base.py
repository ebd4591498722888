"""The base the default job starts from: shipped in the package (`builtin:countdown-easy`), pinned byte for byte, the
embedded model's shape with the project's own tokenizer, and the default of `model.path`."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from raro_fast.config import EmbeddedModelConfig, load_config
from raro_fast.model.hf import BUILTIN_DIR, load_pretrained, load_project_tokenizer, resolve_model_path
from warm_train import run_train

SHA256 = "7942ba9361e27b8a756d3caa7b222fc3491c483dc718097076210aa2fe2388ea"  # the seed-0 base of docs/experiments.md


def test_the_default_job_starts_from_the_shipped_base_pinned_byte_for_byte():
    cfg = load_config([])
    assert cfg.model.path == "builtin:countdown-easy"
    path = Path(resolve_model_path(cfg.model.path, "model.path"))
    assert path == BUILTIN_DIR / "countdown-easy"
    assert hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() == SHA256
    assert "SHA-256" in (path / "README.md").read_text()  # its provenance travels with it


def test_the_shipped_base_is_the_embedded_model_with_the_projects_tokenizer():
    model, tokenizer = load_pretrained("builtin:countdown-easy", dtype=torch.float32)
    shape = EmbeddedModelConfig()
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (
        shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
    assert tokenizer.get_vocab() == load_project_tokenizer().get_vocab()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_shipped_base_names_a_tokenizer_class_that_transformers_4_has():
    """transformers 5 saves `TokenizersBackend`, which 4.x (the project supports >= 4.56) cannot load: the default
    job then stopped at start. Re-saving the base with 5.x must not bring it back."""
    config = json.loads((BUILTIN_DIR / "countdown-easy" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_an_unknown_builtin_name_lists_what_ships():
    with pytest.raises(ValueError, match=r"model.path: 'builtin:countdown-hard': no such built-in base; the package "
                                         r"ships builtin:countdown-easy"):
        resolve_model_path("builtin:countdown-hard", "model.path")


@pytest.mark.slow
def test_the_default_job_trains_from_the_shipped_base_without_a_warm_up(tmp_path):
    run = tmp_path / "run"
    out = run_train(["--train.steps", "1", "--train.eval_size", "4", "--train.progress", "false", "--train.output_dir",
                     str(run)], timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "format warm-up" not in out.stdout + out.stderr and not (run / "base_model").exists()
    assert json.loads((run / "config.json").read_text())["model"]["path"] == "builtin:countdown-easy"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and records[1]["batch/critic_sequences"] > 0


def test_building_a_tokenizer_never_overwrites_the_shipped_one(tmp_path):
    """A build learns from today's prompts and traces, so its ids differ from the shipped tokenizer's; run as the
    docstring said, it overwrote the shipped files and the shipped base read other tokens with no error."""
    from raro_fast.model import build_tokenizer

    shipped = (build_tokenizer.OUT_DIR / "tokenizer.json").read_bytes()
    with pytest.raises(SystemExit, match="holds the shipped tokenizer"):
        build_tokenizer.main([str(build_tokenizer.OUT_DIR / ".." / "tokenizer")])
    assert (build_tokenizer.OUT_DIR / "tokenizer.json").read_bytes() == shipped
    # nor a model's own: a shipped base (its copy here) read 122 of its 384 token ids as others after a build
    base = tmp_path / "base"
    shutil.copytree(build_tokenizer.OUT_DIR.parent / "bases" / "countdown-easy", base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    with pytest.raises(SystemExit, match=r"base already holds tokenizer.json, tokenizer_config.json, config.json"):
        build_tokenizer.main([str(base)])
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    build_tokenizer.main([str(tmp_path / "tok")])
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"  # a pad that ends nothing
    # What the module says a build gives: one token per digit (a merged "24" is an opaque symbol to the model's
    # arithmetic) and the reasoning and answer tags as single tokens.
    from tokenizers import Tokenizer

    built = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert built.encode("<think>1024-24</think><answer>13*2</answer>").tokens == [
        "<think>", "1", "0", "2", "4", "-", "2", "4", "</think>", "<answer>", "1", "3", "*", "2", "</answer>"]
    with pytest.raises(SystemExit, match="usage"):
        build_tokenizer.main([])
