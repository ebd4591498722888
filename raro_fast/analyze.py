"""Support and entropy analysis of two or more models: `python -m raro_fast.analyze --analysis.models
base=path/a,trained=path/b [--analysis.k 64 ...]` (also `raro-fast analyze`). The first model is the base of
the support categories. Writes report.json, report.md and PNG plots to `analysis.output_dir`.
"""
from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from tqdm import tqdm

from raro_fast import prompts
from raro_fast.analysis import (
    answer_entropy, avg_at_n, load_traces_jsonl, mean_token_entropy, pass_at_k_curve, perplexity, support_categories,
    support_metrics, token_entropy,
)
from raro_fast.analysis.cache import SampleCache, draw_seed
from raro_fast.config import ConfigError, _at_least, _help, help_text, load_config, to_dict
from raro_fast.metrics import strict_json
from raro_fast.model.hf import load_pretrained, model_files_digest, resolve_device, resolve_model_path, weights_digest
from raro_fast.model.policy import fused_lm_head_refusal
from raro_fast.rollout.embedded import EmbeddedEngine
from raro_fast.rollout.engine import SamplingParams, context_limit
from raro_fast.tasks import TaskConfig, make_task


@dataclass(kw_only=True)
class AnalysisSettings:
    models: str = _help("Comma-separated name=path (Hugging Face model directories); the first is the base.", "")
    split: Literal["train", "heldout"] = _help("Task split whose problems are sampled.", "heldout")
    num_problems: int = _help("Problems analysed (0: all of the split).", 64)
    k: int = _help("Samples per problem and model (pass@k up to k).", 64)
    chunk: int = _help("Samples drawn per problem per engine call.", 16)
    temperature: float = _help("Sampling temperature.", 0.6)
    top_p: float = _help("Nucleus sampling.", 0.95)
    max_new_tokens: int = _help("Longest completion; a longer one is unfinished (answer class NA).", 96)
    entropy_samples: int = _help(
        "Samples per problem teacher-forced for token-level entropy (at most k; a cache that kept the token ids of "
        "fewer draws a chunk more for them).", 4)
    answer_entropy_samples: int = _help(
        "Samples per problem (the first ones) over which answer entropy is taken; 0: all k. The plug-in estimate "
        "rises with the samples (more rare answers are seen), so reports compare only at one count: the paper "
        "takes 32, this project's published reports k (1024).", 0)
    seed: int = _help("Seed of the sample chunks (cached per model, problem and seed).", 0)
    batch_size: int = _help("Sequences per engine forward (a chunk of samples of one problem is split into these).", 64)
    device: str = _help("Where models run: auto = the GPU if there is one, else the CPU; or cpu, cuda, cuda:N.", "auto")
    traces: str = _help(
        "Optional JSONL of external reasoning traces ({\"problem_id\", \"trace\"} per line): their perplexity under "
        "every model, grouped by the support category of the last model against the base.", "")
    output_dir: str = _help("Where the cache, report and plots go.", "runs/analysis")

    def __post_init__(self) -> None:
        # num_problems -1 analysed all problems but the last (a slice), entropy_samples -1 gave token entropy nan.
        _at_least("analysis", self, 0, "num_problems", "entropy_samples", "answer_entropy_samples")
        _at_least("analysis", self, 1, "k", "chunk", "max_new_tokens", "batch_size")
        # Token entropy divides the logits by the temperature, and the engines sample greedily at 0 or below: the
        # k samples were one answer, reported as pass@k at that temperature.
        if not self.temperature > 0:
            raise ValueError(f"analysis.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"analysis.top_p must be in (0, 1], got {self.top_p}")


@dataclass(kw_only=True)
class AnalyzeConfig:
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    task: TaskConfig = field(default_factory=TaskConfig)


def parse_models(spec: str) -> list[tuple[str, str]]:
    pairs = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ValueError(f"analysis.models: {item!r} is not name=path")
        pairs.append((name, path))
    if len(pairs) < 2:
        raise ValueError("analysis.models: give at least two models (name=path,name=path)")
    if len({n for n, _ in pairs}) != len(pairs):
        raise ValueError("analysis.models: model names must differ")
    return pairs


def entropy_count(cfg: AnalysisSettings) -> int:
    """Samples per problem teacher-forced for token entropy: entropy_samples, at most k."""
    return max(0, min(cfg.entropy_samples, cfg.k))


def _with_ids(samples: list[dict]) -> int:
    return sum("token_ids" in x for x in samples)


def _draws_due(samples: list[dict], cfg: AnalysisSettings) -> int:
    """Draws (chunks) still to make for a problem: to k samples, and to `entropy_count` of them with token ids."""
    return max(math.ceil(max(0, cfg.k - len(samples)) / cfg.chunk),
               math.ceil(max(0, entropy_count(cfg) - _with_ids(samples)) / cfg.chunk))


def sample_model(name, model, tokenizer, task, problems, cfg: AnalysisSettings, cache: SampleCache) -> dict[str, list]:
    """Fill the cache up to k samples per problem (only what is missing), and up to `entropy_count` samples with
    token ids; return the first k samples per problem id.

    Token ids are kept only for the first samples of a problem that need them (entropy_samples of them: they are
    long). A cache written with a smaller entropy_samples holds fewer: the samples after it in the cache have no
    ids to teacher-force, so chunks are drawn past the cached ones (fresh seeds, as for a larger k) until enough
    carry ids; they are samples like any other, used by a later, larger k. Before, token entropy was silently
    averaged over the fewer sequences the old run kept."""
    engine = EmbeddedEngine.from_tokenizer(model, tokenizer, batch_size=cfg.batch_size)
    prompt = policy_prompts(tokenizer, problems)
    have = {p.id: cache.get(name, p.id, cfg.seed, prompt[p.id]) for p in problems}
    bar = tqdm(total=sum(_draws_due(have[p.id], cfg) for p in problems), desc=f"sampling {name}", dynamic_ncols=True)
    while due := [p for p in problems if _draws_due(have[p.id], cfg)]:
        for p in due:  # one engine call per problem and draw: its seed must not depend on which others are due
            # Whole chunks (samples past k stay cached for a larger k later). A draw is seeded by the index of its
            # first sample, so no seed draws twice for a problem whatever k and chunk this run or an earlier one
            # used (seeded by chunk number, a changed chunk size drew from a seed already used: correlated samples).
            start = len(have[p.id])
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                    n=cfg.chunk, seed=draw_seed(cfg.seed, p.id, start))
            comps = engine.generate([prompt[p.id]], params)[0]
            kept = _with_ids(have[p.id])
            for c in comps:
                keep_ids = kept < cfg.entropy_samples
                kept += keep_ids
                have[p.id].append({"text": c.text, "truncated": c.truncated, "length": len(c.token_ids),
                                   **({"prompt_ids": c.prompt_ids, "token_ids": c.token_ids} if keep_ids else {})})
            cache.put(name, p.id, cfg.seed, prompt[p.id], have[p.id])
            bar.update(1)
    bar.close()
    unread = sum("text" not in x for p in problems for x in have[p.id][: cfg.k])
    if unread:
        print(f"warning: {name}: {unread} cached samples hold their answer but not their text (cached before texts "
              "were): their answers stay as the parser of that time read them; delete the model's cache folder to "
              "sample again", file=sys.stderr)
    return {p.id: [read_answer(task, p, x) for x in have[p.id][: cfg.k]] for p in problems}


