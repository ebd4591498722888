"""Training modes: one file each. `make_mode` gives the loop the one it runs (see `base.Mode` for the hooks)."""
from __future__ import annotations

from raro_fast.modes.base import COUNT_KEYS, STAT_KEYS, Mode, RankRollout
from raro_fast.modes.dpo import DpoMode
from raro_fast.modes.raro import RaroMode
from raro_fast.modes.rationalization import RationalizationMode
from raro_fast.modes.rl_logit import RlLogitMode
from raro_fast.modes.rlvr import RlvrMode
from raro_fast.modes.sft import SftMode

MODES: dict[str, type[Mode]] = {m.name: m for m in (RaroMode, RlvrMode, SftMode, RationalizationMode, RlLogitMode, DpoMode)}


def make_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"train.mode: unknown mode {name!r}; choose one of {', '.join(MODES)}")
    return MODES[name]()


__all__ = ["COUNT_KEYS", "MODES", "STAT_KEYS", "Mode", "RankRollout", "make_mode"]
