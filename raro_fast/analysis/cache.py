"""On-disk cache of sampled answers, one JSON file per (model, problem), so that k can grow across runs and an
interrupted run resumes without resampling.

Samples are drawn in chunks; chunk j of a problem is sampled with seed `chunk_seed(seed, problem_id, j)`, so the
first k samples of a problem are the same whatever k a later run asks for.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path


def chunk_seed(seed: int, problem_id: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{problem_id}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


class SampleCache:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _path(self, model: str, problem_id: str, seed: int) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", problem_id)
        return self.root / re.sub(r"[^A-Za-z0-9_.-]", "_", model) / f"seed{seed}" / f"{safe}.json"

    def get(self, model: str, problem_id: str, seed: int) -> list[dict]:
        path = self._path(model, problem_id, seed)
        if not path.is_file():
            return []
        try:
            return json.loads(path.read_text())["samples"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path}: corrupt sample cache ({e}); delete the file to resample") from None

    def put(self, model: str, problem_id: str, seed: int, samples: list[dict]) -> None:
        """Replace the stored samples (write to a temporary file, then rename: never a half-written file)."""
        path = self._path(model, problem_id, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"problem_id": problem_id, "samples": samples}))
        os.replace(tmp, path)
