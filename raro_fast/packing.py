"""Padding-free micro-batches: sequences balanced across ranks, packed into rows with cu_seqlens.

A RARO step mixes short policy answers with long critic prompts; padding them to a rectangle wastes most of the
compute. Here every sequence keeps its own length: sequences are first split across data-parallel ranks by the
Karmarkar–Karp largest-differencing method on a cost a·len + len² (linear layers plus attention), then packed,
first-fit decreasing, into micro-batches of at most `max_tokens_per_micro_batch` tokens, each one row whose
`position_ids` restart at every sequence. Every rank runs the same number of micro-batches (FSDP collectives
must line up): a rank with fewer splits its largest multi-sequence micro-batch, and only if it cannot, runs a
one-token filler micro-batch marked `is_padding` whose loss is multiplied by zero.

A sequence longer than the budget is an error naming it; nothing is ever dropped.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, fields
from typing import Sequence

import torch

IGNORE_INDEX = -100


@dataclass
class SequenceSample:
    input_ids: list[int]  # prompt + completion
    prompt_len: int  # completion = input_ids[prompt_len:], the only trained tokens
    advantage: float
    role: str  # "policy" | "critic"
    group: int
    uid: int  # index in the global (all-rank) batch, for sequence-level loss aggregation
    loss_weight: float = 1.0
    old_logprobs: list[float] | None = None  # per completion token
    rollout_logprobs: list[float] | None = None  # per completion token, from the rollout engine
    ref_logprobs: list[float] | None = None  # per completion token, from a frozen reference
    weight_version: int | None = None  # the engine weights that sampled it (None: not sampled, e.g. SFT data)
    preference: int = 0  # DPO: +1 the chosen, -1 the rejected member of pair `group`; 0 elsewhere
    temperature: float | None = None  # sampled at this temperature (None: the run's rollout.temperature)
    reward: float | None = None  # before group centring; only read by the rollout log (None: the mode has none)

    @property
    def num_targets(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass
class PackedMicroBatch:
    """One packed row of T tokens. Per-token tensors are 1-D [T]; the value for predicting token i+1 sits at i."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 [S+1]
    max_seqlen: int
    targets: torch.Tensor  # next token where it is a completion token, else -100
    advantages: torch.Tensor
    loss_weights: torch.Tensor
    seq_ids: torch.Tensor  # index (0..S-1) of the sequence in this micro-batch, at every position
    uids: torch.Tensor  # [S] global uid of each of those sequences
    old_logprobs: torch.Tensor | None
    rollout_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    num_sequences: int  # GLOBAL count over the whole step, for loss normalisation
    num_tokens: int  # GLOBAL count of trained tokens
    is_padding: bool = False
    # per token, where the samples carry their own (RARO's critic's); float64, so 1/T rounds once, as for a number
    temperatures: torch.Tensor | None = None
    # Computing only what is read (`pack(share_prompts=True)`); every per-token tensor above stays one value per row
    # of the whole packed row. Sequences of this row with the same prompt have the decoder compute it once:
    # `kept_rows` [Tc], the rows the decoder computes (each prompt's first copy, every completion token); `expand`
    # [T], for every row, the index in `kept_rows` of the row that holds its hidden state; both None where no
    # prompt repeats. `trained_rows`: the rows with a target, the only ones the LM head computes (listed here, on
    # the host: finding them on a GPU would make it wait for the answer every forward).
    kept_rows: torch.Tensor | None = None
    expand: torch.Tensor | None = None
    trained_rows: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "PackedMicroBatch":
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return PackedMicroBatch(**moved)

    @property
    def num_real_tokens(self) -> int:
        return 0 if self.is_padding else int(self.input_ids.numel())


def _per_token(values: list[float] | None, s: SequenceSample, name: str) -> list[float] | None:
    if values is None:
        return None
    if len(values) != s.num_targets:
        raise ValueError(f"sequence uid={s.uid}: {name} has {len(values)} values for {s.num_targets} completion tokens")
    return values


