"""Make the capture take the path eager takes, where a library decides on tensor values it cannot see.

Under fake tensors, code that would look at values sees a tracer instead and takes its "unknown
values" path. Hugging Face `transformers` does this when it prepares attention masks
(`masking_utils._preprocess_mask_arguments`): with no `attention_mask` and no cache, it asks
`find_packed_sequence_indices(position_ids)` whether the positions restart inside a row (several
sequences packed into one). Eager answers from the values: `position_ids = arange(seq)` is one
sequence, so the causal mask can be skipped (`_ignore_causal_mask_sdpa`: no padding, q_length ==
kv_length) and SDPA runs with `is_causal=True` and no mask at all. Under tracing the function
cannot read the values (`is_tracing`), answers "packed", and the capture materialises three
[batch, 1, seq, seq] boolean masks per Llama forward that eager never allocates: a seq^2 term in
the peak of what is really a seq^1 model.

`eager_decisions` reproduces eager's answer for the inputs the user described: positions the model
makes itself (from `arange`, its own buffers and sizes, as every decoder does when no
`position_ids` input is given) are one sequence per row; positions that come from a user input are
unknown values, and keep the traced answer (a mask, counted). The positions are still computed
(the ops stay in the graph, as eager computes them too); only the decision follows eager. An
`attention_mask` input is taken as padding: the masks it makes are real and counted. Eager
attention implementations (GPT-2's `eager`) build their masks whatever the answer, as in eager.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.fx as fx


from costmodel._torch import traced_node  # noqa: E402


def derived_from(t: torch.Tensor, is_input: Callable[[fx.Node], bool]) -> bool | None:
    """Whether the values of traced tensor `t` depend on the values of a user input (a placeholder
    for which `is_input` holds); None when `t` is not part of a running trace. Sizes are not values:
    the walk does not follow SymInts (an input's length shapes `arange(seq)`, it is not its data)."""
    node = traced_node(t)
    if node is None:
        return None
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and is_input(n):
            return True
        todo.extend(a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor))
    return False


@contextlib.contextmanager
def eager_decisions(is_input: Callable[[fx.Node], bool]):
    """Within this context (around make_fx), library decisions on values follow eager (see above)."""
    def own_rows(original):
        def find_packed_sequence_indices(position_ids: torch.Tensor):
            packed = original(position_ids)
            if packed is not None and derived_from(position_ids, is_input) is False:
                return None          # the model's own positions: one sequence per row, as eager finds
            return packed
        return find_packed_sequence_indices

    with _packed_finder(own_rows):
        yield


@contextlib.contextmanager
def _packed_finder(replace: Callable):
    """transformers' `masking_utils.find_packed_sequence_indices` replaced by replace(original) for
    the duration; nothing where transformers has no such function."""
    try:
        import transformers.masking_utils as masking
    except ImportError:
        yield
        return
    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking.find_packed_sequence_indices = replace(original)
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


@contextlib.contextmanager
def own_positions():
    """An eager run on fake tensors (FSDPMemTracker under the fake process group) whose inputs hold
    no positions: the positions the model makes are one sequence per row, as eager finds from their
    values (fake tensors have none, and `transformers` would answer "packed", building masks eager
    never allocates)."""
    with _packed_finder(lambda original: lambda position_ids: None):
        yield


@contextlib.contextmanager
def eager_masks_under_export():
    """torch.export of a model whose inputs hold no positions and no attention mask (the pipeline
    split of validate --parallel pp=N): `transformers` then decides on masks as eager does (one
    sequence per row, the causal mask skipped, SDPA with is_causal=True) instead of building the
    [batch, 1, seq, seq] masks it keeps for exported programs, which must serve other inputs. The
    program is run at the shapes it was exported with only."""
    try:
        import transformers.masking_utils as masking
    except ImportError:
        yield
        return
    original = getattr(masking, "is_torchdynamo_exporting", None)
    with own_positions():
        if original is None:
            yield
            return
        masking.is_torchdynamo_exporting = lambda: False
        try:
            yield
        finally:
            masking.is_torchdynamo_exporting = original
