"""Repeated blocks traced once (capture.blocks): the copied graph is the one a full trace gives.

Each test captures a model twice, with every block traced (`repeated_blocks=False`) and with each
distinct block traced once and copied, and compares what the report says: every total formula,
per-module and per-op roll-ups, the graph's size, and peak memory with its breakdown at several
points. Models cover identical stacks and the cases that must not be merged: attention that
alternates between sliding and global per layer, MoE layers among dense ones, behaviour keyed on the
layer index, a last layer that differs, a block that writes its own attributes, encoder-decoder
cross attention whose gradients sum over the blocks, activation checkpointing.
"""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn as nn

import costmodel
from costmodel.symbols import symbols_for
from costmodel.capture.zoo import hf_factory as _hf

TEXT = ["input_ids:int64[batch,seq]"]
POINTS = [{"batch": 2, "seq": 16}, {"batch": 1, "seq": 40}]

llama4 = _hf("LlamaForCausalLM", "LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
gemma2 = _hf("Gemma2ForCausalLM", "Gemma2Config", attention="eager", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, sliding_window=8,
             max_position_embeddings=512)
# decoder_sparse_step=2: layers 1 and 3 are mixture-of-experts, 0 and 2 dense
qwen2_moe_interleaved = _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", attention="eager", hidden_size=64,
                            intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                            max_position_embeddings=512)
# each layer divides its attention scores by layer_idx + 1: no two layers alike
gpt2_by_layer = _hf("GPT2LMHeadModel", "GPT2Config", attention="eager", n_embd=64, n_layer=3, n_head=4,
                    vocab_size=256, n_positions=512, scale_attn_by_inverse_layer_idx=True)
t5_3 = _hf("T5ForConditionalGeneration", "T5Config", d_model=64, d_ff=128, num_layers=3, num_heads=4, d_kv=16,
           vocab_size=256)


def llama4_checkpointed():
    model = llama4()
    model.gradient_checkpointing_enable()
    return model


class Block(nn.Module):
    def __init__(self, d: int, final: bool):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.final = final

    def forward(self, x):
        h = self.down(torch.relu(self.up(self.norm(x))))
        if self.final:                    # the last block runs its MLP twice
            h = self.down(torch.relu(self.up(h)))
        return x + h


class LastDiffers(nn.Module):
    def __init__(self, n: int = 4, d: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, i == n - 1) for i in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class Counting(nn.Module):
    """A block that writes an attribute every call: copying it would lose the writes."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.lin(x)


class InPlace(nn.Module):
    """A block that adds into its argument: a copy would not."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        x.add_(1.0)
        return self.lin(x)


class Log:
    """An object handed to every block beside its tensors, as transformers hands each layer the KV
    cache: the blocks append to it (the cache's update) or read a tensor it holds (the cached keys)."""

    def __init__(self, scale=None):
        self.outputs, self.scale = [], scale


class Appending(nn.Module):
    def __init__(self, d: int, read: bool):
        super().__init__()
        self.lin, self.read = nn.Linear(d, d), read

    def forward(self, x, log: Log):
        h = self.lin(x)
        if self.read:
            return x + h * log.scale
        log.outputs.append(h)
        return x + h


class WithLog(nn.Module):
    def __init__(self, read: bool, n: int = 3, d: int = 16):
        super().__init__()
        self.blocks, self.read = nn.ModuleList(Appending(d, read) for _ in range(n)), read

    def forward(self, x):
        log = Log(x.new_full((), 0.5) if self.read else None)
        for b in self.blocks:
            x = b(x, log)
        return x + sum(log.outputs)


def stack_of(block, n: int = 3, d: int = 16):
    def build():
        return nn.Sequential(*[block(d) for _ in range(n)])
    return build


def reports(model, inputs, mode, **kw):
    full = costmodel.analyze(model, inputs=inputs, mode=mode, repeated_blocks=False, attention="math", **kw)
    once = costmodel.analyze(model, inputs=inputs, mode=mode, attention="math", **kw)
    return full, once


def assert_same(full, once, points):
    for m, f in full.primary.totals.items():
        assert sympy.expand(f - once.primary.totals[m]) == 0, m
    rows = lambda r, key: {row[key]: {m: sympy.expand(row[m]) for m in ("flops", "bytes")}  # noqa: E731
                           for row in (r.by_module() if key == "module" else r.by_op())}
    assert rows(full, "module") == rows(once, "module")
    assert {r["target"]: r["count"] for r in full.by_op()} == {r["target"]: r["count"] for r in once.by_op()}
    g, h = full.graph, once.graph
    assert (g.number_of_nodes(), g.number_of_edges()) == (h.number_of_nodes(), h.number_of_edges())
    # what eager's time depends on beyond the work: module calls, and each op's kernel class and
    # features (which ops pay the Python binding or the autograd engine's node)
    assert full.primary.captured.module_calls == once.primary.captured.module_calls
    for point in points:
        a, b = full.evaluate(**point), once.evaluate(**point)
        assert a.totals["peak_memory_bytes"] == b.totals["peak_memory_bytes"], point
        assert a.totals["memory"] == b.totals["memory"], point
        assert _classes(a) == _classes(b), point


