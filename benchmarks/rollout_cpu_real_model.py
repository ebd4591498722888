"""The CPU comparison behind `--rollout.backend auto`'s choice on CPU: the embedded engine against transformers'
continuous batching on a real model, alternated in one process (this machine's speed drifts 10-20% within an hour).

    python benchmarks/rollout_cpu_real_model.py MODEL_DIR [THREADS]

MODEL_DIR: a Hugging Face directory, e.g. SmolLM2-135M-Instruct converted with `raro-fast convert-gguf smollm2 DIR`.
Workload: 8 chat prompts x 4 samples x 64 new tokens at temperature 1, fp32, no end token (every sample runs to 64,
so both engines generate the same 2,048 tokens), the embedded engine at the trainer's default batch size. Each call
follows a release of the KV cache, as every training step does. Prints tokens/s per call and the median per engine.
Not collected by pytest (a real model is not shipped with the repository).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raro_fast.config import RolloutConfig
from raro_fast.rollout.continuous import ContinuousEngine, continuous_batching_unavailable
from raro_fast.rollout.embedded import EmbeddedEngine
from raro_fast.rollout.engine import SamplingParams

QUESTIONS = ["Using the numbers 3, 5, 7 make 10.", "What is 12 times 13?", "Write a haiku about rain.",
             "Explain photosynthesis briefly.", "Using 2, 9, 4 make 10.", "Name three prime numbers.",
             "What is the capital of France?", "Count from one to ten."]


def main(model_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    # The last vocabulary id as the only end token: drawn about as rarely as any, so every sample runs to 64.
    kw = dict(pad_token_id=tokenizer.pad_token_id or 0, eos_token_ids=[model.config.vocab_size - 1],
              decode=tokenizer.decode)
    engines = {"embedded": EmbeddedEngine(model, batch_size=RolloutConfig().batch_size, **kw)}
    missing = continuous_batching_unavailable()
    if missing:
        print(f"continuous: unavailable ({missing})")
    else:
        engines["continuous"] = ContinuousEngine(model, **kw)
    params = SamplingParams(max_new_tokens=64, temperature=1.0, n=4, seed=0)
    for engine in engines.values():  # one-time costs out of the timed calls
        engine.generate(prompts[:2], SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=1))
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for rep in range(4):
        for name, engine in engines.items():
            engine.release_memory(("kv_cache",))
            t0 = time.perf_counter()
            outs = engine.generate(prompts, params)
            seconds = time.perf_counter() - t0
            tokens = sum(len(c.token_ids) for o in outs for c in o)
            rates[name].append(tokens / seconds)
            print(f"{name} call {rep}: {tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s", flush=True)
    for name, r in rates.items():
        print(f"{name}: median {statistics.median(r):.1f} tokens/s (range {min(r):.1f}-{max(r):.1f}, {threads} threads)")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 2)
