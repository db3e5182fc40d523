# An SDPA site with a boolean attn_mask (True = attend) passed in by the caller: the mask goes
# to the SPA op unchanged (its 4th operand).
#
# RUN: spa inspect %s --stage before --set mode=spa | filecheck %s --check-prefix=FX-BEFORE
# RUN: spa inspect %s --stage after --set mode=spa | filecheck %s --check-prefix=FX-AFTER
# RUN: spa inspect %s --format mlir --stage before --set mode=spa | filecheck %s --check-prefix=MLIR-BEFORE
# RUN: spa inspect %s --format mlir --stage after --set mode=spa | filecheck %s --check-prefix=MLIR-AFTER
import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, q, k, v, mask):
        return self.attn(q, k, v, mask)


def make_model(seq_len=128):
    q, k, v = (torch.randn(1, 2, seq_len, 16) for _ in range(3))
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()[None, None]
    return Model(), (q, k, v, mask)


# FX-BEFORE: #   model.attn: spa pattern=sdpa mask=bool k=1/2 ({{.*}})
# FX-BEFORE-LABEL: def forward(
# FX-BEFORE-SAME: L_mask_: "b8[1, 1, 128, 128]"
# FX-BEFORE: # spa site model.attn: spa pattern=sdpa mask=bool k=1/2 ({{.*}})
# FX-BEFORE-NEXT: torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_, attn_mask = l_mask_)

# The bool mask is the op's attn_mask operand; is_causal stays False.
# FX-AFTER-LABEL: def forward(
# FX-AFTER-NOT: scaled_dot_product_attention
# FX-AFTER: # spa site model.attn: spa pattern=sdpa mask=bool k=1/2 ({{.*}})
# FX-AFTER-NEXT: torch.ops.spa.attention.default(l_q_, l_k_, l_v_, l_mask_, None, None, None, 0.25, False, 0, -1, '{{.*}}')
# FX-AFTER-NOT: scaled_dot_product_attention

# MLIR-BEFORE-LABEL: func.func @main(
# MLIR-BEFORE-SAME: %arg3: !torch.vtensor<[1,1,128,128],i1>
# MLIR-BEFORE: torch.aten.scaled_dot_product_attention %arg0, %arg1, %arg2, %arg3,
# MLIR-BEFORE-SAME: !torch.vtensor<[1,1,128,128],i1>
# MLIR-BEFORE-NOT: torch.operator

# MLIR-AFTER-LABEL: func.func @main(
# MLIR-AFTER-SAME: %arg3: !torch.vtensor<[1,1,128,128],i1>
# MLIR-AFTER-NOT: torch.aten.scaled_dot_product_attention
# MLIR-AFTER: torch.operator "torch.spa.attention"(%arg0, %arg1, %arg2, %arg3, %none{{[_0-9]*}}, %none{{[_0-9]*}}, %none{{[_0-9]*}},
# MLIR-AFTER-SAME: : (!torch.vtensor<[1,2,128,16],f32>, !torch.vtensor<[1,2,128,16],f32>, !torch.vtensor<[1,2,128,16],f32>, !torch.vtensor<[1,1,128,128],i1>, !torch.none, !torch.none, !torch.none, !torch.float, !torch.bool, !torch.int, !torch.int, !torch.str)
