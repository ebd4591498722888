"""The broadcast weight-sync path between two CPU processes over gloo: a trainer streams flattened buckets, a
receiver rebuilds the state dict into an embedded engine; afterwards the engine's weights are the trainer's bit for
bit and its sampled log-probs equal the trainer's recompute on the same tokens."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raro_fast.model.policy import PolicyModel
from raro_fast.weight_sync.source import hf_named_tensors, tied_names
from raro_kernels import linear_logprobs

WORKER = Path(__file__).with_name("gloo_worker.py")
sys.path.insert(0, str(WORKER.parent))
from gloo_worker import PROMPT, tiny_model  # noqa: E402


def test_gloo_broadcast_rebuilds_the_trainers_weights_in_an_embedded_engine(tmp_path, free_port):
    procs = [subprocess.Popen([sys.executable, str(WORKER), role, str(free_port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for role in ("trainer", "receiver")]
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            assert p.returncode == 0, out
    finally:
        for p in procs:
            p.kill()
    assert json.loads((tmp_path / "receiver_done.json").read_text()) == {"syncs": 2}

    for version in (1, 2):
        sent = load_file(tmp_path / f"trainer_v{version}.safetensors")
        got = load_file(tmp_path / f"receiver_v{version}.safetensors")
        assert sent.keys() == got.keys()
        for name in sent:
            assert torch.equal(sent[name], got[name]), name
        record = json.loads((tmp_path / f"receiver_v{version}.json").read_text())
        assert record["weight_version"] == version
        # the trainer's own recompute (final hidden states through raro_kernels) on the engine's tokens
        model = tiny_model(seed=0)
        model.load_state_dict(sent)
        policy = PolicyModel(model)
        ids = torch.tensor([PROMPT + record["token_ids"]])
        with torch.no_grad():
            hidden = policy.lm.model(input_ids=ids).last_hidden_state[0]
            lp = linear_logprobs(hidden[len(PROMPT) - 1 : -1], policy.lm.lm_head.weight, ids[0, len(PROMPT) :]).logprobs
        torch.testing.assert_close(lp, torch.tensor(record["logprobs"]), rtol=0, atol=2e-5)
    # the two versions really differ (so a stale engine would have been caught)
    assert not torch.equal(load_file(tmp_path / "trainer_v1.safetensors")["model.norm.weight"],
                           load_file(tmp_path / "trainer_v2.safetensors")["model.norm.weight"])
    # tied embeddings: lm_head is not sent, and the receiver still ends up with it equal to the embedding
    v2 = load_file(tmp_path / "receiver_v2.safetensors")
    assert torch.equal(v2["lm_head.weight"], v2["model.embed_tokens.weight"])


def test_hf_named_tensors_strips_the_wrapper_skips_tied_and_casts():
    model = tiny_model(seed=3)
    policy = PolicyModel(model)
    assert tied_names(policy) == {"lm_head.weight"}
    named = dict(hf_named_tensors(policy, dtype=torch.bfloat16))
    assert "lm_head.weight" not in named and "model.embed_tokens.weight" in named
    assert not any(n.startswith("lm.") for n in named)
    assert all(t.dtype == torch.bfloat16 for t in named.values())
    assert torch.equal(named["model.norm.weight"], model.model.norm.weight.to(torch.bfloat16))
    full = dict(hf_named_tensors(policy, skip_tied=False))
    assert "lm_head.weight" in full and full["model.norm.weight"].dtype == torch.float32


def test_one_bucket_request_in_flight_at_a_time_and_the_next_gathered_meanwhile(monkeypatch):
    """Found by review: bucket k+1 was announced as soon as bucket k's broadcast was issued, so two requests were in
    flight over separate connections. An NCCL broadcast returns before the data moved, so a server that took k+1's
    request first read k's bytes under k+1's names (silently, for buckets of one size). Now each request is
    announced after the previous one was answered, and the next bucket is gathered while the receiver loads."""
    from raro_fast.weight_sync import broadcast

    events = []
    monkeypatch.setattr(broadcast, "_broadcast", lambda group, flat, answered=None: events.append(f"broadcast {flat.numel()}"))

    def tensors():
        for i in range(4):
            events.append(f"gather {i}")
            yield f"w{i}", torch.full((4,), float(i))  # 16 bytes: one bucket each

    def announce(body):
        name = body["names"][0]
        events.append(f"announce {name}")
        return lambda timeout=None: events.append(f"loaded {name}")

    sent = broadcast.broadcast_weights(None, tensors(), group_name="g", bucket_bytes=16, announce=announce,
                                       weight_version=3)
    assert sent == 64
    announced = [e for e in events if e.startswith(("announce", "loaded"))]
    assert announced == [x for i in range(4) for x in (f"announce w{i}", f"loaded w{i}")]  # never two in flight
    # the next bucket's tensors are gathered before the receiver's answer for the current one is waited for
    assert events.index("gather 2") < events.index("loaded w1")


def test_only_the_last_bucket_flushes_the_cache_and_carries_the_weight_version(monkeypatch):
    """The receiver loads a sync when the flushing bucket arrives and takes its version from it: a flush or a
    version on an earlier bucket would have an engine sample from, and report, a half-updated model."""
    from raro_fast.weight_sync import broadcast

    monkeypatch.setattr(broadcast, "_broadcast", lambda group, flat, answered=None: None)
    bodies = []

    def announce(body):
        bodies.append(body)
        return lambda timeout=None: None

    named = [(f"w{i}", torch.full((4,), float(i) + 0.5)) for i in range(3)]  # 16 bytes: one bucket each
    broadcast.broadcast_weights(None, named, group_name="g", bucket_bytes=16, announce=announce, weight_version=9)
    assert [b["names"] for b in bodies] == [["w0"], ["w1"], ["w2"]]
    assert [b["flush_cache"] for b in bodies] == [False, False, True]
    assert [b.get("weight_version") for b in bodies] == [None, None, "9"]


def test_hf_named_tensors_sends_an_untied_lm_head_and_leaves_integer_tensors_uncast():
    """Only a tied lm_head is left out (an untied one left out would leave an SGLang engine on its old head, with
    no error); the cast to the engine's dtype is for floating tensors only (an integer buffer keeps its values)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(4)
    cfg = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg)
    model.model.register_buffer("counts", torch.tensor([3, 70001, -5]))  # 70001 is not a bfloat16 value
    policy = PolicyModel(model)
    assert tied_names(policy) == set()
    named = dict(hf_named_tensors(policy, dtype=torch.bfloat16))
    assert torch.equal(named["lm_head.weight"], model.lm_head.weight.to(torch.bfloat16))
    assert not torch.equal(named["lm_head.weight"], named["model.embed_tokens.weight"])
    assert named["model.counts"].dtype == torch.int64 and named["model.counts"].tolist() == [3, 70001, -5]


