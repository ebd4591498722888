"""A damaged model folder is refused with the setting, the path and the file at fault, never a traceback from
inside transformers or safetensors."""
import shutil
from pathlib import Path

import pytest
import torch

from raro_fast.model.hf import end_token_ids, load_pretrained


@pytest.fixture(scope="module")
def saved(saved_embedded_model):
    return saved_embedded_model


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "model")


def test_an_intact_folder_loads(saved):
    model, tok = load_pretrained(str(saved), dtype=torch.float32)
    assert model.config.hidden_size == 32 and tok.pad_token_id is not None


def test_a_tokenizer_saved_to_split_special_tokens_still_reads_the_templates_markers_as_tokens(saved, tmp_path):
    """With split_special_tokens in tokenizer_config.json, every prompt's turn markers and every trained end token
    were read as characters (found by review): the model never learnt to stop."""
    import json

    from raro_fast import prompts

    _, plain = load_pretrained(str(saved), dtype=torch.float32)
    p = _copy(saved, tmp_path)
    config = json.loads((p / "tokenizer_config.json").read_text())
    (p / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": True}))
    _, tok = load_pretrained(str(p), dtype=torch.float32)
    messages = prompts.policy_messages("Using 3, 5 and 7, make 22.")
    assert prompts.render_prompt(tok, messages) == prompts.render_prompt(plain, messages)
    assert tok("x" + tok.eos_token, add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id


@pytest.mark.parametrize("turn_end_is_an_end_token", [True, False])
@pytest.mark.parametrize("variant", ["plain", "split_special_tokens", "newline first", "system first", "old eos undeclared"])
def test_the_eos_is_the_end_token_the_chat_template_ends_a_turn_with(saved, tmp_path, turn_end_is_an_end_token,
                                                                      variant):
    """A tokenizer whose EOS is not the token its template ends the assistant's turn with (Phi-3: `<|endoftext|>`
    and `<|end|>`; the first Llama-3-Instruct release: `<|end_of_text|>` and `<|eot_id|>`) had every SFT, DPO and
    rl_logit target end in a token the model never ends a turn with (found by review on 2026-12-07). The template's
    turn end is taken where the model counts it among its end tokens; otherwise nothing is guessed. Also (review)
    with a tokenizer saved to split special tokens, a template that writes a newline before the end token, and one
    that wants a system message first, as the trainer's prompts have. Generation still stops at the old EOS."""
    import json

    from raro_fast.modes.base import expert_completion_ids

    from transformers import AutoTokenizer

    p = _copy(saved, tmp_path)
    original = AutoTokenizer.from_pretrained(str(p))
    template = original.chat_template
    if variant == "newline first":
        template = template.replace("message['content'] + '<|im_end|>'", "message['content'] + '\\n<|im_end|>'")
    elif variant == "system first":
        template = ("{%- if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{%- endif %}"
                    + template)
    assert variant in ("plain", "split_special_tokens", "old eos undeclared") or template != original.chat_template
    original.chat_template, original.eos_token = template, "<|endoftext|>"
    original.save_pretrained(str(p))
    config = json.loads((p / "tokenizer_config.json").read_text())
    (p / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": variant == "split_special_tokens"}))
    generation = json.loads((p / "generation_config.json").read_text())
    ends = [2] if turn_end_is_an_end_token else [0]  # <|im_end|> (the template's turn end), <|endoftext|>
    if variant == "old eos undeclared":  # generation_config.json names no end (review: [None, 0] was saved)
        generation.pop("eos_token_id", None)
    else:
        generation["eos_token_id"] = ends
    (p / "generation_config.json").write_text(json.dumps(generation))
    model_config = json.loads((p / "config.json").read_text())
    # the old EOS declared by config.json, or only by the tokenizer (then generation is told to stop at it still)
    old_declared = 2 if variant == "old eos undeclared" and turn_end_is_an_end_token else 0
    (p / "config.json").write_text(json.dumps({**model_config, "eos_token_id": old_declared}))
    model, tok = load_pretrained(str(p), dtype=torch.float32)
    assert tok.convert_ids_to_tokens([0, 2]) == ["<|endoftext|>", "<|im_end|>"]
    want = "<|im_end|>" if turn_end_is_an_end_token else "<|endoftext|>"
    assert tok.eos_token == want
    assert expert_completion_ids(tok, "8+2")[-1] == tok.convert_tokens_to_ids(want)
    assert set(end_token_ids(model, tok)) == ({0, 2} if turn_end_is_an_end_token else {0})  # still stops at the old
    assert None not in (model.generation_config.eos_token_id or [])


def test_a_pad_or_end_token_past_the_models_embedding_rows_is_not_used(saved, tmp_path):
    """transformers gives a Qwen2 tokenizer that lacks `<|endoftext|>` that token one past the model's vocabulary,
    and it was kept as the pad: the first batched rollout stopped in an IndexError inside the embedding (a device
    assert on CUDA). Found by review on 2026-12-07: such a pad is passed over, and such an end token refused."""
    import json

    from transformers import AutoTokenizer

    p = _copy(saved, tmp_path)
    rows = json.loads((p / "config.json").read_text())["vocab_size"]
    tok = AutoTokenizer.from_pretrained(str(p))
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    assert tok.pad_token_id == rows  # one past the embedding
    tok.save_pretrained(str(p))
    _, loaded = load_pretrained(str(p), dtype=torch.float32)
    assert loaded.pad_token == "<|endoftext|>" and loaded.pad_token_id < rows
    generation = json.loads((p / "generation_config.json").read_text())
    # no other candidate (<|endoftext|> ends a turn here): the pad falls back to the EOS
    (p / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [0, 2]}))
    _, loaded = load_pretrained(str(p), dtype=torch.float32)
    assert loaded.pad_token_id == loaded.eos_token_id < rows
    (p / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [2, rows]}))
    with pytest.raises(ValueError, match=rf"model.path: .*: the end token '<\|pad\|>' \(id {rows}\) lies outside "
                                         rf"the model's {rows} embedding rows: its tokenizer or its end token ids"):
        load_pretrained(str(p), dtype=torch.float32)
    for bad in (-1, 10**6):  # no token to name (a negative id was an OverflowError naming it: review)
        (p / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [2, bad]}))
        with pytest.raises(ValueError, match=rf"model.path: .*: the end token \(id {bad}\) lies outside the model's"):
            load_pretrained(str(p), dtype=torch.float32)


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