def policy_prompts(tokenizer, problems) -> dict[str, list[int]]:
    """Each problem's rendered policy prompt (token ids), by problem id: what its samples are drawn for."""
    return {p.id: prompts.render_prompt(tokenizer, prompts.policy_messages(p.question)) for p in problems}


def entropy_sequences(name: str, tokenizer, problems, cfg: AnalysisSettings, cache: SampleCache) -> dict[str, list[dict]]:
    """The samples teacher-forced for token entropy, per problem id: its first `entropy_count` cached samples that
    kept their token ids (a cache that kept more gives its first ones). Call after `sample_model`, which drew them."""
    n = entropy_count(cfg)
    prompt = policy_prompts(tokenizer, problems)
    out = {}
    for p in problems:
        seqs = [x for x in cache.get(name, p.id, cfg.seed, prompt[p.id]) if "token_ids" in x][:n]
        if len(seqs) < n:
            raise ValueError(f"{name}: problem {p.id!r} has {len(seqs)} cached samples with token ids, not "
                             f"analysis.entropy_samples = {n}")
        out[p.id] = seqs
    return out


def read_answer(task, problem, sample: dict) -> dict:
    """The sample with its answer and verdict, read now by the task's current parser and verifier: the cache keeps
    the text, so samples drawn before a parser fix are never scored by the old rule."""
    answer = task.final_answer(sample["text"], sample["truncated"]) if "text" in sample else sample["answer"]
    return {**sample, "answer": answer, "correct": bool(task.verify(problem, answer))}




