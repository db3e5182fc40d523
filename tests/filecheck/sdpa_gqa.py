# A grouped-query SDPA site (enable_gqa=True, 4 query heads over 2 kv heads, causal): the SPA op
# takes k/v with their 2 heads, and its selection (outputs 3 and 4) is per kv head (selection="group").
#
# RUN: spa inspect %s --stage before --set mode=spa | filecheck %s --check-prefix=FX-BEFORE
# RUN: spa inspect %s --stage after --set mode=spa --set topk=2 | filecheck %s --check-prefix=FX-AFTER
# RUN: spa inspect %s --format mlir --stage before --set mode=spa | filecheck %s --check-prefix=MLIR-BEFORE
# RUN: spa inspect %s --format mlir --stage after --set mode=spa | filecheck %s --check-prefix=MLIR-AFTER
import torch
import torch.nn as nn
import torch.nn.functional as F


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def make_model(seq_len=256):
    q = torch.randn(1, 4, seq_len, 16)
    k, v = (torch.randn(1, 2, seq_len, 16) for _ in range(2))
    return Model(), (q, k, v)


# FX-BEFORE: #   model.attn: spa pattern=sdpa mask=causal k=1/4 ({{.*}})
# FX-BEFORE-LABEL: def forward(self, L_q_: "f32[1, 4, 256, 16]", L_k_: "f32[1, 2, 256, 16]", L_v_: "f32[1, 2, 256, 16]")
# FX-BEFORE: # spa site model.attn: spa pattern=sdpa mask=causal k=1/4 ({{.*}})
# FX-BEFORE-NEXT: torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_, is_causal = True, enable_gqa = True)

# topk=2 shows in k and in the op's config; k/v keep their 2 heads (no repeat_interleave).
# FX-AFTER-LABEL: def forward(
# FX-AFTER-NOT: repeat_interleave
# FX-AFTER: # spa site model.attn: spa pattern=sdpa mask=causal k=2/4 ({{.*}})
# FX-AFTER-NEXT: torch.ops.spa.attention.default(l_q_, l_k_, l_v_, None, None, None, None, 0.25, True, 0, -1, '{{.*}}"topk":2}')
# FX-AFTER-NEXT: "f32[1, 4, 256, 16]"
# FX-AFTER-NOT: scaled_dot_product_attention

# MLIR-BEFORE-LABEL: func.func @main(
# MLIR-BEFORE-DAG: [[T1:%true[_0-9]*]] = torch.constant.bool true
# MLIR-BEFORE-DAG: [[T2:%true[_0-9]*]] = torch.constant.bool true
# MLIR-BEFORE: torch.aten.scaled_dot_product_attention %arg0, %arg1, %arg2, %none{{[_0-9]*}}, %float0.000000e00, [[T1]], %none{{[_0-9]*}}, [[T2]] : !torch.vtensor<[1,4,256,16],f32>, !torch.vtensor<[1,2,256,16],f32>, !torch.vtensor<[1,2,256,16],f32>

# Outputs: out [1,4,256,16], lse [1,4,256], and the selection per kv head: [1,2,4,4] / [1,2,4].
# MLIR-AFTER-LABEL: func.func @main(
# MLIR-AFTER-NOT: torch.aten.scaled_dot_product_attention
# MLIR-AFTER: torch.operator "torch.spa.attention"(%arg0, %arg1, %arg2,
# MLIR-AFTER-SAME: : (!torch.vtensor<[1,4,256,16],f32>, !torch.vtensor<[1,2,256,16],f32>, !torch.vtensor<[1,2,256,16],f32>,
# MLIR-AFTER-SAME: -> (!torch.vtensor<[1,4,256,16],f32>, !torch.vtensor<[1,4,256],f32>, !torch.vtensor<[1,2,4,4],si32>, !torch.vtensor<[1,2,4],si32>)