def pack(samples: Sequence[SequenceSample], *, num_sequences: int, num_tokens: int,
         share_prompts: bool = False) -> PackedMicroBatch:
    """Concatenate `samples` into one row; with `share_prompts`, also the rows the decoder computes once."""
    ids, pos, targets, adv, weights, seq_ids, cu = [], [], [], [], [], [], [0]
    uids = [s.uid for s in samples]
    extra: dict[str, list[float] | None] = {"old_logprobs": [], "rollout_logprobs": [], "ref_logprobs": []}
    for s in samples:
        n, p = len(s.input_ids), s.prompt_len
        if not 1 <= p <= n:
            raise ValueError(f"sequence uid={s.uid}: prompt_len {p} outside 1..{n}")
        ids.extend(s.input_ids)
        pos.extend(range(n))
        # Position i predicts token i+1; trained where i+1 is a completion token.
        targets.extend([IGNORE_INDEX] * (p - 1) + s.input_ids[p:] + [IGNORE_INDEX])
        adv.extend([0.0] * (p - 1) + [s.advantage] * (n - p) + [0.0])
        weights.extend([0.0] * (p - 1) + [s.loss_weight] * (n - p) + [0.0])
        seq_ids.extend([len(cu) - 1] * n)
        cu.append(cu[-1] + n)
        for name in extra:
            vals = _per_token(getattr(s, name), s, name)
            if vals is None or extra[name] is None:
                extra[name] = None
            else:
                extra[name].extend([0.0] * (p - 1) + list(vals) + [0.0])
    f32 = torch.float32
    temperatures = _temperatures(samples)
    kept_rows, expand = _shared_prompt_rows(samples) if share_prompts else (None, None)
    return PackedMicroBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max((len(s.input_ids) for s in samples), default=0),
        targets=torch.tensor(targets, dtype=torch.long),
        advantages=torch.tensor(adv, dtype=f32),
        loss_weights=torch.tensor(weights, dtype=f32),
        seq_ids=torch.tensor(seq_ids, dtype=torch.long),
        uids=torch.tensor(uids, dtype=torch.long),
        old_logprobs=None if extra["old_logprobs"] is None else torch.tensor(extra["old_logprobs"], dtype=f32),
        rollout_logprobs=None if extra["rollout_logprobs"] is None else torch.tensor(extra["rollout_logprobs"], dtype=f32),
        ref_logprobs=None if extra["ref_logprobs"] is None else torch.tensor(extra["ref_logprobs"], dtype=f32),
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        temperatures=None if temperatures is None else torch.tensor(temperatures, dtype=torch.float64),
        kept_rows=kept_rows,
        expand=expand,
        trained_rows=torch.tensor([i for i, t in enumerate(targets) if t != IGNORE_INDEX], dtype=torch.long)
        if share_prompts else None,
    )


