"""Settings of the forwarder: one frozen dataclass, each field also an environment variable."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

ENV_PREFIX = "DSPY_RLM_MLFLOW_"

#: rlm-code's experiment name, when DSPY_RLM_MLFLOW_EXPERIMENT does not say otherwise.
DEFAULT_EXPERIMENT = "rlm-code-rlm"

#: The full-buffer policies (see `Settings.when_full`).
WhenFull = Literal["block", "drop_newest", "drop_oldest", "spill"]
WHEN_FULL: tuple[WhenFull, ...] = get_args(WhenFull)

#: The spool's durability levels (see `Settings.fsync`).
Fsync = Literal["never", "batch", "always"]
FSYNC: tuple[Fsync, ...] = get_args(Fsync)

#: Field types read as text (the two Literals are checked against their values).
TEXT_TYPES = ("str", "WhenFull", "Fsync")

#: MLflow rejects a ``log_batch`` call with more than this many metrics.
MLFLOW_MAX_METRICS_PER_BATCH = 1000


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """How the sink buffers and sends. Every field ``x`` is read from ``DSPY_RLM_MLFLOW_X``."""

    queue_size: int = _setting(
        100_000, "Events the in-memory buffer holds before a hook has to wait (then drop)."
    )
    memory_max_bytes: int = _setting(
        64 << 20,
        "Bytes of events held in memory: half for the buffer (its bound in events is lowered "
        "when events are large), half for what is in flight or retried. Past it, with a spool "
        "the journal takes the rest; without, the when_full policy applies.",
    )
    batch_size: int = _setting(
        1000, "Metrics per MLflow log_batch call (MLflow accepts at most 1000)."
    )
    flush_interval: float = _setting(
        1.0, "Seconds the worker waits for a full batch before it sends what it has."
    )
    max_in_flight: int = _setting(
        4, "log_batch calls in flight at once against a tracking server (1 for local stores)."
    )
    put_timeout: float = _setting(
        5.0, "Seconds a hook may wait for room in a full buffer before the event is dropped."
    )
    retry_deadline: float = _setting(
        120.0, "Seconds a failing call is retried (transient errors only) before it is failed."
    )
    request_timeout: float = _setting(
        30.0, "Seconds one HTTP request to the tracking server may take."
    )
    close_timeout: float = _setting(
        30.0, "Seconds flush() and close() (also the close at interpreter exit) wait by default."
    )
    when_full: WhenFull = _setting(  # noqa: RUF009 (a field(), as for every setting)
        "block",
        "What a hook does when the buffer is full: block (up to put_timeout, then drop), "
        "drop_newest, drop_oldest, or spill (to the spool; needs spool_dir).",
    )
    spool_dir: str = _setting(
        "", "Directory of the write-ahead journal; empty: no journal (events live in memory)."
    )
    fsync: Fsync = _setting(  # noqa: RUF009 (a field(), as for every setting)
        "batch",
        "Durability of the spool: never (survives a crash of the process), batch (one fsync "
        "per drain: survives a power cut but for the drain being written), always (also every "
        "spilled event).",
    )
    spool_max_bytes: int = _setting(
        1 << 30, "Size cap of this process's journal; past it the when_full policy applies."
    )
    handle_sigterm: bool = _setting(
        True,
        "On SIGTERM, close every sink (deliver or journal within close_timeout), then do what "
        "the process did before. Off: the sink installs no signal handler.",
    )
    traces: bool = _setting(
        False,
        "Send each run's trajectory as an MLflow trace in its Traces tab: a span per step with "
        "its code, output, reward and tokens.",
    )
    trace_text_limit: int = _setting(
        4096, "Characters kept of each text in a span's inputs and outputs (the rest is cut)."
    )
    trace_max_spans: int = _setting(
        250,
        "Step spans per trace: the first three quarters of them and the last quarter, the "
        "steps between counted on a span of their own (MLflow's trace view opens a trace of "
        "250 rlm-code steps in about 2 s).",
    )
    restore_deleted_experiment: bool = _setting(
        False,
        "Restore the experiment when it was deleted in MLflow (else the sink reports it "
        "unavailable and keeps the events in the spool, or counts them failed).",
    )
    dead_letter_file: str = _setting(
        "",
        "JSONL file of what MLflow refused; empty: dead-letter.jsonl in spool_dir, "
        "else rlm-mlflow-dead-letter.jsonl in the working directory.",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (*TEXT_TYPES, "bool"):
                kind = bool if f.type == "bool" else str
                if not isinstance(value, kind):
                    raise ValueError(
                        f"{f.name} (env {env_name(f.name)}) must be a {f.type}, got {value!r}"
                    )
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(
                    f"{f.name} (env {env_name(f.name)}) must be a positive number, got {value!r}"
                )
        if self.when_full not in WHEN_FULL:
            raise ValueError(
                f"when_full (env {env_name('when_full')}) must be one of "
                f"{', '.join(WHEN_FULL)}, got {self.when_full!r}"
            )
        if self.fsync not in FSYNC:
            raise ValueError(
                f"fsync (env {env_name('fsync')}) must be one of {', '.join(FSYNC)}, "
                f"got {self.fsync!r}"
            )
        if self.when_full == "spill" and not self.spool_dir:
            raise ValueError(
                f"when_full=spill (env {env_name('when_full')}) needs a spool directory "
                f"(env {env_name('spool_dir')})"
            )
        if self.batch_size > MLFLOW_MAX_METRICS_PER_BATCH or self.batch_size < 2:
            raise ValueError(
                f"batch_size (env {env_name('batch_size')}) must be between 2 and "
                f"{MLFLOW_MAX_METRICS_PER_BATCH} (MLflow's limit), got {self.batch_size}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``DSPY_RLM_MLFLOW_*`` variables, then ``overrides``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is None or (raw.strip() == "" and f.type not in TEXT_TYPES):
                continue
            kind = PARSERS[str(f.type)]
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise ValueError(
                    f"{env_name(f.name)}={raw!r} is not a valid {f.type} (setting {f.name})"
                ) from None
        values.update(overrides)
        return cls(**values)


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def parse_bool(raw: str | None, default: bool = False) -> bool:
    """rlm-code's reading of ``DSPY_RLM_MLFLOW_ENABLED``: 1/true/yes/on, any case."""
    if raw is None:
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def strict_bool(raw: str) -> bool:
    """A yes/no setting: 1/true/yes/on or 0/false/no/off, any case; else ValueError."""
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(raw)


#: How a setting's environment variable (or flag) is read, by the field's type.
PARSERS: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "WhenFull": str,
    "Fsync": str,
    "bool": strict_bool,
}
