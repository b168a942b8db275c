"""Recurrent nets as PyTorch's CPU kernels run them, for captures whose memory model is the CPU's.

PyTorch's Python decompositions of torch._VF.lstm/gru/rnn_* (what the meta device runs, and
FlopCounterMode counts) unroll every layer alike; the CPU's C++ (aten/src/ATen/native/RNN.cpp)
keeps other tensors alive, and runs a float32 LSTM as one oneDNN call per layer and direction:

  LSTM (float32, no projections, mkldnn on): mkldnn_rnn (native/mkldnn/RNN.cpp): the input made
      contiguous, `mkldnn_rnn_layer` per layer and direction over the whole sequence, which in grad
      mode also returns a workspace the backward reads (`costmodel::onednn_lstm_layer` here, whose
      workspace has oneDNN's size); layer outputs concatenated, final states stacked.
  GRU, RNN_TANH/RELU: FullLayer / FullBidirectionalLayer: the input projection of every step made
      at once (linear_ih), one cell per step with the cell's in-place ops, the step outputs stacked;
      a bidirectional layer holds the forward direction's step outputs until it returns, and its
      input projection until the backward direction's is made.

The matmuls are the decompositions' (same FLOPs). Other cases (packed sequences, an LSTM oneDNN
does not take) keep the Python decomposition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from costmodel import _torch
from costmodel.rules.cost import MATMUL, OpCost
from costmodel.rules.pointwise import FLOPS_PER_ELEMENT
from costmodel.rules.registry import TensorSpec, nbytes_of, register

aten = torch.ops.aten
_PAGE = 4096
_LSTM_GATES = 4
# The oneDNN layer's kernel class: its GEMMs run in oneDNN's own kernels, not the BLAS that prices
# "matmul" (on this project's AMD CPU, which has AVX-512, at one thread ~190 GF/s against addmm's
# ~100, as if the BLAS took its AVX2 path there); a calibration measures it (Prober.lstm), and a
# device without its table prices it as a product (hardware.kernels.chain)
LSTM_KERNEL = "matmul.lstm"


def _good_ld(n: int) -> int:
    """oneDNN's leading dimension for float32 (cpu/rnn/rnn_utils.cpp get_good_ld): a multiple of 16
    elements (64 bytes), and not of 256 (4K aliasing)."""
    ld = -(-n // 16) * 16
    return ld + 16 if ld % 256 == 0 else ld


def _pages(nbytes):
    return (nbytes + _PAGE - 1) // _PAGE * _PAGE


def onednn_lstm_workspace_bytes(S, B, I: int, H: int):
    """Bytes of the workspace oneDNN (v3, cpu/rnn/rnn_utils) returns for one float32 LSTM layer and
    direction of S steps, batch B: its parts, each starting on a 4096-byte page (set_offsets), are
    the gates [S, B, ld(4H)], the hidden states [S, B, ld(H)], three [S + 1, 2, B, ld(max(I, H))]
    state arrays (ws_states_layer, and ws_states_iter registered twice), the cell states and their
    gradients [S + 1, 2, B, H]. Checked against torch.ops.aten.mkldnn_rnn_layer's workspace at
    sizes around tests' (tests/test_memory_rnn.py)."""
    states = _pages((S + 1) * 2 * B * _good_ld(max(I, H)) * 4)
    cells = _pages((S + 1) * 2 * B * H * 4)
    return (_pages(S * B * _good_ld(_LSTM_GATES * H) * 4) + _pages(S * B * _good_ld(H) * 4)
            + 3 * states + 2 * cells)


# --- the oneDNN LSTM layer as one op ----------------------------------------------------------

