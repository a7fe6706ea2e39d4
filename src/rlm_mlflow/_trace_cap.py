"""Which of a run's step spans its trace holds (pure): at most ``cap`` of them, the first
ones and the last ones, and a gap between them.

The first ``cap - cap // 4`` steps are sent as they come; the next ones are held, at most
``cap // 4``, and a step pushed out of that window joins the gap. At the run's end the held
steps go with a span saying how many steps are between (`_spans.gap_span`). A trace of
MLflow's UI opens promptly only when it holds few spans: the start and the end of a run are
what a reader opens it for.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

Span = dict[str, Any]


@dataclass
class Gap:
    first: int
    last: int
    start: float
    end: float
    count: int = 0


@dataclass
class TraceCap:
    sent: int = 0  # step spans sent as they came (the head)
    held: deque[tuple[int, float, float, list[Span]]] = field(default_factory=deque)
    gap: Gap | None = None

    @property
    def untraced(self) -> int:
        return 0 if self.gap is None else self.gap.count

    def add(self, cap: int, step: int, start: float, end: float, spans: list[Span]) -> list[Span]:
        """The step's spans to send now: all of them while the trace has room in its head,
        none once it is in its tail (held until `finish`)."""
        tail = cap // 4
        if self.sent < cap - tail:
            self.sent += 1
            return spans
        self.held.append((step, start, end, spans))
        if len(self.held) > tail:
            self._skip(*self.held.popleft()[:3])
        return []

    def _skip(self, step: int, start: float, end: float) -> None:
        if self.gap is None:
            self.gap = Gap(step, step, start, end)
        else:
            self.gap.first, self.gap.last = min(self.gap.first, step), max(self.gap.last, step)
            self.gap.start, self.gap.end = min(self.gap.start, start), max(self.gap.end, end)
        self.gap.count += 1

    def finish(self) -> tuple[list[Span], Gap | None]:
        """The held steps' spans, and the gap (None: every step is traced)."""
        return [span for *_, spans in self.held for span in spans], self.gap

    def copy(self) -> TraceCap:
        gap = None if self.gap is None else Gap(**vars(self.gap))
        return TraceCap(self.sent, deque(self.held), gap)
