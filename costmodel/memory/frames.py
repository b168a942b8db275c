"""Python frames in the memory timeline: eager keeps a tensor alive while a name refers to it.
A module's arguments live until its forward returns (the caller holds them); the tensors a
forward's local variables hold live as long as the capture saw them named (capture.trace's
_FrameLocals records it as node.meta[LIVE_UNTIL])."""

from __future__ import annotations

from costmodel.capture.trace import LIVE_UNTIL


class FrameLifetimes:
    """The frames part of memory.timeline._Builder."""

    def _frame_locals(self, nodes, step_of: dict[str, int]) -> None:
        """Tensors a forward's local variables still name when it returns live until then (the
        capture records which, as node.meta[LIVE_UNTIL])."""
        for node in nodes:
            until = node.meta.get(LIVE_UNTIL)
            if until is None or until not in step_of:
                continue
            for key in self.node_keys.get(node.name, []):
                i = self.by_key.get(key)
                if i is not None and self.buffers[i].end < step_of[until]:
                    self.buffers[i].end = step_of[until]

    def _eager_lifetimes(self) -> None:
        """Python frames hold tensors past their last use by an op. A module's arguments live until
        its forward returns (the caller's frame holds them), modelled from the module calls
        (contiguous runs of forward ops under one module path). The forward's own locals are read
        from its frame by the capture (`_frame_locals`); expression temporaries are freed at last
        use, as eager does."""
        calls: list[list] = []       # open calls per depth: [path, index into spans]
        spans: list[list[int]] = []  # [start, end] per call
        step_calls: list[list[int]] = [[] for _ in self.steps]
        for s, st in enumerate(self.steps):
            stack = st.stack
            if not stack:
                calls = []
                continue
            depth = 0
            while depth < len(calls) and depth < len(stack) and calls[depth][0] == stack[depth] \
                    and spans[calls[depth][1]][1] == s - 1:
                depth += 1
            del calls[depth:]
            for d in range(depth, len(stack)):
                spans.append([s, s])
                calls.append([stack[d], len(spans) - 1])
            for c in calls:
                spans[c[1]][1] = s
            step_calls[s] = [c[1] for c in calls]

        def extend(b: int, end: int) -> None:
            if self.buffers[b].end < end:
                self.buffers[b].end = end

        for s, ids in enumerate(step_calls):
            if not ids:
                continue
            for b in self.reads[s]:
                if b in self.cache_inputs:
                    continue         # reached through the cache object, not passed as an argument
                start = self.buffers[b].start
                for cid in ids:                       # outermost first
                    if spans[cid][0] > start:
                        extend(b, spans[cid][1])
                        break
