# A hand-written attention (matmul -> scale -> masked_fill with a tril mask -> softmax -> matmul):
# the decomposed matcher finds it, mask recovery turns the tril mask into causal, and the whole
# chain becomes one SPA op with causal=True and no mask tensor. (One case of the decomposed
# families; more live next to it.)
#
# RUN: spa inspect %s --stage before --set mode=spa | filecheck %s --check-prefix=FX-BEFORE
# RUN: spa inspect %s --stage after --set mode=spa | filecheck %s --check-prefix=FX-AFTER
# RUN: spa inspect %s --format mlir --stage before --set mode=spa | filecheck %s --check-prefix=MLIR-BEFORE
# RUN: spa inspect %s --format mlir --stage after --set mode=spa | filecheck %s --check-prefix=MLIR-AFTER
import math

import torch
import torch.nn as nn


class Attention(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def make_model(seq_len=128):
    return Model(), tuple(torch.randn(1, 2, seq_len, 16) for _ in range(3))


# FX-BEFORE: #   model.attn: spa pattern=matmul/softmax/matmul mask=causal k=1/2 ({{.*}})
# FX-BEFORE-LABEL: def forward(
# FX-BEFORE: torch.softmax(
# FX-BEFORE: # spa site model.attn: spa pattern=matmul/softmax/matmul mask=causal k=1/2 ({{.*}})
# FX-BEFORE-NEXT: "f32[1, 2, 128, 16]" = softmax @ l_v_

# The chain, its mask and the softmax are gone; causal comes from the recovered mask.
# FX-AFTER-LABEL: def forward(
# FX-AFTER-NOT: torch.softmax(
# FX-AFTER-NOT: .tril()
# FX-AFTER: # spa site model.attn: spa pattern=matmul/softmax/matmul mask=causal k=1/2 ({{.*}})
# FX-AFTER-NEXT: torch.ops.spa.attention.default(l_q_, l_k_, l_v_, None, None, None, None, 0.25, True, 0, -1, '{{.*}}')
# FX-AFTER-NOT: torch.softmax(

# MLIR-BEFORE-LABEL: func.func @main(
# MLIR-BEFORE: torch.aten.matmul
# MLIR-BEFORE: torch.aten.tril
# MLIR-BEFORE: torch.aten.softmax.int
# MLIR-BEFORE: torch.aten.matmul
# MLIR-BEFORE-NOT: torch.operator

# MLIR-AFTER-LABEL: func.func @main(
# MLIR-AFTER-NOT: torch.aten.softmax
# MLIR-AFTER: [[CAUSAL:%true[_0-9]*]] = torch.constant.bool true
# MLIR-AFTER: torch.operator "torch.spa.attention"({{.*}}, %none{{[_0-9]*}}, %none{{[_0-9]*}}, %none{{[_0-9]*}}, %none{{[_0-9]*}}, %float2.500000e-01, [[CAUSAL]],
# MLIR-AFTER-NOT: torch.aten.matmul
