"""Policy and critic prompts, and parsing of their outputs.

The policy reasons in <think>…</think> and answers in <answer>…</answer>. The relativistic critic sees a question
and two final answers (one the expert's, one the policy's, in an order the caller randomises), reasons, and ends
with <answer>1</answer>, <answer>2</answer> or <answer>tie</answer>. The wording is short because the embedded
model is tiny; a real instruct model reads the same messages through its own chat template.
"""
from __future__ import annotations

import re

CRITIC_VERDICTS = ("1", "2", "tie")

POLICY_SYSTEM = "Reason in <think></think>, then give the final answer in <answer></answer>."
CRITIC_SYSTEM = (
    "One of two answers is an expert's. Reason in <think></think>, then pick the better one: "
    "<answer>1</answer>, <answer>2</answer>, or <answer>tie</answer> if equally good."
)

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


def policy_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": POLICY_SYSTEM}, {"role": "user", "content": question}]


def rationalization_messages(question: str, answer: str) -> list[dict[str, str]]:
    """Ask for reasoning that leads to a known final answer (the Rationalization baseline's data generator)."""
    return [{"role": "system", "content": POLICY_SYSTEM},
            {"role": "user", "content": f"{question}\nThe correct final answer is {answer}. Show the reasoning that reaches it."}]


def critic_messages(question: str, answer_1: str, answer_2: str) -> list[dict[str, str]]:
    user = f"Question: {question}\nAnswer 1: {answer_1}\nAnswer 2: {answer_2}"
    return [{"role": "system", "content": CRITIC_SYSTEM}, {"role": "user", "content": user}]


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation up to the assistant's turn, through the tokenizer's own chat template."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


THINK_END = "</think>"


def format_completion(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def parse_answer(text: str) -> str | None:
    """The stripped content of the last complete <answer>…</answer>; None if there is none.

    An opening tag that is never closed after the last complete one does not count: the output was cut off or
    malformed, and whatever came before it was not the model's final word, so the answer is None.
    """
    if not isinstance(text, str):
        return None
    matches = list(_ANSWER_RE.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    if re.search(r"<answer>", text[last.end() :], re.IGNORECASE):
        return None
    return last.group(1).strip()


def parse_verdict(text: str) -> str | None:
    """"1", "2" or "tie" from the last answer tag (case and whitespace tolerated); anything else is None."""
    answer = parse_answer(text)
    if answer is None:
        return None
    answer = answer.strip().lower()
    return answer if answer in CRITIC_VERDICTS else None
