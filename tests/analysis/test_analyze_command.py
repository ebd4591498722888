"""`python -m raro_fast.analyze` end to end on two embedded-default checkpoints (random weights, CPU, small k):
report, table and plots written; a larger k samples only what is missing, and the first samples stay the same."""
import json
import math
import re

import pytest
import torch

from raro_fast import analyze
from raro_fast.analysis.cache import SampleCache
from raro_fast.model.hf import build_embedded_model, load_project_tokenizer, save_pretrained_atomic


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = load_project_tokenizer()
    paths = []
    for seed in (0, 1):
        m = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                 max_position=256, seed=seed)
        save_pretrained_atomic(m, tok, root / f"m{seed}")
        paths.append(root / f"m{seed}")
    return paths


def _args(models, out, k):
    return ["--analysis.models", f"base={models[0]},other={models[1]}", "--analysis.k", str(k), "--analysis.chunk", "2",
            "--analysis.num_problems", "3", "--analysis.max_new_tokens", "12", "--analysis.output_dir", str(out),
            "--analysis.entropy_samples", "2", "--task.countdown.num_train", "10", "--task.countdown.num_heldout", "5"]


def test_analyze_end_to_end_and_growing_k(two_models, tmp_path, capsys):
    out = tmp_path / "a"
    assert analyze.main(_args(two_models, out, 2)) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"base", "other"} and report["k"] == 2
    other = report["models"]["other"]
    assert sum(other["categories"].values()) == 3 and set(other["support_metrics"]) == {"SRR", "NDR", "SDS", "NSCR"}
    assert other["answer_entropy"] >= 0 and other["token_entropy"] > 0
    for png in ("pass_at_k.png", "support_and_entropy.png", "across_models.png"):
        assert (out / png).stat().st_size > 5000
    assert "| base |" in (out / "report.md").read_text() and "pass@2" in capsys.readouterr().out

    cache = SampleCache(out / "samples")
    pid = next(iter(p.name for p in (out / "samples" / "base" / "seed0").glob("*.json")))
    first = json.loads((out / "samples" / "base" / "seed0" / pid).read_text())["samples"]
    assert len(first) == 2
    assert analyze.main(_args(two_models, out, 4)) == 0
    grown = json.loads((out / "samples" / "base" / "seed0" / pid).read_text())["samples"]
    assert len(grown) == 4 and grown[:2] == first  # only the missing samples were drawn
    assert json.loads((out / "report.json").read_text())["k"] == 4
    assert cache.get("base", "nope", 0, [5, 6]) == []


def test_a_changed_chunk_size_draws_what_is_missing_from_seeds_never_used(two_models, tmp_path, monkeypatch):
    """k and chunk both grow (support.sh passes chunk = k): a larger k used to draw nothing when the cached count
    was not a multiple of the new chunk (and then label the old samples pass@k), or to draw again from a seed that
    had drawn already (correlated samples) when it was."""
    from raro_fast.rollout.embedded import EmbeddedEngine

    seeds = []
    generate = EmbeddedEngine.generate
    monkeypatch.setattr(EmbeddedEngine, "generate",
                        lambda self, prompts, params: seeds.append(params.seed) or generate(self, prompts, params))
    out = tmp_path / "g"
    grow = lambda k, chunk: analyze.main([*_args(two_models, out, k), "--analysis.chunk", str(chunk)])  # noqa: E731
    assert grow(4, 2) == 0  # draws at samples 0 and 2 of every problem and model
    first = {p: json.loads(p.read_text())["samples"] for p in (out / "samples").rglob("seed0/*.json")}
    assert grow(6, 4) == 0  # 4 cached, a chunk of 4 from sample 4 (the old code: none, then a KeyError)
    assert grow(8, 8) == 0  # 8 cached: nothing to draw
    # models x problems x draws; within a model all distinct (the two models share them: a paired comparison)
    assert len(seeds) == 2 * 3 * 3 and len(set(seeds)) == 3 * 3
    for path, samples in first.items():
        now = json.loads(path.read_text())["samples"]
        assert len(now) == 8 and now[:4] == samples
    report = json.loads((out / "report.json").read_text())
    assert report["k"] == 8 and "pass@8" in (out / "report.md").read_text()


