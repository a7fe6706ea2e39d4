"""The synthetic RLM workload behind `rlm-mlflow run`: recursive runs with a learning curve.

Deterministic (rewards from a seeded generator, by position in the run tree), so two runs of
the command give the same curves. Each run writes its trajectory JSONL, as rlm-code's runner
does, and reports through the sink's three hooks only.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._sink import MLflowSink


@dataclass(frozen=True)
class Result:
    """What rlm-code's runner hands to ``on_run_end``."""

    completed: bool
    steps: int
    total_reward: float
    final_response: str = ""
    usage_summary: dict[str, int] | None = None


#: Programs the synthetic model "writes", in turn (what a trace shows as a step's code).
PROGRAMS = (
    "import dspy\n\nclass Signature(dspy.Signature):\n    question: str = dspy.InputField()\n"
    "    answer: str = dspy.OutputField()\n\nprint(Signature.__doc__ or 'Signature ok')",
    "numbers = [{a}, {b}, {c}]\nprint(sum(numbers) / len(numbers))",
    "text = 'recursive language models'\nprint(text.title(), len(text.split()))",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint(fib({a} % 20))",
)


@dataclass(frozen=True)
class Plan:
    task: str
    environment: str
    steps: int
    depth: int
    seed: int
    run_dir: Path


def run_rlm(
    sink: MLflowSink,
    plan: Plan,
    run_id: str,
    path: str,
    depth: int,
    parent: str | None,
    advance: Callable[[], None],
) -> None:
    """One RLM run: deterministic rewards from (seed, position in the tree); at half-time a
    non-leaf run spawns two child runs in parallel threads and waits for them."""
    steps = plan.steps if depth == 0 else max(plan.steps >> depth, 1)
    params: dict[str, Any] = {
        "max_steps": steps,
        "model": "synthetic",
        "seed": plan.seed,
        "depth": depth,
        "parent_run_id": parent,
    }
    sink.on_run_start(run_id, task=plan.task, environment=plan.environment, params=params)
    rng = random.Random(f"{plan.seed}:{path}")
    trajectory = plan.run_dir / f"{run_id}.jsonl"
    cumulative = 0.0
    usage = {"total_calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
    with trajectory.open("w", encoding="utf-8") as out:
        for step in range(steps):
            if step == steps // 2 and depth < plan.depth:
                children = [
                    threading.Thread(
                        target=run_rlm,
                        args=(
                            sink,
                            plan,
                            f"{run_id}.{i}",
                            f"{path}.{i}",
                            depth + 1,
                            run_id,
                            advance,
                        ),
                    )
                    for i in range(2)
                ]
                for child in children:
                    child.start()
                for child in children:
                    child.join()
            # A learning curve with noise: the reward drifts from ~0.2 up to ~0.8.
            reward = round(min(1.0, max(0.0, 0.2 + 0.6 * step / steps + rng.gauss(0, 0.1))), 4)
            cumulative += reward
            a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 99)
            code = PROGRAMS[step % len(PROGRAMS)].format(a=a, b=b, c=c)
            step_usage = {
                "total_calls": 1,
                "prompt_tokens": 500 + 4 * (step % 50) + rng.randint(0, 200),
                "completion_tokens": 40 + len(code) // 4 + rng.randint(0, 30),
            }
            for key, count in step_usage.items():
                usage[key] += count
            action = {"action": "run_python", "code": code, "rationale": f"step {step}"}
            event = {
                "step": step,
                "action": action,
                "planner_raw": json.dumps(action),  # the model's answer, as rlm-code keeps it
                "observation": {
                    "success": reward > 0.5,
                    "stdout": f"{(a + b + c) / 3:.2f}" if step % 4 == 1 else "ok",
                    "stderr": "" if reward > 0.3 else "AssertionError: the check failed",
                },
                "reward": reward,
                "usage": step_usage,
            }
            out.write(json.dumps(event) + "\n")
            sink.on_step(run_id, event=event, cumulative_reward=cumulative)
            advance()
    answer = f"{plan.task}: done in {steps} steps (synthetic run {run_id})"
    result = Result(True, steps, cumulative, answer, dict(usage))
    sink.on_run_end(run_id, result=result, run_path=trajectory)


def total_steps(steps: int, max_depth: int) -> int:
    return sum((2**d) * max(steps >> d, 1) for d in range(max_depth + 1))
