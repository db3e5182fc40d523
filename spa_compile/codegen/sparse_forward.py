"""Block-sparse FlashAttention over the selected blocks plus the landmark fill (SPEC.md 3-5).

One program per (query block, GP query heads of one selection row). GP > 1 packs the
heads of a GQA group into one tile of GP * Bq rows (group selection only), so each
K/V block is loaded once for GP heads. The exact part walks the ascending index list
with an online softmax (log2 domain); blocks that need no element mask skip it. The
fill then walks the key-block means of the blocks that are fully visible (a range
found once per program, ``common.fill_bounds``), in 32-aligned chunks of BJ, as
pseudo-keys with logit ``s q . kbar + log n``; selected blocks are skipped through the
query block's selection bitmap. TMA / TMA_FILL (autotune candidates on Hopper): the
exact loop's K/V, and the fill's kbar/vbar, through host-built tensor descriptors
(bulk tensor copies) instead of pointer loads; same arithmetic, same results. GO (autotune
candidates for GQA group selection) and HF (opt-in): group order and heads-first program order
(``common.qblock_prologue``), so that the head packs of one group share K/V tiles through L2;
same results.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .autotune import interpreting
from .blockinfo import BlockInfo, all_keys_valid
from .common import exact_logits, fill_bounds, load_rows, program_grid, qblock_prologue

LOG2E = 1.4426950408889634


@triton.jit
def fill_bias(c0, cj, lo, he, NB_b, SEL_r, LOW: tl.constexpr, BJ: tl.constexpr, UNIFORM_N: tl.constexpr, LOG2_N):
    """Additive log2-domain bias of landmarks c0 + cj (cj = arange(BJ), c0 a multiple of 32)
    for a fill over [lo, he) (see fill_bounds): log2(n) for non-empty, unselected blocks,
    -inf for the rest (log2(0) = -inf drops empty blocks without a test).

    The bias sits in the score dot's accumulator layout, where every thread holds about BJ / 4 of
    its columns: per-column global loads there cost more than the fill's softmax (the H200,
    128K top-k 32: the fill took 7.7 ms with two loads a column, 4.7 ms with no bias;
    benchmarks/bench_fill.py). So the chunk's BJ / 32 selection words are scalar loads, and
    UNIFORM_N (every block holds BS valid keys: no key padding, Nk a multiple of BS, every key
    visible to some row) replaces the count load by the constant LOG2_N.
    LOW: also drop columns below lo (the loop start was aligned down to 32).
    """
    word = tl.zeros_like(cj)
    last_w = (he - 1) // 32
    for w in tl.static_range(BJ // 32):
        ww = tl.load(SEL_r + tl.minimum(c0 // 32 + w, last_w))  # one scalar load a word
        word = tl.where(cj // 32 == w, ww, word)
    use = (cj < he - c0) & (((word >> (cj % 32)) & 1) == 0)
    if LOW:
        use = use & (cj >= lo - c0)
    if UNIFORM_N:
        return tl.where(use, LOG2_N, float("-inf"))
    jc = tl.minimum(c0 + cj, he - 1)  # in range: unmasked loads
    n = tl.load(NB_b + jc)
    return tl.math.log2(tl.where(use, n, 0).to(tl.float32))


@triton.jit
def fill_bias_loads(c0, cj, lo, he, NB_b, SEL_r, LOW: tl.constexpr):
    """The bias of ``fill_bias`` with a count and a selection-word load per column (the shipped
    form until 2026-11-28; BIAS_MODE 1, for benchmarks/bench_fill.py)."""
    jc = tl.minimum(c0 + cj, he - 1)
    n = tl.load(NB_b + jc)
    word = tl.load(SEL_r + jc // 32)
    use = (cj < he - c0) & (((word >> (cj % 32)) & 1) == 0)
    if LOW:
        use = use & (cj >= lo - c0)
    return tl.math.log2(tl.where(use, n, 0).to(tl.float32))


@triton.jit
def softmax_step(qk, v, m_i, l_i, acc, qk_scale, PREC: tl.constexpr):
    """Fold the unscaled logits ``qk`` ``[BM, BN]`` (log2-domain logits ``qk * qk_scale``, qk_scale
    > 0: launch_forward flips a negative scale into q) and their values ``v`` ``[BN, DV]`` into the
    online softmax (m, l, acc; m in the log2 domain); a row with no finite logit yet keeps m =
    -inf, l = 0. The scale enters the row max once and each exponent through one multiply-add
    (FlashAttention's form): no separate multiply per logit. Forms measured slower or no faster
    on the H200 and removed (docs/kernels.md, session 17): lazy rescaling after FlashAttention-4
    (0.91-0.96x: its CTA-wide test a tile costs more than the multiply it skips), q as wgmma's
    register operand (0.97-1.01x)."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
    m_s = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_s)
    p = tl.math.exp2(qk * qk_scale - m_s[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _block_kv(K_h, V_h, KD, VD, b32, kh, j, offs_n, d, dv, Nk, skn, svn, D: tl.constexpr, DV: tl.constexpr,
              BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, TMA: tl.constexpr):
    """K and V rows of key block j."""
    if TMA:
        # Hopper bulk tensor copies through host-built descriptors of K, V as [B, Hkv, Nk, D]
        # (tma_descriptors): rows past Nk come back as zeros (the descriptor's bounds), their
        # logits are masked like the clamped rows
        k = KD.load([b32, kh, j * BS, 0]).reshape(BS, BD)
        v = VD.load([b32, kh, j * BS, 0]).reshape(BS, BDV)
    else:
        # rows past Nk are clamped, not masked (unpredicated copies): their logits are masked
        # (a block reaching past Nk is never "clean")
        kc = tl.minimum(j * BS + offs_n, Nk - 1)
        k = load_rows(K_h, kc, skn, d, D, BD)
        v = load_rows(V_h, kc, svn, dv, DV, BDV)
    return k, v


@triton.jit
def _fwd_kernel(
    Q, K, V, KBAR, VBAR, NB, FIRST, LAST, KVALID, IDX, CNT, SEL, O, LSE, KD, VD, KBD, VBD,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    Hq, Hkv, Hs, Nq, Nk, NQB, NKB, KMAX, OFF, WIN, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, GP: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BJ: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KV: tl.constexpr, FILL: tl.constexpr,
    PREC: tl.constexpr, FILL_STAGES: tl.constexpr = 0, TMA: tl.constexpr = False,
    TMA_FILL: tl.constexpr = False, HF: tl.constexpr = False, UNIFORM_N: tl.constexpr = False, GO: tl.constexpr = False,
    BIAS_MODE: tl.constexpr = 0,
):
    i, b64, kh, hs, rh, t, t0, t1 = qblock_prologue(Hq, Hkv, Hs, Nq, NQB, BS, GP, HF, GO)
    BM: tl.constexpr = GP * BS
    row_ok = t < Nq
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    offs_n = tl.arange(0, BS)

    q = tl.load(Q + b64 * sqb + rh[:, None] * sqh + t[:, None].to(tl.int64) * sqn + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    K_h = K + b64 * skb + kh.to(tl.int64) * skh
    b32 = b64.to(tl.int32)
    V_h = V + b64 * svb + kh.to(tl.int64) * svh
    NB_b = NB + b64 * NKB
    KV_b = KVALID + b64 * Nk
    IDX_r = IDX + ((b64 * Hs + hs) * NQB + i) * KMAX
    cnt = tl.load(CNT + (b64 * Hs + hs) * NQB + i)

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)

    for s in range(0, cnt):
        j = tl.load(IDX_r + s)
        kpos = j * BS + offs_n
        k, v = _block_kv(K_h, V_h, KD, VD, b32, kh, j, offs_n, d, dv, Nk, skn, svn, D, DV, BS, BD, BDV, TMA)
        qk = exact_logits(q, k, j, kpos, t, t0, t1, NB_b, KV_b, Nk, OFF, WIN, qk_scale, BS, CAUSAL, WINDOW, HAS_KV,
                          PREC, SCALED=False)
        m_i, l_i, acc = softmax_step(qk, v, m_i, l_i, acc, qk_scale, PREC)

    if FILL:
        # landmarks [ls, he) are fully visible by geometry (one scalar test at each end), so
        # the chunk loop only tests n > 0 and the selection bit: no first/last vectors, no
        # per-column visibility test. FILL_STAGES > 0: the fill loop's own pipeline depth.
        ls, he = fill_bounds(t0, t1, NKB, OFF, WIN, FIRST + b64 * NKB, LAST + b64 * NKB, BS, CAUSAL, WINDOW)
        SEL_r = SEL + ((b64 * Hs + hs) * NQB + i) * ((NKB + 31) // 32)
        KB_h = KBAR + (b64 * Hkv + kh) * NKB * D
        VB_h = VBAR + (b64 * Hkv + kh) * NKB * DV
        tl.static_assert(BJ % 32 == 0)
        cj = tl.arange(0, BJ)
        inv_scale = 1.0 / qk_scale
        c_lo = ls - ls % 32  # 32-aligned chunks: a selection word's bit of column cj is cj % 32
        log2_n = tl.math.log2(BS * 1.0)
        for c0 in tl.range(c_lo, he, BJ, num_stages=FILL_STAGES if FILL_STAGES > 0 else None):
            # BIAS_MODE (benchmarks/bench_fill.py): 0 fill_bias (shipped), 1 fill_bias_loads (the
            # earlier per-column loads), 2 no bias at all (timing only: wrong results)
            if BIAS_MODE == 1:
                bias = fill_bias_loads(c0, cj, ls, he, NB_b, SEL_r, WINDOW)
            elif BIAS_MODE == 2:
                bias = tl.zeros([BJ], dtype=tl.float32)
            else:
                bias = fill_bias(c0, cj, ls, he, NB_b, SEL_r, WINDOW, BJ, UNIFORM_N, log2_n)
            if TMA_FILL:
                # rows c0 .. c0 + BJ - 1 (the descriptor zero-fills past NKB; columns at or past
                # he, or below ls, get a -inf bias like the clamped rows of the pointer loads)
                kb = KBD.load([b32, kh, c0, 0]).reshape(BJ, BD)
                vb = VBD.load([b32, kh, c0, 0]).reshape(BJ, BDV)
            else:
                jc = tl.minimum(c0 + cj, he - 1)  # in range: unmasked loads, the extra columns get -inf
                kb = load_rows(KB_h, jc, D, d, D, BD)
                vb = load_rows(VB_h, jc, DV, dv, DV, BDV)
            # the bias enters as the score dot's initial accumulator (in units of the dot, hence
            # the 1/qk_scale): fewer live registers than an add after the dot, and it keeps the
            # small loads out of the pipeline's shared-memory stages (compile_check: 228 -> ~195
            # registers for 4 warps, spills 160 -> 128 bytes at 16 warps x 4 heads)
            qk = tl.dot(q, tl.trans(kb), acc=tl.broadcast_to((bias * inv_scale)[None, :], [BM, BJ]),
                        input_precision=PREC)
            m_i, l_i, acc = softmax_step(qk, vb, m_i, l_i, acc, qk_scale, PREC)  # vb: the landmark values in q's dtype

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O + b64 * sob + rh[:, None] * soh + t[:, None].to(tl.int64) * son + dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE + (b64 * Hq + rh) * Nq + t, lse, mask=row_ok)


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: three-pass tf32, about float32 accuracy on the tensor cores
    return "tf32x3" if dtype == torch.float32 else "tf32"


def selected_bitmap(index: Tensor, nkb: int) -> Tensor:
    """[B, Hs, NQB, ceil(NKB / 32)] int32: bit j of a query block's row is set when it selected
    block j (the fill skips those landmarks). 32x smaller than the index lists at density 1/32."""
    b, hs, nqb, kmax = index.shape
    words = (nkb + 31) // 32
    bits = torch.zeros(b, hs, nqb, words + 1, dtype=torch.int32, device=index.device)
    idx = index.long()
    ok = idx >= 0
    w = torch.where(ok, idx // 32, torch.full_like(idx, words))
    val = torch.where(ok, torch.ones_like(idx).bitwise_left_shift(idx % 32), torch.zeros_like(idx))
    # distinct bits of a word: their sum is their OR (int64 keeps bit 31 exact, then wraps to int32)
    acc = torch.zeros(b, hs, nqb, words + 1, dtype=torch.int64, device=index.device)
    acc.scatter_add_(3, w, val)
    bits = torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)
    return bits[..., :words].contiguous()


def tma_ok(k: Tensor, v: Tensor, block: int) -> bool:
    """Whether K and V can be read through TMA descriptors of shape [B, Hkv, Nk, D] with
    [1, 1, block, D] boxes: 16-bit dtypes, power-of-two head dims 16..256 (the box is the
    whole head dim: no column masking), a contiguous last dim, 16-byte aligned base and
    strides, and a Hopper-or-newer card (or the interpreter, for the tests). Otherwise the
    kernel keeps its pointer loads (the same config without ``TMA``)."""
    if k.dtype not in (torch.float16, torch.bfloat16) or v.dtype != k.dtype or k.dim() != 4 or v.dim() != 4:
        return False
    if block & (block - 1) or not 16 <= block <= 256:
        return False
    for x in (k, v):
        d = x.shape[-1]
        if d & (d - 1) or not 16 <= d <= 256 or x.stride(-1) != 1 or x.data_ptr() % 16 or x.shape[2] >= 2**31:
            return False
        if any(st <= 0 or (st * x.element_size()) % 16 for st in _tma_strides(x)[:-1]):
            return False
    if interpreting():
        return True
    return k.is_cuda and v.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9


def _tma_strides(x: Tensor) -> list[int]:
    """x's strides, those of size-1 dims (only index 0 is read, any stride is right; torch
    may report 1 there) replaced by the extent of the dims inside: an aligned value."""
    st = list(x.stride())
    for i in range(x.dim() - 2, -1, -1):
        if x.shape[i] == 1:
            st[i] = st[i + 1] * x.shape[i + 1]
    return st


def tma_descriptors(k: Tensor, v: Tensor, block: int):
    """Host-built descriptors of K and V (or the landmarks kbar, vbar) with [1, 1, block, D]
    boxes, for bulk tensor copies (passed by value: no device allocation, no
    ``triton.set_allocator``). The shape's Nk (NKB) bounds the copies: rows past it come
    back as zeros."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor(x, list(x.shape), _tma_strides(x), [1, 1, block, x.shape[-1]]) for x in (k, v))


def uniform_counts(info: BlockInfo) -> bool:
    """Whether every key block holds ``block`` valid keys, from the geometry alone (no device
    read): no key padding, no window, Nk a multiple of the block, and (causal) every key visible
    to the last row. Then the fill's landmark count is a constant (``fill_bias``'s UNIFORM_N)."""
    return info.nk % info.block == 0 and not info.has_window and all_keys_valid(info)


def positive_scale(q: Tensor, scale: float) -> tuple[Tensor, float]:
    """(q, scale) with scale > 0, for the forwards' softmax (here and gluon_forward), which takes
    the row max before the scale: q k . s = (-q) k . |s|. Scale 0 is refused: a masked logit's
    -inf times 0 is NaN."""
    if scale == 0:
        raise ValueError("scale 0 makes every logit 0 (uniform attention); the SPA kernels take scale != 0, "
                         "spa_compile.reference takes any scale")
    return (-q, -scale) if scale < 0 else (q, scale)


def launch_forward(q, k, v, kbar, vbar, info: BlockInfo, index, count, scale, fill: bool, config, out=None, lse=None,
                   sel=None):
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    dv = v.shape[-1]
    hs = index.shape[1]
    if out is None:
        out = torch.empty(b, hq, nq, dv, device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty(b, hq, nq, device=q.device, dtype=torch.float32)
    gp = config["GP"]
    q, scale = positive_scale(q, scale)
    kv = info.key_valid if info.key_valid is not None else info.valid
    if sel is None:
        sel = selected_bitmap(index, info.nkb) if fill else count
    # TMA: a config flag; shapes or strides the descriptors cannot take keep the pointer loads
    tma = bool(config.get("TMA", False)) and tma_ok(k, v, info.block)
    kd, vd = tma_descriptors(k, v, info.block) if tma else (None, None)
    bj = config.get("BJ", 64)
    tma_fill = fill and bool(config.get("TMA_FILL", False)) and tma_ok(kbar, vbar, bj)
    kbd, vbd = tma_descriptors(kbar, vbar, bj) if tma_fill else (None, None)
    grid, hf, go = program_grid(config, b, hq, info.nqb)
    _fwd_kernel[grid](
        q, k, v, kbar, vbar, info.n, info.first, info.last, kv, index, count, sel, out, lse, kd, vd, kbd, vbd,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, hkv, hs, nq, info.nk, info.nqb, info.nkb, index.shape[-1], info.offset, info.win,
        float(scale) * LOG2E,
        D=d, DV=dv, BS=info.block, GP=gp,
        BD=triton.next_power_of_2(d), BDV=triton.next_power_of_2(dv), BJ=bj,
        FILL_STAGES=config.get("FILL_STAGES", 0), CAUSAL=info.causal, WINDOW=info.has_window, HAS_KV=info.key_valid is not None, FILL=fill,
        PREC=dot_precision(q.dtype), TMA=tma, TMA_FILL=tma_fill, HF=hf, GO=go, UNIFORM_N=uniform_counts(info),
        BIAS_MODE=config.get("BIAS_MODE", 0),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out, lse
