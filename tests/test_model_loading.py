"""A damaged model folder is refused with the setting, the path and the file at fault, never a traceback from
inside transformers or safetensors."""
import shutil

import pytest
import torch

from raro_fast.model.hf import load_pretrained


@pytest.fixture(scope="module")
def saved(saved_embedded_model):
    return saved_embedded_model


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "model")


def test_an_intact_folder_loads(saved):
    model, tok = load_pretrained(str(saved), dtype=torch.float32)
    assert model.config.hidden_size == 32 and tok.pad_token_id is not None


def test_invalid_config_json_is_named(saved, tmp_path):
    p = _copy(saved, tmp_path)
    (p / "config.json").write_text('{"model_type": "qwen2",')
    with pytest.raises(ValueError, match=r"eval.model: .*config.json is not valid JSON"):
        load_pretrained(str(p), dtype=torch.float32, setting="eval.model")


def test_truncated_weights_are_named(saved, tmp_path):
    p = _copy(saved, tmp_path)
    w = p / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.path: .*model.safetensors is truncated or damaged"):
        load_pretrained(str(p), dtype=torch.float32)
    w.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or damaged, not a readable safetensors file"):
        load_pretrained(str(p), dtype=torch.float32)


def test_a_folder_without_tokenizer_files_is_named(saved, tmp_path):
    p = _copy(saved, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (p / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"analysis.models \(base\): .* has no tokenizer files"):
        load_pretrained(str(p), dtype=torch.float32, setting="analysis.models (base)")


def test_a_damaged_tokenizer_is_named(saved, tmp_path):
    p = _copy(saved, tmp_path)
    (p / "tokenizer.json").write_text("{broken")
    # The file and the place in it, on every transformers (4.x reported a missing protobuf library instead).
    with pytest.raises(ValueError, match=r"model.path: .*tokenizer\.json is not valid JSON, its tokenizer does not "
                                         r"load \(.*line 1 column 2"):
        load_pretrained(str(p), dtype=torch.float32)
