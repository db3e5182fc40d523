"""SPEC.md transcribed as literally as possible, with O(N^2) memory and Python loops.

Only for tests: it checks the block-by-block reference against an independent
reading of the semantics. Float64 throughout.
"""

from __future__ import annotations

import math

import torch


def naive_spa(q, k, v, visible, scale, *, block, density=None, topk=None, min_blocks=None, max_blocks=None,
              sink=0, local=0, fill="landmark", per_head=False, pq=None, pk=None, offset=0):
    """q [B,Hq,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv], visible bool [B,Hq,Nq,Nk] (full, explicit)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nqb, nkb = math.ceil(Nq / block), math.ceil(Nk / block)
    rows = lambda i: range(i * block, min((i + 1) * block, Nq))  # noqa: E731
    keys = lambda j: range(j * block, min((j + 1) * block, Nk))  # noqa: E731
    # valid keys per (b, g): some query of some head of the group sees them
    valid = torch.zeros(B, Hkv, Nk, dtype=torch.bool)
    for g in range(Hkv):
        valid[:, g] = visible[:, g * G:(g + 1) * G].any(dim=1).any(dim=1)
    kbar = torch.zeros(B, Hkv, nkb, D, dtype=torch.float64)
    vbar = torch.zeros(B, Hkv, nkb, v.shape[-1], dtype=torch.float64)
    n = torch.zeros(B, Hkv, nkb, dtype=torch.float64)
    for j in range(nkb):
        for u in keys(j):
            w = valid[:, :, u].double()
            kbar[:, :, j] += k[:, :, u] * w[..., None]
            vbar[:, :, j] += v[:, :, u] * w[..., None]
            n[:, :, j] += w
    kbar = kbar / n.clamp(min=1)[..., None]
    vbar = vbar / n.clamp(min=1)[..., None]

    def vis_block(b, h, i, j):
        return any(bool(visible[b, h, t, u]) for t in rows(i) for u in keys(j))

    def full_block(b, h, i, j):
        g = h // G
        return all(bool(visible[b, h, t, u]) or not bool(valid[b, g, u]) for t in rows(i) for u in keys(j))

    Pq = [torch.eye(D, dtype=torch.float64) if pq is None else pq[g].double() for g in range(Hkv)]
    Pk = [torch.eye(D, dtype=torch.float64) if pk is None else pk[g].double() for g in range(Hkv)]
    sel_heads = Hq if per_head else Hkv
    S = {}
    for b in range(B):
        for s in range(sel_heads):
            heads = [s] if per_head else list(range(s * G, (s + 1) * G))
            g = heads[0] // G
            for i in range(nqb):
                visible_j = [j for j in range(nkb) if any(vis_block(b, h, i, j) for h in heads)]
                partial = [j for j in visible_j if any(vis_block(b, h, i, j) and not full_block(b, h, i, j) for h in heads)]
                diag = min(max((rows(i)[-1] + offset) // block, 0), nkb - 1)
                near = sorted(visible_j, key=lambda j: (abs(j - diag), j))[:local]
                forced = set(partial) | set(visible_j[:sink]) | set(near)
                score = {}
                for j in visible_j:
                    acc = 0.0
                    for h in heads:
                        qbar = q[b, h, list(rows(i))].mean(0)
                        acc += float((qbar @ Pq[g]) @ (kbar[b, g, j] @ Pk[g]))
                    score[j] = scale * acc
                remaining = [j for j in visible_j if j not in forced]
                kk = topk if topk is not None else math.ceil(round(density * len(visible_j), 9))
                if min_blocks is not None:
                    kk = max(kk, min_blocks)
                if max_blocks is not None:
                    kk = min(kk, max_blocks)
                chosen = sorted(remaining, key=lambda j: (-score[j], j))[:kk]
                S[b, s, i] = forced | set(chosen)
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, Hq, Nq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // G
            s = h if per_head else g
            for i in range(nqb):
                sel = S[b, s, i]
                for t in rows(i):
                    logits, values = [], []
                    for j in sorted(sel):
                        for u in keys(j):
                            if visible[b, h, t, u]:
                                logits.append(scale * float(q[b, h, t] @ k[b, g, u]))
                                values.append(v[b, g, u])
                    if fill == "landmark":
                        for j in range(nkb):
                            if j not in sel and vis_block(b, h, i, j) and full_block(b, h, i, j) and n[b, g, j] > 0:
                                logits.append(scale * float(q[b, h, t] @ kbar[b, g, j]) + math.log(n[b, g, j]))
                                values.append(vbar[b, g, j])
                    if logits:
                        lg = torch.tensor(logits, dtype=torch.float64)
                        p = torch.softmax(lg, 0)
                        out[b, h, t] = (p[:, None] * torch.stack(values)).sum(0)
                        lse[b, h, t] = torch.logsumexp(lg, 0)
    return out, lse, S
