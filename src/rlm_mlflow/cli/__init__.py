"""The `rlm-mlflow` command: its five commands, one module each, and their parser.

``main`` (in `cli.main`, with the parser) is the console entry point. `cli.common` holds what
the commands share (settings from flags and variables, the tracking URI, one-line errors, a
look at the store); `run`, `status`, `sync`, `import_` and `instrument` are the commands. What
they drive lives in the library (`_workload`, `_replay`, `_import`, `_autolog`'s bootstrap,
`_instrument`).
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]