def test_saving_over_a_model_replaces_it_whole_readable_by_all_and_a_failed_save_keeps_the_old_one(saved, tmp_path,
                                                                                                   monkeypatch):
    """A save replaces the folder whole (no file of the old one stays beside the new ones), leaves no temporary or
    old folder behind, gives the modes a plain write would (mkdtemp's 0700 and safetensors' 0600 once made a model
    private to its writer), and a save that fails leaves the model that was there."""
    import os
    import stat

    from raro_fast.model.hf import save_pretrained_atomic

    model, tok = load_pretrained(str(saved), dtype=torch.float32)
    out = tmp_path / "runs" / "model"
    umask = os.umask(0o022)
    try:
        save_pretrained_atomic(model, tok, out, extra_files={"note.txt": "first"})
        assert (out / "note.txt").read_text() == "first"
        with torch.no_grad():
            model.model.norm.weight.add_(0.5)
        save_pretrained_atomic(model, tok, out)
    finally:
        os.umask(umask)
    assert [p.name for p in out.parent.iterdir()] == ["model"] and not (out / "note.txt").exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
    saved_norm = model.model.norm.weight.detach().clone()
    assert torch.equal(load_pretrained(str(out), dtype=torch.float32)[0].model.norm.weight, saved_norm)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", fail)
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(model, tok, out)
    assert [p.name for p in out.parent.iterdir()] == ["model"]
    assert torch.equal(load_pretrained(str(out), dtype=torch.float32)[0].model.norm.weight, saved_norm)
    monkeypatch.undo()

    # A Ctrl-C between moving the old folder aside and the new one in left no model at all (the new one deleted,
    # the old one stranded in .model.old, which the next save deletes); found by review
    from raro_fast.model import hf

    real_replace, calls = os.replace, []

    def interrupted_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(hf.os, "replace", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_atomic(model, tok, out)
    monkeypatch.undo()
    assert len(calls) == 3 and [p.name for p in out.parent.iterdir()] == ["model"]  # the third put the old one back
    assert torch.equal(load_pretrained(str(out), dtype=torch.float32)[0].model.norm.weight, saved_norm)


def test_a_saved_model_is_on_disk_before_its_folder_is_renamed_into_place(saved, tmp_path, request):
    """A rename alone survives a process kill, not a power cut: final_model/ could be named before its files'
    contents reached the disk, and an empty model.safetensors be all that a finished run leaves."""
    import os

    from raro_fast.model.hf import save_pretrained_atomic

    model, tok = load_pretrained(str(saved), dtype=torch.float32)
    events = request.getfixturevalue("disk_events")
    out = tmp_path / "final_model"
    save_pretrained_atomic(model, tok, out)
    (renamed,) = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == os.path.realpath(out)]
    tmp = Path(events[renamed][1])
    synced = {e[1]: i for i, e in enumerate(events) if e[0] == "fsync"}
    written = [tmp / p.relative_to(out) for p in out.rglob("*")]
    assert len(written) >= 4 and [p for p in [*written, tmp] if not synced.get(str(p), renamed) < renamed] == []
    assert synced.get(os.path.realpath(tmp_path), -1) > renamed  # the rename itself, on disk


