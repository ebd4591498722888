"""The SGLang adapters against SGLang's own code, not stand-ins written from its docs.

SGLang cannot serve on a CPU machine, but its request classes, HTTP routes, `/generate` contract gate, tensor
serializer (with its SafeUnpickler) and weight buckets are plain Python. Here:
  * every HTTP request the server adapter makes (a full sync, generation, memory release/resume) is checked against
    the route in SGLang's http_server.py and the fields of the request class its handler takes (io_struct.py);
  * every call the in-process adapter makes on `sglang.Engine` against that method's parameters;
  * sglang_source_worker.py pushes our bucket payloads and bodies through SGLang's own code (see there), and runs
    a server-mode sync between our trainer side and a receiver built from SGLang's group and bucket code.
SGLang comes from RARO_SGLANG_PATH (a `pip install --target` directory: .ci/install-sglang-source makes one, and
.ci/run does), else from an installed sglang.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raro_fast.model.policy import PolicyModel
from raro_fast.rollout.engine import SamplingParams
from raro_fast.rollout.sglang import SGLangEngine
from raro_fast.weight_sync.source import hf_named_tensors

sys.path.insert(0, str(Path(__file__).parent))
import fake_sglang  # noqa: E402
from test_sglang_adapter import PROMPTS, Tok, free_port, inner_engine, perturbed, server_engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HINT = "run `.ci/install-sglang-source DIR` and set RARO_SGLANG_PATH=DIR (CI does)"


def _sglang_dir() -> Path | None:
    if root := os.environ.get("RARO_SGLANG_PATH"):
        found = Path(root) / "sglang"
        if not (found / "__init__.py").is_file():
            pytest.fail(f"RARO_SGLANG_PATH={root} holds no sglang package: {HINT}")
        return found
    try:
        spec = importlib.util.find_spec("sglang")
    except ValueError:  # a stand-in module left in sys.modules
        spec = None
    return Path(spec.origin).parent if spec is not None and spec.origin else None


@pytest.fixture(scope="module")
def sglang_dir() -> Path:
    found = _sglang_dir()
    if found is None:
        pytest.skip(f"SGLang's source is not installed: {HINT}")
    return found


# -- SGLang's source, read without importing it ---------------------------------------------------------------------


def _classes(path: Path) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}


def _fields(classes: dict[str, ast.ClassDef], name: str) -> dict[str, ast.AnnAssign]:
    """A request class's annotated fields, its bases' (from the same file) first."""
    out: dict[str, ast.AnnAssign] = {}
    for base in classes[name].bases:
        if isinstance(base, ast.Name) and base.id in classes:
            out |= _fields(classes, base.id)
    for node in classes[name].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and "ClassVar" not in ast.unparse(node.annotation):
            out[node.target.id] = node
    return out


def _literal_values(annotation: ast.expr) -> list | None:
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Literal":
        elts = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        return [e.value for e in elts if isinstance(e, ast.Constant)]
    return None


def _routes(path: Path) -> dict[str, tuple[set[str], str | None]]:
    """HTTP path → (methods, the request class the handler's first parameter takes)."""
    routes = {}
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for dec in fn.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and ast.unparse(dec.func.value) == "app"
                    and dec.args and isinstance(dec.args[0], ast.Constant)):
                continue
            kind = dec.func.attr
            methods = {kind.upper()} if kind in ("get", "post", "put") else set()
            for kw in dec.keywords:
                if kw.arg == "methods":
                    methods = {e.value for e in kw.value.elts}
            cls = None
            if fn.args.args and (ann := fn.args.args[0].annotation) is not None:
                if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "Annotated":
                    ann = ann.slice.elts[0]
                cls = ast.unparse(ann)
            routes[dec.args[0].value] = (methods, cls)
    return routes


def _version(sglang_dir: Path) -> str:
    metadata = sorted(sglang_dir.parent.glob("sglang-*.dist-info/METADATA"))
    assert metadata, f"no sglang-*.dist-info beside {sglang_dir}: cannot tell which SGLang this is"
    return next(line.split(":", 1)[1].strip() for line in metadata[-1].read_text().splitlines() if line.startswith("Version:"))


