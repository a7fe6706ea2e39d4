"""Drive the real rlm-code ``RLMRunner`` offline with a scripted, LLM-shaped connector.

The root task delegates two child tasks (run by the runner in parallel threads), runs three
``run_python`` steps and finishes; each child runs two ``run_python`` steps and finishes.
No LLM, no network, no API keys: the connector answers from the prompt alone.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from rlm_code.execution.engine import ExecutionResult
from rlm_code.rlm.environments import RLMRewardProfile
from rlm_code.rlm.observability import RLMObservability
from rlm_code.rlm.runner import RLMRunner, RLMRunResult
from rlm_code.sandbox.runtimes.base import RuntimeExecutionRequest
from rlm_code.sandbox.runtimes.local_runtime import LocalSandboxRuntime

__all__ = [
    "BENCH_ANSWER",
    "BENCH_CASES",
    "CHILD_KEYS",
    "CHILD_STEPS",
    "CHILD_TASKS",
    "COMPLETION_TOKENS_PER_CALL",
    "GENERIC_REWARDS",
    "GENERIC_TOTAL_REWARDS",
    "PROMPT_TOKENS_PER_CALL",
    "ROOT_STEPS",
    "ROOT_TASK",
    "RUN_COUNT",
    "STEPS_BY_TASK",
    "SUPPORTED_ENVIRONMENTS",
    "TOTAL_STEPS",
    "LocalExecutionEngine",
    "ScriptedCall",
    "ScriptedConnector",
    "run_scripted",
    "scripted_runner",
    "shutdown_interpreters",
    "write_pack",
]

PROMPT_TOKENS_PER_CALL = 120
COMPLETION_TOKENS_PER_CALL = 30

# Child tasks are identified by a marker on the prompt's ``Task:`` line.
_MARKER = re.compile(r"\[scripted:([a-z0-9-]+)\]")
_STEP = re.compile(r"^Step: (\d+)$", re.MULTILINE)

ROOT_TASK = "[scripted:root] Split the arithmetic check into two subtasks, then verify locally."
CHILD_KEYS: tuple[str, ...] = ("child-a", "child-b")
CHILD_TASKS: dict[str, str] = {
    "child-a": "[scripted:child-a] Compute 6 * 7 and sort a short list.",
    "child-b": "[scripted:child-b] Upper-case a word and count letters.",
}


def _run_python(code: str, rationale: str) -> dict[str, Any]:
    return {"action": "run_python", "code": code, "rationale": rationale, "done": False}


def _final(text: str) -> dict[str, Any]:
    return {"action": "final", "done": True, "final_response": text}


# One planner answer per step (index 0 is step 1). Avoid the substrings that rlm-code's own
# ExecutionEngine validator rejects (exec, eval, compile, http, subprocess, ...) so the
# script also runs unchanged on that engine.
_CHILD_SCRIPTS: dict[str, tuple[dict[str, Any], ...]] = {
    "child-a": (
        _run_python("print(6 * 7)", "Multiply."),
        _run_python("print(sorted([3, 1, 2]))", "Sort."),
        _final("child-a: 42 and [1, 2, 3]."),
    ),
    "child-b": (
        _run_python("print('scripted'.upper())", "Upper-case."),
        _run_python("print(len('scripted'))", "Count."),
        _final("child-b: SCRIPTED has 8 letters."),
    ),
}
# Benchmark cases (`write_pack`): one that answers what is expected, one that answers
# something else, and one whose model call raises (its run starts and never ends).
BENCH_ANSWER = "The answer is 42."
_BENCH_SCRIPTS: dict[str, tuple[dict[str, Any], ...]] = {
    "answer": (_run_python("print(6 * 7)", "Compute."), _final(BENCH_ANSWER)),
    "wrong": (_run_python("print(6 * 6)", "Compute."), _final("The answer is 36.")),
}
RAISING_KEY = "raise"
_SCRIPTS: dict[str, tuple[dict[str, Any], ...]] = {
    "root": (
        {
            "action": "delegate_batch",
            "tasks": [CHILD_TASKS[key] for key in CHILD_KEYS],
            "parallel": len(CHILD_KEYS),
            "max_children": len(CHILD_KEYS),
            # Children's max_steps (the runner's default would be min(3, parent max_steps)).
            "steps": max(len(script) for script in _CHILD_SCRIPTS.values()),
            # A glob nothing matches: keeps workdir files out of the child task text.
            "context_include": ["__scripted_no_context__"],
            "rationale": "Two independent subtasks; run them in parallel.",
            "done": False,
        },
        _run_python("print(1 + 1)", "Sanity-check the interpreter."),
        _run_python("total = sum(range(10))\nprint(total)", "Compute a checksum."),
        _run_python("import json\nprint(json.dumps({'ok': True}))", "Emit a JSON marker."),
        _final("Root done: children finished, 1 + 1 = 2, sum(range(10)) = 45."),
    ),
    **_CHILD_SCRIPTS,
    **_BENCH_SCRIPTS,
}

ROOT_STEPS = len(_SCRIPTS["root"])
CHILD_STEPS = len(_SCRIPTS["child-a"])
RUN_COUNT = 1 + len(CHILD_KEYS)
STEPS_BY_TASK: dict[str, int] = {
    ROOT_TASK: ROOT_STEPS,
    **{CHILD_TASKS[key]: len(_SCRIPTS[key]) for key in CHILD_KEYS},
}
TOTAL_STEPS = sum(STEPS_BY_TASK.values())
# Per-step rewards in the "generic" environment with the default reward profile: delegate
# 0.2 + 0.5 * completed-children ratio, run_python 0.1 + 0.7 (a float: 0.7999999999999999),
# final 1.0. Run totals are rounded to 4 places by the runner (root 4.1, children 2.6).
_PROFILE = RLMRewardProfile()
_PY_OK = _PROFILE.run_python_base + _PROFILE.run_python_success_bonus
GENERIC_REWARDS: dict[str, tuple[float, ...]] = {
    ROOT_TASK: (0.7, _PY_OK, _PY_OK, _PY_OK, 1.0),
    **{CHILD_TASKS[key]: (_PY_OK, _PY_OK, 1.0) for key in CHILD_KEYS},
}
GENERIC_TOTAL_REWARDS: dict[str, float] = {
    task: round(sum(rewards), 4) for task, rewards in GENERIC_REWARDS.items()
}
# Environments whose planner speaks the JSON action protocol used here.
SUPPORTED_ENVIRONMENTS = frozenset({"generic", "rlm", "dspy", "dspy-coding", "framework"})

_Usage = dict[str, int]


def _zero_usage() -> _Usage:
    return {"total_calls": 0, "prompt_tokens": 0, "completion_tokens": 0}


@dataclass(frozen=True, slots=True)
class ScriptedCall:
    """One ``generate_response`` call as the connector saw it."""

    key: str | None
    step: int | None
    action: str | None
    thread_id: int
    thread_name: str
    started: float
    finished: float


class ScriptedConnector:
    """Thread-safe stand-in for rlm-code's LLM connector that replays a fixed script.

    The answer depends only on the prompt (task marker + ``Step: N``), never on call order.
    Every call adds fixed token counts. With ``usage_scope="thread"`` (default),
    ``usage_snapshot()`` reports the calling thread's counters, so a run's usage covers exactly
    its own planner calls even while siblings run concurrently; ``"global"`` mimics a real
    shared connector (a parent's delegate step then includes its children's calls, and
    concurrent siblings' counts bleed into each other).
    Each child's first call waits (up to ``rendezvous_timeout`` s) for the other children's
    first call, so the children are provably in flight at the same time.
    """

    current_model = "scripted/offline"

    def __init__(
        self,
        *,
        usage_scope: Literal["thread", "global"] = "thread",
        rendezvous_timeout: float = 5.0,
    ) -> None:
        if usage_scope not in ("thread", "global"):
            raise ValueError(f"usage_scope must be 'thread' or 'global', not {usage_scope!r}")
        self.usage_scope = usage_scope
        self.rendezvous_timeout = rendezvous_timeout
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._arrived_children: set[str] = set()
        self.rendezvous_met: bool | None = None
        self._totals = _zero_usage()
        self._by_thread: dict[int, _Usage] = {}
        self._by_key: dict[str, _Usage] = {}
        self.calls: list[ScriptedCall] = []

    def generate_response(
        self,
        prompt: str,
        system_prompt: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> str:
        """Return the scripted planner JSON for the task and step named in ``prompt``."""
        started = time.monotonic()
        key, step = self._parse_prompt(prompt)
        if key == RAISING_KEY:
            raise RuntimeError("scripted model failure")
        if key in CHILD_KEYS and step == 1:
            self._rendezvous(key)
        answer = self._answer(key, step)
        self._record(key, step, answer, started)
        return json.dumps(answer) if isinstance(answer, dict) else answer

    def usage_snapshot(self) -> dict[str, int]:
        """Token counters (this thread's, or global); the runner diffs two snapshots."""
        with self._lock:
            if self.usage_scope == "global":
                return dict(self._totals)
            return dict(self._by_thread.get(threading.get_ident(), _zero_usage()))

    def get_usage_summary(self) -> dict[str, Any]:
        """Global totals plus a per-task breakdown, shaped like rlm-code's connector."""
        with self._lock:
            return {
                "totals": dict(self._totals),
                "by_task": {key: dict(row) for key, row in self._by_key.items()},
                "last_call": None,
            }

    def child_threads(self) -> dict[str, set[int]]:
        """Thread ids that served each child task's calls."""
        with self._lock:
            result: dict[str, set[int]] = {}
            for call in self.calls:
                if call.key in CHILD_KEYS:
                    result.setdefault(call.key, set()).add(call.thread_id)
            return result

    def children_overlapped(self) -> bool:
        """True when every pair of child tasks had overlapping call windows."""
        with self._lock:
            spans: dict[str, tuple[float, float]] = {}
            for call in self.calls:
                if call.key in CHILD_KEYS:
                    low, high = spans.get(call.key, (call.started, call.finished))
                    spans[call.key] = (min(low, call.started), max(high, call.finished))
        if len(spans) < len(CHILD_KEYS):
            return False
        windows = list(spans.values())
        return all(
            a[0] < b[1] and b[0] < a[1] for i, a in enumerate(windows) for b in windows[i + 1 :]
        )

    @staticmethod
    def _parse_prompt(prompt: str) -> tuple[str | None, int | None]:
        task_line = next((ln for ln in prompt.splitlines() if ln.startswith("Task: ")), "")
        marker = _MARKER.search(task_line)
        step = _STEP.search(prompt)
        return (marker.group(1) if marker else None), (int(step.group(1)) if step else None)

    @staticmethod
    def _answer(key: str | None, step: int | None) -> dict[str, Any] | str:
        if step is None:
            # Not a planner prompt (e.g. the runner's synthesis fallback): plain text.
            return f"Scripted summary for {key or 'unknown task'}."
        script = _SCRIPTS.get(key or "")
        if script is None:
            return _final(f"No script for this task (step {step}).")
        if step > len(script):
            return _final(f"{key}: script exhausted at step {step}.")
        return script[step - 1]

    def _rendezvous(self, key: str) -> None:
        with self._arrived:
            self._arrived_children.add(key)
            self._arrived.notify_all()
            met = self._arrived.wait_for(
                lambda: self._arrived_children.issuperset(CHILD_KEYS),
                timeout=self.rendezvous_timeout,
            )
            self.rendezvous_met = bool(met) and self.rendezvous_met is not False

    def _record(
        self, key: str | None, step: int | None, answer: dict[str, Any] | str, started: float
    ) -> None:
        thread = threading.current_thread()
        delta = {
            "total_calls": 1,
            "prompt_tokens": PROMPT_TOKENS_PER_CALL,
            "completion_tokens": COMPLETION_TOKENS_PER_CALL,
        }
        with self._lock:
            for row in (
                self._totals,
                self._by_thread.setdefault(thread.ident or 0, _zero_usage()),
                self._by_key.setdefault(key or "unknown", _zero_usage()),
            ):
                for name, value in delta.items():
                    row[name] += value
            self.calls.append(
                ScriptedCall(
                    key=key,
                    step=step,
                    action=answer.get("action") if isinstance(answer, dict) else None,
                    thread_id=thread.ident or 0,
                    thread_name=thread.name,
                    started=started,
                    finished=time.monotonic(),
                )
            )


class LocalExecutionEngine:
    """Minimal ``execution_engine``: runs code through rlm-code's ``LocalSandboxRuntime``.

    Same subprocess path as rlm-code's ``ExecutionEngine`` with the ``local`` runtime, minus
    its per-call runtime health probe (which shells out to ``docker info``) and its shared,
    thread-unsafe temp-dir state. Each call gets its own temp dir; safe from parallel threads.

    ``config_manager`` is read by ``RLMRunner`` only to pick the backend of its (unused here)
    pure_rlm environment: "exec" builds it inert, where the default ("docker") starts a
    loopback HTTP proxy thread in ``RLMRunner.__init__`` that the runner never stops.
    """

    config_manager = SimpleNamespace(
        config=SimpleNamespace(
            sandbox=SimpleNamespace(pure_rlm_backend="exec", pure_rlm_allow_unsafe_exec=True)
        )
    )

    def get_runtime_name(self) -> str:
        """Runtime name reported to ``RLMRunner.doctor``."""
        return "local"

    def execute_code(
        self, code: str, inputs: dict[str, Any] | None = None, timeout: int | None = None
    ) -> ExecutionResult:
        """Run ``code`` in a fresh ``python`` subprocess and return rlm-code's result type."""
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="scripted_rlm_exec_") as temp:
            code_file = Path(temp) / "generated_code.py"
            prefix = "".join(f"{name} = {value!r}\n" for name, value in (inputs or {}).items())
            code_file.write_text(prefix + code, encoding="utf-8")
            request = RuntimeExecutionRequest(
                code_file=code_file,
                workdir=Path(temp),
                timeout_seconds=int(timeout or 30),
                python_executable=Path(sys.executable),
                env={
                    "PYTHONPATH": "",
                    "PYTHONUNBUFFERED": "1",
                    "HOME": temp,
                    "TMPDIR": temp,
                    "PATH": "/usr/bin:/bin",
                },
            )
            try:
                outcome = LocalSandboxRuntime().execute(request)
            except Exception as exc:  # timeout or spawn failure
                return ExecutionResult(
                    success=False,
                    output=None,
                    stdout="",
                    stderr=f"Execution error: {exc}",
                    execution_time=time.perf_counter() - started,
                    error=exc,
                )
        success = outcome.return_code == 0
        return ExecutionResult(
            success=success,
            output=outcome.stdout if success else None,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            execution_time=time.perf_counter() - started,
            error=None if success else RuntimeError(outcome.stderr),
            resource_usage={"time": time.perf_counter() - started},
        )


def run_scripted(
    workdir: Path,
    *,
    observability: RLMObservability | None = None,
    environment: str = "generic",
    connector: ScriptedConnector | None = None,
    execution_engine: Any | None = None,
) -> RLMRunResult:
    """Run the scripted root task (and its two parallel children); return the root result.

    Writes run JSONL under ``workdir/"runs"``. Without ``observability`` the runner builds
    ``RLMObservability.default(...)`` itself. Pass ``connector`` to inspect its call log.
    """
    if environment not in SUPPORTED_ENVIRONMENTS:
        raise ValueError(f"environment {environment!r} not in {sorted(SUPPORTED_ENVIRONMENTS)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if observability is not None:
        kwargs["observability"] = observability
    if execution_engine is None:
        execution_engine = LocalExecutionEngine()
    with warnings.catch_warnings():
        # The inert exec-backed pure_rlm environment warns about exec() isolation on creation.
        warnings.filterwarnings("ignore", "PureRLMEnvironment is using exec", UserWarning)
        runner = RLMRunner(
            llm_connector=connector if connector is not None else ScriptedConnector(),
            execution_engine=execution_engine,
            workdir=workdir,
            run_dir=workdir / "runs",
            max_parallelism=len(CHILD_KEYS) + 2,
            **kwargs,
        )
    try:
        return runner.run_task(
            ROOT_TASK,
            max_steps=ROOT_STEPS,
            exec_timeout=30,
            environment=environment,
            branch_width=1,
            max_depth=1,
            max_children_per_step=len(CHILD_KEYS),
            parallelism=len(CHILD_KEYS),
        )
    finally:
        _shutdown_interpreters(runner)


def _shutdown_interpreters(runner: RLMRunner) -> None:
    """Stop what ``RLMRunner()`` may start eagerly and never stops itself.

    With an engine whose config does not select the "exec" pure_rlm backend (e.g. rlm-code's
    ``ExecutionEngine()``), the runner starts a ``DockerPersistentInterpreter``: a loopback HTTP
    proxy thread plus a ``/tmp/rlm_docker_interp_*`` dir. Stopping it takes up to 0.5 s.
    """
    for env in {id(env): env for env in runner.environments.values()}.values():
        shutdown = getattr(getattr(env, "_interpreter", None), "shutdown", None)
        if callable(shutdown):
            shutdown()


#: A benchmark pack (rlm-code's ``presets`` format): a case that delegates to two children
#: (the recursive one), one that matches its expected answer, one that does not, and one
#: whose model call raises.
BENCH_CASES: tuple[dict[str, Any], ...] = (
    {
        "id": "recursive",
        "description": "Delegates two subtasks.",
        "task": ROOT_TASK,
        "environment": "generic",
        "max_steps": ROOT_STEPS,
        "task_family": "arithmetic",
        "domain": "math",
        "split": "dev",
        "length_bucket": "short",
    },
    {
        "id": "matches",
        "description": "Answers 42.",
        "task": "[scripted:answer] What is six times seven?",
        "environment": "generic",
        "max_steps": 3,
        "expected_answer": "42",
        "task_family": "arithmetic",
        "split": "dev",
    },
    {
        "id": "misses",
        "description": "Answers 36.",
        "task": "[scripted:wrong] What is six times seven, again?",
        "environment": "generic",
        "max_steps": 3,
        "expected_answer": "42",
        "domain": "math",
    },
    {
        "id": "model-fails",
        "description": "Its model call raises.",
        "task": "[scripted:raise] What is the meaning of life?",
        "environment": "generic",
        "max_steps": 3,
        "expected_answer": "42",
    },
)


def write_pack(path: Path, preset: str = "scripted_pack", cases: Any = BENCH_CASES) -> Path:
    """A pack file rlm-code's ``run_benchmark(pack_paths=[path])`` loads as ``preset``."""
    path.write_text(
        json.dumps({"presets": {preset: {"description": "Scripted cases.", "cases": list(cases)}}})
    )
    return path


def scripted_runner(
    workdir: Path,
    *,
    connector: ScriptedConnector | None = None,
    observability: RLMObservability | None = None,
) -> RLMRunner:
    """A real ``RLMRunner`` on the scripted connector and local engine (call
    `shutdown_interpreters` when done)."""
    kwargs: dict[str, Any] = {}
    if observability is not None:
        kwargs["observability"] = observability
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "PureRLMEnvironment is using exec", UserWarning)
        return RLMRunner(
            llm_connector=connector if connector is not None else ScriptedConnector(),
            execution_engine=LocalExecutionEngine(),
            workdir=workdir,
            run_dir=workdir / ".rlm_code" / "rlm" / "runs",
            max_parallelism=len(CHILD_KEYS) + 2,
            **kwargs,
        )


shutdown_interpreters = _shutdown_interpreters