@torch.library.custom_op("costmodel::onednn_lstm_layer", mutates_args=())
def onednn_lstm_layer(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                      b_hh: torch.Tensor, hx: torch.Tensor, cx: torch.Tensor, reverse: bool,
                      workspace: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    H = hx.shape[-1]
    with torch.set_grad_enabled(workspace):
        y, hy, cy, ws = aten.mkldnn_rnn_layer(x, w_ih, w_hh, b_ih, b_hh, hx, cx, reverse, [], 2, H, 1, True,
                                              False, False, workspace)
    return y, hy, cy, ws if ws is not None else x.new_empty(0, dtype=torch.uint8)


@onednn_lstm_layer.register_fake
def _(x, w_ih, w_hh, b_ih, b_hh, hx, cx, reverse, workspace):
    S, B, I = x.shape
    H = hx.shape[-1]
    ws = onednn_lstm_workspace_bytes(S, B, I, H) if workspace else 0
    return x.new_empty(S, B, H), hx.new_empty(hx.shape), cx.new_empty(cx.shape), x.new_empty(ws, dtype=torch.uint8)


@torch.library.custom_op("costmodel::onednn_lstm_layer_backward", mutates_args=())
def onednn_lstm_layer_backward(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                               b_hh: torch.Tensor, hx: torch.Tensor, cx: torch.Tensor, y: torch.Tensor,
                               hy: torch.Tensor, cy: torch.Tensor, gy: torch.Tensor | None, ghy: torch.Tensor | None,
                               gcy: torch.Tensor | None, ws: torch.Tensor, reverse: bool, x_grad: bool,
                               hx_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor, torch.Tensor]:
    H = hx.shape[-1]
    gx, gw_ih, gw_hh, gb, _, ghx, gcx = aten.mkldnn_rnn_layer_backward(
        x, w_ih, w_hh, b_ih, b_hh, hx, cx, y, hy, cy, gy, ghy, gcy, reverse, 2, H, 1, True, True, False, [],
        False, ws)
    return gx, ghx, gcx, gw_ih, gw_hh, gb


@onednn_lstm_layer_backward.register_fake
def _(x, w_ih, w_hh, b_ih, b_hh, hx, cx, y, hy, cy, gy, ghy, gcy, ws, reverse, x_grad, hx_grad):
    return (torch.empty_like(x), torch.empty_like(hx), torch.empty_like(cx), torch.empty_like(w_ih),
            torch.empty_like(w_hh), b_ih.new_empty(w_hh.shape[0]))


def _setup_context(ctx, inputs, output):
    x, w_ih, w_hh, b_ih, b_hh, hx, cx, reverse, _ = inputs
    y, hy, cy, ws = output
    ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, hx, cx, y, hy, cy, ws)
    ctx.mark_non_differentiable(ws)
    ctx.set_materialize_grads(False)      # the kernel takes missing gradients as they are, making no zeros
    ctx.reverse = reverse


def _backward(ctx, gy, ghy, gcy, _):
    x, w_ih, w_hh, b_ih, b_hh, hx, cx, y, hy, cy, ws = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, ghx, gcx, gw_ih, gw_hh, gb = onednn_lstm_layer_backward(
        x, w_ih, w_hh, b_ih, b_hh, hx, cx, y, hy, cy, gy, ghy, gcy, ws, ctx.reverse, need[0], need[5])
    grads = (gx, gw_ih, gw_hh, gb, gb, ghx, gcx)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None, None)


onednn_lstm_layer.register_autograd(_backward, setup_context=_setup_context)


def _lstm_pointwise_flops(S, B, H):
    """The cell's pointwise work per step as the decomposition's ops count it (rules.pointwise): the
    bias added to the input projection and the gates' sum [B, 4H]; three sigmoids, two tanh, three
    products and a sum on [B, H]."""
    per_h = 2 * _LSTM_GATES + 3 * FLOPS_PER_ELEMENT.get(aten.sigmoid, 1) + 2 * FLOPS_PER_ELEMENT.get(aten.tanh, 1) + 4
    return S * B * H * per_h


