# A 3-D SDPA site ([B*H, N, D]): the rewrite adds a head dimension around the SPA op
# (unsqueeze(1) on q, k, v and squeeze(1) on the output).
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

    def forward(self, q, k, v):
        return self.attn(q, k, v)


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def make_model(seq_len=128):
    q, k, v = (torch.randn(4, seq_len, 16) for _ in range(3))
    return Model(), (q, k, v)


# FX-BEFORE: #   model.attn: spa pattern=sdpa mask=causal k=1/2 ({{.*}})
# FX-BEFORE-LABEL: def forward(self, L_q_: "f32[4, 128, 16]"
# FX-BEFORE: # spa site model.attn: spa pattern=sdpa mask=causal k=1/2 ({{.*}})
# FX-BEFORE-NEXT: scaled_dot_product_attention: "f32[4, 128, 16]" = torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_, is_causal = True)

# FX-AFTER-LABEL: def forward(
# FX-AFTER-NOT: # No stacktrace found
# FX-AFTER: [[Q:[a-z_0-9]+]] = l_q_.unsqueeze(1)
# FX-AFTER: [[K:[a-z_0-9]+]] = l_k_.unsqueeze(1)
# FX-AFTER: [[V:[a-z_0-9]+]] = l_v_.unsqueeze(1)
# FX-AFTER: # spa site model.attn: spa pattern=sdpa mask=causal k=1/2 ({{.*}})
# FX-AFTER-NEXT: {{^ *}}[[OP:[a-z_0-9]+]] = torch.ops.spa.attention.default([[Q]], [[K]], [[V]], None, None, None, None, 0.25, True, 0, -1, '{{.*}}')
# FX-AFTER-NEXT: {{^ *}}[[OUT:[a-z_0-9]+]] = [[OP]][0]
# FX-AFTER: "f32[4, 128, 16]" = [[OUT]].squeeze(1)
# FX-AFTER-NOT: scaled_dot_product_attention

# MLIR-BEFORE-LABEL: func.func @main(%arg0: !torch.vtensor<[4,128,16],f32>
# MLIR-BEFORE: torch.aten.scaled_dot_product_attention %arg0, %arg1, %arg2, {{.*}} -> !torch.vtensor<[4,128,16],f32>

# MLIR-AFTER-LABEL: func.func @main(
# MLIR-AFTER: %[[Q:[0-9]+]] = torch.aten.unsqueeze %arg0, {{.*}} -> !torch.vtensor<[4,1,128,16],f32>
# MLIR-AFTER: %[[K:[0-9]+]] = torch.aten.unsqueeze %arg1,
# MLIR-AFTER: %[[V:[0-9]+]] = torch.aten.unsqueeze %arg2,
# MLIR-AFTER: %[[SPA:[0-9]+]]:4 = torch.operator "torch.spa.attention"(%[[Q]], %[[K]], %[[V]], %none
# MLIR-AFTER-SAME: -> (!torch.vtensor<[4,1,128,16],f32>, !torch.vtensor<[4,1,128],f32>,
# MLIR-AFTER: torch.aten.squeeze.dim %[[SPA]]#0, {{.*}} -> !torch.vtensor<[4,128,16],f32>
# MLIR-AFTER-NOT: torch.aten.scaled_dot_product_attention