def _session_gated(sglang_dir: Path) -> set[str]:
    """What SGLang's scheduler refuses outside a weight-update session (a `self._session is None` guard, read from
    its source; SGLang >= 0.5.21): names shared by its Engine methods and HTTP routes. Empty before sessions."""
    path = sglang_dir / "srt/managers/scheduler_components/weight_updater.py"
    if not path.exists():
        return set()
    gated = set()
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, ast.FunctionDef) and any(isinstance(n, ast.If) and ast.unparse(n.test) == "self._session is None"
                                                   for n in ast.walk(fn)):
            gated.add(fn.name)
    return gated - {"end_weight_update"}  # the closer checks for an open session too


def _check_sessions(calls: list[str], gated: set[str]) -> None:
    """Every session-gated call lies inside one begin_weight_update ... end_weight_update, and sessions balance."""
    open_ = False
    for i, name in enumerate(calls):
        if name == "begin_weight_update":
            assert not open_, f"call {i}: a second session opened inside one: {calls}"
            open_ = True
        elif name == "end_weight_update":
            assert open_, f"call {i}: end_weight_update without a session: {calls}"
            open_ = False
        elif name in gated:
            assert open_, f"call {i}: SGLang refuses {name} outside a weight-update session: {calls}"
    assert not open_, f"a session is left open: {calls}"


def _check_body(what: str, body: dict, fields: dict[str, ast.AnnAssign]) -> None:
    unknown = set(body) - set(fields)
    assert not unknown, f"{what}: SGLang has no fields {sorted(unknown)}"
    required = {n for n, node in fields.items() if node.value is None}
    assert required <= set(body), f"{what}: SGLang requires {sorted(required - set(body))}"
    for name, value in body.items():
        allowed = _literal_values(fields[name].annotation)
        assert allowed is None or value in allowed, f"{what}: {name}={value!r} not among SGLang's {allowed}"


# -- the tests ------------------------------------------------------------------------------------------------------


def test_every_http_request_matches_sglangs_route_and_request_class(sglang_dir, monkeypatch):
    fake_sglang.plain_weight_group(monkeypatch)
    routes = _routes(sglang_dir / "srt/entrypoints/http_server.py")
    classes = _classes(sglang_dir / "srt/managers/io_struct.py")
    server = fake_sglang.FakeServer(inner_engine(), version=_version(sglang_dir))
    try:
        engine = server_engine(server.url)
        engine.release_memory(("kv_cache", "weights"))
        engine.resume_memory(("weights",))
        engine.update_weights(hf_named_tensors(PolicyModel(perturbed(31))), version=1)
        engine.resume_memory(("kv_cache",))
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9, n=2))
    finally:
        server.close()
    paths = {p for p, _ in server.calls}
    assert paths >= {"/server_info", "/init_weights_update_group", "/pause_generation", "/update_weights_from_distributed",
                     "/continue_generation", "/release_memory_occupation", "/resume_memory_occupation", "/generate"}
    for path, body in server.calls:
        assert path in routes, f"SGLang serves no {path}"
        methods, cls = routes[path]
        assert ("GET" if body is None else "POST") in methods, (path, methods)
        if body is not None:
            assert cls in classes, f"{path}: handler takes {cls}, not a request class of io_struct.py"
            _check_body(f"{path} ({cls})", body, _fields(classes, cls))
    gated = _session_gated(sglang_dir)
    if gated:
        assert {"/begin_weight_update", "/end_weight_update"} <= paths
    _check_sessions([p.lstrip("/") for p, _ in server.calls], gated)