def _shared_prompt_rows(samples: Sequence[SequenceSample]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`kept_rows` and `expand` of a packed row of `samples` whose repeated prompts are computed once: a prompt's
    hidden states depend on its tokens alone (causal attention, positions from 0), so every sequence that starts
    with the same prompt can read them from its first copy. (None, None) where no prompt repeats."""
    first: dict[tuple[int, ...], int] = {}  # prompt -> index in kept of its first row
    kept: list[int] = []
    expand: list[int] = []
    row = 0
    for s in samples:
        n, p = len(s.input_ids), s.prompt_len
        prompt = tuple(s.input_ids[:p])
        if prompt in first:
            expand.extend(range(first[prompt], first[prompt] + p))
        else:
            first[prompt] = len(kept)
            expand.extend(range(len(kept), len(kept) + p))
            kept.extend(range(row, row + p))
        expand.extend(range(len(kept), len(kept) + n - p))
        kept.extend(range(row + p, row + n))
        row += n
    if len(kept) == row:
        return None, None
    return torch.tensor(kept, dtype=torch.long), torch.tensor(expand, dtype=torch.long)


def _temperatures(samples: Sequence[SequenceSample]) -> list[float] | None:
    """Each token's sampling temperature where the samples carry their own; None where none does. A mix would
    leave some tokens' temperature unknown here, so it is refused."""
    own = [s.temperature is not None for s in samples]
    if not any(own):
        return None
    if not all(own):
        uid = next(s.uid for s in samples if s.temperature is None)
        raise ValueError(f"sequence uid={uid}: no sampling temperature, packed with sequences that carry one")
    return [t for s in samples for t in [s.temperature] * len(s.input_ids)]


def balanced_partition(costs: Sequence[float], k: int) -> list[list[int]]:
    """Split item indices into k parts of near-equal total cost: Karmarkar–Karp largest differencing, k-way.

    Each item starts as a k-tuple of subsets (itself in one, the rest empty). Repeatedly the two tuples with the
    largest spread (max sum − min sum) are merged, pairing the heaviest subset of one with the lightest of the
    other, until one tuple remains. Deterministic: ties break on item index.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    heap = []
    for i, c in enumerate(costs):
        parts = [(float(c), [i])] + [(0.0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-float(c), i, parts))
    if not heap:
        return [[] for _ in range(k)]
    while len(heap) > 1:
        _, i1, a = heapq.heappop(heap)
        _, i2, b = heapq.heappop(heap)
        a = sorted(a, key=lambda p: -p[0])
        b = sorted(b, key=lambda p: p[0])
        merged = sorted(((x[0] + y[0], x[1] + y[1]) for x, y in zip(a, b)), key=lambda p: -p[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), min(i1, i2), merged))
    return [sorted(p[1]) for p in heap[0][2]]


def _first_fit_decreasing(lengths: dict[int, int], budget: int) -> list[list[int]]:
    bins: list[tuple[int, list[int]]] = []
    for i in sorted(lengths, key=lambda i: (-lengths[i], i)):
        for b, (used, members) in enumerate(bins):
            if used + lengths[i] <= budget:
                bins[b] = (used + lengths[i], members + [i])
                break
        else:
            bins.append((lengths[i], [i]))
    return [members for _, members in bins]


def _split_to_count(bins: list[list[int]], count: int, lengths: dict[int, int]) -> list[list[int]]:
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            break
        largest = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        bins.remove(largest)
        half, acc, total = [], 0, sum(lengths[i] for i in largest)
        for i in largest:
            if acc < total / 2 and len(half) < len(largest) - 1:
                half.append(i)
                acc += lengths[i]
        bins += [half, [i for i in largest if i not in half]]
    return bins


def plan_micro_batches(
    samples: Sequence[SequenceSample],
    *,
    max_tokens_per_micro_batch: int,
    world_size: int,
    rank: int,
    cost_a: float = 2048.0,
    share_prompts: bool = False,
) -> list[PackedMicroBatch]:
    """This rank's packed micro-batches for the global batch `samples` (every rank passes the same list and gets
    its own share; every rank gets the same number of micro-batches). Normalisers carried by each micro-batch are
    the GLOBAL counts, so per-micro-batch losses sum to the full-batch loss."""
    for s in samples:
        if len(s.input_ids) > max_tokens_per_micro_batch:
            raise ValueError(
                f"sequence uid={s.uid} (role {s.role}) has {len(s.input_ids)} tokens, more than "
                f"train.max_tokens_per_micro_batch={max_tokens_per_micro_batch}; raise the budget or shorten rollouts"
            )
    for name in ("old_logprobs", "rollout_logprobs", "ref_logprobs"):
        # A mix made a micro-batch's field None wherever one sequence lacked it, so which sequences had it (the
        # engine gap's metric, truncated importance sampling) followed the packing, and a filler copied samples[0].
        lacking = [s.uid for s in samples if getattr(s, name) is None]
        if lacking and len(lacking) < len(samples):
            raise ValueError(f"sequence uid={lacking[0]} has no {name}, in a batch whose other sequences carry them")
    # At least 1: a (mini-)batch whose sequences have no completion token trains nothing (loss 0); a count of 0
    # stopped it in the loss kernel, naming no sequence.
    num_sequences = max(1, sum(1 for s in samples if s.num_targets > 0))
    num_tokens = max(1, sum(s.num_targets for s in samples))
    # What is placed whole: a sequence, or with `share_prompts` the sequences of one prompt, so that a micro-batch
    # computes each prompt once. A prompt's run is cut to fit the budget, and to a rank's share of the tokens, so
    # that a few large groups still spread over every rank.
    if share_prompts:
        rank_share = -(-sum(len(s.input_ids) for s in samples) // world_size)
        units = _prompt_units(samples, min(max_tokens_per_micro_batch, rank_share))
    else:
        units = [[i] for i in range(len(samples))]
    lengths = {u: sum(len(samples[i].input_ids) for i in unit) for u, unit in enumerate(units)}
    costs = [sum(cost_a * len(samples[i].input_ids) + len(samples[i].input_ids) ** 2 for i in unit) for unit in units]
    parts = balanced_partition(costs, world_size)
    per_rank = [_first_fit_decreasing({u: lengths[u] for u in part}, max_tokens_per_micro_batch) for part in parts]
    count = max(len(b) for b in per_rank)
    mine = _split_to_count(per_rank[rank], count, lengths)
    mbs = [pack([samples[i] for u in b for i in units[u]], num_sequences=num_sequences, num_tokens=num_tokens,
                share_prompts=share_prompts) for b in mine]
    while len(mbs) < count:
        mbs.append(_filler(samples, num_sequences, num_tokens))
    return mbs


def _prompt_units(samples: Sequence[SequenceSample], budget: int) -> list[list[int]]:
    """Indices of the sequences that share a prompt, in order of first appearance, each cut into runs of at most
    `budget` tokens (a longer sequence is a run of its own)."""
    by_prompt: dict[tuple[int, ...], list[list[int]]] = {}
    for i, s in enumerate(samples):
        runs = by_prompt.setdefault(tuple(s.input_ids[: s.prompt_len]), [[]])
        if runs[-1] and sum(len(samples[j].input_ids) for j in runs[-1]) + len(s.input_ids) > budget:
            runs.append([])
        runs[-1].append(i)
    return [run for runs in by_prompt.values() for run in runs]


def _filler(samples: Sequence[SequenceSample], num_sequences: int, num_tokens: int) -> PackedMicroBatch:
    """A two-token micro-batch with a trained position: it runs forward and backward like a real one (so every
    collective happens), and the update multiplies its loss by zero. Its temperature is its own (1): without one
    it ran at rollout.temperature, which SFT may set to 0, and the rank that got a filler stopped."""
    s = samples[0] if samples else None
    token = s.input_ids[0] if s else 0
    dummy = SequenceSample(input_ids=[token, token], prompt_len=1, advantage=0.0, role="padding", group=-1, uid=-1,
                           loss_weight=0.0, temperature=1.0,
                           old_logprobs=[0.0] if s and s.old_logprobs is not None else None,
                           rollout_logprobs=[0.0] if s and s.rollout_logprobs is not None else None,
                           ref_logprobs=[0.0] if s and s.ref_logprobs is not None else None)
    mb = pack([dummy], num_sequences=num_sequences, num_tokens=num_tokens)
    mb.is_padding = True
    return mb


def padding_stats(samples: Sequence[SequenceSample], micro_batches: Sequence[PackedMicroBatch]) -> dict[str, float]:
    """Tokens computed vs tokens a padded rectangle (batch x longest) would compute."""
    real = sum(len(s.input_ids) for s in samples)
    packed = sum(mb.input_ids.numel() for mb in micro_batches)
    rect = len(samples) * max((len(s.input_ids) for s in samples), default=0)
    return {
        "tokens": float(real),
        "packed_tokens": float(packed),
        "padded_tokens": float(rect),
        "packed_padding_fraction": 1.0 - real / packed if packed else 0.0,
        "padded_padding_fraction": 1.0 - real / rect if rect else 0.0,
    }
