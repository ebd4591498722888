"""convert-gguf on tiny Llama GGUF files written here (tests/tiny_gguf.py): a faithful file converts exactly, and a
file transformers would read wrong without a word (a tensor missing, scaled rotary positions) is refused."""
import pytest
import torch

from raro_fast.model import gguf
from raro_fast.model.hf import load_pretrained

pytestmark = pytest.mark.skipif(gguf.gguf_unavailable() is not None, reason=str(gguf.gguf_unavailable()))


@pytest.fixture(scope="module")
def reference():
    from tiny_gguf import tiny_llama

    return tiny_llama(seed=5, tied=False)


def _write(reference, tmp_path, **kw):
    from tiny_gguf import write_gguf

    return write_gguf(reference, tmp_path / "tiny.gguf", **kw)


def test_a_faithful_file_converts_to_the_same_model(reference, tmp_path):
    out = gguf.convert_gguf(_write(reference, tmp_path), tmp_path / "out")
    model, tok = load_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([tok.encode("Using 3, 4 and 2, make 10.")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_tensor_the_file_lacks_is_refused_naming_it(reference, tmp_path):
    """transformers filled it with random values (reported only in its loading info): the file without one layer's
    MLP converted "successfully" (found by review)."""
    with pytest.raises(ValueError, match=r"tiny.gguf: its tensors do not fill the llama model .*not in the file: "
                                         r"\['model.layers.1.mlp.down_proj.weight'\]"):
        gguf.convert_gguf(_write(reference, tmp_path, drop={"blk.1.ffn_down.weight"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_scaled_rotary_positions_transformers_does_not_read_are_refused(reference, tmp_path):
    """transformers reads no `llama.rope.scaling.*` key and drops `rope_freqs.weight` (Llama 3.1's scaling): the
    converted model had plain rotary positions (found by review: 4.5e-3 in log-probs on this tiny model)."""
    import numpy as np
    from gguf import RopeScalingType

    def linear(w):
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    with pytest.raises(ValueError, match=r"declares scaled rotary positions \({'type': 'linear', 'factor': 4.0}\), "
                                         r"which transformers' GGUF reader does not read"):
        gguf.convert_gguf(_write(reference, tmp_path, extra=linear), tmp_path / "out")
    freqs = {"rope_freqs.weight": np.linspace(1, 8, 8).astype(np.float32)}
    with pytest.raises(ValueError, match=r"it holds rope_freqs.weight"):
        gguf.convert_gguf(_write(reference, tmp_path, extra_tensors=freqs), tmp_path / "out")

    def unscaled(w):
        w.add_rope_scaling_type(RopeScalingType.NONE)
        w.add_rope_scaling_factor(1.0)

    assert gguf.convert_gguf(_write(reference, tmp_path, extra=unscaled), tmp_path / "out").is_dir()


def test_a_supported_architecture_is_not_blamed_for_another_failure(reference, tmp_path):
    """Every failure used to end 'its architecture (llama) must be one transformers supports', llama included."""
    with pytest.raises(ValueError, match="Cannot build a tokenizer") as e:
        gguf.convert_gguf(_write(reference, tmp_path, tokenizer=False), tmp_path / "out")
    assert "its architecture" not in str(e.value)


def _split(tokenizer, text):
    return [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_the_tokenizer_splits_text_as_the_file_names(reference, tmp_path):
    """transformers reads `tokenizer.ggml.pre = smollm` (SmolLM2's: each digit split off first) as GPT-2's split, so
    a blank line or two spaces before a number became other tokens than the model was trained on (found by review).
    A name neither transformers nor raro-fast knows is refused."""
    _, smollm = gguf.load_gguf(_write(reference, tmp_path, pre="smollm"))
    assert _split(smollm, "Answer:\n\n42 x  12") == ["Answer", ":", "ĊĊ", "4", "2", "Ġx", "ĠĠ", "1", "2"]
    out = gguf.convert_gguf(_write(reference, tmp_path, pre="smollm"), tmp_path / "out")
    _, saved = load_pretrained(out, dtype=torch.float32)
    assert _split(saved, "Answer:\n\n42") == ["Answer", ":", "ĊĊ", "4", "2"]  # and so it is saved
    _, minerva = gguf.load_gguf(_write(reference, tmp_path, pre="minerva-7b"))  # llama.cpp's name for it
    assert _split(minerva, "Answer:\n\n42") == ["Answer", ":", "ĊĊ", "4", "2"]
    _, gpt2 = gguf.load_gguf(_write(reference, tmp_path, pre="default"))
    assert _split(gpt2, "Answer:\n\n42") == ["Answer", ":", "Ċ", "Ċ", "42"]
    with pytest.raises(ValueError, match=r"tiny.gguf: its tokenizer splits text as 'mystery' \(tokenizer.ggml.pre\)"):
        gguf.convert_gguf(_write(reference, tmp_path, pre="mystery"), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_a_tensor_of_another_shape_is_refused_naming_it(reference, tmp_path):
    """transformers raised its own RuntimeError ("You set `ignore_mismatched_sizes` to `False`") from deep inside,
    past the check that names the tensor (found by review)."""
    with pytest.raises(ValueError, match=r"tiny.gguf: its tensors do not fill .*of another shape: "
                                         r"\[.*model.layers.0.mlp.up_proj.weight"):
        gguf.convert_gguf(_write(reference, tmp_path, transform={"blk.0.ffn_up.weight": lambda a: a.T.copy()}),
                          tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_out_dir_that_cannot_be_written_is_refused_before_the_file_is_read(tmp_path, capsys):
    """It failed after the minutes of reading the GGUF, in a PermissionError traceback (found by review)."""
    src = tmp_path / "never-read.gguf"
    src.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"/proc/raro_out: cannot write beside it in /proc"):
        gguf.convert_gguf(src, "/proc/raro_out")
    assert gguf.main([str(src), "/proc/raro_out"]) == 2 and "cannot write beside it" in capsys.readouterr().err
    # the probe makes no folder: a conversion refused for its file leaves none behind (review of the probe)
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf.convert_gguf(src, tmp_path / "new" / "a" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["never-read.gguf"]


def test_a_linked_out_dir_is_converted_into_the_folder_it_names_again_and_again(reference, tmp_path):
    """The link was replaced by a folder beside it (not on the disk it named), and its leftover `.link.old` made the
    next conversion a NotADirectoryError (found by review)."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "model")
    src = _write(reference, tmp_path)
    for _ in range(2):
        gguf.convert_gguf(src, tmp_path / "link")
        assert (tmp_path / "link").is_symlink() and (tmp_path / "disk" / "model" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "link", "tiny.gguf"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["model"]
    (tmp_path / "disk" / ".model.old").write_text("a stray file where a save moves the old folder aside")
    gguf.convert_gguf(src, tmp_path / "link")
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["model"]
    load_pretrained(tmp_path / "link", dtype=torch.float32)


def test_a_linked_out_dir_is_probed_where_the_link_points(tmp_path):
    """The output is written beside the folder a link names: a link in a writable folder to one that takes no file
    is refused before the file is read (and a link to a writable folder from anywhere is accepted)."""
    src = tmp_path / "never-read.gguf"
    src.write_bytes(b"not read")
    (tmp_path / "link").symlink_to("/proc/raro_out")
    with pytest.raises(ValueError, match=r"link: cannot write beside it in /proc"):
        gguf.convert_gguf(src, tmp_path / "link")
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "link").symlink_to(tmp_path / "disk" / "model")
    gguf.check_out_dir(tmp_path / "disk" / "link")
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["link"]
