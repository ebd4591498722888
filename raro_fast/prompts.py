"""Policy and critic prompts, and parsing of their outputs.

The policy reasons in <think>…</think> and answers in <answer>…</answer>. The relativistic critic sees a question
and two final answers (one the expert's, one the policy's, in an order the caller randomises), reasons, and ends
with <answer>1</answer>, <answer>2</answer> or <answer>tie</answer>. The wording is short because the embedded
model is tiny; a real instruct model reads the same messages through its own chat template.
"""
from __future__ import annotations

import re
from typing import Callable

CRITIC_VERDICTS = ("1", "2", "tie")

POLICY_SYSTEM = "Reason in <think></think>, then give the final answer in <answer></answer>."
CRITIC_SYSTEM = (
    "One of two answers is an expert's. Reason in <think></think>, then pick the better one: "
    "<answer>1</answer>, <answer>2</answer>, or <answer>tie</answer> if equally good."
)

# The format's markup. A tokenizer may mark these special (a fine-tuning recipe's add_special_tokens does); they are
# still what the model writes, never control tokens: kept in decoded text and read as tokens in prompts and targets.
FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

_ANSWER_OPEN_RE = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE_RE = re.compile(r"</answer>", re.IGNORECASE)
_THINK_TAG_RE = re.compile(r"</?think>", re.IGNORECASE)


def policy_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": POLICY_SYSTEM}, {"role": "user", "content": question}]


def rationalization_messages(question: str, answer: str) -> list[dict[str, str]]:
    """Ask for reasoning that leads to a known final answer (the Rationalization baseline's data generator)."""
    return [{"role": "system", "content": POLICY_SYSTEM},
            {"role": "user", "content": f"{question}\nThe correct final answer is {answer}. Show the reasoning that reaches it."}]


def critic_messages(question: str, answer_1: str, answer_2: str) -> list[dict[str, str]]:
    """The critic's conversation. An answer's later lines are indented, so a policy answer cannot start a line of
    the prompt: "…\nAnswer 2: <the expert's>" would otherwise forge the layout the critic reads. Single-line
    answers (every Countdown expert's) read exactly as before; expert and policy answers get the same treatment.
    So are a question's (found by review: a multiple-choice question listing "Answer 1: 4" put two such lines in
    the prompt); every Countdown question is one line."""
    user = f"Question: {one_block(question)}\nAnswer 1: {one_block(answer_1)}\nAnswer 2: {one_block(answer_2)}"
    return [{"role": "system", "content": CRITIC_SYSTEM}, {"role": "user", "content": user}]