def test_a_float32_buffer_keeps_its_dtype_through_a_sync_into_the_engine():
    """An fp32 persistent buffer (LFM2-MoE's router `expert_bias`; MiniMax's decays) was sent cast to the engine's
    bf16 and copied back into the engine's fp32 buffer, which `engine_copy` and `from_pretrained(dtype=bf16)` keep in
    fp32: from the first sync on the engine routed with rounded biases (found by review)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from raro_fast.model.hf import engine_copy
    from raro_fast.rollout.embedded import copy_weights_in_place

    if not hasattr(transformers, "Lfm2MoeConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no LFM2-MoE")
    torch.manual_seed(0)
    cfg = transformers.Lfm2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                        num_experts_per_tok=2, num_dense_layers=0, use_expert_bias=True,
                        layer_types=["full_attention"] * 2)
    trainer = AutoModelForCausalLM.from_config(cfg).float()
    names = [n for n, _ in trainer.named_buffers() if n.endswith("expert_bias")]
    assert names
    with torch.no_grad():
        for n in names:
            trainer.get_buffer(n).copy_(torch.tensor([0.1234567, -0.3333333, 1.0009765, 0.0]))
    engine = engine_copy(trainer, torch.device("cpu"), torch.bfloat16)
    sent = dict(hf_named_tensors(PolicyModel(trainer), dtype=torch.bfloat16))
    assert sent["model.embed_tokens.weight"].dtype == torch.bfloat16
    copy_weights_in_place(engine, sent.items())
    for n in names:
        assert sent[n].dtype == torch.float32 and torch.equal(engine.get_buffer(n), trainer.get_buffer(n)), n


def test_a_failed_broadcast_raises_the_receivers_answer_which_names_the_cause(monkeypatch):
    """A receiver that refused a request never joins its broadcast; the broadcast's own error (a timeout, a closed
    connection) says nothing of why, so the receiver's answer is waited for and raised instead."""
    from raro_fast.weight_sync import broadcast

    def broken(group, flat, answered=None):
        raise RuntimeError("gloo: connection closed by peer")

    def announce(body):
        def wait(timeout=None):
            raise RuntimeError(f"receiver: no parameter named {body['names'][0]!r}")
        return wait

    monkeypatch.setattr(broadcast, "_broadcast", broken)
    with pytest.raises(RuntimeError, match=r"receiver: no parameter named 'w0'"):
        broadcast.broadcast_weights(None, [("w0", torch.tensor([1.5, -2.0]))], group_name="g", bucket_bytes=16,
                                    announce=announce, weight_version=1)


