"""`python -m raro_fast.analyze` end to end on two embedded-default checkpoints (random weights, CPU, small k):
report, table and plots written; a larger k samples only what is missing, and the first samples stay the same."""
import json

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
    assert cache.get("base", "nope", 0) == []


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
    text = f"<think>x</think><answer>{p.answer} makes {p.meta['target']}</answer>"  # text beside the expression
    cache.put("m", p.id, 0, [
        # read by the old parser as the expression: right; the current one reads no answer
        {"text": text, "truncated": False, "length": 9, "answer": p.answer, "correct": True},
        {"text": f"<think>x</think><answer>{p.answer}</answer>", "truncated": True, "length": 9},  # cut off: none
        {"answer": p.answer, "correct": False, "length": 5},  # cached before texts: its verdict is computed again
    ])
    model, tok = load_pretrained(two_models[0], dtype=torch.float32, setting="test")
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
    assert {p: p.read_bytes() for p in (out / "samples").rglob("seed0/*.json")} == files  # nothing overwritten
    # A cache from before identities were recorded is adopted, with a warning, and then bound.
    for record in (out / "samples").rglob("identity.json"):
        record.unlink()
    assert analyze.main(_args(two_models, out, 2)) == 0
    assert "cached samples without a record of the model and settings" in capsys.readouterr().err
    assert analyze.main(swapped) == 2


def test_weights_digest_follows_the_bytes(tmp_path):
    from raro_fast.analysis.cache import weights_digest

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weight files"):
        weights_digest(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    first = weights_digest(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1}')  # not a weight file
    assert weights_digest(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x03")
    assert weights_digest(tmp_path) != first


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
    seqs = analyze.entropy_sequences("base", problems, cfg, cache)
    assert {pid: [x["token_ids"] for x in s] for pid, s in seqs.items()} == {
        p.id: [x["token_ids"] for x in cache.get("base", p.id, 0) if "token_ids" in x][:2] for p in problems}
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
