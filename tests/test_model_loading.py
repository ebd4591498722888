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


def _edit_weights(p, edit):
    from safetensors.torch import load_file, save_file

    w = p / "model.safetensors"
    save_file(edit(load_file(str(w))), str(w), metadata={"format": "pt"})


def test_missing_or_misnamed_tensors_are_refused_not_left_random(saved, tmp_path):
    """transformers loads such a folder, leaving the weights it did not find random, and only logs it."""
    p = _copy(saved, tmp_path)
    _edit_weights(p, lambda sd: {k: v for k, v in sd.items() if k != "model.layers.0.mlp.down_proj.weight"})
    with pytest.raises(ValueError, match=r"model.path: .*model\.safetensors does not hold the weights of the model its "
                                         r"config\.json describes; tensors 1 missing .*: "
                                         r"model\.layers\.0\.mlp\.down_proj\.weight$"):
        load_pretrained(str(p), dtype=torch.float32)
    _edit_weights(p, lambda sd: {"lm." + k: v for k, v in sd.items()})
    with pytest.raises(ValueError, match=r"eval.model: .*model\.safetensors does not hold .* missing .*"
                                         r"model\.embed_tokens\.weight.*; \d+ not in the model \(misnamed\?\): "
                                         r".*lm\.model\."):
        load_pretrained(str(p), dtype=torch.float32, setting="eval.model")


def test_an_untied_head_saved_without_its_tensor_is_refused(saved, tmp_path):
    """Only a tied head may be missing from the file (it is the embedding under another name)."""
    import json

    p = _copy(saved, tmp_path)
    config = json.loads((p / "config.json").read_text())
    (p / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ValueError, match=r"tensors 1 missing .*: lm_head\.weight$"):
        load_pretrained(str(p), dtype=torch.float32)


def test_tensors_of_another_shape_than_the_config_says_are_named(saved, tmp_path):
    import json

    p = _copy(saved, tmp_path)
    config = json.loads((p / "config.json").read_text())
    (p / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"model.path: .*model\.safetensors does not hold .*; tensors 3 of another "
                                         r"shape than config\.json describes: "
                                         r"model\.layers\.0\.mlp\.down_proj\.weight"):
        load_pretrained(str(p), dtype=torch.float32)


@pytest.mark.parametrize("config, error", [
    ("[]", r"config\.json is not a model configuration: it holds a JSON list"),
    ('"qwen2"', r"config\.json is not a model configuration: it holds a JSON str"),
    ({"num_hidden_layers": "1"}, r"config\.json.*(Validation error for field 'num_hidden_layers'|'str' object "
                                 r"cannot be interpreted as an integer)"),
    ({"model_type": "nosuchmodel"}, r"config\.json does not describe a model transformers can build .*nosuchmodel"),
])
def test_a_config_json_of_the_wrong_shape_or_types_is_named(saved, tmp_path, config, error):
    import json

    p = _copy(saved, tmp_path)
    if isinstance(config, dict):
        config = json.dumps({**json.loads((p / "config.json").read_text()), **config})
    (p / "config.json").write_text(config)
    with pytest.raises(ValueError, match=r"analysis.models \(base\): .*" + error):
        load_pretrained(str(p), dtype=torch.float32, setting="analysis.models (base)")


@pytest.mark.parametrize("text, error", [("{\"eos_token_id\": [2, ", "Expecting value"),
                                         ("[2, 3]", "not a JSON object")])
def test_a_broken_generation_config_is_named_not_skipped(saved, tmp_path, text, error):
    # transformers logs and falls back to the defaults, and a model that ends turns on a second token (Qwen2.5's
    # <|endoftext|>, Llama 3's <|eot_id|>) would generate past it with no error.
    p = _copy(saved, tmp_path)
    (p / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=r"model.path: .*generation_config\.json is not a generation configuration "
                                         r"\(.*" + error):
        load_pretrained(str(p), dtype=torch.float32)
