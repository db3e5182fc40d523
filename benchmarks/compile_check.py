"""Compile every SPA kernel for a GPU target without a GPU (Triton + bundled ptxas).

Usage: python benchmarks/compile_check.py [--arch 90]
Prints registers, spills and shared memory per kernel variant; exits non-zero on a compile error.
Catches GPU-only compile errors (layouts, unsupported ops) that the interpreter cannot see.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from spa_compile.codegen import (  # noqa: E402
    bound_selection, fine_score, pooling, selection, sparse_backward, sparse_forward, wide_selection)

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
       torch.int8: "i8", torch.int64: "i64"}


def signature(fn, args: dict):
    """Triton signature, constexprs and the divisibility facts a real launch would specialise on
    (pointers 16-byte aligned, strides multiples of 16)."""
    sig, consts, attrs = {}, {}, {}
    for pos, name in enumerate(fn.arg_names):
        p = fn.params[fn.arg_names.index(name)]
        val = args[name] if name in args else p.default  # a constexpr left out: its default
        if p.is_constexpr or val is None:  # None: what a launch passes for an unused descriptor
            sig[name] = "constexpr"
            consts[name] = val
        elif isinstance(val, str) and val.startswith("tensordesc"):  # host-built TMA descriptor
            sig[name] = val
        elif isinstance(val, torch.dtype):
            sig[name] = "*" + _TY[val]
            attrs[(pos,)] = [["tt.divisibility", 16]]
        elif isinstance(val, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("s") and name[1:2] in "qkvodg" and len(name) <= 5 and name not in ("scale",):
                attrs[(pos,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_one(fn, args, arch, num_warps, num_stages, label, source=ASTSource):
    sig, consts, attrs = signature(fn, args)
    src = source(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    try:
        c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # noqa: BLE001
        root = e  # a Gluon/Triton CompilationError wraps the real cause: print the innermost
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[-2000:]}\n  cause: {type(root).__name__}: {str(root)[-1500:]}")
        return False
    regs, spill = "?", "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        try:
            res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+)", res)
            s = re.search(r"STACK:(\d+)", res)
            regs, spill = (m.group(1) if m else "?"), (s.group(1) if s else "?")
        except OSError:
            pass
    ttgir = c.asm["ttgir"]
    kinds = [n for n, key in (("async", "async_copy_global_to_local"), ("tma", "async_tma_copy")) if key in ttgir]
    pipe = "+".join(kinds) or "sync"
    ptx = c.asm["ptx"]
    sass_mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma")
    # bulk tensor copies (TMA) in the PTX: the descriptor loads that reached the hardware copy engine
    bulk = ptx.count("cp.async.bulk.tensor")
    extra = f" bulk-tensor-copies {bulk}" if bulk else ""
    print(f"ok   {label}: regs {regs} stack {spill} smem {c.metadata.shared} mma {sass_mma} loads {pipe}{extra}")
    return True


def compile_gluon(arch: int) -> bool:
    """The experimental Gluon forward (codegen/gluon_forward.py) at head dims 64 and 128, ring
    depths 2 and 3, with and without the fill: its descriptors' signatures from host-built
    descriptors over CPU tensors."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from spa_compile.codegen import gluon_forward

    ok = True
    for d in (128, 64):
        x = torch.empty(256, d, dtype=torch.bfloat16).view(1, 1, 256, d)
        desc = mangle_type(gluon_forward.descriptors(x, block=64)[0])  # q, k, v and the landmarks alike
        for ns, fill, qr, pva, pair, order in ((2, False, 0, 0, 0, 0), (3, False, 0, 0, 0, 0), (2, True, 0, 0, 0, 0),
                                               (3, True, 0, 0, 0, 0), (3, True, 1, 0, 0, 0), (3, True, 1, 1, 0, 0),
                                               (3, True, 1, 0, 1, 0), (6, True, 1, 0, 1, 0), (5, True, 1, 1, 1, 0),
                                               (3, True, 1, 0, 0, 1), (2, False, 1, 0, 0, 1), (6, True, 1, 0, 1, 1)):
            if d == 64 and pair:
                continue
            args = dict(q_desc=desc, k_desc=desc, v_desc=desc, kb_desc=desc, vb_desc=desc, IDX=torch.int32,
                        CNT=torch.int32, SEL=torch.int32, O=torch.bfloat16, LSE=torch.float32, Hq=1, Hkv=1, Hs=1,
                        Nq=1, Nk=1, NQB=1, NKB=1, KMAX=1, OFF=1, qk_scale=0.1, BS=64, D=d, DV=d, NS=ns, CAUSAL=True,
                        FILL=fill, Q_REGS=bool(qr), PV_ASYNC=bool(pva), PAIR=bool(pair), ORDER=bool(order),
                        CONSUMER_REGS=gluon_forward.CONSUMER_REGS,
                        PRODUCER_REGS=gluon_forward.PRODUCER_REGS)
            ok &= compile_one(gluon_forward._gluon_fwd_kernel, args, arch, 4, 1,
                              f"gluon-fwd d{d} ns{ns} fill{int(fill)} qregs{qr} pvasync{pva} pair{pair} order{order}", source=GluonASTSource)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tma-only", action="store_true", help="only the forward's TMA variants (and the rest below)")
    ap.add_argument("--gluon", action="store_true", help="only the experimental Gluon forward (Hopper)")
    a = ap.parse_args()
    if a.gluon:
        sys.exit(0 if compile_gluon(a.arch) else 1)
    ok = True
    I = 0
    for dt in ([torch.bfloat16] if a.quick else [torch.bfloat16, torch.float32]):
        for d in ([128] if a.quick else [64, 128, 256]):
            for bs, gp, w, s, bj, fs, tma in [(64, 4, 16, 2, 64, 0, 0), (64, 4, 16, 2, 32, 3, 0), (64, 2, 8, 3, 64, 0, 0),
                                              (64, 1, 4, 3, 64, 0, 0), (64, 1, 4, 2, 128, 0, 0), (128, 1, 8, 2, 64, 0, 0),
                                              # the TMA variants (16-bit dtypes only) of the main forward configs:
                                              # 1 = K/V of the exact loop, 2 = also kbar/vbar of the fill
                                              (64, 4, 16, 2, 64, 0, 1), (64, 4, 16, 2, 32, 3, 1), (64, 2, 8, 3, 64, 0, 1),
                                              (64, 2, 8, 2, 64, 0, 1), (64, 2, 8, 4, 64, 0, 1), (64, 1, 4, 3, 64, 0, 1), (64, 1, 4, 4, 64, 0, 2),
                                              (64, 4, 16, 2, 64, 0, 2), (64, 4, 16, 2, 32, 3, 2), (64, 2, 8, 3, 64, 0, 2),
                                              (64, 1, 4, 3, 64, 0, 2), (64, 1, 4, 2, 128, 0, 2)]:
                if gp == 4 and (dt != torch.bfloat16 or d != 128):
                    continue
                if d == 256 and (gp * bs > 64 or s > 2):
                    continue
                if tma and dt == torch.float32:
                    continue
                if a.tma_only and not tma:
                    continue
                for causal, fill, kv in [(True, True, False), (True, False, True)]:
                    if tma == 2 and not fill:
                        continue
                    common = dict(Hq=32, Hkv=8, Hs=8, Nq=I, Nk=I, NQB=I, NKB=I, KMAX=I, OFF=I, WIN=I,
                                  qk_scale=0.1, D=d, DV=d, BS=bs, GP=gp, BD=d, BDV=d, BJ=bj, FILL_STAGES=fs, CAUSAL=causal,
                                  WINDOW=False, HAS_KV=kv, FILL=fill, PREC=sparse_forward.dot_precision(dt))
                    ptrs = dict(Q=dt, K=dt, V=dt, KBAR=dt, VBAR=dt, NB=torch.int32,
                                FIRST=torch.int32, LAST=torch.int32, KVALID=torch.int8, IDX=torch.int32,
                                CNT=torch.int32, SEL=torch.int32, O=dt, LSE=torch.float32, DO=dt, DELTA=torch.float32, DQ=dt)
                    strides = {n: I for n in ["sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh",
                                              "son", "sdb", "sdh", "sdn", "sgb", "sgh", "sgn"]}
                    desc = {n: (f"tensordesc<{_TY[dt]}[1,1,{bs},{d}]>" if tma else None) for n in ("KD", "VD")}
                    desc.update({n: (f"tensordesc<{_TY[dt]}[1,1,{bj},{d}]>" if tma == 2 else None) for n in ("KBD", "VBD")})
                    args = {**common, **ptrs, **strides, **desc, "scale": 0.1, "TMA": bool(tma), "TMA_FILL": tma == 2,
                            "HF": False, "UNIFORM_N": causal and not kv, "BIAS_MODE": 0}
                    # heads first (HF: grid axes swapped, the autotuner's GQA variants of the 2-head configs)
                    hf = gp == 2 and s in (2, 3)
                    tag = (f"{str(dt)[6:]} D{d} bs{bs} gp{gp} w{w} s{s} bj{bj} fs{fs} causal{int(causal)} fill{int(fill)}"
                           f" kv{int(kv)}" + ("" if not tma else " TMA" if tma == 1 else " TMA+fill"))
                    ok &= compile_one(sparse_forward._fwd_kernel, args, a.arch, w, s, "fwd " + tag)
                    if hf:
                        ok &= compile_one(sparse_forward._fwd_kernel, dict(args, HF=True), a.arch, w, s,
                                          "fwd " + tag + " HF")
                    if gp == 1 and s == 3 and tma and causal:  # group order (GO: the shipped 128K top-k config)
                        ok &= compile_one(sparse_forward._fwd_kernel, dict(args, GO=True), a.arch, w, s,
                                          "fwd " + tag + " GO")
                    if tma:
                        continue
                    if bj == 64:
                        ok &= compile_one(sparse_backward._dq_kernel, args, a.arch, w, s, "dq  " + tag)
                        if hf:
                            ok &= compile_one(sparse_backward._dq_kernel, dict(args, HF=True), a.arch, w, s,
                                              "dq  " + tag + " HF")
                    if gp == 1 and bj == 64:
                        bargs = dict(args, REV_OFF=torch.int32, REV_I=torch.int32, DKBAR=torch.float32, DVBAR=torch.float32,
                                     VALID=torch.int8, DK=dt, DV_=dt, REV_LEN=I, NSTEPS=I, B=I, ISPLIT=I, NSPLIT=I,
                                     skgb=I, skgh=I, skgn=I, svgb=I, svgh=I, svgn=I)
                        ww = 8 if bs * d >= 64 * 128 else 4
                        ok &= compile_one(sparse_backward._dkdv_kernel, bargs, a.arch, ww, 2, "dkdv " + tag)
                        if fill:
                            ok &= compile_one(sparse_backward._landmark_kernel, bargs, a.arch, ww, 2, "lmk " + tag)
    # selection (the launcher's shapes: dot path up to a 128-wide buffer, broadcast products above)
    for kpb, bj, qb, dot in [(16, 64, 16, True), (64, 128, 16, True), (256, 256, 8, False), (4096, 4096, 1, False)]:
        for causal, window in [(True, False), (False, True)]:
            args = dict(QP=torch.float32, KP=torch.float32, NB=torch.int32, FIRST=torch.int32, LAST=torch.int32,
                        CS=torch.int32, IDX=torch.int32, CNT=torch.int32, Hs=I, Hkv=I, Nq=I, Nk=I, NQB=I, NKB=I, R=I,
                        KMAX=I, GS=I, OFF=I, WIN=I, scale=0.1, SINK=I, LOCAL=I, TOPK=I, PPM=I, MINB=I, MAXB=I,
                        CAUSAL=causal, WINDOW=window, BS=64, QB=qb, KPB=kpb, BJ=bj,
                        RC=16 if dot else max(1, min(128, 16384 // (qb * bj))), USE_DOT=dot, NEAR=6, HALF=False,
                        LPT=True, KT=dot and selection.KEYS_TRANSPOSED["stream"])  # the launcher's key operand
            w = 4 if qb * bj < 1024 else 8
            ok &= compile_one(selection._select_kernel, args, a.arch, w, 1,
                              f"select kpb{kpb} bj{bj} qb{qb} causal{int(causal)} win{int(window)}")
            if causal:  # no key padding: geometry-only visibility and the interior-chunk path
                ok &= compile_one(selection._select_kernel, dict(args, HAS_KV=False), a.arch, w, 1,
                                  f"select kpb{kpb} bj{bj} qb{qb} causal1 win0 nopad")
            if kpb == 16 and causal:  # block_score "hybrid": the projector's half
                ok &= compile_one(selection._select_kernel, dict(args, HALF=True), a.arch, w, 1,
                                  f"select kpb{kpb} bj{bj} qb{qb} causal1 win0 half")
    # dense selection (NKB <= 256): the launcher's configs at 16K and 4K (block 64)
    for nqb, nkb, kmax in [(256, 256, 64), (64, 64, 16)]:
        qb, nkbp, rc, dot, w = selection._dense_config(nqb, nkb, 16, kmax)
        for causal, window, rb in [(True, False, 1), (False, True, 1), (True, False, 3), (True, False, 2)]:
            args = dict(QP=torch.float32, KP=torch.float32, NB=torch.int32, FIRST=torch.int32, LAST=torch.int32,
                        CS=torch.int32, IDX=torch.int32, CNT=torch.int32, Hs=I, Hkv=I, Nq=I, Nk=I, NQB=I, NKB=I, R=I,
                        KMAX=I, GS=I, OFF=I, WIN=I, scale=0.1, SINK=I, LOCAL=I, TOPK=I, PPM=I, MINB=I, MAXB=I,
                        CAUSAL=causal, WINDOW=window, BS=64, QB=qb, NKBP=nkbp, RC=rc, USE_DOT=dot,
                        RB=rb, FW=9 if rb == 3 else 10, HALF=rb == 2, LPT=True)
            ok &= compile_one(selection._select_dense_kernel, args, a.arch, w, 1,
                              f"select-dense nkb{nkb} qb{qb} nkbp{nkbp} causal{int(causal)} win{int(window)} rb{rb}")
            if dot and rb == 1:  # the dense path's default score precision (selection.SCORE_PRECISION)
                prec = selection.score_precision(None, "dense")
                ok &= compile_one(selection._select_dense_kernel, dict(args, PREC=prec), a.arch, w, 1,
                                  f"select-dense nkb{nkb} qb{qb} nkbp{nkbp} causal{int(causal)} win{int(window)} {prec}")
    # wide selection (path "wide": "auto" where KMAX >= 129): the tiers' widths at 128K, block 64, the launcher's rows and warps
    for nkbp in (2048, 1024, 512, 256):
        args = dict(QP=torch.float32, KP=torch.float32, NB=torch.int32, FIRST=torch.int32, LAST=torch.int32,
                    CS=torch.int32, IDX=torch.int32, CNT=torch.int32, Hs=I, Hkv=I, Nq=I, Nk=I, NQB=I, NKB=I, R=I,
                    KMAX=I, GS=I, OFF=I, WIN=I, scale=0.1, SINK=I, LOCAL=I, TOPK=I, PPM=I, MINB=I, MAXB=I,
                    CAUSAL=True, WINDOW=False, BS=64, QB=wide_selection.WIDE_ROWS, NKBP=nkbp, HAS_KV=False, PID0=I,
                    LPT=True, RU=wide_selection.WIDE_UNROLL)
        ok &= compile_one(wide_selection._select_wide_kernel, args, a.arch,
                          wide_selection.wide_warps(wide_selection.WIDE_ROWS, nkbp), 1, f"select-wide nkbp{nkbp}")
    # block_score "fine" (fine_score.fine_mass): 16 row means, head dim 128, 16 and 2 sub-keys a block
    for m in (16, 2):
        args = dict(QM=torch.float32, KS=torch.float32, LN=torch.float32, VIS=torch.int8, OUT=torch.float32,
                    **{n: I for n in ["sqb", "sqh", "sqi", "sqa", "skb", "skh", "skn", "slb", "slh", "svb", "svh",
                                      "svi", "sob", "soh", "soi", "Hq", "HK", "HL", "HV", "NKB", "A", "R"]},
                    scale=0.1, M=m, BJ=fine_score.SUB_KEYS_PER_CHUNK // m, BA=16, BR=128, PREC="tf32x3")
        ok &= compile_one(fine_score._fine_mass_kernel, args, a.arch, 8, 1, f"fine_mass m{m}")
    # the key-range bound pass (block_score "bound" / "hybrid"): 16K and 128K at density 0.2, GQA 4 and MHA
    for gs, kmax, dt in [(4, 56, torch.bfloat16), (1, 416, torch.bfloat16), (4, 56, torch.float32)]:
        k2 = max(16, triton.next_power_of_2(kmax // 2))
        gt, bj, w = bound_selection._bound_config(gs, 64, 128, k2)
        for causal, window in [(True, False), (False, True)]:
            args = dict(Q=dt, KMX=dt, KMN=dt, NB=torch.int32, FIRST=torch.int32, LAST=torch.int32, CS=torch.int32,
                        SEL1=torch.int32, IDX1=torch.int32, CNT1=torch.int32, IDX=torch.int32, CNT=torch.int32,
                        sqb=I, sqh=I, sqn=I, Hs=I, Hkv=I, Nq=I, Nk=I, NQB=I, NKB=I, KMAX=I, OFF=I, WIN=I, scale=0.1,
                        TOPK=I, PPM=I, MINB=I, MAXB=I, D=128, BD=128, GS=gs, GT=gt, BS=64, BJ=bj, KP=k2,
                        KP1=triton.next_power_of_2(kmax), KPO=triton.next_power_of_2(kmax), HYBRID=True,
                        CAUSAL=causal, WINDOW=window, PREC="ieee" if dt == torch.float32 else "tf32")
            ok &= compile_one(bound_selection._bound_select_kernel, args, a.arch, w, 1,
                              f"bound {str(dt)[6:]} gs{gs} kmax{kmax} bj{bj} causal{int(causal)} win{int(window)}")
    ok &= compile_one(bound_selection._key_range_kernel,
                      dict(K=torch.bfloat16, VALID=torch.int8, KMX=torch.bfloat16, KMN=torch.bfloat16, skb=I, skh=I,
                           skn=I, H=I, Nk=I, NKB=I, D=128, BS=64, BD=128), a.arch, 8, 1, "key_range")
    args = dict(K=torch.bfloat16, V=torch.bfloat16, VALID=torch.int8, KBAR=torch.float32, VBAR=torch.float32, KLP=torch.bfloat16, VLP=torch.bfloat16, LP=True,
                skb=I, skh=I, skn=I, svb=I, svh=I, svn=I, H=I, Nk=I, NKB=I, D=128, DV=128, BS=64, BD=128, BDV=128)
    # blocks a program: 1, 4 (key padding: pooling.POOL_BLOCKS_PER_PROGRAM), 8 (POOL_BLOCKS_UNWEIGHTED), at the
    # launcher's 4 warps (block 64 x D 128); WEIGHTED as the launcher sets it for each
    for nbp, weighted in ((1, True), (4, True), (8, False)):
        ok &= compile_one(pooling._pool_kv_kernel, dict(args, NBP=nbp, WEIGHTED=weighted), a.arch, 4, 1,
                          f"pool_kv nbp{nbp} weighted{int(weighted)}")
        ok &= compile_one(pooling._pool_qkv_kernel,
                          dict(args, NBP=nbp, WEIGHTED=weighted, POOL_V=True, Q=torch.bfloat16, QBAR=torch.float32,
                               sqb=I, sqh=I, sqn=I, HQ=I, Nq=I, NQB=I, BHQ=I), a.arch, 4, 1,
                          f"pool_qkv nbp{nbp} weighted{int(weighted)}")
    args = dict(Q=torch.bfloat16, QBAR=torch.float32, sqb=I, sqh=I, sqn=I, H=I, Nq=I, NQB=I, D=128, BS=64, BD=128)
    for nbp in (1, 4, 8):
        ok &= compile_one(pooling._pool_q_kernel, dict(args, NBP=nbp), a.arch, 4, 1, f"pool_q nbp{nbp}")
    args = dict(O=torch.bfloat16, DO=torch.bfloat16, DELTA=torch.float32, sob=I, soh=I, son=I, sdb=I, sdh=I, sdn=I,
                H=I, Nq=I, DV=128, BM=64, BDV=128)
    ok &= compile_one(sparse_backward._delta_kernel, args, a.arch, 4, 1, "delta")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
