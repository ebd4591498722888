"""The compiler's report and a SASS census of the fused-GEMM Triton kernels, for Hopper (sm_90a) or another target.

No GPU needed: Triton compiles for a named target with the ptxas it ships, and its cuobjdump disassembles the
cubin. Run it on the machine whose Triton version you measured with (the code it generates changes between
versions). Usage, from the repository root, with the kernels installed (`pip install ./kernels`) or on the path
(`PYTHONPATH=kernels`):

    python benchmarks/compile_report.py [--arch 90] [--hidden 3584] [--sass-dir DIR]

For each kernel and each of its autotune configs it prints registers per thread, stack frame bytes per thread (where spilled registers live), shared memory,
and counts of the instructions that decide its speed: warpgroup matrix products (HGMMA) against the older
HMMA, TMA loads (UTMALDG) against asynchronous copies (LDGSTS), local-memory traffic (LDL/STL, i.e. spills), the
exp2 unit (MUFU.EX2) and barriers. Full SASS goes to --sass-dir when given.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from raro_kernels import _triton_lm_head as lm

OPCODE_GROUPS = {
    "HGMMA": r"^HGMMA", "HMMA": r"^HMMA", "UTMALDG": r"^UTMALDG", "LDGSTS": r"^LDGSTS", "LDG": r"^LDG\b",
    "LDS": r"^LDS", "STS": r"^STS", "LDSM": r"^LDSM", "LDL": r"^LDL", "STL": r"^STL", "MUFU.EX2": r"^MUFU\.EX2",
    "BAR": r"^BAR", "WARPGROUP": r"^WARPGROUP", "FFMA": r"^FFMA", "STG": r"^STG",
}
_SIG_STATS = {
    "h_ptr": "*bf16", "w_ptr": "*bf16", "tgt_ptr": "*i64", "z_ptr": "*fp32", "m_ptr": "*fp32", "s_ptr": "*fp32",
    "u_ptr": "*fp32", "zt_ptr": "*fp32", "n_rows": "i32", "vocab": "i32", "hidden_size": "i32",
    "stride_hn": "i32", "stride_hk": "i32", "stride_wv": "i32", "stride_wk": "i32", "stride_zn": "i32",
    "cols_per_split": "i32", "num_splits": "i32", "inv_temp_ptr": "*fp32",
}
_SIG_DZ = {
    "h_ptr": "*bf16", "w_ptr": "*bf16", "tgt_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
    "glp_ptr": "*fp32", "gent_ptr": "*fp32", "dz_ptr": "*bf16", "n_rows": "i32", "n_cols": "i32",
    "col_offset": "i32", "hidden_size": "i32", "stride_hn": "i32", "stride_hk": "i32", "stride_wv": "i32",
    "stride_wk": "i32", "stride_dzn": "i32", "inv_temp_ptr": "*fp32",
}


def _source(kernel, signature: dict, values: dict, consts: dict) -> ASTSource:
    """What a launch would compile: as Triton's launcher does, integer arguments equal to 1 become constants,
    and pointers (16-byte aligned, as torch allocates) and integers divisible by 16 carry tt.divisibility 16."""
    fn = kernel.fn  # under the EVEN_K heuristic
    sig, constexprs, attrs = dict(signature), dict(consts), {}
    for name, kind in signature.items():
        value = values.get(name)
        if kind.startswith("i") and value == 1:
            constexprs[name] = 1
        elif kind.startswith("*") or (kind.startswith("i") and value is not None and value % 16 == 0):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    for name in constexprs:
        sig[name] = "constexpr"
    return ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)


def _launch_values(kernel_name: str, n_rows: int, hidden: int, vocab: int) -> dict:
    """The integer arguments of one benchmark-shaped launch (contiguous bf16 hidden and weight)."""
    common = {"n_rows": n_rows, "hidden_size": hidden, "stride_hn": hidden, "stride_hk": 1, "stride_wv": hidden,
              "stride_wk": 1}
    if kernel_name == "_stats_kernel":
        splits = lm.default_num_splits(vocab)
        per_split = lm.round_up(triton.cdiv(vocab, splits), lm.SPLIT_ALIGN)
        return {**common, "vocab": vocab, "stride_zn": vocab, "cols_per_split": per_split, "num_splits": splits}
    cols = lm.SLICE_COLS  # one vocabulary slice of the backward, not the first
    return {**common, "n_cols": cols, "col_offset": cols, "stride_dzn": lm.round_up(cols, 8)}


def _cuobjdump(cubin: bytes, tool_dir: str, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([os.path.join(tool_dir, "cuobjdump"), flag, f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def resources(cubin: bytes, tool_dir: str) -> dict:
    """REG, STACK, SHARED, LOCAL (bytes of spills per thread) as cuobjdump reads them from the cubin."""
    text = _cuobjdump(cubin, tool_dir, "--dump-resource-usage")
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def census(sass: str) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m:
            continue
        op = m.group(1)
        for group, pattern in OPCODE_GROUPS.items():
            if re.match(pattern, op):
                counts[group] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper, compiled as sm_90a)")
    ap.add_argument("--hidden", type=int, default=3584, help="hidden size")
    ap.add_argument("--tokens", type=int, default=16384, help="rows N of the launch")
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary size V")
    ap.add_argument("--sass-dir", default="", help="write each kernel's full SASS here")
    ap.add_argument("--configs", type=int, default=0, help="only the first N autotune configs of each kernel (0: all)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    tool_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    hopper = args.arch >= 90
    print(f"triton {triton.__version__}, target sm_{args.arch}{'a' if hopper else ''}, "
          f"N x H x V = {args.tokens} x {args.hidden} x {args.vocab}, bf16")
    groups = list(OPCODE_GROUPS)
    print("| kernel | BLOCK_N x BLOCK_V x BLOCK_K | warps | stages | regs | stack B | smem KB | "
          + " | ".join(groups) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(groups))
    for name, kernel, signature, extra in (
        ("_stats_kernel", lm._stats_kernel, _SIG_STATS, {"WITH_ENTROPY": True, "STORE_Z": False}),
        ("_dz_kernel", lm._dz_kernel, _SIG_DZ, {"WITH_ENTROPY_GRAD": True, "GROUP_N": 8}),
    ):
        for cfg in lm._gemm_configs(hopper)[: args.configs or None]:
            k = cfg.kwargs["BLOCK_K"]
            consts = {**cfg.kwargs, **extra, "EVEN_K": args.hidden % k == 0, "DOT_PRECISION": "tf32",
                      "UPCAST": False}
            values = _launch_values(name, args.tokens, args.hidden, args.vocab)
            compiled = triton.compile(_source(kernel, signature, values, consts), target=target,
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            sass = _cuobjdump(compiled.asm["cubin"], tool_dir, "-sass")
            res = resources(compiled.asm["cubin"], tool_dir)
            if args.sass_dir:
                os.makedirs(args.sass_dir, exist_ok=True)
                tag = f"{name}_{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_V']}x{k}_w{cfg.num_warps}s{cfg.num_stages}"
                with open(os.path.join(args.sass_dir, tag + ".sass"), "w") as f:
                    f.write(sass)
            smem = max(res.get("SHARED", 0), compiled.metadata.shared)
            c = census(sass)
            print(f"| {name} | {cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_V']}x{k} | {cfg.num_warps} | "
                  f"{cfg.num_stages} | {res.get('REG')} | {res.get('STACK')} | {smem / 1024:.0f} | "
                  + " | ".join(str(c[g]) for g in groups) + " |")


if __name__ == "__main__":
    main()
