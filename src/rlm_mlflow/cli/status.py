"""`rlm-mlflow status`: what a sink configured like this would use and find, read-only."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from .._orphans import waiting_journals
from .._redact import redact_uri
from .._settings import DEFAULT_EXPERIMENT, Settings, env_name, parse_bool
from .common import given_settings, probe, resolve_uri, settings_from


def cmd_status(args: argparse.Namespace) -> int:
    """What a sink configured like this would use and find. Read-only: imports no mlflow,
    creates no experiment, no file and no journal, replays nothing."""
    settings = settings_from(args)
    flags = given_settings(args)
    enabled = parse_bool(os.environ.get("DSPY_RLM_MLFLOW_ENABLED"))
    experiment = os.environ.get("DSPY_RLM_MLFLOW_EXPERIMENT") or DEFAULT_EXPERIMENT
    configured = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    importable = importlib.util.find_spec("mlflow") is not None
    if not enabled:
        detail = "disabled"
    elif not importable:
        detail = "unavailable: No module named 'mlflow'"
    else:
        detail = redact_uri(configured) or "default-tracking-uri"
    uri = resolve_uri(args)
    reachable, store_detail = probe(uri)
    status: dict[str, Any] = {
        "name": "mlflow",
        "enabled": enabled,
        "available": enabled and importable,
        "detail": detail,
        "experiment": experiment,
        "tracking_uri": redact_uri(uri),
        "mlflow": "importable" if importable else "not installed",
        "store_reachable": reachable,
        "store": store_detail,
        "settings": {
            f.name: {
                "value": getattr(settings, f.name),
                "source": "flag"
                if f.name in flags
                else "env"
                if env_name(f.name) in os.environ
                else "default",
            }
            for f in dataclasses.fields(Settings)
        },
        "journals": [
            {**journal, "dir": str(journal["dir"])}
            for journal in waiting_journals(Path(settings.spool_dir))
        ]
        if settings.spool_dir
        else [],
    }
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    width = max(len(key) for key in status)
    for key, value in status.items():
        if key == "settings":
            for name, setting in value.items():
                shown = setting["value"] if setting["value"] != "" else "''"
                print(f"{name:<{width}}  {shown} ({setting['source']})")
        elif key == "journals":
            for journal in value:
                print(
                    f"{'journal':<{width}}  {journal['dir']}: {journal['state']}, "
                    f"for {journal['destination']}, {journal['events']} events, "
                    f"{journal['bytes']} bytes, since {journal['since']}"
                )
        else:
            print(f"{key:<{width}}  {value}")
    return 0
