"""On-disk cache of sampled completions, one JSON file per (model, problem), so that k can grow across runs and an
interrupted run resumes without resampling. It keeps each completion's text, not a reading of it: answers are
extracted and verified again on every run, so a fixed parser applies to samples drawn before the fix. Each model's
folder records what drew its samples (the weights' digest, the digest of the files that configure the model and
render its prompts, and the sampling settings), and each problem's file the prompt its samples were drawn for: a later
run that names other weights, another config, tokenizer or chat template, other settings under the same model name, or
words a problem otherwise is refused, never served the old samples.

Samples are drawn in chunks; the chunk whose first sample is sample i of a problem is drawn with seed
`draw_seed(seed, problem_id, i)`, so the first k samples of a problem are the same whatever k a later run asks for,
and no seed draws twice for a problem even when the chunk size changes (a draw seeded by its chunk number did:
correlated samples).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

from raro_fast.durable import write_text_atomic

def draw_seed(seed: int, problem_id: str, first: int) -> int:
    """The seed of the draw whose first sample is sample `first` of the problem (the same as the chunk-numbered
    seed of the caches written before, for their first chunk)."""
    digest = hashlib.sha256(f"{seed}/{problem_id}/{first}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


class SampleCache:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._unrecorded_prompts: set[str] = set()  # models already warned about

    def _folder(self, model: str) -> Path:
        return self.root / re.sub(r"[^A-Za-z0-9_.-]", "_", model)

    def _path(self, model: str, problem_id: str, seed: int) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", problem_id)
        return self._folder(model) / f"seed{seed}" / f"{safe}.json"

    def claim(self, model: str, identity: dict) -> None:
        """Bind `model`'s cached samples to `identity` (what draws them: weights digest, sampling settings). Samples
        drawn under another identity raise ValueError naming what differs; they are neither reused nor overwritten.
        A folder from before identities were recorded is adopted with a warning on stderr, and so is a record from
        before one of the identity's keys was (then the key is added to it)."""
        folder = self._folder(model)
        record = folder / "identity.json"
        if record.is_file():
            try:
                stored = json.loads(record.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{record}: corrupt ({e}); delete {folder} to resample") from None
            if not isinstance(stored, dict):  # found by review: an AttributeError
                raise ValueError(f"{record}: corrupt (a JSON {type(stored).__name__}, not an object of settings); "
                                 f"delete {folder} to resample")
            unrecorded = sorted(identity.keys() - stored.keys())
            differ = sorted(k for k in stored.keys() | identity.keys()
                            if k not in unrecorded and stored.get(k) != identity.get(k))
            if differ:
                what = "; ".join(f"{k}: cached {stored.get(k)!r}, now {identity.get(k)!r}" for k in differ)
                raise ValueError(f"{folder}: the cached samples of '{model}' were drawn by another model or settings "
                                 f"({what}); give another analysis.output_dir, another model name, or delete {folder}")
            if unrecorded:
                print(f"warning: {record}: does not record {', '.join(unrecorded)} (written before it was); assuming "
                      "the cached samples match this run's", file=sys.stderr)
                _write_atomic(record, json.dumps({**stored, **identity}, indent=1, sort_keys=True))
            return
        if any(folder.glob("seed*/*.json")):
            print(f"warning: {folder}: cached samples without a record of the model and settings that drew them; "
                  "assuming they match this run's", file=sys.stderr)
        _write_atomic(record, json.dumps(identity, indent=1, sort_keys=True))

    def get(self, model: str, problem_id: str, seed: int, prompt: list[int]) -> list[dict]:
        """The samples cached for the problem, drawn for `prompt` (the rendered prompt's token ids): samples drawn
        for another prompt under the same problem id raise ValueError (a Countdown id names the numbers as a set, and
        another task seed lists them in another order). A file from before prompts were recorded is read with a
        warning."""
        path = self._path(model, problem_id, seed)
        if not path.is_file():
            return []
        try:
            record = json.loads(path.read_text())
            samples = record["samples"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: corrupt sample cache ({e}); delete the file to resample") from None
        stored = record.get("prompt_sha256")
        if stored is None:
            if model not in self._unrecorded_prompts:
                self._unrecorded_prompts.add(model)
                print(f"warning: {self._folder(model)}: cached samples without a record of the prompt they were drawn "
                      "for (cached before prompts were); assuming this run's", file=sys.stderr)
        elif stored != prompt_digest(prompt):
            raise ValueError(f"{path}: the cached samples of problem {problem_id!r} were drawn for another prompt "
                             f"(the same problem worded otherwise: another task seed or template); give another "
                             f"analysis.output_dir, or delete {self._folder(model)}")
        return samples

    def put(self, model: str, problem_id: str, seed: int, prompt: list[int], samples: list[dict]) -> None:
        """Replace the stored samples, drawn for `prompt`, atomically."""
        _write_atomic(self._path(model, problem_id, seed), json.dumps(
            {"problem_id": problem_id, "prompt_sha256": prompt_digest(prompt), "samples": samples}))


def prompt_digest(prompt: list[int]) -> str:
    return hashlib.sha256(json.dumps([int(t) for t in prompt]).encode()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