def test_the_receiver_loads_each_sync_with_that_syncs_tensors_only(monkeypatch):
    """Each flush hands the engine the buckets since the last one: a list kept across syncs would hold every
    earlier sync's tensors too (a model's worth of memory more per sync) and load stale values before new ones."""
    from raro_fast.weight_sync import broadcast

    bodies = iter([{"names": ["a"], "flush_cache": False}, {"names": ["b"], "flush_cache": True, "weight_version": "1"},
                   {"names": ["c"], "flush_cache": True, "weight_version": "2"}, {"stop": True}])
    monkeypatch.setattr(broadcast, "recv_json", lambda group: next(bodies))
    monkeypatch.setattr(broadcast, "receive_bucket",
                        lambda group, body, device: [(n, torch.tensor([ord(n) + 0.5])) for n in body["names"]])

    class Engine:
        loads = []

        def update_weights(self, named, version):
            self.loads.append(([(n, t.item()) for n, t in named], version))

    engine = Engine()
    assert broadcast.serve_weight_updates(None, engine) == 2
    assert engine.loads == [([("a", 97.5), ("b", 98.5)], 1), ([("c", 99.5)], 2)]


@pytest.mark.parametrize("model_type, extra", [
    ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                   "shared_expert_intermediate_size": 16}),
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    ("qwen2", {}),
])
def test_an_engine_that_loads_checkpoints_is_sent_the_checkpoints_names_and_values(model_type, extra, tmp_path):
    """transformers 5 holds an MoE's experts fused (`mlp.experts.gate_up_proj`); SGLang's loaders match the
    checkpoint's names (`mlp.experts.0.gate_proj.weight`) and skip others silently, so the experts were never synced
    (found by review). An engine with `takes_checkpoint_names` gets exactly what `save_pretrained` writes."""
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from raro_fast.weight_sync import push_weights

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 holds the checkpoint's names")
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    checkpoint = load_file(tmp_path / "model.safetensors")

    class Loader:  # what an SGLang engine is handed
        takes_checkpoint_names = True

        def update_weights(self, named, version):
            self.got = dict(named)

    engine = Loader()
    push_weights(engine, PolicyModel(model), version=1, dtype=torch.bfloat16)
    assert set(engine.got) == set(checkpoint)
    for name, value in checkpoint.items():
        assert torch.equal(engine.got[name], value.to(torch.bfloat16)), name
    if model_type != "qwen2":  # the embedded engine is a transformers model: its own names
        assert set(dict(hf_named_tensors(PolicyModel(model)))) != set(checkpoint)


def test_the_sglang_engines_take_checkpoint_names():
    from raro_fast.rollout.sglang import SGLangEngine, SGLangServerEngine

    assert SGLangEngine.takes_checkpoint_names and SGLangServerEngine.takes_checkpoint_names


def test_the_sender_polls_for_a_refusal_without_spinning():
    """While a gloo broadcast is in flight the sender asks the receivers' answer every few ms; an answer already in
    returned at once, and the loop spun (1.5 million calls in half a second: review)."""
    import time

    from raro_fast.weight_sync import broadcast

    class Work:
        def __init__(self):
            self.done_at = time.monotonic() + 0.2

        def is_completed(self):
            return time.monotonic() >= self.done_at

        def wait(self):
            return True

    class Group:
        def broadcast(self, tensors, opts):
            return Work()

    calls = []
    broadcast._broadcast(Group(), torch.zeros(4), answered=lambda timeout=None: calls.append(timeout))
    assert 5 <= len(calls) <= 60 and set(calls) == {0.05}


def test_each_buckets_broadcast_polls_that_buckets_answer(monkeypatch):
    """broadcast_weights hands `_broadcast` the wait of the request it announced for that bucket: without it a
    refused bucket's gloo broadcast waited out the group's timeout before the refusal was raised."""
    from raro_fast.weight_sync import broadcast

    waits, polled = [], []

    def announce(body):
        def wait(timeout=None):
            return None
        waits.append(wait)
        return wait

    monkeypatch.setattr(broadcast, "_broadcast", lambda group, flat, answered=None: polled.append(answered))
    broadcast.broadcast_weights(None, [("w0", torch.tensor([1.5, -2.0])), ("w1", torch.tensor([3.0, 4.0]))],
                                group_name="g", bucket_bytes=8, announce=announce, weight_version=1)
    assert len(waits) == 2 and polled == waits