def test_a_filesystem_that_cannot_sync_a_folder_still_saves_and_one_that_cannot_sync_a_file_fails(saved, tmp_path,
                                                                                                   monkeypatch):
    """CIFS before Linux 4.17 and some FUSE filesystems answer EINVAL to a folder's fsync: a run there must still
    save its model (it lost final_model/ whole), while a file that cannot reach the disk is an error."""
    import errno
    import os
    import stat

    from raro_fast.model.hf import save_pretrained_atomic

    model, tok = load_pretrained(str(saved), dtype=torch.float32)
    real_fsync, refuse = os.fsync, {"folder": True, "file": False}

    def fsync(fd):
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        if refuse[kind]:
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save_pretrained_atomic(model, tok, tmp_path / "model")
    assert load_pretrained(str(tmp_path / "model"), dtype=torch.float32)[0].config.vocab_size == model.config.vocab_size
    refuse["file"] = True
    with pytest.raises(OSError, match="Invalid argument"):
        save_pretrained_atomic(model, tok, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_folder_whose_tokenizer_pads_with_its_end_token_loads_with_a_pad_that_ends_nothing(saved, tmp_path):
    """SmolLM2's and Qwen2.5's tokenizers pad with an end token: generation pads finished rows, and a pad read as a
    stop would be mistaken for the model's own output."""
    from raro_fast.model.hf import end_token_ids, save_pretrained_atomic

    model, tok = load_pretrained(str(saved), dtype=torch.float32)
    tok.pad_token = tok.eos_token
    save_pretrained_atomic(model, tok, tmp_path / "eos_pad")
    model, tok = load_pretrained(str(tmp_path / "eos_pad"), dtype=torch.float32)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id not in end_token_ids(model, tok)


def test_auto_precision_is_bfloat16_on_a_gpu_only():
    """A CPU computes bfloat16 slowly, or emulated, and the default job's numbers are float32 ones."""
    from raro_fast.model.hf import resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cuda")) == torch.float32


def test_the_engines_bf16_copy_keeps_the_rotary_frequencies_of_the_trainer(saved_embedded_model, tmp_path):
    """`.to(bfloat16)` also rounded the rotary embedding's inv_freq, a buffer no weight sync sends: on a GPU the
    engine sampled with other rotations than the trainer's (found by review). Its parameters are bf16, its buffers
    what from_pretrained(dtype=bf16) loads, its embeddings still tied; it samples with the bf16 model's own
    log-probs."""
    from raro_fast import train
    from raro_fast.config import load_config
    from raro_fast.distributed import Dist
    from raro_fast.model.hf import engine_copy

    args = ["--model.path", str(saved_embedded_model), "--model.dtype", "bfloat16", "--train.output_dir",
            str(tmp_path / "run"), "--task.countdown.num_train", "8", "--task.countdown.num_heldout", "2",
            "--train.progress", "false"]
    r = train.setup(load_config(args), Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    engine_model = r.engine.model
    loaded, _ = load_pretrained(str(saved_embedded_model), dtype=torch.bfloat16)
    buffers = dict(loaded.named_buffers())
    assert [n for n, _ in engine_model.named_buffers()] == list(buffers) and buffers
    for name, b in engine_model.named_buffers():
        assert b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]), name
    assert dict(r.hf_model.named_buffers())["model.rotary_emb.inv_freq"].dtype == torch.float32
    assert engine_model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in engine_model.parameters())
    assert engine_model.lm_head.weight is engine_model.model.embed_tokens.weight
    copied = engine_copy(r.hf_model, torch.device("cpu"), torch.bfloat16)
    for (name, p), (_, q) in zip(copied.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name  # the same bf16 numbers as a bf16 load


def test_weights_transformers_keeps_in_fp32_stay_fp32_in_the_engine_copy_and_the_sync():
    """DeepSeek-V3's MoE router (`_keep_in_fp32_modules_strict`) is fp32 at any dtype in transformers; the engine
    copy and the weight sync rounded it to bf16 (found by review). The rest is bf16, as before."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from raro_fast.model.hf import engine_copy
    from raro_fast.rollout.embedded import copy_weights_in_place
    from raro_fast.weight_sync.source import hf_named_tensors

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                           num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                           n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=None,
                           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    trainer = AutoModelForCausalLM.from_config(cfg)
    if not getattr(type(trainer), "_keep_in_fp32_modules_strict", None):
        pytest.skip("this transformers keeps no DeepSeek-V3 weight in fp32 (4.56 casts its router too)")
    with torch.no_grad():
        for p in trainer.parameters():
            p.normal_(0, 0.3)
    router = "model.layers.1.mlp.gate.weight"
    copy = engine_copy(trainer, torch.device("cpu"), torch.bfloat16)
    params = dict(copy.named_parameters())
    assert params[router].dtype == torch.float32 and torch.equal(params[router], dict(trainer.named_parameters())[router])
    assert params["model.layers.0.mlp.gate_proj.weight"].dtype == torch.bfloat16
    sent = dict(hf_named_tensors(trainer, dtype=torch.bfloat16))
    assert sent[router].dtype == torch.float32 and sent["model.embed_tokens.weight"].dtype == torch.bfloat16
    with torch.no_grad():
        trainer.get_parameter(router).add_(1e-3)  # a change bf16 would round away
    copy_weights_in_place(copy, hf_named_tensors(trainer, dtype=torch.bfloat16))
    assert torch.equal(dict(copy.named_parameters())[router], trainer.get_parameter(router))


def test_a_tied_config_with_a_head_of_its_own_in_the_file_is_refused(saved, tmp_path):
    """config.json ties the head to the embeddings, the file holds a different lm_head.weight: transformers loaded
    it untied, silently (the trainer trained a head the config says is not there; an engine following the config
    samples from another). Found by review on 2026-12-07."""
    import json

    p = _copy(saved, tmp_path)
    assert json.loads((p / "config.json").read_text()).get("tie_word_embeddings", True)
    _edit_weights(p, lambda sd: {**sd, "lm_head.weight": sd["model.embed_tokens.weight"] * 0.5})
    with pytest.raises(ValueError, match=r"holds an lm_head.weight of its own, but config.json ties the LM head"):
        load_pretrained(str(p), dtype=torch.float32)
    _edit_weights(p, lambda sd: {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()})
    load_pretrained(str(p), dtype=torch.float32)  # the same values under both names: one tied head, as saved


def _tokenizer_config(p, **changes):
    import json

    f = p / "tokenizer_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def test_a_tokenizer_without_an_end_token_takes_the_generation_configs_or_is_refused(saved, tmp_path):
    """Every expert answer and warm-up trace ends with the EOS: a tokenizer with none stopped the warm-up with a
    TypeError (found by review on 2026-12-07)."""
    import json

    from raro_fast.model.hf import end_token_ids

    p = _copy(saved, tmp_path)
    _tokenizer_config(p, eos_token=None)
    (p / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    model, tok = load_pretrained(str(p), dtype=torch.float32)
    assert tok.eos_token_id == 2 and end_token_ids(model, tok)[0] == 2 and tok.pad_token_id != 2
    (p / "generation_config.json").write_text("{}")
    config = json.loads((p / "config.json").read_text())
    (p / "config.json").write_text(json.dumps({**config, "eos_token_id": None}))
    with pytest.raises(ValueError, match=r"model.path: .*: neither its tokenizer \(eos_token\) nor its generation "
                                         r"config or config.json \(eos_token_id\) names the token that ends a turn"):
        load_pretrained(str(p), dtype=torch.float32)


def test_a_chat_template_that_refuses_the_trainers_prompts_is_named_at_load(saved, tmp_path):
    """Mistral-7B-Instruct v0.1's template allows user and assistant only; its TemplateError (no ValueError) came as
    a traceback at the first rollout (found by review on 2026-12-07)."""
    p = _copy(saved, tmp_path)
    (p / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    with pytest.raises(ValueError, match=r"model.path: .*: its chat template does not render the trainer's prompts, "
                                         r"a system message then a user message \(TemplateError: Conversation roles"):
        load_pretrained(str(p), dtype=torch.float32)