def one_block(text: str) -> str:
    """`text` as one block of the prompt's layout: its later lines indented."""
    return "\n  ".join(text.splitlines())


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation up to the assistant's turn, through the tokenizer's own chat template.

    Special tokens come from the template only. A message holding a special token's text (a policy answer that
    spells `<|im_end|>` out of ordinary tokens, say) would otherwise be read back as that token and could end its
    turn early and write a turn of its own into the critic's prompt; such content is tokenized as plain text.
    Every other prompt is the template's text tokenized whole, as before."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.rstrip().endswith("<think>"):
        # A thinking model's template (found by review: Qwen3-Thinking's, DeepSeek-R1-Distill's) opens the reasoning in
        # the prompt: SFT's targets would then teach a second <think>, and an answer written inside the unclosed
        # reasoning would read as final, since its opening tag is in the prompt and not in the completion.
        raise ValueError("the model's chat template opens <think> in the assistant's turn itself (a thinking model's "
                         "template); this trainer's formats have the model write <think>...</think> and then "
                         "<answer>...</answer>: give a model whose template leaves the turn empty, or remove the "
                         "<think> from its tokenizer's chat_template")
    specials = _special_token_texts(tokenizer)
    if not any(sp in m["content"] for m in messages for sp in specials):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # The template around placeholders (private-use characters, in no template or tokenizer's special tokens),
    # each placeholder's content tokenized after the template's text before it, its special tokens' text split into
    # ordinary tokens.
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    around = tokenizer.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                           tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    for m, mark in zip(messages, marks):
        before, found, around = around.partition(mark)
        if not found:  # a template that rewrites its contents: keep it, without the special tokens' text
            cleaned = [{**msg, "content": _without(msg["content"], specials)} for msg in messages]
            text = tokenizer.apply_chat_template(cleaned, tokenize=False, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tokenizer(before, add_special_tokens=False)["input_ids"]
        # after the template's text before it: alone, a SentencePiece tokenizer began every message with a `▁` the
        # template's own text does not have (review)
        ids += text_ids_after(tokenizer, _after_last_special(tokenizer, before), m["content"])
    return ids + tokenizer(around, add_special_tokens=False)["input_ids"]


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as plain text: a control token's text in it (`<|im_end|>` spelled out) is ordinary
    characters, never the token. The format's tags are read as the tokenizer's tokens even where it marks them
    special: splitting every special token spelled `<think>` out in SFT's targets and the prompts, where the model
    writes the one token. Only a text that spells a control token out is split whole, its tags too. Never
    tokenized in pieces: a SentencePiece tokenizer starts each piece with a space of its own (found by review:
    `<think>`, `▁`, `3*5` where the model writes `<think>`, `3*5`)."""
    if any(sp in text for sp in _special_token_texts(tokenizer)):
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def text_ids_after(tokenizer, before: str, text: str) -> list[int]:
    """The tokens of `text` (read as `text_ids` reads it) as the tokenizer writes them right after `before`:
    tokenized on its own, a SentencePiece tokenizer starts a text with a `▁` of its own that it does not write
    after other text. Tokenized alone only where the two texts' tokens merge across the boundary."""
    head, whole = text_ids(tokenizer, before), text_ids(tokenizer, before + text)
    if whole[:len(head)] == head:
        return whole[len(head):]
    return text_ids(tokenizer, text)


def reply_ids(tokenizer, text: str, messages: list[dict[str, str]] | None = None) -> list[int]:
    """The tokens of `text` as the assistant's reply (to `messages`; by default to any of the trainer's prompts):
    after the chat template's generation prompt (its text after the last special token, `assistant\n` in ChatML),
    as the whole conversation reads. Without a chat template, `text_ids`."""
    if getattr(tokenizer, "chat_template", None) is None:
        return text_ids(tokenizer, text)
    messages = policy_messages("1 2 3") if messages is None else messages
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text_ids_after(tokenizer, _after_last_special(tokenizer, prompt), text)


def _after_last_special(tokenizer, text: str) -> str:
    """The text after the last special token's text in `text` (all of it if there is none)."""
    cut = max((text.rfind(sp) + len(sp) for sp in _special_token_texts(tokenizer, with_tags=True) if sp in text),
              default=0)
    return text[cut:]


def completion_decoder(tokenizer) -> Callable[[list[int]], str]:
    """The text of generated token ids as the rewards and the critic read it: control tokens (end of turn, padding,
    turn markers) left out, the format's tags kept, spaces as written. `skip_special_tokens` dropped the tags too
    where a tokenizer marks them special (found by review: every answer unparseable, every reward 0, no error), and
    a tokenizer's `clean_up_tokenization_spaces` rewrote " ." as "." in what the critic was shown."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special_ids = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    tag_ids = {tokenizer.convert_tokens_to_ids(t) for t in FORMAT_TAGS
               if t in _special_token_texts(tokenizer, with_tags=True)}
    control = frozenset(special_ids - tag_ids)
    return lambda ids: tokenizer.decode([i for i in ids if i not in control], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)


def _special_token_texts(tokenizer, *, with_tags: bool = False) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens: those a message must not produce (the format's tags are not
    among them unless `with_tags`)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if t.special}
    return tuple(t for t in texts if t and (with_tags or t not in FORMAT_TAGS))


def _without(text: str, specials: tuple[str, ...]) -> str:
    while any(sp in text for sp in specials):  # until none is left: removing one can join another
        for sp in specials:
            text = text.replace(sp, "")
    return text


THINK_END = "</think>"


def format_completion(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def parse_answer(text: str) -> str | None:
    """The stripped content of the last <answer> tag, up to the </answer> that closes it; None if there is none.

    The last *opening* tag decides: in `<answer>13-9=10 yes.</think><answer>8</answer>` the answer is "8". Matching
    from the first opening tag used to return the whole `13-9=10 yes.</think><answer>8`, and a RARO policy learned
    to write such answers: text in the critic's own verification style, pasted into the critic's prompt, that
    talked wrong answers into ties (docs/experiments.md, section 12). An answer that still contains a think tag is
    reasoning, not an answer (None), and so is a last tag that is never closed (the output was cut off there). An
    empty tag is no answer either (None): it used to be the answer "", which the critic judged (a tie paid it
    tau_pol where writing no answer earns 0) and a majority vote could pick. A tag followed by a think tag lies
    inside the reasoning (None): `<think>the system says <answer>1</answer>, <answer>2</answer>, or
    <answer>tie</answer></think> I think 1` gave the verdict "tie", a critic that never decided scored as one that
    did (found by review). So does a tag after a `<think>` that is never closed: the turn ended in its reasoning.
    """
    if not isinstance(text, str):
        return None
    opens = list(_ANSWER_OPEN_RE.finditer(text))
    if not opens:
        return None
    close = _ANSWER_CLOSE_RE.search(text, opens[-1].end())
    if close is None:
        return None
    answer = text[opens[-1].end() : close.start()]
    answer = answer.strip()
    if not answer or _THINK_TAG_RE.search(answer) or inside_reasoning(text, opens[-1].start(), close.end()):
        return None
    return answer


def inside_reasoning(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] lies in the reasoning: a think tag follows it, or the last think tag before it
    opens one that is never closed (the turn ended in its reasoning)."""
    if _THINK_TAG_RE.search(text, end):
        return True
    before = _THINK_TAG_RE.findall(text, 0, start)
    return bool(before) and not before[-1].startswith("</")


def has_think_tag(text: str) -> bool:
    return bool(_THINK_TAG_RE.search(text))


def parse_verdict(text: str) -> str | None:
    """"1", "2" or "tie" from the last answer tag (case and whitespace tolerated); anything else is None."""
    answer = parse_answer(text)
    if answer is None:
        return None
    answer = answer.strip().lower()
    return answer if answer in CRITIC_VERDICTS else None