def test_cached_samples_are_read_by_the_current_parser_and_verifier(two_models, tmp_path, capsys):
    """The cache keeps texts: a sample drawn before a parser fix is read by the fixed parser (it used to keep the
    answer and verdict of the day it was drawn); one cached before texts were has its answer verified again."""
    from raro_fast.model.hf import load_pretrained
    from raro_fast.tasks import make_task

    cfg = analyze.load_config(_args(two_models, tmp_path / "c", 3), root=analyze.AnalyzeConfig)
    task = make_task(cfg.task)
    p = task.examples("heldout")[0]
    cache = SampleCache(tmp_path / "c" / "samples")
    model, tok = load_pretrained(two_models[0], dtype=torch.float32, setting="test")
    text = f"<think>x</think><answer>{p.answer} makes {p.meta['target']}</answer>"  # text beside the expression
    cache.put("m", p.id, 0, analyze.policy_prompts(tok, [p])[p.id], [
        # read by the old parser as the expression: right; the current one reads no answer
        {"text": text, "truncated": False, "length": 9, "answer": p.answer, "correct": True},
        {"text": f"<think>x</think><answer>{p.answer}</answer>", "truncated": True, "length": 9},  # cut off: none
        {"answer": p.answer, "correct": False, "length": 5},  # cached before texts: its verdict is computed again
    ])
    got = analyze.sample_model("m", model, tok, task, [p], cfg.analysis, cache)[p.id]
    assert [(x["answer"], x["correct"]) for x in got] == [(None, False), (None, False), (p.answer, True)]
    assert "1 cached samples hold their answer but not their text" in capsys.readouterr().err


def test_analyze_refuses_a_task_without_a_verifier(two_models, tmp_path, capsys):
    # poetry's verify is None: every answer was counted wrong and the report said pass@k = 0, out of support
    assert analyze.main([*_args(two_models, tmp_path / "p", 2), "--task.name", "poetry"]) == 2
    assert "the poetry task has no verifier" in capsys.readouterr().err


