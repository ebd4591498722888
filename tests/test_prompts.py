import pytest

from raro_fast import prompts


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>hmm</think><answer>1</answer>", "1"),
        ("<think>x</think><answer>2</answer>", "2"),
        ("<answer>tie</answer>", "tie"),
        ("<ANSWER> Tie </answer>", "tie"),
        ("<answer>\n2\n</answer>", "2"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last tag decides
        ("<answer>3</answer>", None),
        ("<answer>both</answer>", None),
        ("<answer>1 or 2</answer>", None),
        ("<answer></answer>", None),
        ("no tag: 1", None),
        ("<answer>1</answer><answer>2", None),  # an unclosed final tag: cut off, not a verdict
        ("", None),
    ],
)
def test_parse_verdict(text, expected):
    assert prompts.parse_verdict(text) == expected


def test_parse_answer():
    assert prompts.parse_answer("<think>a</think><answer> (2+2)*6 </answer>") == "(2+2)*6"
    assert prompts.parse_answer("<answer>a</answer><answer>b</answer>") == "b"
    assert prompts.parse_answer("<think>no answer</think>") is None
    assert prompts.parse_answer("<answer>cut off") is None
    assert prompts.parse_answer(None) is None


def test_messages_and_completion_format():
    pol = prompts.policy_messages("Q?")
    assert pol[-1] == {"role": "user", "content": "Q?"} and "<answer>" in pol[0]["content"]
    crit = prompts.critic_messages("Q?", "A1", "A2")
    text = crit[-1]["content"]
    assert text.index("A1") < text.index("A2") and "Q?" in text
    assert "tie" in crit[0]["content"]
    done = prompts.format_completion("t", "a")
    assert done == "<think>t</think><answer>a</answer>" and prompts.parse_answer(done) == "a"
