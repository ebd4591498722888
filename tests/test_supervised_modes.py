"""The supervised modes take one update at ratio 1, on the expert's text as text (found by review; their gradient at
temperature 1 is checked in test_baselines.py)."""
import pytest

from raro_fast.config import load_config
from raro_fast.model.hf import load_project_tokenizer
from raro_fast.modes.base import expert_completion_ids


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