@register(torch.ops.costmodel.onednn_lstm_layer)
def onednn_lstm_layer_rule(x: TensorSpec, w_ih: TensorSpec, w_hh: TensorSpec, b_ih, b_hh, hx, cx, reverse,
                           workspace, *, out, **_) -> OpCost:
    """y = LSTM over S steps: x[S, B, I] @ W_ih^T at once, then h[B, H] @ W_hh^T per step."""
    S, B, I = x.shape
    G, H = w_hh.shape
    matmul = 2 * S * B * G * I + 2 * S * B * G * H
    return OpCost(matmul + _lstm_pointwise_flops(S, B, H), nbytes_of([x, w_ih, w_hh, b_ih, b_hh, hx, cx]),
                  nbytes_of(list(out)), MATMUL, counted_flops=matmul, kernel=LSTM_KERNEL,
                  features={"batch": B, "hidden": H})


@register(torch.ops.costmodel.onednn_lstm_layer_backward)
def onednn_lstm_layer_backward_rule(x: TensorSpec, w_ih: TensorSpec, w_hh: TensorSpec, b_ih, b_hh, hx, cx, y,
                                    hy, cy, gy, ghy, gcy, ws, reverse, x_grad, hx_grad, *, out, **_) -> OpCost:
    """The weights' gradients over every step; the input's and the first state's only where they
    require grad, and the states' between steps (S - 1 of them): the products autograd makes of the
    unrolled decomposition, which FlopCounterMode counts. Pointwise work taken as twice the forward's."""
    S, B, I = x.shape
    G, H = w_hh.shape
    matmul = 2 * S * B * G * I * (1 + int(bool(x_grad))) + 2 * S * B * G * H + 2 * (S - 1 + int(bool(hx_grad))) * B * G * H
    return OpCost(matmul + 2 * _lstm_pointwise_flops(S, B, H),
                  nbytes_of([x, w_ih, w_hh, b_ih, b_hh, hx, cx, y, hy, cy, gy, ghy, gcy, ws]),
                  nbytes_of(list(out)), MATMUL, counted_flops=matmul, kernel=f"{LSTM_KERNEL}.backward",
                  features={"batch": B, "hidden": H})


# --- the CPU's layers ----------------------------------------------------------------------------