_CHECKED_HEADS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


@torch.no_grad()
def check_lm_head(model, setting: str) -> None:
    """Refuse (ValueError naming `setting`) a model whose next-token distribution is not softmax(hidden @ W.T / T),
    what `token_entropy` computes from the LM-head weight W: a config that transforms the logits (Gemma 2's
    final_logit_softcapping, Cohere's logit_scale, ...), a head with a bias (`fused_lm_head_refusal`, as the trainer
    checks), or, for whatever else a model does, its own logits on a short probe differing from hidden @ W.T.
    Before, Gemma 2's token entropy came out 0.04 where its own logits give 3.6."""
    if model in _CHECKED_HEADS:
        return
    why = fused_lm_head_refusal(model)
    if why is None:
        weight = model.get_output_embeddings().weight
        ids = torch.arange(min(16, weight.shape[0]), device=weight.device)[None]
        logits = model(input_ids=ids).logits[0].float()
        mine = decoder_body(model, setting)(input_ids=ids).last_hidden_state[0].float() @ weight.float().T
        err, scale = float((logits - mine).abs().max()), float(logits.abs().max())
        if not err <= (1e-3 if weight.dtype == torch.float32 else 3e-2) * max(1.0, scale):
            why = (f"the model's logits are not its last hidden state times the LM-head weight (they differ by up to "
                   f"{err:.3g} at logits up to {scale:.3g} on a probe): it transforms them in a way the fused "
                   "LM-head kernels, which token entropy and trace perplexity go through, do not")
    if why is not None:
        raise ValueError(f"{setting}: {why}; analyse a model without it")
    _CHECKED_HEADS.add(model)


def decoder_body(model, setting: str):
    """The model's decoder without its LM head, where Hugging Face keeps it (`model.model` for Llama and Qwen,
    `model.transformer` for GPT-2: found by review, an AttributeError from `.model`)."""
    body = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
    if body is None or body is model:
        raise ValueError(f"{setting}: {type(model).__name__} keeps no decoder apart from its LM head where Hugging Face "
                         "models do (base_model_prefix), so its hidden states cannot be read; analyse another model")
    return body


@torch.no_grad()
def teacher_forced(model, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0):
    """(log-prob, entropy, mask) at every position of prompt + completion; only completion targets are kept. A
    model whose logits are not hidden @ W.T is refused (`check_lm_head`)."""
    check_lm_head(model, "teacher_forced")
    ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
    targets = torch.full_like(ids[0], -100)
    targets[len(prompt_ids) - 1 : -1] = ids[0, len(prompt_ids) :]
    hidden = decoder_body(model, "teacher_forced")(input_ids=ids).last_hidden_state[0].float()
    logprobs, entropy = token_entropy(hidden, model.get_output_embeddings().weight.float(), targets, temperature=temperature)
    return logprobs, entropy, targets != -100


@torch.no_grad()
def model_token_entropy(model, samples: dict[str, list], temperature: float) -> float:
    """Teacher-force every given sample that kept its token ids (`entropy_sequences`: the first entropy_samples of
    each problem); average over positions, then sequences (the paper)."""
    ents, masks, seqs = [], [], []
    for sid, s in enumerate(x for xs in samples.values() for x in xs if "token_ids" in x):
        _, ent, mask = teacher_forced(model, s["prompt_ids"], s["token_ids"], temperature)
        ents.append(ent)
        masks.append(mask)
        seqs.append(torch.full_like(mask, sid, dtype=torch.long))
    if not ents:
        return math.nan
    return mean_token_entropy(torch.cat(ents).cpu(), torch.cat(masks).cpu(), torch.cat(seqs).cpu())


@torch.no_grad()
def trace_perplexities(model, tokenizer, problems, traces: list[dict[str, str]]) -> dict[str, float]:
    """Perplexity of each external trace (teacher-forced as the assistant's reply to the problem), by problem id."""
    by_id = {p.id: p for p in problems}
    out = {}
    for rec in traces:
        p = by_id.get(rec["problem_id"])
        if p is None:
            continue  # counted as skipped in the report
        prompt = prompts.render_prompt(tokenizer, prompts.policy_messages(p.question))
        # as the conversation reads it: tokenized alone, a SentencePiece tokenizer began it with a `▁` the model never
        # reads there (found by review: a model that writes the trace at perplexity 1.08 was reported at 13.0)
        completion = prompts.reply_ids(tokenizer, rec["trace"], prompts.policy_messages(p.question))
        if not completion:
            raise ValueError(f"analysis.traces: the trace of {rec['problem_id']!r} is empty")
        limit = context_limit(model.config)
        if limit is not None and len(prompt) + len(completion) > limit:
            # found by review: read silently past the positions a rotary model supports (GPT-2: an IndexError)
            raise ValueError(f"analysis.traces: the trace of {rec['problem_id']!r} is {len(completion)} tokens after a "
                             f"{len(prompt)}-token prompt, past the model's {limit} positions "
                             "(max_position_embeddings); shorten the trace or analyse a model with a longer context")
        logprobs, _, mask = teacher_forced(model, prompt, completion)
        out[rec["problem_id"]] = perplexity(logprobs[mask].tolist())
    return out