def test_every_in_process_engine_call_matches_sglangs_engine(sglang_dir, monkeypatch):
    methods = {n.name: n.args for n in _classes(sglang_dir / "srt/entrypoints/engine.py")["Engine"].body
               if isinstance(n, ast.FunctionDef)}
    class Recorder:  # every call the adapter makes on the engine, by keyword; only the methods SGLang's Engine has
        def __init__(self, inner):
            self.inner, self.calls = inner, []

        def __getattr__(self, name):
            if name not in methods:
                raise AttributeError(f"sglang.Engine has no method {name}")

            def call(*args, **kw):
                assert not args, f"{name} called with positional arguments {args}"
                self.calls.append((name, kw))
                return getattr(self.inner, name)(**kw)
            return call

    fake_sglang.install(monkeypatch)
    # The stand-in of the same generation as the SGLang read here (with or without weight-update sessions).
    recorder = Recorder(fake_sglang.FakeEngine(inner_engine()) if "begin_weight_update" in methods
                        else fake_sglang.FakeEngineBeforeSessions(inner_engine()))
    engine = SGLangEngine(model_path="unused", tokenizer=Tok(), dtype="float32", mem_fraction=0.5, tp_size=1,
                          bucket_bytes=8192, seed=0, gpu_id=0, engine=recorder)
    engine.release_memory(("kv_cache", "weights"))
    engine.resume_memory(("weights",))
    engine.update_weights(hf_named_tensors(PolicyModel(perturbed(32))), version=1)
    engine.resume_memory(("kv_cache",))
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=2))
    engine.shutdown()
    gated = _session_gated(sglang_dir)
    sessions = {"begin_weight_update", "end_weight_update"} if gated else set()
    assert {n for n, _ in recorder.calls} == {"release_memory_occupation", "resume_memory_occupation",
                                              "update_weights_from_tensor", "generate", "shutdown"} | sessions
    _check_sessions([n for n, _ in recorder.calls], gated)
    for name, kw in recorder.calls:
        assert name in methods, f"sglang.Engine has no method {name}"
        params = {a.arg for a in methods[name].args + methods[name].kwonlyargs}
        assert methods[name].kwarg is not None or set(kw) <= params, f"Engine.{name} takes no {sorted(set(kw) - params)}"


WORKER = str(Path(__file__).parent / "sglang_source_worker.py")


def _env_with(sglang_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(sglang_dir.parent), str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def test_the_session_rule_read_from_sglang_agrees_with_the_adapters_version_switch(sglang_dir):
    """SGLang's own scheduler decides which updates need a session; the server adapter decides by version
    (SESSION_VERSION) whether to open one. Both must say the same of the SGLang read here."""
    from packaging.version import Version

    from raro_fast.rollout.sglang import SESSION_VERSION

    gated = _session_gated(sglang_dir)
    assert bool(gated) == (Version(_version(sglang_dir)) >= SESSION_VERSION), (_version(sglang_dir), gated)
    if gated:
        assert {"update_weights_from_tensor", "update_weights_from_distributed"} <= gated, gated


def test_payloads_and_bodies_pass_through_sglangs_own_code(sglang_dir):
    run = subprocess.run([sys.executable, WORKER], env=_env_with(sglang_dir), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["buckets"] > 5 and report["tensors"] > 20 and report["finish_kinds"] == 3 and report["engine_args"] == 8, report
    print("checked against sglang", report["sglang"], report)


def test_server_mode_sync_meets_sglangs_own_group_and_receiver(sglang_dir):
    """Two processes over gloo: our trainer side (open_weight_group + broadcast_weights) and SGLang's server side
    built from SGLang's own group and bucket code; the bodies travel as JSON lines where HTTP would carry them."""
    to_server, to_trainer = os.pipe(), os.pipe()
    port = free_port()
    env = _env_with(sglang_dir)
    server = subprocess.Popen([sys.executable, WORKER, "receive", str(port), str(to_server[0]), str(to_trainer[1])],
                              env=env, pass_fds=(to_server[0], to_trainer[1]), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    trainer = subprocess.Popen([sys.executable, WORKER, "send", str(port), str(to_trainer[0]), str(to_server[1])],
                               env=env, pass_fds=(to_trainer[0], to_server[1]), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for fd in (*to_server, *to_trainer):
        os.close(fd)  # the children hold them now: a dead peer shows as end of file, not a hang
    try:
        t_out, t_err = trainer.communicate(timeout=300)
        s_out, s_err = server.communicate(timeout=60)
    finally:
        for p in (trainer, server):
            p.kill()
    assert trainer.returncode == 0 and server.returncode == 0, f"trainer:\n{t_err[-3000:]}\nserver:\n{s_err[-3000:]}"
    report = json.loads(t_out.strip().splitlines()[-1])
    assert report["digest_equal"] and report["buckets"] > 5, report
