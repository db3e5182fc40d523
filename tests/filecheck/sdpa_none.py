# An SDPA site without a mask, at the top of the model (site name "model"). With mode=auto and
# 128 keys it stays dense, and the annotation says why.
#
# RUN: spa inspect %s --stage before --set mode=spa | filecheck %s --check-prefix=FX-BEFORE
# RUN: spa inspect %s --stage after --set mode=spa | filecheck %s --check-prefix=FX-AFTER
# RUN: spa inspect %s --stage after --set mode=auto --set min_seq_len=4096 | filecheck %s --check-prefix=FX-AUTO
# RUN: spa inspect %s --format mlir --stage before --set mode=spa | filecheck %s --check-prefix=MLIR-BEFORE
# RUN: spa inspect %s --format mlir --stage after --set mode=spa | filecheck %s --check-prefix=MLIR-AFTER
# RUN: spa inspect %s --format mlir --stage after --set mode=dense | filecheck %s --check-prefix=MLIR-DENSE
import torch
import torch.nn as nn
import torch.nn.functional as F


class Model(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def make_model(seq_len=128):
    q, k, v = (torch.randn(2, 2, seq_len, 32) for _ in range(3))
    return Model(), (q, k, v)


# The header lists every site; the annotation sits right above the site's node.
# FX-BEFORE: # spa_compile.inspect: stage=before graph 1 of 1: 1 attention site(s), 1 SPA, 0 dense
# FX-BEFORE-NEXT: #   model: spa pattern=sdpa mask=none k=1/2 ({{.*}})
# FX-BEFORE-LABEL: def forward(
# FX-BEFORE: # spa site model: spa pattern=sdpa mask=none k=1/2 ({{.*}})
# FX-BEFORE-NEXT: scaled_dot_product_attention: "f32[2, 2, 128, 32]" = torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_);
# FX-BEFORE: return (scaled_dot_product_attention,)

# No mask, not causal; the scale is SDPA's default 1/sqrt(32).
# FX-AFTER-LABEL: def forward(
# FX-AFTER-NOT: scaled_dot_product_attention
# FX-AFTER: # spa site model: spa pattern=sdpa mask=none k=1/2 ({{.*}})
# FX-AFTER-NEXT: {{^ *}}[[OP:[a-z_0-9]+]] = torch.ops.spa.attention.default(l_q_, l_k_, l_v_, None, None, None, None, 0.17677669529663687, False, 0, -1, '{{.*}}')
# FX-AFTER-NEXT: {{^ *}}[[OUT:[a-z_0-9]+]]: "f32[2, 2, 128, 32]" = [[OP]][0]
# FX-AFTER: return ([[OUT]],)

# mode=auto: 128 keys are below min_seq_len, so the site stays dense and says why.
# FX-AUTO: 1 attention site(s), 0 SPA, 1 dense
# FX-AUTO-LABEL: def forward(
# FX-AUTO-NOT: spa.attention
# FX-AUTO: # spa site model: dense pattern=sdpa mask=none k=all ({{.*}})
# FX-AUTO-NEXT: torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_)
# FX-AUTO-NOT: spa.attention

# MLIR-BEFORE-LABEL: func.func @main(%arg0: !torch.vtensor<[2,2,128,32],f32>, %arg1: !torch.vtensor<[2,2,128,32],f32>, %arg2: !torch.vtensor<[2,2,128,32],f32>) -> !torch.vtensor<[2,2,128,32],f32>
# MLIR-BEFORE: %[[OUT:[0-9]+]] = torch.aten.scaled_dot_product_attention %arg0, %arg1, %arg2, %none{{.*}} -> !torch.vtensor<[2,2,128,32],f32>
# MLIR-BEFORE-NOT: torch.operator
# MLIR-BEFORE: return %[[OUT]]

# MLIR-AFTER-LABEL: func.func @main(
# MLIR-AFTER-NOT: torch.aten.scaled_dot_product_attention
# MLIR-AFTER-DAG: [[NOTCAUSAL:%false[_0-9]*]] = torch.constant.bool false
# MLIR-AFTER-DAG: [[SCALE:%float[0-9.e+-]+]] = torch.constant.float 0.17677669529663687
# MLIR-AFTER: %[[SPA:[0-9]+]]:4 = torch.operator "torch.spa.attention"(%arg0, %arg1, %arg2, %none{{[_0-9]*}}, %none{{[_0-9]*}}, %none{{[_0-9]*}}, %none{{[_0-9]*}}, [[SCALE]], [[NOTCAUSAL]], %int0{{[_0-9]*}}, %int-1{{[_0-9]*}}, %str{{[_0-9]*}})
# MLIR-AFTER-SAME: -> (!torch.vtensor<[2,2,128,32],f32>, !torch.vtensor<[2,2,128],f32>, !torch.vtensor<[2,2,2,2],si32>, !torch.vtensor<[2,2,2],si32>)
# MLIR-AFTER-NOT: torch.aten.scaled_dot_product_attention
# MLIR-AFTER: return %[[SPA]]#0

# mode=dense: the graph after the passes still has the aten op, and no SPA op.
# MLIR-DENSE: //   model: dense pattern=sdpa mask=none k=all ({{.*}})
# MLIR-DENSE-NOT: torch.operator
# MLIR-DENSE: torch.aten.scaled_dot_product_attention %arg0, %arg1, %arg2
# MLIR-DENSE-NOT: torch.operator
