"""The supervised modes train the expert's tokens by their likelihood at temperature 1, one update at ratio 1, on
the expert's text as text (found by review)."""
import pytest
import torch

from raro_fast.config import LossConfig, load_config
from raro_fast.model.hf import build_embedded_model, load_project_tokenizer
from raro_fast.model.policy import PolicyModel
from raro_fast.model.varlen import use_varlen_attention
from raro_fast.modes.base import expert_completion_ids
from raro_fast.modes.sft import sft_samples
from raro_fast.packing import plan_micro_batches
from raro_fast.tasks import make_task
from raro_fast.update import recompute_logprobs, update_step


@pytest.mark.parametrize("run_temperature", [0.5, 0.0])
def test_sft_is_nll_at_temperature_one_whatever_the_rollout_temperature(run_temperature):
    """At rollout.temperature 0.5 the update's gradient was the tempered NLL's (twice as long); at 0 the first
    update stopped with 'temperature must be > 0'."""
    cfg = load_config(["--train.mode", "sft", "--rollout.temperature", str(run_temperature),
                       "--task.countdown.num_train", "30", "--task.countdown.num_heldout", "5"])
    tok = load_project_tokenizer()
    samples = sft_samples(make_task(cfg.task).examples("train")[:5], tokenizer=tok).samples
    for uid, s in enumerate(samples):
        s.uid = uid
    model = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                 max_position=256, seed=0)
    use_varlen_attention(model)
    policy = PolicyModel(model)
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=256, world_size=1, rank=0)
    recompute_logprobs(policy, mbs, temperature=cfg.rollout.temperature)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    update_step(policy, opt, mbs, loss_cfg=LossConfig(loss_agg="token_mean"), temperature=cfg.rollout.temperature,
                norm_constant=1.0, grad_clip=0.0)
    g_update = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    plain = plan_micro_batches(samples, max_tokens_per_micro_batch=256, world_size=1, rank=0)
    for mb in plain:
        mb.temperatures = None
    nll = sum(-(policy(mb, temperature=1.0)[0] * (mb.targets != -100)).sum() for mb in plain) / plain[0].num_tokens
    nll.backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(g_update[n], p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["sft", "rationalization", "dpo"])
def test_supervised_modes_refuse_several_mini_batches(mode):
    """Past the first mini-batch SFT's ratio left 1 and the clip dropped a fifth of the expert tokens."""
    with pytest.raises(ValueError, match=f"train.ppo_mini_batches > 1 with train.mode {mode}"):
        load_config(["--train.mode", mode, "--train.ppo_mini_batches", "2"])
    load_config(["--train.mode", "rlvr", "--train.ppo_mini_batches", "2"])


def test_a_special_tokens_text_in_the_trained_reasoning_is_plain_text():
    """Rationalization trains on the model's own reasoning: a spelled-out <|im_end|> in it became the end token, and
    the model was taught to end its turn inside <think>."""
    tok = load_project_tokenizer()
    ids = expert_completion_ids(tok, "8+2", think="so <|im_end|> then 8+2=10")
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == "<think>so <|im_end|> then 8+2=10</think><answer>8+2</answer>"
    # Text without special tokens' text: the same ids as the whole string with the end token, as before.
    plain = expert_completion_ids(tok, "8+2", think="8+2=10")
    assert plain == tok("<think>8+2=10</think><answer>8+2</answer>" + tok.eos_token, add_special_tokens=False)["input_ids"]
