"""Token entropy, log-probs and trace perplexity go through the fused LM-head kernels, softmax(hidden @ W.T / T): a
model whose own logits are something else (Gemma 2's final_logit_softcapping, a head with a bias, any other
transform) is refused, with the setting named, never measured wrong. The trainer (PolicyModel) refuses the same
models at setup. Before, a soft-capped Gemma 2 gave token entropy 0.04 where its own logits give 3.6."""
import pytest
import torch
import transformers
from torch import nn

from raro_fast import analyze
from raro_fast.model.hf import load_project_tokenizer, save_pretrained_atomic
from raro_fast.model.policy import PolicyModel

PROMPT, COMPLETION = [1, 5, 7], [9, 11, 13, 2]


def _gemma(version: int, cap: float | None, vocab: int = 64) -> nn.Module:
    """Gemma 2, or Gemma 3 (text), which soft-caps as Gemma 2 does where its config says and loads with sdpa
    (Gemma 2 does not)."""
    torch.manual_seed(0)
    config, causal_lm = ((transformers.Gemma2Config, transformers.Gemma2ForCausalLM) if version == 2
                         else (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM))
    cfg = config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, final_logit_softcapping=cap)
    model = causal_lm(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits large enough that the cap matters
    return model


def _gemma2(cap: float | None, vocab: int = 64) -> nn.Module:
    return _gemma(2, cap, vocab)


def _gemma3(cap: float | None, vocab: int = 64) -> nn.Module:
    return _gemma(3, cap, vocab)


def _llama(vocab: int = 64) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _reference(model, temperature=1.0):
    """(log-probs, entropies) of the completion from the model's own logits, in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT + COMPLETION])).logits[0].double() / temperature
    logp = logits.log_softmax(-1)[len(PROMPT) - 1 : -1]
    return logp.gather(1, torch.tensor(COMPLETION)[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("make", [lambda: _gemma2(None), lambda: _gemma3(None), _llama],
                         ids=["gemma2-uncapped", "gemma3-uncapped", "llama"])
def test_teacher_forced_is_the_models_own_distribution(make):
    model = make()
    lp, ent, mask = analyze.teacher_forced(model, PROMPT, COMPLETION, temperature=0.7)
    ref_lp, ref_ent = _reference(model, 0.7)
    torch.testing.assert_close(ent[mask].double(), ref_ent, atol=1e-4, rtol=0)
    torch.testing.assert_close(lp[mask].double(), ref_lp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("make", [_gemma2, _gemma3], ids=["gemma2", "gemma3"])
def test_teacher_forced_refuses_a_soft_capped_gemma(make):
    model = make(2.0)
    ref_lp, ref_ent = _reference(model)
    assert float(ref_ent.min()) > 3.0  # the capped distribution is nearly flat; hidden @ W.T alone gave ~0.04
    with pytest.raises(ValueError, match=r"final_logit_softcapping = 2\.0"):
        analyze.teacher_forced(model, PROMPT, COMPLETION)


def test_teacher_forced_refuses_an_lm_head_with_a_bias():
    model = _llama()
    head = nn.Linear(32, 64, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0, 3.0)
    model.lm_head = head
    with pytest.raises(ValueError, match="LM head has a bias"):
        analyze.teacher_forced(model, PROMPT, COMPLETION)


@pytest.mark.parametrize("factor", [3.0, 1.02])
def test_teacher_forced_refuses_logits_transformed_where_no_config_says(factor):
    """A transform no config field names (here a hook that scales the logits) is found by the probe, also a small
    one: x1.02 is temperature 0.98, and the entropy that comes out is not the model's."""
    model = _llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits of a few units, as a trained model's
    model.lm_head.register_forward_hook(lambda module, args, out: out * factor)
    with pytest.raises(ValueError, match="logits are not its last hidden state times the LM-head weight"):
        analyze.teacher_forced(model, PROMPT, COMPLETION)


@pytest.mark.parametrize("setting,value", [("logit_scale", 0.0625), ("logits_scaling", 8.0)])
def test_logit_scaling_configs_are_refused(setting, value):
    model = _llama()
    setattr(model.config, setting, value)
    with pytest.raises(ValueError, match=f"config {setting} = {value!r}"):
        analyze.teacher_forced(model, PROMPT, COMPLETION)


def test_analyze_refuses_a_soft_capped_model_before_sampling(tmp_path, capsys):
    tok = load_project_tokenizer()
    save_pretrained_atomic(_gemma3(2.0, vocab=len(tok)), tok, tmp_path / "gemma")
    save_pretrained_atomic(_llama(vocab=len(tok)), tok, tmp_path / "llama")
    out = tmp_path / "out"
    args = ["--analysis.models", f"base={tmp_path / 'gemma'},other={tmp_path / 'llama'}", "--analysis.k", "2",
            "--analysis.chunk", "2", "--analysis.num_problems", "2", "--analysis.max_new_tokens", "4",
            "--analysis.output_dir", str(out), "--task.countdown.num_train", "10", "--task.countdown.num_heldout", "5"]
    assert analyze.main(args) == 2
    err = capsys.readouterr().err
    assert "analysis.models (base): the model transforms its logits (config final_logit_softcapping = 2.0)" in err
    assert not (out / "samples").exists()  # refused before anything was drawn or recorded


def test_the_trainer_refuses_the_same_models_at_setup():
    with pytest.raises(ValueError, match=r"model\.path: the model transforms its logits \(config "
                                         r"final_logit_softcapping = 2\.0\)"):
        PolicyModel(_gemma3(2.0))
    biased = _llama()
    biased.lm_head = nn.Linear(32, 64, bias=True)
    with pytest.raises(ValueError, match="model.path: the model's LM head has a bias"):
        PolicyModel(biased)
    PolicyModel(_gemma3(None))  # nothing to refuse
    PolicyModel(_llama())


def test_a_model_whose_decoder_is_not_at_model_is_read_where_it_is():
    """GPT-2 keeps its decoder at `.transformer`: the check and teacher forcing called `.model` and stopped in an
    AttributeError (found by review on 2026-12-07). Its log-probs are its own logits'."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1,
                                                                 n_head=2)).eval()
    analyze.check_lm_head(model, "analysis.models (gpt2)")
    logprobs, _, mask = analyze.teacher_forced(model, PROMPT, COMPLETION)
    with torch.no_grad():
        own = torch.log_softmax(model(input_ids=torch.tensor([PROMPT + COMPLETION])).logits[0].double(), -1)
    want = own[len(PROMPT) - 1 : -1].gather(1, torch.tensor(COMPLETION)[:, None])[:, 0]
    torch.testing.assert_close(logprobs[mask].double(), want, rtol=1e-5, atol=1e-5)


def test_a_head_with_its_own_logit_scale_is_refused_by_the_trainer():
    """Dory's head is an nn.Linear that multiplies its logits by a learned scale: only its weight reached the fused
    kernels, so the scale was neither applied nor trained (found by review on 2026-12-07)."""

    class ScaledHead(nn.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.logit_scale = nn.Parameter(torch.ones(self.out_features))

        def forward(self, x):
            return super().forward(x) * self.logit_scale

    class DoubledHead(nn.Linear):  # a forward of its own, no parameter beside the weight
        def forward(self, x):
            return 2 * super().forward(x)

    for head, what in ((ScaledHead(32, 64, bias=False), r"ScaledHead\) computes more than hidden @ W.T \(its logit_scale\)"),
                       (DoubledHead(32, 64, bias=False), r"DoubledHead\) computes more than hidden @ W.T, and")):
        model = _llama()
        model.lm_head = head
        with pytest.raises(ValueError, match=f"model.path: the model's LM head \\({what}"):
            PolicyModel(model)


def test_a_model_without_decoder_layers_where_the_trainer_runs_them_is_refused():
    """GPT-2 keeps its layers at .transformer.h: it passed, then the first sharding stopped in an AttributeError that
    named decoder_layers, not the model (found by review on 2026-12-07)."""
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1,
                                                                 n_head=2))
    with pytest.raises(ValueError, match=r"model.path: GPT2LMHeadModel keeps no decoder layers at .model.layers"):
        PolicyModel(model)
    assert PolicyModel(_llama()).decoder_layers  # the usual layout
