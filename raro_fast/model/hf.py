"""Models and tokenizers in Hugging Face format: the embedded default (built from a config) and real checkpoints.

Both go through `AutoTokenizer` / `AutoModelForCausalLM` and safetensors, so every later stage treats a real
checkpoint directory and the embedded default the same way.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase,
                          Qwen2Config)

from raro_fast.durable import fsync_path

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
# Warmed-up bases shipped with the package, named `builtin:NAME` in model.path (see each folder's README.md).
BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "bases"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def resolve_device(spec: str, setting: str) -> torch.device:
    """`auto` (the GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`; errors name `setting`."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"{setting}: {spec!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{setting}: {spec!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting}: {spec!r} asked for, but this machine has no CUDA GPU")
    return device


def load_project_tokenizer() -> PreTrainedTokenizerBase:
    """The project's own tokenizer (byte-level BPE, shipped in the package; see raro_fast/model/build_tokenizer.py)."""
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def build_embedded_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position: int,
    seed: int,
) -> PreTrainedModel:
    """A small Qwen2 causal LM with random weights (same architecture family as Qwen2.5-Instruct)."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"model.embedded: hidden_size ({hidden_size}) must divide by num_heads ({num_heads}), "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 over a model's weight files (a directory's, names and bytes in name order; or one file, a GGUF):
    which model this is, whatever its path."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*")
                                                 if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ValueError(f"{path}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to identify the model by")
    h = hashlib.sha256()
    for f in files:
        h.update((f.name if f == root else f.relative_to(root).as_posix()).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


# Beside the weights, the files Hugging Face reads that change what a model samples: its architecture and numerics
# (config.json), end tokens and defaults (generation_config.json), and its tokenizer and chat template, which render
# the prompts (and decode the completions).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
               "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")
MODEL_FILE_SUFFIXES = (".tiktoken",)
# Keys of those JSON files that name where or by what they were written, not what the model does.
VOLATILE_JSON_KEYS = ("transformers_version", "_name_or_path", "name_or_path", "_commit_hash")


def model_files_digest(model_dir: str | os.PathLike) -> str:
    """SHA-256 over the model directory's files that are not weights but change what is sampled (`MODEL_FILES`,
    `MODEL_FILE_SUFFIXES`, the chat templates in additional_chat_templates/): the weights' digest alone served
    samples drawn under another config, tokenizer or chat template. A JSON file counts by its content without
    `VOLATILE_JSON_KEYS`, so saving the same model again (another transformers version) changes nothing."""
    root = Path(model_dir)
    files = [p for p in root.iterdir()
             if p.is_file() and (p.name in MODEL_FILES or p.name.endswith(MODEL_FILE_SUFFIXES))]
    if (root / "additional_chat_templates").is_dir():
        files += [p for p in (root / "additional_chat_templates").iterdir() if p.is_file()]
    h = hashlib.sha256()
    for f in sorted(files):
        data = f.read_bytes()
        if f.suffix == ".json" and f.name != "tokenizer.json":  # tokenizer.json: megabytes, and no such keys
            try:
                obj = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass  # the bytes, then
            else:
                if isinstance(obj, dict):
                    obj = {k: v for k, v in obj.items() if k not in VOLATILE_JSON_KEYS}
                data = json.dumps(obj, sort_keys=True).encode()
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def engine_copy(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """A copy of `model` for an in-process rollout engine: its parameters in `dtype` (but those transformers keeps
    in fp32: `kept_in_fp32`), its buffers as they are, as `from_pretrained(dtype=...)` loads them. `.to(dtype)` also
    rounded the rotary embedding's `inv_freq` to bf16, which no weight sync restores (it is not in the state dict):
    on GPU the engine sampled with other rotations than the trainer's, tripling the log-prob gap on the shipped base
    at 477 tokens, more for longer contexts."""
    import copy

    from raro_fast.weight_sync.source import kept_in_fp32

    out = copy.deepcopy(model).to(device)
    fp32 = kept_in_fp32(model, dtype)
    for name, p in out.named_parameters():  # a tied parameter is listed once, and stays one tensor
        if p.is_floating_point() and not fp32(name):
            p.data = p.data.to(dtype)
    return out


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a turn: the tokenizer's EOS first, then the generation config's `eos_token_id` (an int
    or a list: Qwen2.5-Instruct ends on <|im_end|> or <|endoftext|>), then config.json's. SGLang stops at
    config.json's EOS whatever it is asked (found by review, 0.5.23), so the in-process engines stop there too:
    otherwise one model's rollouts would end at other tokens on another backend."""
    ids = [tokenizer.eos_token_id]
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        extra = getattr(source, "eos_token_id", None)
        ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


# Names tokenizers use for a padding token of their own; the first one present that does not end a turn is taken.
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")


def choose_pad_token(tokenizer: PreTrainedTokenizerBase, end_ids: list[int], rows: int | None = None) -> None:
    """Give `tokenizer` a pad token that is not an end token where its vocabulary has one (SmolLM2 and Qwen2.5 pad
    with an end token), else the EOS: generation pads finished rows, and a pad that reads as a stop or as text must
    never be mistaken for the model's own output. Only ids below `rows` (the model's embedding rows) are taken:
    transformers gives a Qwen2 tokenizer that lacks `<|endoftext|>` one past the model's vocabulary (review)."""
    embeddable = lambda i: rows is None or i < rows  # noqa: E731
    pad = tokenizer.pad_token_id
    if pad is not None and pad not in end_ids and embeddable(pad):
        return
    vocab = tokenizer.get_vocab()
    for name in _PAD_CANDIDATES:
        if name in vocab and vocab[name] not in end_ids and embeddable(vocab[name]):
            tokenizer.pad_token = name
            return
    if tokenizer.pad_token_id is None or not embeddable(tokenizer.pad_token_id):
        tokenizer.pad_token = tokenizer.eos_token


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path: str | os.PathLike, setting: str) -> str:
    """A local directory as given; `builtin:NAME`, a base shipped with the package; otherwise a hub id
    (`Qwen/Qwen2.5-1.5B-Instruct`) resolved through huggingface_hub's cache, downloading its safetensors, config and
    tokenizer files unless HF_HUB_OFFLINE is set."""
    path = os.fspath(path)
    if path.startswith(BUILTIN_PREFIX):
        name = path.removeprefix(BUILTIN_PREFIX)
        shipped = sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file())
        if name not in shipped:
            raise ValueError(f"{setting}: {path!r}: no such built-in base; the package ships "
                             f"{', '.join(BUILTIN_PREFIX + n for n in shipped)}")
        return str(BUILTIN_DIR / name)
    if Path(path).exists() or not HUB_ID.match(path):
        return path
    folder = path.split("/", 1)[0]
    if Path(folder).is_dir():  # `runs/bsae`, a typo: downloading a stranger's model of that name would train on it
        raise ValueError(f"{setting}: {path!r}: no such directory (the folder {folder!r} is here, so it is not read as "
                         "a hub id; run from another folder to load that hub model)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:  # transformers depends on it; a broken install is the only way here
        raise ValueError(f"{setting}: {path!r} is not a directory, and huggingface_hub (to resolve it as a hub id) "
                         "is not installed") from None
    try:
        return snapshot_download(path, allow_patterns=_HUB_FILES)
    except LocalEntryNotFoundError:
        raise ValueError(f"{setting}: {path!r} is neither a directory nor a model in the Hugging Face cache "
                         f"({_hub_cache()}), and it cannot be downloaded here (offline, or no network); download it "
                         "on a machine with network (`hf download` it) or give a model directory") from None
    except (HFValidationError, OSError) as e:
        raise ValueError(f"{setting}: {path!r} is not a directory and does not resolve as a hub id "
                         f"({type(e).__name__}: {e})") from None


_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype,
                    setting: str = "model.path") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model directory in Hugging Face format (or a hub id, see `resolve_model_path`). Every error names
    `setting` (the option that gave the path, or what the folder is), the path, and the file at fault: never a
    traceback from inside transformers."""
    path = resolve_model_path(path, setting)
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{setting}: {path!r} is not a directory (expected a Hugging Face model directory)")
    config = p / "config.json"
    if not config.is_file():
        raise ValueError(f"{setting}: {path!r} has no config.json (not a Hugging Face model directory)")
    try:
        raw = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{setting}: {config} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{setting}: {config} is not a model configuration: it holds a JSON {type(raw).__name__}, "
                         "not an object of settings")
    generation = p / "generation_config.json"
    if generation.is_file():  # transformers falls back to defaults on a broken one, silently losing its end tokens
        try:
            if not isinstance(json.loads(generation.read_text()), dict):
                raise ValueError("not a JSON object")
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{setting}: {generation} is not a generation configuration ({e}); it names the "
                             "tokens that end a turn, so it is not skipped") from None
    try:  # before the tokenizer, which reads config.json too (transformers 5 checks each field's type there)
        model_config = AutoConfig.from_pretrained(path)
    except _CONFIG_ERRORS as e:
        raise ValueError(f"{setting}: {config} does not describe a model transformers can build "
                         f"({type(e).__name__}: {_first_lines(e)})") from None
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{setting}: {path!r} has no *.safetensors weights (pickled weights are not loaded)")
    for w in weights:
        _check_safetensors(w, setting)
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"{setting}: {path!r} has no tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); "
                         "save the tokenizer with the model (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError, json.JSONDecodeError) as e:
        # Only once it failed is tokenizer.json parsed here (a real one is megabytes): transformers 4.x reports a
        # broken one as a missing protobuf library, so the file and the place in it are named instead.
        try:
            if (p / "tokenizer.json").is_file():
                json.loads((p / "tokenizer.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as bad:
            raise ValueError(f"{setting}: {p / 'tokenizer.json'} is not valid JSON, its tokenizer does not load "
                             f"({bad})") from None
        raise ValueError(f"{setting}: {path!r}: its tokenizer does not load ({type(e).__name__}: {e})") from None
    try:
        # ignore_mismatched_sizes: transformers then lists the tensors of another shape (raised below, by name)
        # instead of raising a RuntimeError that only refers to the log.
        model, info = AutoModelForCausalLM.from_pretrained(path, config=model_config, dtype=dtype,
                                                           attn_implementation="sdpa", use_safetensors=True,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{setting}: {path!r}: the model does not load ({type(e).__name__}: {e})") from None
    except (TypeError, RuntimeError, *_CONFIG_ERRORS) as e:
        # a field of the wrong type (transformers 4.x builds the model before noticing) or a tensor of another shape
        raise ValueError(f"{setting}: {config} and {_weights_label(weights)}: the model does not build from that "
                         f"config, or its weights do not fit it ({type(e).__name__}: {_first_lines(e)})") from None
    _check_all_weights_loaded(model, info, weights, setting)
    _check_tied_head(model, weights, setting)
    # Saved with split_special_tokens (a fine-tuning tool's option), every call read "<|im_end|>" as characters:
    # each prompt's turn markers and each trained end token became text, and the model never learnt to stop (found
    # by review). The text encoded here is the chat template's and the traces'; their markers are tokens.
    tokenizer.split_special_tokens = False
    _check_end_token(model, tokenizer, path, setting)
    _check_chat_template(tokenizer, path, setting)
    _end_turns_as_the_template_does(model, tokenizer)
    ends = end_token_ids(model, tokenizer)
    rows = model.get_input_embeddings().num_embeddings
    choose_pad_token(tokenizer, ends, rows)
    for what, ids in (("the end token", ends), ("the pad token", [tokenizer.pad_token_id])):
        for i in ids:
            if not 0 <= i < rows:  # an IndexError inside the embedding at the first rollout, or a CUDA assert
                name = f"{tokenizer.convert_ids_to_tokens(i)!r} " if 0 <= i < len(tokenizer) else ""
                raise ValueError(f"{setting}: {path!r}: {what} {name}(id {i}) lies outside the model's {rows} "
                                 "embedding rows: its tokenizer or its end token ids (generation_config.json, "
                                 "config.json) are not the model's")
    return model, tokenizer


def _check_end_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str, setting: str) -> None:
    """A tokenizer with no EOS takes the first end token its generation config (or config.json) names: the
    trainer ends every expert answer and warm-up trace with the EOS (found by review: a TypeError in the warm-up).
    With none anywhere, the model cannot say it has finished: refused."""
    if tokenizer.eos_token is not None:
        return
    ends = end_token_ids(model, tokenizer)
    if not ends:
        raise ValueError(f"{setting}: {path!r}: neither its tokenizer (eos_token) nor its generation config or "
                         "config.json (eos_token_id) names the token that ends a turn")
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ends[0])


def _check_chat_template(tokenizer: PreTrainedTokenizerBase, path: str, setting: str) -> None:
    """The trainer's prompts are a system message and a user message through the tokenizer's chat template. A
    template that refuses a system role (Mistral-7B-Instruct v0.1/v0.2) raised jinja2's TemplateError at the first
    rollout, a traceback after the model loaded (found by review). A tokenizer with no template loads (a model
    converted to be checked, or given one later); rendering a prompt then says so."""
    from raro_fast import prompts

    if getattr(tokenizer, "chat_template", None) is None:  # a converted or base model: refused where it samples
        return
    try:
        prompts.render_prompt(tokenizer, prompts.policy_messages("1 2 3"))
    except Exception as e:  # jinja2's TemplateError (a template's raise_exception) is no ValueError
        raise ValueError(f"{setting}: {path!r}: its chat template does not render the trainer's prompts, a system "
                         f"message then a user message ({type(e).__name__}: {_first_lines(e)})") from None


def _end_turns_as_the_template_does(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Every expert target and warm-up trace ends with the tokenizer's EOS. Where the chat template ends the
    assistant's turn with another of the model's end tokens (Phi-3's `<|end|>` beside `<|endoftext|>`, the first
    Llama-3-Instruct release's `<|eot_id|>` beside `<|end_of_text|>`), SFT taught an end the model never writes,
    DPO's chosen answers ended otherwise than its sampled rejected ones, and rl_logit scored the other token (found
    by review). The EOS becomes the token the template writes after an assistant's message (past whitespace), where
    that is one of the model's end tokens (so the saved model's tokenizer says so too), and generation still stops at
    the old one; it is left alone otherwise."""
    from raro_fast import prompts

    if getattr(tokenizer, "chat_template", None) is None:
        return
    turns = [*prompts.policy_messages("\ue000"), {"role": "assistant", "content": "\ue001"}]  # as the trainer's
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that wants other turns: the trainer never renders an answer
        return
    _, found, after = text.partition("\ue001")
    ids = tokenizer(after.lstrip(), add_special_tokens=False)["input_ids"] if found else []
    old = tokenizer.eos_token_id
    if not ids or ids[0] == old or ids[0] not in end_token_ids(model, tokenizer):
        return
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ids[0])
    generation = getattr(model, "generation_config", None)
    if old is not None and generation is not None and old not in end_token_ids(model, tokenizer):
        declared = generation.eos_token_id  # None where only config.json names the end (review: [None, 0] was saved)
        declared = [] if declared is None else list(declared) if isinstance(declared, (list, tuple)) else [declared]
        generation.eos_token_id = [*declared, old]


def _check_tied_head(model: PreTrainedModel, weights: list[Path], setting: str) -> None:
    """A config that ties the LM head to the embeddings, with a different lm_head.weight in the file: transformers
    5 loaded it untied and 4.x dropped it, both silently (the trainer trained a head the config says is not there,
    or not the file's). Read from the file, so both are caught. Found by review."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or head is None or embed is None:
        return
    # By module: tied, both weights are one parameter, and its names cannot tell which is the head.
    modules = dict((id(m), n) for n, m in model.named_modules(remove_duplicate=False))
    head_name, embed_name = (f"{modules[id(m)]}.weight" if id(m) in modules else None for m in (head, embed))
    where = {}
    for f in weights:
        with safe_open(str(f), framework="pt") as fh:
            where.update({name: f for name in (head_name, embed_name) if name in fh.keys()})
    if head_name not in where or embed_name not in where:  # the usual tied file: no head of its own, nothing read
        return
    stored = {}
    for name in (head_name, embed_name):
        with safe_open(str(where[name]), framework="pt") as fh:
            stored[name] = fh.get_tensor(name)
    if not torch.equal(stored[head_name], stored[embed_name]):
        raise ValueError(f"{setting}: {_weights_label(weights)} holds an lm_head.weight of its own, but config.json "
                         "ties the LM head to the input embeddings (tie_word_embeddings true); set it to false to train "
                         "that head, or remove lm_head.weight from the file to train the tied one")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

try:  # huggingface_hub >= 1.0 (transformers 5) validates config fields with it; 0.x has no such class
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    StrictDataclassError = ValueError
_CONFIG_ERRORS = (ValueError, TypeError, KeyError, OSError, StrictDataclassError)


def _first_lines(e: BaseException, n: int = 3) -> str:
    return " ".join(str(e).strip().splitlines()[:n])


def _weights_label(weights: list[Path]) -> str:
    return str(weights[0]) if len(weights) == 1 else f"{weights[0].parent}/*.safetensors ({len(weights)} files)"


def _listed(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _check_all_weights_loaded(model: PreTrainedModel, info: dict, weights: list[Path], setting: str) -> None:
    """transformers loads a checkpoint whose tensors are missing, misnamed or of another shape, leaving those weights
    random, and only logs it: refused here. Missing keys the model expects to miss are ignored: aliases of a tied
    weight that did load (lm_head.weight under tie_word_embeddings), the class's `_keys_to_ignore_on_load_missing`,
    rotary inv_freq buffers; so are unexpected keys its `_keys_to_ignore_on_load_unexpected` names."""
    def patterns(attr: str) -> list[re.Pattern]:
        return [re.compile(p) for p in (getattr(model, attr, None) or ())] + [re.compile(r"rotary_emb\.inv_freq")]

    tensors: dict[str, torch.Tensor] = {**dict(model.named_parameters(remove_duplicate=False)),
                                        **dict(model.named_buffers(remove_duplicate=False))}
    missing_set = set(info.get("missing_keys") or ())
    skip_missing = patterns("_keys_to_ignore_on_load_missing")

    def expected_missing(key: str) -> bool:
        if any(p.search(key) for p in skip_missing):
            return True
        t = tensors.get(key)
        return t is not None and any(  # tied: the same tensor loaded under another name
            other not in missing_set and (u is t or (u.data_ptr() == t.data_ptr() != 0 and u.shape == t.shape))
            for other, u in tensors.items() if other != key)

    missing = [k for k in missing_set if not expected_missing(k)]
    skip_unexpected = patterns("_keys_to_ignore_on_load_unexpected")
    unexpected = [k for k in info.get("unexpected_keys") or () if not any(p.search(k) for p in skip_unexpected)]
    mismatched = [f"{m[0]} (file {list(m[1])}, model {list(m[2])})" if isinstance(m, (tuple, list)) and len(m) == 3
                  else str(m) for m in info.get("mismatched_keys") or ()]
    errors = [_first_lines(Exception(e), 1) for e in info.get("error_msgs") or ()]
    problems = [f"{len(keys)} {what}: {_listed(keys)}" for what, keys in (
        ("missing (the model would keep random weights there)", missing),
        ("not in the model (misnamed?)", unexpected),
        ("of another shape than config.json describes", mismatched),
        ("errors", errors)) if keys]
    if problems:
        raise ValueError(f"{setting}: {_weights_label(weights)} does not hold the weights of the model its "
                         f"config.json describes; tensors {'; '.join(problems)}")


def _check_safetensors(path: Path, setting: str) -> None:
    """safetensors' own header check (a truncated file's header no longer covers it), named with the setting."""
    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as e:
        raise ValueError(f"{setting}: {path} is truncated or damaged, not a readable safetensors file ({e})") from None


def save_pretrained_atomic(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write model + tokenizer in HF format (safetensors), and `extra_files` (name: text), to a temporary folder,
    sync it to disk, then rename it into place. A link to a folder is saved into the folder it names (the link
    was replaced by a folder of its own: the model landed beside the link, not on the disk it pointed to)."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_killed_save(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        with_umask_modes(tmp)
        fsync_tree(tmp)
        _replace_dir(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def with_umask_modes(folder: Path) -> None:
    """The modes a plain write would give `folder` and everything in it (0644/0755 under the usual umask 022).
    mkdtemp makes a folder 0700, and safetensors (0.8) writes its files 0600: renamed into place, a model or a
    checkpoint was private to its writer (a teammate on a shared cluster could not read it)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder`, and `folder` itself, on disk: after a power cut a rename alone could
    name files whose contents never reached the disk."""
    for p in [*folder.rglob("*"), folder]:
        fsync_path(p)


def _recover_killed_save(path: Path) -> None:
    """What a save of `path` killed midway left (found by review): between its two renames, the previous folder
    only at `.NAME.old` (taken back: it is the last whole one), and its temporary folders `.NAME.XXXXXXXX`, a whole
    model's size each, that no later save named again."""
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir() and not old.is_symlink():
        os.replace(old, path)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if re.fullmatch(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}", leftover.name) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _remove_old(old: Path) -> None:
    """A previous save's leftover: a folder, or a link (a symlinked folder saved over is moved aside as the link;
    rmtree cannot remove one, and the next save stopped in NotADirectoryError: found by review)."""
    if old.is_symlink() or old.is_file():
        old.unlink()
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst` so that a reader sees either the old or the new one, never a mix."""
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old")
        _remove_old(old)
        try:
            os.replace(dst, old)
            os.replace(src, dst)
        except BaseException:  # a Ctrl-C between the two left neither at dst, and the caller deleted the new one
            if (old.exists() or old.is_symlink()) and not dst.exists():
                os.replace(old, dst)
            raise
        _remove_old(old)
    else:
        os.replace(src, dst)