def cpu_rnn(func, args, kwargs):
    """torch._VF.lstm/gru/rnn_tanh/rnn_relu as the CPU runs them, or NotImplemented where the Python
    decomposition is kept (packed sequences; an LSTM oneDNN does not take)."""
    if kwargs or len(args) != 9 or not isinstance(args[1], (torch.Tensor, tuple, list)) \
            or (isinstance(args[1], torch.Tensor) and args[1].dim() == 1):
        return NotImplemented                         # packed: (data, batch_sizes, hx, ...)
    x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
    if func is torch._VF.lstm:
        h0, c0 = hx
        if not (torch._C._get_mkldnn_enabled() and x.dtype == torch.float32 and h0.shape[-1] == c0.shape[-1]):
            return NotImplemented
        return _onednn_lstm(x, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    cell = {torch._VF.gru: _gru_cell, torch._VF.rnn_tanh: _tanh_cell, torch._VF.rnn_relu: _relu_cell}[func]
    return _full_layers(cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


def _weights(params, has_biases: bool, index: int):
    stride = 4 if has_biases else 2
    w = params[index * stride:(index + 1) * stride]
    return (w[0], w[1], w[2], w[3]) if has_biases else (w[0], w[1], None, None)


def _onednn_lstm(x, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """at::native mkldnn_rnn; zeros stand for missing biases, as there."""
    dirs = 2 if bidirectional else 1
    layer_input = x_in = (x.transpose(0, 1) if batch_first else x).contiguous()
    h0, c0 = h0.contiguous(), c0.contiguous()
    outputs: list = [None] * dirs
    hy, cy = [], []
    for layer in range(num_layers):
        for d in range(dirs):
            w_ih, w_hh, b_ih, b_hh = _weights(params, has_biases, layer * dirs + d)
            if b_ih is None:
                b_ih, b_hh = torch.zeros(w_ih.shape, dtype=w_ih.dtype), torch.zeros(w_hh.shape, dtype=w_hh.dtype)
            y, h, c, _ = onednn_lstm_layer(layer_input, w_ih, w_hh, b_ih, b_hh, h0[layer * dirs + d].unsqueeze(0),
                                           c0[layer * dirs + d].unsqueeze(0), d > 0, torch.is_grad_enabled())
            if outputs[d] is not None:
                _live_until_now([outputs[d]])          # the vector's slot held it until replaced
            outputs[d] = y
            hy.append(h.squeeze(0))
            cy.append(c.squeeze(0))
        _live_until_now([layer_input])                 # the local is reassigned only now
        layer_input = outputs[0] if dirs == 1 else torch.cat(outputs, -1)
        if dropout and train and layer < num_layers - 1:
            layer_input = torch.dropout(layer_input, dropout, True)
    out = layer_input.transpose(0, 1) if batch_first else layer_input
    hy, cy = torch.stack(hy, 0), torch.stack(cy, 0)
    _live_until_now([x_in])                            # the contiguous input is a local to the end
    return out, hy, cy


def _gru_cell(x, h, w_hh, b_hh):
    """GRUCell on a precomputed input projection x [B, 3H] (RNN.cpp): the gates made in place."""
    ig = x.unsafe_chunk(3, 1)
    hg = F.linear(h, w_hh, b_hh).unsafe_chunk(3, 1)
    reset = hg[0].add_(ig[0]).sigmoid_()
    update = hg[1].add_(ig[1]).sigmoid_()
    new = ig[2].add(hg[2].mul_(reset)).tanh_()
    return (h - new).mul_(update).add_(new)


def _tanh_cell(x, h, w_hh, b_hh):
    return torch.tanh(F.linear(h, w_hh, b_hh).add_(x))


def _relu_cell(x, h, w_hh, b_hh):
    return torch.relu(F.linear(h, w_hh, b_hh).add_(x))


def _full_layers(cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """_rnn_impl_with_concat over FullLayer / FullBidirectionalLayer (RNN.cpp, CPU branch)."""
    dirs = 2 if bidirectional else 1
    layer_input = x.transpose(0, 1) if batch_first else x
    h0 = hx.unbind(0)
    finals = []
    for layer in range(num_layers):
        w = [_weights(params, has_biases, layer * dirs + d) for d in range(dirs)]
        fw_in = F.linear(layer_input, w[0][0], w[0][2])
        fw_steps, fw_h = _steps(cell, fw_in.unbind(0), h0[layer * dirs], w[0])
        fw_out = torch.stack(fw_steps, 0)
        finals.append(fw_h)
        if dirs == 1:
            _live_until_now([fw_in, layer_input])      # the layer's locals are freed when it returns
            layer_input = fw_out
        else:
            bw_in = F.linear(layer_input, w[1][0], w[1][2])
            _live_until_now([fw_in])                   # input_w reassigned only now
            bw_steps, bw_h = _steps(cell, bw_in.unbind(0)[::-1], h0[layer * dirs + 1], w[1])
            bw_out = torch.stack(bw_steps[::-1], 0)
            out = torch.cat([fw_out, bw_out], fw_out.dim() - 1)
            # the layer's locals are freed when it returns, its input when the loop reassigns it
            _live_until_now(fw_steps + bw_steps + [bw_in, layer_input])
            layer_input = out
            finals.append(bw_h)
        if dropout and train and layer < num_layers - 1:
            layer_input = torch.dropout(layer_input, dropout, True)
    out = layer_input.transpose(0, 1) if batch_first else layer_input
    return out, torch.stack(finals, 0)


def _steps(cell, inputs, h, weights):
    outputs = []
    for x in inputs:
        h = cell(x, h, weights[1], weights[3])
        outputs.append(h)
    return outputs, h


def _live_until_now(tensors) -> None:
    from costmodel.capture.trace import live_until_now
    if _torch.in_trace():
        live_until_now(list(tensors))
