"""How the project's own tokenizer, shipped in raro_fast/model/tokenizer/, was built
(`python -m raro_fast.model.build_tokenizer OUT_DIR` builds one like it into OUT_DIR).

Byte-level BPE, so any text round-trips. Digits are split one per token: the model does arithmetic on them, and
a merged "24" would be an opaque symbol. The reasoning and answer tags are single tokens, and a Qwen-style chat
template makes the embedded default and a real Qwen2.5-Instruct checkpoint read the same messages. The vocabulary
is learnt from the project's own prompts and synthetic traces, so it is small (the embedded model's LM head is
tiny) and the build needs no download.

The shipped files are the source of truth. A build is deterministic, but it learns from today's prompts and traces,
which have changed since the shipped tokenizer was built, so it gives other merges and token ids. The shipped base
models' embeddings are indexed by the shipped ids: a build over the shipped files would make them read other tokens
with no error, so the command refuses that folder.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raro_fast import prompts
from raro_fast.tasks.countdown import evaluation_trace, generate_puzzles, question_text, search_trace, solve

OUT_DIR = Path(__file__).parent / "tokenizer"
VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = list(prompts.FORMAT_TAGS)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for target in (10, 24, 30):
        for p in generate_puzzles(num=200, num_numbers=4, min_number=1, max_number=13, target=target, seed=seed):
            expr = solve(p.numbers, p.target)
            question = question_text(p.numbers, p.target)
            for m in prompts.policy_messages(question) + prompts.critic_messages(question, expr, expr):
                texts.append(f"{m['role']}\n{m['content']}")
            texts.append(prompts.format_completion(search_trace(p.numbers, p.target, rng=rng), expr))
            texts.append(evaluation_trace(p.numbers, p.target, expr))
    return texts


def build(out_dir: Path = OUT_DIR) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens(TAG_TOKENS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": 4096,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m raro_fast.model.build_tokenizer OUT_DIR")
    out = Path(argv[0])
    if out.resolve() == OUT_DIR.resolve():
        raise SystemExit(f"error: {out} holds the shipped tokenizer, whose token ids the shipped base models are "
                         "trained on; build into another folder")
    # A shipped base, a checkpoint or a converted model holds its own tokenizer, whose ids its weights are trained
    # on; a build over it read them as other tokens, with no error (found by review: 122 of 384 ids moved).
    held = [name for name in ("tokenizer.json", "tokenizer_config.json", "config.json") if (out / name).exists()]
    if held:
        raise SystemExit(f"error: {out} already holds {', '.join(held)} (a model's or a tokenizer's); build into a "
                         "new or empty folder")
    build(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
