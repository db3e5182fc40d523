# An SDPA site with a float (additive) attn_mask of 0 / -inf built inside the model: the mask's
# ops stay in the graph and feed the SPA op. (A mask with finite non-zero entries is a bias;
# the op then computes it densely at run time, SPEC.md "Bias".)
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

    def forward(self, q, k, v, key_padding):
        return self.attn(q, k, v, key_padding)


class Attention(nn.Module):
    def forward(self, q, k, v, key_padding):
        # key_padding: [B, Nk] bool, True for padding keys
        mask = torch.zeros(key_padding.shape, dtype=q.dtype).masked_fill(key_padding, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


def make_model(seq_len=128):
    q, k, v = (torch.randn(2, 2, seq_len, 16) for _ in range(3))
    key_padding = torch.zeros(2, seq_len, dtype=torch.bool)
    key_padding[1, seq_len // 2 :] = True
    return Model(), (q, k, v, key_padding)


# FX-BEFORE: #   model.attn: spa pattern=sdpa mask=additive k=1/2 ({{.*}})
# FX-BEFORE-LABEL: def forward(
# FX-BEFORE: [[MASK:[a-z_0-9]+]]: "f32[2, 128]" = zeros.masked_fill(l_key_padding_, -inf)
# FX-BEFORE: [[M4:[a-z_0-9]+]]: "f32[2, 1, 1, 128]" = [[MASK]][
# FX-BEFORE: # spa site model.attn: spa pattern=sdpa mask=additive k=1/2 ({{.*}})
# FX-BEFORE-NEXT: torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_, attn_mask = [[M4]])

# The mask's ops stay; their result is the SPA op's attn_mask.
# FX-AFTER-LABEL: def forward(
# FX-AFTER: zeros.masked_fill(l_key_padding_, -inf)
# FX-AFTER: [[M4:[a-z_0-9]+]]: "f32[2, 1, 1, 128]" = mask[
# FX-AFTER: # spa site model.attn: spa pattern=sdpa mask=additive k=1/2 ({{.*}})
# FX-AFTER-NEXT: torch.ops.spa.attention.default(l_q_, l_k_, l_v_, [[M4]], None, None, None, 0.25, False, 0, -1, '{{.*}}')
# FX-AFTER-NOT: scaled_dot_product_attention

# MLIR-BEFORE-LABEL: func.func @main(%arg0: !torch.vtensor<[2,128],i1>,
# MLIR-BEFORE: %[[FILLED:[0-9]+]] = torch.aten.masked_fill.Scalar %{{[0-9]+}}, %arg0, %float-Inf
# MLIR-BEFORE: %[[MASK:[0-9]+]] = torch.aten.unsqueeze {{.*}} -> !torch.vtensor<[2,1,1,128],f32>
# MLIR-BEFORE: torch.aten.scaled_dot_product_attention %arg1, %arg2, %arg3, %[[MASK]],
# MLIR-BEFORE-NOT: torch.operator

# MLIR-AFTER-LABEL: func.func @main(
# MLIR-AFTER: torch.aten.masked_fill.Scalar %{{[0-9]+}}, %arg0, %float-Inf
# MLIR-AFTER: %[[MASK:[0-9]+]] = torch.aten.unsqueeze {{.*}} -> !torch.vtensor<[2,1,1,128],f32>
# MLIR-AFTER-NOT: torch.aten.scaled_dot_product_attention
# MLIR-AFTER: %[[SPA:[0-9]+]]:4 = torch.operator "torch.spa.attention"(%arg1, %arg2, %arg3, %[[MASK]], %none
# MLIR-AFTER-SAME: !torch.vtensor<[2,1,1,128],f32>, !torch.none
# MLIR-AFTER: return %[[SPA]]#0
