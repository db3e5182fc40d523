# Two layers with a causal SDPA site each; the sites option keeps layer 0 dense, layer 1 takes SPA.
# The drawing (dot) puts each site in its own cluster, SPA green, dense yellow, the rewritten op bold.
#
# RUN: spa inspect %s --stage after --set mode=spa --set sites=model.layers.0.*=dense | filecheck %s --check-prefix=FX
# RUN: spa inspect %s --format dot --stage after --set mode=spa --set sites=model.layers.0.*=dense | filecheck %s --check-prefix=DOT
# RUN: spa inspect %s --format dot --stage before --set mode=spa --set sites=model.layers.0.*=dense | filecheck %s --check-prefix=DOT-BEFORE
# RUN: spa inspect %s --format mlir --stage after --set mode=spa --set sites=model.layers.0.*=dense | filecheck %s --check-prefix=MLIR
import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        return x + self.attn(x)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def make_model(seq_len=192):
    return Model(), (torch.randn(1, seq_len, 32),)


# FX: # spa_compile.inspect: stage=after graph 1 of 1: 2 attention site(s), 1 SPA, 1 dense
# FX-NEXT: #   model.layers.0.attn: dense pattern=sdpa mask=causal k=all ({{.*}})
# FX-NEXT: #   model.layers.1.attn: spa pattern=sdpa mask=causal k=1/3 ({{.*}})
# FX-LABEL: def forward(
# FX-NOT: spa.attention
# FX: # spa site model.layers.0.attn: dense pattern=sdpa mask=causal k=all ({{.*}})
# FX-NEXT: torch._C._nn.scaled_dot_product_attention(q, k, v, is_causal = True)
# FX-NOT: scaled_dot_product_attention
# FX: # spa site model.layers.1.attn: spa pattern=sdpa mask=causal k=1/3 ({{.*}})
# FX-NEXT: torch.ops.spa.attention.default(q_1, k_1, v_1, None, None, None, None, 0.25, True, 0, -1,
# FX-NOT: scaled_dot_product_attention

# DOT: digraph spa_inspect {
# DOT: label="spa_compile.inspect stage=after";
# DOT: subgraph cluster_g0_s0 {
# DOT-NEXT: label="model.layers.0.attn: dense (mask=causal, k=all)";
# DOT-NEXT: "g0.y" [label="y\nscaled_dot_product_attention\nfloat32[1, 2, 192, 16]", fillcolor="lightgoldenrod1"];
# DOT-NEXT: }
# DOT-NEXT: subgraph cluster_g0_s1 {
# DOT-NEXT: label="model.layers.1.attn: spa (mask=causal, k=1/3)";
# DOT-NEXT: "g0.[[OP:[a-z_0-9]+]]" [label="{{.*}}\nspa.attention\n(rewritten)", fillcolor="palegreen", penwidth="3"];
# DOT-NEXT: "g0.[[OUT:[a-z_0-9]+]]" [label="{{.*}}getitem{{.*}}", fillcolor="palegreen"];
# DOT-NEXT: }
# DOT-DAG: "g0.q_1" -> "g0.[[OP]]";
# DOT-DAG: "g0.k_1" -> "g0.[[OP]]";
# DOT-DAG: "g0.v_1" -> "g0.[[OP]]";
# DOT-DAG: "g0.[[OP]]" -> "g0.[[OUT]]";
# DOT-DAG: "g0.q" -> "g0.y";
# DOT: }

# Before the passes both sites are SDPA; the colours say what the passes will do.
# DOT-BEFORE: label="spa_compile.inspect stage=before";
# DOT-BEFORE-NOT: spa.attention
# DOT-BEFORE: label="model.layers.0.attn: dense (mask=causal, k=all)";
# DOT-BEFORE-NEXT: "g0.y" [label="y\nscaled_dot_product_attention{{.*}}fillcolor="lightgoldenrod1"];
# DOT-BEFORE: label="model.layers.1.attn: spa (mask=causal, k=1/3)";
# DOT-BEFORE-NEXT: "g0.y_1" [label="y_1\nscaled_dot_product_attention{{.*}}fillcolor="palegreen"];
# DOT-BEFORE-NOT: spa.attention

# MLIR: //   model.layers.0.attn: dense
# MLIR: //   model.layers.1.attn: spa
# MLIR-LABEL: func.func @main(
# MLIR-NOT: torch.operator
# MLIR: torch.aten.scaled_dot_product_attention
# MLIR-NOT: torch.aten.scaled_dot_product_attention
# MLIR: torch.operator "torch.spa.attention"
# MLIR-NOT: torch.aten.scaled_dot_product_attention