def test_analyze_trace_perplexity_by_category(two_models, tmp_path):
    from raro_fast.tasks import get_task
    from raro_fast.tasks.countdown import CountdownConfig

    problems = get_task("countdown", CountdownConfig(num_train=10, num_heldout=5)).examples("heldout")[:3]
    traces = tmp_path / "traces.jsonl"
    lines = [json.dumps({"problem_id": p.id, "trace": f"<think>try</think><answer>{p.answer}</answer>"}) for p in problems]
    lines.append(json.dumps({"problem_id": "countdown:not-analysed", "trace": "x"}))
    traces.write_text("\n".join(lines) + "\n")
    out = tmp_path / "t"
    assert analyze.main(_args(two_models, out, 2) + ["--analysis.traces", str(traces)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["traces"] == {"categories_of": "other", "used": 3, "skipped_not_analysed": 1}
    for name in ("base", "other"):
        groups = report["models"][name]["trace_perplexity"]
        assert groups and all(v > 1.0 for v in groups.values())  # a random model: perplexity well above 1
    traces.write_text('{"problem_id": "a"}\n')
    assert analyze.main(_args(two_models, out, 2) + ["--analysis.traces", str(traces)]) == 2


def test_analyze_bad_models_argument(tmp_path, capsys):
    assert analyze.main(["--analysis.models", "only=one"]) == 2
    assert "at least two models" in capsys.readouterr().err
    assert analyze.main(["--analysis.models", f"a={tmp_path},b"]) == 2
    assert "'b' is not name=path" in capsys.readouterr().err
    assert analyze.main(["--analysis.models", f"a={tmp_path},a={tmp_path}"]) == 2
    assert "model names must differ" in capsys.readouterr().err  # one cache folder and one report entry for two
    # refused at start: -1 analysed every problem but the last (a slice), and the report said nothing of it
    assert analyze.main(["--analysis.models", "a=x,b=y", "--analysis.num_problems", "-1"]) == 2
    assert "command line: section 'analysis': analysis.num_problems must be >= 0, got -1" in capsys.readouterr().err
    assert analyze.main(["--analysis.models", "a=x,b=y", "--analysis.entropy_samples", "-2"]) == 2
    assert "analysis.entropy_samples must be >= 0, got -2" in capsys.readouterr().err
    assert analyze.main(["--analysis.models", "a=x,b=y", "--analysis.max_new_tokens", "0"]) == 2
    assert "analysis.max_new_tokens must be >= 1, got 0" in capsys.readouterr().err
    assert analyze.main(["--analysis.models", f"a={tmp_path / 'x'},b={tmp_path / 'y'}"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_analyze_bad_device(two_models, tmp_path, capsys):
    args = _args(two_models, tmp_path / "d", 2)
    assert analyze.main(args + ["--analysis.device", "gpu0"]) == 2
    assert "analysis.device: 'gpu0' is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert analyze.main(args + ["--analysis.device", "cuda"]) == 2
        assert "has no CUDA GPU" in capsys.readouterr().err


def test_cached_samples_are_never_served_for_other_weights_or_settings(two_models, tmp_path, capsys):
    out = tmp_path / "c"
    assert analyze.main(_args(two_models, out, 2)) == 0
    capsys.readouterr()
    files = {p: p.read_bytes() for p in (out / "samples").rglob("seed0/*.json")}
    # The same names given the other weights: before, the old samples were silently reused.
    swapped = _args(two_models[::-1], out, 2)
    assert analyze.main(swapped) == 2
    err = capsys.readouterr().err
    assert f"{out / 'samples' / 'base'}: the cached samples of 'base' were drawn by another model or settings " \
           "(weights_sha256: cached '" in err and "give another analysis.output_dir" in err
    assert analyze.main(_args(two_models, out, 2) + ["--analysis.temperature", "1.0"]) == 2
    assert "(temperature: cached 0.6, now 1.0)" in capsys.readouterr().err
    # longer completions finish where the cached ones were cut off; another nucleus draws other answers
    assert analyze.main(_args(two_models, out, 2) + ["--analysis.max_new_tokens", "13"]) == 2
    assert "(max_new_tokens: cached 12, now 13)" in capsys.readouterr().err
    assert analyze.main(_args(two_models, out, 2) + ["--analysis.top_p", "0.9"]) == 2
    assert "(top_p: cached 0.95, now 0.9)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (out / "samples").rglob("seed0/*.json")} == files  # nothing overwritten
    # A cache from before identities were recorded is adopted, with a warning, and then bound.
    for record in (out / "samples").rglob("identity.json"):
        record.unlink()
    assert analyze.main(_args(two_models, out, 2)) == 0
    assert "cached samples without a record of the model and settings" in capsys.readouterr().err
    assert analyze.main(swapped) == 2


def test_weights_digest_follows_the_bytes(tmp_path):
    from raro_fast.model.hf import weights_digest

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weight files"):
        weights_digest(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    first = weights_digest(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1}')  # not a weight file
    assert weights_digest(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x03")
    assert weights_digest(tmp_path) != first
    # the same bytes split otherwise over the shards are other weights: the digest names each file
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.bin").write_bytes(b"\x01")
    (shards / "b.bin").write_bytes(b"\x02\x03")
    first = weights_digest(shards)
    (shards / "a.bin").write_bytes(b"\x01\x02")
    (shards / "b.bin").write_bytes(b"\x03")
    assert weights_digest(shards) != first


def test_model_files_digest_follows_each_files_name_and_the_extra_chat_templates(tmp_path):
    from raro_fast.model.hf import model_files_digest

    (tmp_path / "merges.txt").write_text("a b\n")
    first = model_files_digest(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01")  # weights count in weights_digest, not here
    assert model_files_digest(tmp_path) == first
    (tmp_path / "merges.txt").rename(tmp_path / "vocab.txt")  # the same bytes as another tokenizer file
    renamed = model_files_digest(tmp_path)
    assert renamed != first
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    assert model_files_digest(tmp_path) != renamed


def test_draw_seeds_are_pinned_and_distinct_for_every_first_sample():
    """Caches written before keep their seeds (the formula is fixed), and no two draws of a problem share one."""
    import hashlib

    from raro_fast.analysis.cache import draw_seed

    assert draw_seed(3, "countdown:1-2-3:6", 16) == int.from_bytes(
        hashlib.sha256(b"3/countdown:1-2-3:6/16").digest()[:6], "little")
    assert len({draw_seed(0, "countdown:1-2-3:6", first) for first in range(0, 512, 2)}) == 256


def test_a_cache_write_cut_short_leaves_the_samples_before_it(tmp_path, monkeypatch):
    from pathlib import Path

    cache = SampleCache(tmp_path)
    cache.put("m", "p:1", 0, [5, 6], [{"text": "a"}])
    write_text = Path.write_text

    def cut_short(self, text, *args, **kwargs):  # a full disk, or the process killed mid-write
        write_text(self, text[: len(text) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(OSError):
        cache.put("m", "p:1", 0, [5, 6], [{"text": "a"}, {"text": "b"}])
    monkeypatch.undo()
    assert cache.get("m", "p:1", 0, [5, 6]) == [{"text": "a"}]


def test_another_seed_draws_its_own_samples_and_num_problems_0_is_the_whole_split(two_models, tmp_path, monkeypatch):
    """The cache is keyed by seed: seed 1 was served seed 0's samples if it were not. Token entropy is measured at
    the sampling temperature, of the distribution the samples were drawn from."""
    temperatures = []
    model_token_entropy = analyze.model_token_entropy
    monkeypatch.setattr(analyze, "model_token_entropy",
                        lambda model, samples, t: temperatures.append(t) or model_token_entropy(model, samples, t))
    out = tmp_path / "s"
    assert analyze.main(_args(two_models, out, 2)) == 0
    assert analyze.main([*_args(two_models, out, 2), "--analysis.seed", "1", "--analysis.num_problems", "0"]) == 0
    assert temperatures == [0.6] * 4
    seed0 = sorted((out / "samples" / "base" / "seed0").glob("*.json"))
    assert len(seed0) == 3 and len(list((out / "samples" / "base" / "seed1").glob("*.json"))) == 5
    for path in seed0:
        drawn = [x["token_ids"] for x in json.loads(path.read_text())["samples"]]
        again = [x["token_ids"] for x in json.loads((path.parents[1] / "seed1" / path.name).read_text())["samples"]]
        assert drawn != again
    report = json.loads((out / "report.json").read_text())
    assert sum(report["models"]["other"]["categories"].values()) == 5  # the five held-out problems


def test_token_entropy_and_trace_perplexity_are_the_models_own_in_float64(two_models):
    """Token entropy averages each sequence's positions, then the sequences (pooled, the longer one would weigh
    more), at the temperature given; a trace's perplexity counts the trace's tokens only (the prompt's positions
    averaged in as zeros gave a lower one)."""
    from raro_fast import prompts
    from raro_fast.model.hf import load_pretrained
    from raro_fast.tasks import get_task
    from raro_fast.tasks.countdown import CountdownConfig

    model, tok = load_pretrained(two_models[0], dtype=torch.float32, setting="test")
    p = get_task("countdown", CountdownConfig(num_train=10, num_heldout=5)).examples("heldout")[0]
    prompt = prompts.render_prompt(tok, prompts.policy_messages(p.question))

    def reference(completion, temperature):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double() / temperature
        logp = logits.log_softmax(-1)[len(prompt) - 1 : -1]
        return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)

    short = tok("(1+2)", add_special_tokens=False)["input_ids"]
    long = tok("<think>3*4=12, 12-5=7</think><answer>3*4-5</answer>", add_special_tokens=False)["input_ids"]
    samples = {"a": [{"prompt_ids": prompt, "token_ids": short}],
                "b": [{"prompt_ids": prompt, "token_ids": long}, {"text": "no ids kept"}]}
    ent_short, ent_long = reference(short, 0.05)[1], reference(long, 0.05)[1]  # sharp: entropies that differ
    want = (ent_short.mean() + ent_long.mean()) / 2
    assert abs(float(torch.cat([ent_short, ent_long]).mean() - want)) > 1e-3  # the two orders differ here
    assert analyze.model_token_entropy(model, samples, 0.05) == pytest.approx(float(want), abs=1e-5)

    trace = "<think>3*4=12</think><answer>3*4-5</answer>"
    ppl = analyze.trace_perplexities(model, tok, [p], [{"problem_id": p.id, "trace": trace},
                                                       {"problem_id": "countdown:elsewhere", "trace": "x"}])
    logprobs = reference(tok(trace, add_special_tokens=False)["input_ids"], 1.0)[0]
    assert ppl == {p.id: pytest.approx(float((-logprobs.mean()).exp()), rel=1e-5)}


def test_entropy_samples_are_at_most_k():
    """entropy_samples 8 at k = 4 teacher-forces the 4 samples there are; it drew 2 chunks more for token ids."""
    cfg = analyze.AnalysisSettings(k=4, chunk=2, entropy_samples=8)
    assert analyze.entropy_count(cfg) == 4
    assert analyze._draws_due([], cfg) == 2
    four = [{"text": "x", "token_ids": [1]} for _ in range(4)]
    assert analyze._draws_due(four, cfg) == 0
    assert analyze._draws_due(four[:1] + [{"text": "x"}] * 2, analyze.AnalysisSettings(k=4, chunk=2, entropy_samples=3)) == 1


def test_summarize_exact_numbers_on_three_models():
    """Support categories are the model's against the base (swapped, expansion and shrinkage trade places); answer
    entropy is the mean over problems of each problem's, with the task's classes; the traces are grouped by the
    categories of the last model against the base."""
    from raro_fast.analysis import support_metrics

    def s(*pairs):  # (answer, correct) per sample
        return [{"answer": a, "correct": c, "length": 10 + i} for i, (a, c) in enumerate(pairs)]

    w, r = ("a", False), ("b", True)
    samples = {
        "base": {"p1": s(("0.5", True), ("1/2", True)), "p2": s(w, w), "p3": s(r, w), "p4": s(w, w),
                 "p5": s(w, w)},
        "mid": {"p1": s(w, w), "p2": s(r, w), "p3": s(r, r), "p4": s(w, w), "p5": s(w, r)},
        "last": {"p1": s(r, w), "p2": s(w, w), "p3": s(w, w), "p4": s(r, r), "p5": s(w, (None, False))},
    }
    classes = {"0.5": 0, "1/2": 0, "a": 1, "b": 2}
    trace_ppl = {name: {"p1": 2.0, "p2": 4.0, "p3": 5.0, "p4": 3.0, "p5": 8.0} for name in samples}
    report = analyze.summarize(samples, 2, {"base": 1.5, "mid": 1.25, "last": 1.0}, trace_ppl, 6,
                               answer_classes=lambda answers: [None if a is None else classes[a] for a in answers])
    base, mid, last = (report["models"][n] for n in ("base", "mid", "last"))
    assert base["pass_at_k"] == {"1": pytest.approx(0.3), "2": pytest.approx(0.4)}  # (1 + 0 + 1/2 + 0 + 0) / 5
    assert base["avg_at_n"] == pytest.approx(0.3) and base["mean_length"] == 10.5 and base["token_entropy"] == 1.5
    # base: p1's 0.5 and 1/2 are one answer (0), p3 two answers (ln 2), the rest one each
    assert base["answer_entropy"] == pytest.approx(math.log(2) / 5, rel=1e-12)
    assert last["answer_entropy"] == pytest.approx(2 * math.log(2) / 5, rel=1e-12)  # p1, and p5 (None is NA)
    assert "categories" not in base
    assert mid["categories"] == {"P": 1, "S": 1, "E": 2, "O": 1}  # p3 P, p1 S, p2 and p5 E, p4 O
    assert last["categories"] == {"P": 1, "S": 1, "E": 1, "O": 2}  # p1 P, p3 S, p4 E, p2 and p5 O
    assert mid["support_metrics"] == pytest.approx(support_metrics(P=1, E=2, S=1, O=1))
    # last against base: p1 P (2), p3 S (5), p4 E (3), p2 and p5 O (4 and 8)
    assert last["trace_perplexity"] == {"E": 3.0, "O": 6.0, "P": 2.0, "S": 5.0}
    assert report["traces"] == {"categories_of": "last", "used": 5, "skipped_not_analysed": 1}
    assert report["answer_entropy_samples"] == 2 and "answer H@2 |" in analyze.markdown(report)
    # Over each problem's first sample only: one answer each, entropy 0 (it was always over all k, and the
    # plug-in estimate rises with the samples: a report at k = 1024 could not be set beside the paper's 32).
    first = analyze.summarize(samples, 2, {"base": 1.5, "mid": 1.25, "last": 1.0}, answer_entropy_samples=1,
                              answer_classes=lambda answers: [None if a is None else classes[a] for a in answers])
    assert [m["answer_entropy"] for m in first["models"].values()] == [0.0, 0.0, 0.0]
    assert first["answer_entropy_samples"] == 1 and "answer H@1 |" in analyze.markdown(first)
    assert first["models"]["last"]["pass_at_k"] == last["pass_at_k"]  # pass@k still over all k


def test_token_entropy_teacher_forces_entropy_samples_sequences_whatever_the_cache_kept(two_models, tmp_path,
                                                                                       monkeypatch):
    """Token ids are kept for the first entropy_samples samples only. A rerun with a larger entropy_samples was
    served the cache of a smaller one and silently averaged token entropy over the fewer sequences it kept; now
    the missing ones are drawn (one chunk past the cached samples, whose first k stay as they were). A cache that
    kept more gives its first entropy_samples."""
    forced = []
    teacher_forced = analyze.teacher_forced
    monkeypatch.setattr(analyze, "teacher_forced",
                        lambda model, p, c, t=1.0: forced.append(tuple(c)) or teacher_forced(model, p, c, t))
    out = tmp_path / "e"
    run = lambda n: analyze.main([*_args(two_models, out, 4), "--analysis.entropy_samples", str(n)])  # noqa: E731
    def files():
        return {p: json.loads(p.read_text())["samples"] for p in (out / "samples").rglob("seed0/*.json")}

    assert run(1) == 0
    assert len(forced) == 2 * 3 * 1  # models x problems x entropy_samples
    first = files()
    assert all(len(s) == 4 and sum("token_ids" in x for x in s) == 1 for s in first.values())
    forced.clear()
    assert run(3) == 0
    assert len(forced) == 2 * 3 * 3  # the old code: 2 * 3 * 1, the sequences the first run kept
    for path, samples in files().items():
        assert samples[:4] == first[path]  # the k samples analysed are the cached ones
        assert len(samples) == 6 and sum("token_ids" in x for x in samples) == 3  # one chunk of 2 more, both kept
    forced.clear()
    assert run(2) == 0
    assert len(forced) == 2 * 3 * 2  # the cache keeps 3 per problem: the first 2 are used (the old code: all 3)
    cache = SampleCache(out / "samples")
    cfg = analyze.load_config([*_args(two_models, out, 4), "--analysis.entropy_samples", "2"],
                              root=analyze.AnalyzeConfig).analysis
    from raro_fast.tasks import get_task
    from raro_fast.tasks.countdown import CountdownConfig

    problems = get_task("countdown", CountdownConfig(num_train=10, num_heldout=5)).examples("heldout")[:3]
    tok = load_project_tokenizer()
    seqs = analyze.entropy_sequences("base", tok, problems, cfg, cache)
    prompt = analyze.policy_prompts(tok, problems)
    assert {pid: [x["token_ids"] for x in s] for pid, s in seqs.items()} == {
        p.id: [x["token_ids"] for x in cache.get("base", p.id, 0, prompt[p.id]) if "token_ids" in x][:2]
        for p in problems}
    assert all(len(s) == 2 for s in seqs.values())


def test_samples_are_never_served_for_another_config_tokenizer_or_chat_template(two_models, tmp_path, capsys):
    """The identity held the weights' digest only: the same weights under another chat template (other prompts) or
    config (another model) were served the old samples. A config saved again, the same but for its
    transformers_version, is still the same model."""
    import shutil

    models = [tmp_path / "base", tmp_path / "other"]
    for src, dst in zip(two_models, models):
        shutil.copytree(src, dst)
    out = tmp_path / "c"
    assert analyze.main(_args(models, out, 2)) == 0
    capsys.readouterr()
    template = models[0] / "chat_template.jinja"
    original = template.read_text()
    template.write_text("Be brief.\n" + original)
    assert analyze.main(_args(models, out, 2)) == 2  # the old code: 0, the samples of the old template
    assert "(model_files_sha256: cached '" in capsys.readouterr().err
    template.write_text(original)

    config_path = models[0] / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "transformers_version": "0.0.1"}, indent=4))  # saved again
    assert analyze.main(_args(models, out, 2)) == 0
    config_path.write_text(json.dumps({**config, "rms_norm_eps": 0.5}))  # another model, the same weights
    assert analyze.main(_args(models, out, 2)) == 2
    assert "(model_files_sha256: cached '" in capsys.readouterr().err
    config_path.write_text(json.dumps(config))

    # A record from before model_files_sha256 was recorded is adopted with a warning, then holds it.
    record = out / "samples" / "base" / "identity.json"
    stored = json.loads(record.read_text())
    record.write_text(json.dumps({k: v for k, v in stored.items() if k != "model_files_sha256"}))
    assert analyze.main(_args(models, out, 2)) == 0
    assert "does not record model_files_sha256" in capsys.readouterr().err
    assert json.loads(record.read_text()) == stored
    record.write_text("[]")  # JSON, but no record: an AttributeError (found by review on 2026-12-07)
    assert analyze.main(_args(models, out, 2)) == 2
    assert "identity.json: corrupt (a JSON list, not an object of settings)" in capsys.readouterr().err
    record.write_text(json.dumps(stored))
    report = json.loads((out / "report.json").read_text())  # the settings that drew it, for support_seeds.py
    assert report["config"]["analysis"]["k"] == 2 and report["config"]["task"]["name"] == "countdown"


def test_samples_are_never_served_for_a_problem_worded_otherwise(two_models, tmp_path, capsys):
    """A Countdown id names the numbers as a set; another task seed lists them in another order. The cache was
    keyed by the id alone and served samples drawn for the other wording (found by review)."""
    from raro_fast.tasks import get_task
    from raro_fast.tasks.countdown import CountdownConfig

    tok = load_project_tokenizer()
    by_seed = [{p.id: p for p in get_task("countdown", CountdownConfig(seed=s)).examples("heldout")} for s in (0, 1)]
    pid = next(i for i in by_seed[0] if i in by_seed[1] and by_seed[0][i].question != by_seed[1][i].question)
    prompt = [analyze.policy_prompts(tok, [by_seed[s][pid]])[pid] for s in (0, 1)]
    cache = SampleCache(tmp_path / "samples")
    cache.put("m", pid, 0, prompt[0], [{"text": "<answer>1</answer>", "truncated": False, "length": 3}])
    assert cache.get("m", pid, 0, prompt[0])[0]["text"] == "<answer>1</answer>"
    with pytest.raises(ValueError, match=f"the cached samples of problem '{pid}' were drawn for another prompt"):
        cache.get("m", pid, 0, prompt[1])

    # End to end: a file whose prompt is not this run's stops the run, naming the file; nothing is overwritten.
    out = tmp_path / "a"
    assert analyze.main(_args(two_models, out, 2)) == 0
    path = next((out / "samples" / "base" / "seed0").glob("*.json"))
    record = json.loads(path.read_text())
    record["prompt_sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    capsys.readouterr()
    assert analyze.main(_args(two_models, out, 2)) == 2
    assert f"{path}: the cached samples of problem" in capsys.readouterr().err
    assert json.loads(path.read_text())["prompt_sha256"] == "0" * 64
    # A file from before prompts were recorded is read, with one warning per model, and written with its prompt.
    for f in (out / "samples").rglob("seed0/*.json"):
        record = json.loads(f.read_text())
        record.pop("prompt_sha256")
        f.write_text(json.dumps(record))
    assert analyze.main(_args(two_models, out, 3)) == 0
    err = capsys.readouterr().err
    assert err.count("without a record of the prompt") == 2  # base and other
    assert all("prompt_sha256" in json.loads(f.read_text()) for f in (out / "samples").rglob("seed0/*.json"))


@pytest.mark.parametrize("flag, value, message", [
    ("--analysis.temperature", "-0.6", "analysis.temperature must be > 0"),
    ("--analysis.temperature", "0", "analysis.temperature must be > 0"),
    ("--analysis.top_p", "0", "analysis.top_p must be in (0, 1]"),
])
def test_analyze_refuses_a_temperature_that_samples_greedily(two_models, tmp_path, capsys, flag, value, message):
    """Every engine samples greedily at a temperature <= 0: the k samples were one answer, reported and cached as
    pass@k at -0.6 (found by review)."""
    assert analyze.main([*_args(two_models, tmp_path / "a", 2), flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a" / "samples").exists()


def test_a_trace_past_the_models_positions_is_refused_before_sampling(two_models, tmp_path, monkeypatch):
    """Found by review: a trace longer than the model's 256 positions got a perplexity read past them (exit 0, a
    number for every model) and would be an IndexError on GPT-2. Refused, naming the trace, before any sampling."""
    traces = tmp_path / "traces.jsonl"
    from raro_fast.tasks import get_task
    from raro_fast.tasks.countdown import CountdownConfig

    pid = get_task("countdown", CountdownConfig(num_train=10, num_heldout=5)).examples("heldout")[0].id
    traces.write_text(json.dumps({"problem_id": pid, "trace": "3*4=12, " * 200}) + "\n")
    monkeypatch.setattr(analyze, "sample_model", lambda *a, **k: pytest.fail("sampled before the traces were checked"))
    with pytest.raises(ValueError, match=rf"analysis.traces: the trace of '{re.escape(pid)}' is \d+ tokens after a \d+-token "
                                         r"prompt, past the model's 256 positions"):
        analyze.run(analyze.load_config(_args(two_models, tmp_path / "t", 2) + ["--analysis.traces", str(traces)],
                                         root=analyze.AnalyzeConfig))


def test_an_empty_split_or_an_unknown_one_is_refused_naming_the_setting(two_models, tmp_path, monkeypatch):
    """An empty split was "pass_at_k_curve: no problems" after every model had loaded and sampled (found by review);
    an unknown one named no setting."""
    monkeypatch.setattr(analyze, "load_pretrained", lambda *a, **k: pytest.fail("a model loaded for an empty split"))
    args = _args(two_models, tmp_path / "e", 2) + ["--task.countdown.num_heldout", "0"]
    with pytest.raises(ValueError, match=r"analysis.split: the countdown task's 'heldout' split has no problems"):
        analyze.run(analyze.load_config(args, root=analyze.AnalyzeConfig))
    with pytest.raises(Exception, match=r"analysis.split.*'test'"):
        analyze.load_config(_args(two_models, tmp_path / "e", 2) + ["--analysis.split", "test"], root=analyze.AnalyzeConfig)


def test_a_trace_that_fills_the_models_positions_exactly_is_read_and_one_token_more_is_not(monkeypatch):
    """The bound is the engines': prompt and trace together may fill the positions, not one more."""
    from types import SimpleNamespace

    from raro_fast import prompts
    from raro_fast.model.hf import load_project_tokenizer
    from raro_fast.tasks.base import Example

    tok = load_project_tokenizer()
    p = Example(id="p", question="Make 10.", answer="x")
    trace = "3*4=12, " * 10
    n = len(prompts.render_prompt(tok, prompts.policy_messages(p.question))) + len(tok(trace, add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(analyze, "teacher_forced", lambda model, prompt, completion: (
        torch.zeros(len(completion)), None, torch.ones(len(completion), dtype=torch.bool)))
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=n))
    assert analyze.trace_perplexities(model, tok, [p], [{"problem_id": "p", "trace": trace}]) == {"p": 1.0}
    model.config.max_position_embeddings = n - 1
    with pytest.raises(ValueError, match=rf"analysis.traces: the trace of 'p' is \d+ tokens after a \d+-token prompt, "
                                         rf"past the model's {n - 1} positions"):
        analyze.trace_perplexities(model, tok, [p], [{"problem_id": "p", "trace": trace}])