def _classes(pt) -> list:
    return sorted((op["target"], pt.kernel_class(i), sorted((k, int(v)) for k, v in pt.features[i].items()))
                  for i, op in enumerate(pt.ops))


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_identical_layers_are_traced_once(mode):
    full, once = reports(llama4, TEXT, mode)
    assert_same(full, once, POINTS)
    copied = once.primary.captured.copied
    assert set(copied) == {f"model.layers.{i}" for i in range(4)}
    assert set(copied.values()) == {"model.layers.0"}
    assert not full.primary.captured.copied
    modules = {r["module"] for r in once.by_module(depth=3)}
    assert {f"model.layers.{i}" for i in range(4)} <= modules


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_sliding_and_global_layers_are_not_merged(mode):
    full, once = reports(gemma2, TEXT, mode)
    assert_same(full, once, POINTS)
    copied = once.primary.captured.copied
    # Gemma 2 alternates sliding-window and global attention: two traces, each copied to its kind
    assert copied == {"model.layers.0": "model.layers.0", "model.layers.1": "model.layers.1",
                      "model.layers.2": "model.layers.0", "model.layers.3": "model.layers.1"}


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_moe_layers_among_dense_ones(mode):
    full, once = reports(qwen2_moe_interleaved, TEXT, mode)
    assert_same(full, once, POINTS)
    copied = once.primary.captured.copied
    assert copied.get("model.layers.2") == "model.layers.0" and copied.get("model.layers.3") == "model.layers.1"


def test_layer_index_read_in_forward_keeps_each_layer_its_own():
    full, once = reports(gpt2_by_layer, TEXT, "train")
    assert_same(full, once, POINTS)
    assert all(path == rep for path, rep in once.primary.captured.copied.items())


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_a_last_block_that_differs(mode):
    full, once = reports(LastDiffers, ["x:float32[batch,seq,16]"], mode)
    assert_same(full, once, POINTS)
    # in train the first block's input needs no gradient (the model's input), the others' do: two calls
    first = "blocks.0" if mode == "inference" else "blocks.1"
    assert once.primary.captured.inline_blocks == {}
    assert once.primary.captured.copied == {"blocks.0": "blocks.0", "blocks.1": first, "blocks.2": first,
                                            "blocks.3": "blocks.3"}


@pytest.mark.parametrize("block", [Counting, InPlace])
def test_blocks_that_write_are_traced_inline(block):
    mode = "inference" if block is InPlace else "train"
    full, once = reports(stack_of(block), ["x:float32[batch,seq,16]"], mode)
    assert_same(full, once, POINTS)
    assert not once.primary.captured.copied


@pytest.mark.parametrize("read", [False, True])
def test_blocks_given_an_object_they_change_or_read_are_traced_inline(read):
    """A block that appends to an object it is given would not append as a copy (which runs no
    Python), and one reading a tensor the object holds would read it from the caller's trace: both are
    traced inline, the object as it was before the block's own trace."""
    full, once = reports(lambda: WithLog(read), ["x:float32[batch,seq,16]"], "inference")
    assert_same(full, once, POINTS)
    assert not once.primary.captured.copied
    # 3 blocks x 2 * 16 * 16 FLOPs per token in the linears (+ the sum of 3 outputs unless read)
    assert sympy.expand(full.primary.totals["matmul_flops"]) == 1536 * symbols_for("batch", "seq")[0] \
        * symbols_for("batch", "seq")[1]


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_encoder_decoder_cross_attention(mode):
    inputs = ["input_ids:int64[batch,src]", "decoder_input_ids:int64[batch,tgt]"]
    full, once = reports(t5_3, inputs, mode)
    assert_same(full, once, [{"batch": 2, "src": 16, "tgt": 8}, {"batch": 1, "src": 24, "tgt": 40}])
    copied = once.primary.captured.copied
    if mode == "inference":
        assert copied.get("encoder.block.2") == "encoder.block.1"
        assert copied.get("decoder.block.2") == "decoder.block.1"
    else:
        # every decoder block reads the encoder's output, every block after the first the position
        # bias: a full trace sums their gradients in one chain, a copy sums its own first; the totals
        # agree, the module of each addition would not, so these blocks are traced each
        assert copied == {}


def test_activation_checkpointing():
    full, once = reports(llama4_checkpointed, TEXT, "train")
    assert_same(full, once, POINTS)


def test_a_failed_backward_before_leaves_no_stale_stack_trace():
    """A backward that raised (a capture that failed earlier in the process) leaves the stack-trace
    hooks' "callback queued" flag set; without the reset in `_torch.backward_meta_fields`, nodes
    traced after a backward carry the gradient-accumulation marker (here: every block is then
    traced inline, as if its gradients were summed inside and out)."""
    from torch._functorch._aot_autograd import logging_utils
    logging_utils.callback_set = True              # as a backward that raised leaves it
    once = costmodel.analyze(LastDiffers, inputs=["x:float32[batch,seq,16]"], mode="train", attention="math")
    assert once.primary.captured.inline_blocks == {}
    assert once.primary.captured.copied == {"blocks.0": "blocks.0", "blocks.1": "blocks.1", "blocks.2": "blocks.1",
                                            "blocks.3": "blocks.3"}


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_outputs_the_callers_frame_holds(mode):
    """BLOOM's layers return their attention probabilities; the model's loop variable holds the last
    layer's outputs until the next layer returns, so one [batch, heads, seq, seq] tensor of layer i
    is live through layer i + 1: the copies' outputs keep the caller's hold."""
    from . import models as M
    full, once = reports(M.bloom, TEXT, mode, device="cpu")
    assert_same(full, once, POINTS)
    if mode == "inference":
        assert once.primary.captured.copied == {"transformer.h.0": "transformer.h.0",
                                                "transformer.h.1": "transformer.h.0"}
    else:
        # nothing reads the attention probabilities the layers return, so they get no gradient; a
        # block's own backward is traced for gradients of all its outputs, so these blocks are
        # traced each time, and the capture says why
        assert once.primary.captured.copied == {}
        assert "gets no gradient" in once.primary.captured.inline_blocks["(every block)"]