def summarize(samples: dict[str, dict[str, list]], k: int, token_entropies: dict[str, float],
              trace_ppl: dict[str, dict[str, float]] | None = None, traces_total: int = 0, *,
              answer_classes: Callable[[list[str | None]], list[int | None]] | None = None,
              answer_entropy_samples: int = 0) -> dict:
    """The report: pass@k, support against the first model, answer entropy over each problem's first
    `answer_entropy_samples` samples (0: all k; answers grouped by `answer_classes`, the task's, where given), token
    entropy, lengths."""
    names = list(samples)
    base = names[0]
    n_answers = min(answer_entropy_samples, k) if answer_entropy_samples > 0 else k
    report = {"k": k, "answer_entropy_samples": n_answers, "models": {}, "support_vs": base}
    for name in names:
        short = {pid: len(s) for pid, s in samples[name].items() if len(s) != k}
        if short:
            raise ValueError(f"{name}: {len(short)} problems do not have exactly k = {k} samples (e.g. "
                             f"{next(iter(short.items()))}): pass@k would be reported for another n")
        counts = [(len(s), sum(x["correct"] for x in s)) for s in samples[name].values()]
        curve = pass_at_k_curve(counts)
        answers = [[x["answer"] for x in s[:n_answers]] for s in samples[name].values()]
        ent = [answer_entropy(a, None if answer_classes is None else answer_classes(a)) for a in answers]
        lengths = [x["length"] for s in samples[name].values() for x in s]
        entry = {"pass_at_k": {str(kk): v for kk, v in curve.items()}, "avg_at_n": avg_at_n(counts),
                 "answer_entropy": sum(ent) / len(ent), "token_entropy": token_entropies[name],
                 "mean_length": sum(lengths) / len(lengths)}
        if name != base:
            b = [sum(x["correct"] for x in samples[base][pid]) for pid in samples[base]]
            t = [sum(x["correct"] for x in samples[name][pid]) for pid in samples[base]]
            _, cats = support_categories(b, t)
            entry["categories"] = cats
            entry["support_metrics"] = support_metrics(cats["P"], cats["E"], cats["S"], cats["O"])
        report["models"][name] = entry
    if trace_ppl is not None:
        # Categories of the last model against the base: where did training lose or gain the problem?
        pids = list(samples[base])
        b = [sum(x["correct"] for x in samples[base][pid]) for pid in pids]
        t = [sum(x["correct"] for x in samples[names[-1]][pid]) for pid in pids]
        cats = dict(zip(pids, support_categories(b, t)[0]))
        for name in names:
            groups: dict[str, list[float]] = {}
            for pid, ppl in trace_ppl[name].items():
                groups.setdefault(cats[pid], []).append(ppl)
            report["models"][name]["trace_perplexity"] = {c: sum(v) / len(v) for c, v in sorted(groups.items())}
        report["traces"] = {"categories_of": names[-1], "used": len(next(iter(trace_ppl.values()))),
                            "skipped_not_analysed": traces_total - len(next(iter(trace_ppl.values())))}
    return report


