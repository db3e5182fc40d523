# An SDPA site with is_causal=True inside a submodule: the site is named after the module path,
# and the causal flag travels into the SPA op (its 9th operand).
#
# RUN: spa inspect %s --stage before --set mode=spa | filecheck %s --check-prefix=FX-BEFORE
# RUN: spa inspect %s --stage after --set mode=spa | filecheck %s --check-prefix=FX-AFTER
# RUN: spa inspect %s --format mlir --stage before --set mode=spa | filecheck %s --check-prefix=MLIR-BEFORE
# RUN: spa inspect %s --format mlir --stage after --set mode=spa | filecheck %s --check-prefix=MLIR-AFTER
import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, q, k, v):
        return self.attn(q, k, v) * 2


def make_model(seq_len=128):
    q, k, v = (torch.randn(1, 2, seq_len, 16) for _ in range(3))
    return Model(), (q, k, v)


# FX-BEFORE: # spa_compile.inspect: stage=before graph 1 of 1: 1 attention site(s), 1 SPA, 0 dense
# FX-BEFORE-LABEL: def forward(self, L_q_: "f32[1, 2, 128, 16]"
# FX-BEFORE: # spa site model.attn: spa pattern=sdpa mask=causal k=1/2 ({{.*}})
# FX-BEFORE-NEXT: scaled_dot_product_attention: "f32[1, 2, 128, 16]" = torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_, is_causal = True)
# FX-BEFORE-NOT: spa.attention
# FX-BEFORE: return

# FX-AFTER: # spa_compile.inspect: stage=after graph 1 of 1: 1 attention site(s), 1 SPA, 0 dense
# FX-AFTER-LABEL: def forward(
# FX-AFTER-NOT: scaled_dot_product_attention
# FX-AFTER: # spa site model.attn: spa pattern=sdpa mask=causal k=1/2 ({{.*}})
# FX-AFTER-NEXT: {{^ *}}[[OP:[a-z_0-9]+]] = torch.ops.spa.attention.default(l_q_, l_k_, l_v_, None, None, None, None, 0.25, True, 0, -1, '{"block_score":"projector","block_size":64,"density":0.2,{{.*}}}')
# FX-AFTER-NEXT: {{^ *}}[[OUT:[a-z_0-9]+]]: "f32[1, 2, 128, 16]" = [[OP]][0]
# FX-AFTER-NOT: scaled_dot_product_attention
# FX-AFTER: mul: "f32[1, 2, 128, 16]" = [[OUT]] * 2

# MLIR-BEFORE: //   model.attn: spa pattern=sdpa mask=causal k=1/2 ({{.*}})
# MLIR-BEFORE-LABEL: func.func @main(%arg0: !torch.vtensor<[1,2,128,16],f32>, %arg1: !torch.vtensor<[1,2,128,16],f32>, %arg2: !torch.vtensor<[1,2,128,16],f32>)
# MLIR-BEFORE-DAG: [[CAUSAL:%true[_0-9]*]] = torch.constant.bool true
# MLIR-BEFORE: torch.aten.scaled_dot_product_attention %arg0, %arg1, %arg2, %none{{[_0-9]*}}, %float0.000000e00, [[CAUSAL]], %none{{[_0-9]*}}, %false{{.*}} -> !torch.vtensor<[1,2,128,16],f32>
# MLIR-BEFORE-NOT: torch.operator

# MLIR-AFTER-LABEL: func.func @main(
# MLIR-AFTER-NOT: torch.aten.scaled_dot_product_attention
# MLIR-AFTER-DAG: [[CAUSAL:%true[_0-9]*]] = torch.constant.bool true
# MLIR-AFTER-DAG: [[CFG:%str[_0-9]*]] = torch.constant.str "{\22block_score\22:\22projector\22,\22block_size\22:64,\22density\22:0.2,{{.*}}}"
# MLIR-AFTER: [[SPA:%[0-9]+]]:4 = torch.operator "torch.spa.attention"(%arg0, %arg1, %arg2, %none{{[_0-9]*}}, %none{{[_0-9]*}}, %none{{[_0-9]*}}, %none{{[_0-9]*}}, %float2.500000e-01, [[CAUSAL]], %int0{{[_0-9]*}}, %int-1, [[CFG]])
# MLIR-AFTER-SAME: -> (!torch.vtensor<[1,2,128,16],f32>, !torch.vtensor<[1,2,128],f32>, !torch.vtensor<[1,2,2,2],si32>, !torch.vtensor<[1,2,2],si32>)
# MLIR-AFTER: torch.aten.mul.Scalar [[SPA]]#0
# MLIR-AFTER-NOT: torch.aten.scaled_dot_product_attention
