# An SDPA site with a float (additive) attn_mask of 0 / -inf given by the caller: the mask goes to
# the SPA op unchanged (its 4th operand). Which entries are -inf is only known at run time; a mask
# with finite non-zero entries would be a bias, which the op computes densely (SPEC.md "Bias").
#
# RUN: spa inspect %s --stage before --set mode=spa | filecheck %s --check-prefix=FX-BEFORE
# RUN: spa inspect %s --stage after --set mode=spa | filecheck %s --check-prefix=FX-AFTER
# RUN: spa inspect %s --format mlir --stage before --set mode=spa | filecheck %s --check-prefix=MLIR-BEFORE
# RUN: spa inspect %s --format mlir --stage after --set mode=spa | filecheck %s --check-prefix=MLIR-AFTER
import torch
import torch.nn as nn
import torch.nn.functional as F


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, q, k, v, mask):
        return self.attn(q, k, v, mask)


class Attention(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def make_model(seq_len=128):
    q, k, v = (torch.randn(2, 2, seq_len, 16) for _ in range(3))
    # key padding as an additive mask: the second sequence has its last half padded
    mask = torch.zeros(2, 1, 1, seq_len)
    mask[1, ..., seq_len // 2 :] = float("-inf")
    return Model(), (q, k, v, mask)


# FX-BEFORE: #   model.attn: spa pattern=sdpa mask=additive k=1/2 ({{.*}})
# FX-BEFORE-LABEL: def forward(
# FX-BEFORE-SAME: L_mask_: "f32[2, 1, 1, 128]"
# FX-BEFORE: # spa site model.attn: spa pattern=sdpa mask=additive k=1/2 ({{.*}})
# FX-BEFORE-NEXT: torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_, attn_mask = l_mask_)

# FX-AFTER-LABEL: def forward(
# FX-AFTER-NOT: scaled_dot_product_attention
# FX-AFTER: # spa site model.attn: spa pattern=sdpa mask=additive k=1/2 ({{.*}})
# FX-AFTER-NEXT: torch.ops.spa.attention.default(l_q_, l_k_, l_v_, l_mask_, None, None, None, 0.25, False, 0, -1, '{{.*}}')
# FX-AFTER-NOT: scaled_dot_product_attention

# MLIR-BEFORE-LABEL: func.func @main(
# MLIR-BEFORE-SAME: %arg3: !torch.vtensor<[2,1,1,128],f32>
# MLIR-BEFORE: torch.aten.scaled_dot_product_attention %arg0, %arg1, %arg2, %arg3,
# MLIR-BEFORE-SAME: !torch.vtensor<[2,1,1,128],f32>
# MLIR-BEFORE-NOT: torch.operator

# MLIR-AFTER-LABEL: func.func @main(
# MLIR-AFTER-NOT: torch.aten.scaled_dot_product_attention
# MLIR-AFTER: %[[SPA:[0-9]+]]:4 = torch.operator "torch.spa.attention"(%arg0, %arg1, %arg2, %arg3, %none
# MLIR-AFTER-SAME: !torch.vtensor<[2,1,1,128],f32>, !torch.none
# MLIR-AFTER: return %[[SPA]]#0