def markdown(report: dict) -> str:
    k = report["k"]
    # Reports from before the count was recorded took every sample.
    n_answers = report.get("answer_entropy_samples", k)
    head = (f"| model | pass@1 | pass@{k} | avg@{k} | P | S | E | O | SRR | NDR | SDS | NSCR | answer H@{n_answers} "
            "| token H | length |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v: "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"  # noqa: E731
    for name, m in report["models"].items():
        c = m.get("categories", {})
        s = m.get("support_metrics", {})
        cells = [name, fmt(m["pass_at_k"]["1"]), fmt(m["pass_at_k"][str(k)]), fmt(m["avg_at_n"]),
                 *(str(c.get(x, "-")) for x in "PSEO"), *(fmt(s[x]) if s else "-" for x in ("SRR", "NDR", "SDS", "NSCR")),
                 fmt(m["answer_entropy"]), fmt(m["token_entropy"]), f"{m['mean_length']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nSupport categories and metrics are against `{report['support_vs']}`.\n"


def plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        curve = report["models"][name]["pass_at_k"]
        ax.plot([int(x) for x in curve], list(curve.values()), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k", ylabel="pass@k", title="pass@k")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    others = names[1:]
    for i, cat in enumerate("PSEO"):
        axes[0].bar([x + i * 0.2 for x in range(len(others))], [report["models"][n]["categories"][cat] for n in others],
                    width=0.2, label=cat)
    axes[0].set_xticks([x + 0.3 for x in range(len(others))], others)
    axes[0].set_title(f"support categories vs {names[0]}")
    axes[0].legend()
    for i, key in enumerate(["answer_entropy", "token_entropy"]):
        axes[1].bar([x + i * 0.4 for x in range(len(names))], [report["models"][n][key] for n in names], width=0.4, label=key)
    axes[1].set_xticks([x + 0.2 for x in range(len(names))], names)
    axes[1].set_title("entropy")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "support_and_entropy.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))  # the models in the given order, e.g. a series of checkpoints
    k = report["k"]
    for key, label in [("1", "pass@1"), (str(k), f"pass@{k}")]:
        ax.plot(names, [report["models"][n]["pass_at_k"][key] for n in names], marker="o", label=label)
    ax.plot(names, [report["models"][n]["answer_entropy"] for n in names], marker="s", label="answer entropy")
    ax.set_title("across models / checkpoints")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "across_models.png", dpi=110)
    plt.close(fig)


def run(cfg: AnalyzeConfig) -> dict:
    a = cfg.analysis
    models = parse_models(a.models)
    if a.k < 1 or a.chunk < 1:
        raise ValueError("analysis.k and analysis.chunk must be >= 1")
    task = make_task(cfg.task)
    if not task.has_verifier:
        raise ValueError(f"task.name: the {cfg.task.name} task has no verifier, and pass@k and the support "
                         "categories count verified answers; analyse a task with one (countdown, deepmath)")
    problems = task.examples(a.split)[: a.num_problems or None]
    if not problems:  # before any model loads (it was "pass_at_k_curve: no problems" after sampling them all)
        raise ValueError(f"analysis.split: the {cfg.task.name} task's {a.split!r} split has no problems")
    out = Path(a.output_dir)
    cache = SampleCache(out / "samples")
    traces = load_traces_jsonl(a.traces) if a.traces else None
    samples, token_h, trace_ppl = {}, {}, {}
    device = resolve_device(a.device, "analysis.device")
    for name, path in models:
        setting = f"analysis.models ({name})"
        path = resolve_model_path(path, setting)  # once: a hub id is looked up here, not again for the digest
        model, tokenizer = load_pretrained(path, dtype=torch.float32, setting=setting)
        model.to(device)  # fp32 everywhere: the models analysed are small, and fp32 keeps entropies exact
        check_lm_head(model, setting)  # before sampling: its token entropy could not be computed
        # What draws the samples: the weights, the files that configure the model and render its prompts
        # (config, generation config, tokenizer, chat template), and the sampling settings.
        cache.claim(name, {"weights_sha256": weights_digest(path), "model_files_sha256": model_files_digest(path),
                           "temperature": a.temperature, "top_p": a.top_p, "max_new_tokens": a.max_new_tokens})
        if traces is not None:  # before sampling: a trace the model cannot read is refused without that wait
            trace_ppl[name] = trace_perplexities(model, tokenizer, problems, traces)
        samples[name] = sample_model(name, model, tokenizer, task, problems, a, cache)
        token_h[name] = model_token_entropy(model, entropy_sequences(name, tokenizer, problems, a, cache), a.temperature)
    report = summarize(samples, a.k, token_h, trace_ppl if traces is not None else None, len(traces or []),
                       answer_classes=task.answer_classes, answer_entropy_samples=a.answer_entropy_samples)
    out.mkdir(parents=True, exist_ok=True)
    # with the settings that drew it, so reports put side by side can be checked (experiments/support_seeds.py)
    (out / "report.json").write_text(strict_json({**report, "config": to_dict(cfg)}, indent=1))
    (out / "report.md").write_text(markdown(report))
    plots(report, out)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text("python -m raro_fast.analyze", root=AnalyzeConfig))
        return 0
    try:
        report = run(load_config(argv, root=AnalyzeConfig))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
