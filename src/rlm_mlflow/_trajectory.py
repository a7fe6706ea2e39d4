"""A run's trajectory as MLflow shows it (pure, no I/O): from a group of its steps, the metric
rows (rewards, cumulative token counts) and, with traces, the step spans its trace holds; at
its end, the spans that close the trace (the steps held back, the gap, the run's root span).

The state it keeps between step groups (the steps seen, where the last step ended, the tokens
so far, the child runs started since, which spans the trace holds) is marked before a group is
sent and restored should that send be cut off (`Lane.rewind`), so a group sent again builds
the same rows and spans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import _payload as payload
from . import _spans as spans_
from ._event import RunEnd, RunStart, Step
from ._memory import StepSet
from ._trace_cap import TraceCap

Span = spans_.Span


@dataclass
class StepRows:
    """What one group of steps sends: metric rows, token rows, spans (by step), and the
    steps that came again (rejected: the first one was kept)."""

    rows: list[payload.MetricRow] = field(default_factory=list)
    tokens: list[payload.MetricRow] = field(default_factory=list)
    spans: list[tuple[int, Span]] = field(default_factory=list)
    repeated: list[Step] = field(default_factory=list)


@dataclass
class Trajectory:
    start: RunStart
    seen_steps: StepSet = field(default_factory=StepSet)
    last_time: float = 0.0  # where the last step ended
    tokens: list[int] = field(default_factory=lambda: [0, 0, 0])  # prompt, completion, calls
    cap: TraceCap = field(default_factory=TraceCap)
    children: list[tuple[str, str]] = field(default_factory=list)  # started since the last step
    # Whether the run is a trace: its events say so (with traces on, its start carries the
    # task and its steps a span), not the settings of the process sending it (a replay).
    tracing: bool = False
    _mark: tuple[StepSet, list[int], TraceCap, float, list[tuple[str, str]]] | None = None

    def __post_init__(self) -> None:
        self.last_time = self.start.time
        self.tracing = isinstance(self.start.extra, dict) and "task" in self.start.extra

    def mark(self) -> None:
        """Before a group is sent: the state to go back to should the send be cut off."""
        self._mark = (
            self.seen_steps.copy(),
            self.tokens[:],
            self.cap.copy(),
            self.last_time,
            self.children[:],
        )

    def sent(self) -> None:
        self._mark = None  # done: nothing of this group to build again

    def restore(self) -> None:
        """The group being sent was cut off: back to the state before it."""
        if self._mark is not None:
            self.seen_steps, self.tokens, self.cap, self.last_time, self.children = self._mark
            self._mark = None

    def step_rows(self, steps: list[Step], spans_to: str | None, max_spans: int) -> StepRows:
        """The group's rows and spans; ``spans_to``: the experiment the trace is in, None
        when no span is to be built (the store takes no traces)."""
        out = StepRows()
        first_time, append = self.seen_steps.add, out.rows.append
        for event in steps:  # per step: kept short, it is most of what the worker does
            _, step, reward, cumulative, at, extra = event
            if not first_time(step):
                out.repeated.append(event)
                continue
            ts = int(at * 1000)  # payload.timestamp_ms, inline
            append(("step_reward", reward, ts, step))
            append(("cumulative_reward", cumulative, ts, step))
            if extra is not None:
                self._extra(step, reward, cumulative, at, ts, extra, out, spans_to, max_spans)
            self.last_time = at
        return out

    def _extra(
        self,
        step: int,
        reward: float,
        cumulative: float,
        at: float,
        ts: int,
        extra: dict[str, Any],
        out: StepRows,
        spans_to: str | None,
        max_spans: int,
    ) -> None:
        """A step's token counts (cumulative, as metrics) and, with traces, its span."""
        usage = extra.get("usage")
        if usage is not None:
            total = self.tokens
            for i in range(3):
                total[i] += usage[i]
            out.tokens.append(("prompt_tokens", float(total[0]), ts, step))
            out.tokens.append(("completion_tokens", float(total[1]), ts, step))
        detail = extra.get("span")
        if detail is None or spans_to is None:
            return
        self.tracing = True
        params = self.start.params
        model = params.get("model") if isinstance(params, dict) else None
        made = spans_.step_spans(
            self.start.key,
            step,
            self.last_time,
            at,
            reward,
            cumulative,
            detail,
            usage,
            self.children,
            model if isinstance(model, str) else None,
            spans_to,
        )
        self.children = []
        # the UI wants few spans, not all: the first and the last steps, the rest a gap
        out.spans.extend(
            (step, span) for span in self.cap.add(max_spans, step, self.last_time, at, made)
        )

    def closing_spans(
        self,
        run_id: str,
        event: RunEnd,
        parent: tuple[str, str] | None,
        top: tuple[str, str],
        user: str | None,
    ) -> tuple[list[Span], Span]:
        """At the run's end: the step spans held back and the gap, and the root span (sent
        last: it ends the trace). ``parent`` and ``top``: (run id, key) of the parent run and
        of the recursion's root."""
        start, extra = self.start, event.extra or {}
        task = (start.extra or {}).get("task")
        inputs = {"task": task, "environment": start.environment, "params": start.params}
        outputs: dict[str, Any] = {"completed": bool(event.completed)}
        if event.total_reward is not None:
            outputs["total_reward"] = event.total_reward
        if extra.get("final_response") is not None:
            outputs["final_response"] = extra["final_response"]
        held, gap = self.cap.finish()
        if gap is not None:
            held.append(
                spans_.gap_span(start.key, gap.first, gap.last, gap.count, gap.start, gap.end)
            )
        root = spans_.root_span(
            start.key,
            run_id,
            start.time,
            event.time,
            {k: v for k, v in inputs.items() if v is not None},
            outputs,
            self.cap.untraced,
            parent,
            ok=event.status == "FINISHED",
            root=top,
            user=user,
        )
        return held, root
