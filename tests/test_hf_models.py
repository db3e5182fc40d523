"""Hugging Face models, built from tiny random configs (no hub access): every attention is found,
rewritten exactly, and no N x N mask is left in the rewritten graph.

LLaMA (GQA, RoPE, causal), GPT-2 (causal) and BERT (bidirectional), each with
attn_implementation "eager" (hand-written matmul/softmax/matmul) and "sdpa", with and
without a padding mask. SPA is forced exact (mode="spa", density=1.0) so outputs must equal
the uncompiled model's.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from spa_compile import SPAConfig  # noqa: E402
from spa_compile.backend import apply_spa_passes  # noqa: E402

EXACT = {"mode": "spa", "density": 1.0, "block_size": 16}
N = 48


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(name: str, impl: str, layers: int = 2):
    torch.manual_seed(0)
    if name == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256,
        )
        cls = transformers.LlamaForCausalLM
    elif name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=layers, n_head=4, n_positions=256)
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.BertConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=256,
        )
        cls = transformers.BertModel
    cfg._attn_implementation = impl
    return cls(cfg).eval(), layers


class Capture:
    """A backend that runs the SPA passes, keeps the rewritten graph and runs it as is."""

    def __init__(self, **options):
        self.cfg = SPAConfig.from_options({**EXACT, **options})
        self.graphs, self.records = [], []

    def __call__(self, gm, example_inputs):
        self.records += apply_spa_passes(gm, self.cfg)
        self.graphs.append(gm)
        return gm.forward

    def square_tensors(self, n: int, nk: int | None = None) -> list[str]:
        """Nodes of the rewritten graphs whose value is [*, *, n, nk]."""
        nk = n if nk is None else nk
        out = []
        for gm in self.graphs:
            for node in gm.graph.nodes:
                val = node.meta.get("example_value")
                if isinstance(val, torch.Tensor) and val.dim() >= 2 and tuple(val.shape[-2:]) == (n, nk):
                    out.append(node.format_node())
        return out

    def spa_ops(self) -> int:
        return sum(1 for gm in self.graphs for n in gm.graph.nodes if "spa" in str(n.target) and "attention" in str(n.target))


def _inputs(pad: bool, b: int = 2, n: int = N):
    ids = torch.randint(0, 97, (b, n), generator=torch.Generator().manual_seed(1))
    if not pad:
        return ids, {}
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, n - 9:] = 0  # right padding: every query row still sees a key
    return ids, {"attention_mask": mask}


def _main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_every_attention_found_rewritten_exact_and_no_square_mask(name, impl, pad):
    model, layers = _model(name, impl)
    ids, kw = _inputs(pad)
    with torch.no_grad():
        ref = _main_output(model(ids, **kw))
        cap = Capture()
        out = _main_output(torch.compile(model, backend=cap)(ids, **kw))
    sites = [s for s, _ in cap.records]
    assert len(sites) == layers, [s.name for s in sites]
    assert all(d.decision == "spa" for _, d in cap.records), [(s.name, d.reason) for s, d in cap.records]
    assert all(s.pattern == ("sdpa" if impl == "sdpa" else "matmul/softmax/matmul") for s in sites)
    assert cap.spa_ops() == layers
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # names come from nn_module_stack, one per layer
    assert len({s.name for s in sites}) == layers and all(".0." in s.name or ".1." in s.name for s in sites)
    kinds = {s.mask_kind for s in sites}
    if name == "bert":
        assert kinds == ({"key_padding"} if pad else {"none"})
    else:
        assert kinds == ({"causal+key_padding"} if pad else {"causal"})
        # the structure went to the op: no [*, *, N, N] tensor is left in the rewritten graph
        assert cap.square_tensors(N) == []
    if name == "llama" and impl == "eager":  # repeat_kv folded: K/V reach the op with 2 heads
        assert all(s.enable_gqa and s.k_shape[1] == 2 and s.kv_groups == 2 for s in sites)
    if pad:
        assert all(s.structure is not None and s.structure.key_valid is not None for s in sites)


def test_llama_left_padding_matches_on_real_tokens():
    model, _ = _model("llama", "eager")
    ids, _ = _inputs(False)
    mask = torch.ones(2, N, dtype=torch.long)
    mask[0, :5] = 0  # left padding: padded query rows see no key (SPA gives 0 there, by the spec)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        cap = Capture()
        out = torch.compile(model, backend=cap)(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0, 5:], ref[0, 5:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-4, atol=1e-4)
    assert cap.square_tensors(N) == []


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_kv_cache_causal_offset(impl):
    """Attention over a KV cache: 16 cached keys, 8 new queries: causal with offset 16."""
    model, layers = _model("llama", impl)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 24, dtype=torch.long)
    with torch.no_grad():
        past = model(ids[:, :16], attention_mask=mask[:, :16], use_cache=True).past_key_values
        import copy

        past2 = copy.deepcopy(past)
        ref = model(ids[:, 16:], attention_mask=mask, past_key_values=past).logits
        cap = Capture()
        out = torch.compile(model, backend=cap)(ids[:, 16:], attention_mask=mask, past_key_values=past2).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    sites = [s for s, _ in cap.records]
    assert len(sites) == layers
    for s in sites:
        assert s.q_shape[-2] == 8 and s.k_shape[-2] == 24
        assert s.structure is not None and s.structure.causal and int(s.structure.offset) == 16
        assert s.mask_kind == "causal(offset=16)+key_padding"
    assert cap.square_tensors(8, 24) == []


def test_backend_spa_aot_eager_end_to_end_and_explain():
    """The registered backend with aot_eager (traces through the op) and explain on fake tensors."""
    import spa_compile

    model, layers = _model("gpt2", "eager")
    ids, kw = _inputs(True)
    with torch.no_grad():
        ref = model(ids, **kw).logits
        out = torch.compile(model, backend="spa", options={**EXACT, "inner_backend": "aot_eager"})(ids, **kw).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    report = spa_compile.explain(model, ids, config={"mode": "spa"}, **kw)
    assert [s.name for s in report.sites] == [f"model.transformer.h.{i}.attn" for i in range(layers)]
    assert all(s.mask == "causal+key_padding" and s.decision == "spa" for s in report.sites)
    assert all(s.pattern == "matmul/softmax/matmul" for s in report.sites)


def test_output_attentions_keeps_sites_dense_with_reason():
    """A model asked to return its attention weights: the weights escape, the sites stay dense."""
    model, layers = _model("bert", "eager")
    ids, kw = _inputs(True)
    with torch.no_grad():
        ref = model(ids, output_attentions=True, **kw)
        cap = Capture()
        out = torch.compile(model, backend=cap)(ids, output_attentions=True, **kw)
    assert len(cap.records) == layers
    for site, decision in cap.records:
        assert decision.decision == "dense" and "returned" in decision.reason
    assert cap.spa_ops() == 0
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_mistral_sliding_window_recovered(impl):
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=16,
    )
    cfg._attn_implementation = impl
    model = transformers.MistralForCausalLM(cfg).eval()
    ids, kw = _inputs(True)
    with torch.no_grad():
        ref = model(ids, **kw).logits
        cap = Capture()
        out = torch.compile(model, backend=cap)(ids, **kw).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    ((site, decision),) = cap.records
    assert decision.decision == "spa" and site.mask_kind == "causal+window(16)+key_padding"
    assert cap.square_tensors(N) == []


def test_dynamic_shapes_one_graph_two_lengths_and_symbolic_cache_offset():
    """dynamic=True: the mask is recovered with symbolic sizes; a cache length is a symbolic offset."""
    import copy

    model, _ = _model("llama", "eager", layers=1)
    cap = Capture()
    compiled = torch.compile(model, backend=cap, dynamic=True)
    for n in (40, 56):
        ids, kw = _inputs(True, n=n)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, **kw).logits, model(ids, **kw).logits, rtol=1e-4, atol=1e-4)
    assert len(cap.graphs) == 1 and [s.mask_kind for s, _ in cap.records] == ["causal+key_padding"]
    torch._dynamo.reset()
    cap = Capture()
    compiled = torch.compile(model, backend=cap, dynamic=True)
    for past in (16, 21):
        ids = torch.randint(0, 97, (2, past + 4), generator=torch.Generator().manual_seed(past))
        mask = torch.ones(2, past + 4, dtype=torch.long)
        with torch.no_grad():
            cache = model(ids[:, :past], attention_mask=mask[:, :past]).past_key_values
            ref = model(ids[:, past:], attention_mask=mask, past_key_values=copy.deepcopy(cache)).logits
            out = compiled(ids[:, past:], attention_mask=mask, past_key_values=cache).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    (site, _), = cap.records[-1:]
    assert site.structure.causal and not site.structure.offset.is_number  # the cache length, a symbol
