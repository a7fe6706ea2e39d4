"""A table artifact as ``mlflow.log_table`` writes it, in pure functions: the file's JSON and
the run tag that lists it. No mlflow here.

``log_table`` writes pandas' ``to_json(orient="split", index=False)`` (``{"columns": [...],
"data": [[...], ...]}``, a missing or non-finite number as ``null``) and adds
``{"path": <file>, "type": "table"}`` to the run tag `LOGGED_ARTIFACTS_TAG`, a JSON list.
The MLflow UI shows such a file as a table, and ``mlflow.load_table`` finds the runs that
have one by that tag (``LIKE '%"path"%:%"<file>",%"type"%:%"table"%'``: path first, then
type) and reads the file with ``pandas.read_json(orient="split")``.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

#: The run tag listing the run's table artifacts (MLflow's ``MLFLOW_LOGGED_ARTIFACTS``).
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"
#: Characters ``log_table`` and ``load_table`` refuse in a table's path.
TABLE_PATH_FORBIDDEN = frozenset("\"',:[]{}")


def table_artifact(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """The file's JSON: one list per row, in ``columns``' order. A non-finite float is
    written ``null``, as pandas writes it; anything else must be JSON already (ValueError or
    TypeError otherwise), and so must a row's length (ValueError)."""
    data = []
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row of {len(row)} cells for {len(columns)} columns")
        data.append([None if _non_finite(cell) else cell for cell in row])
    table = {"columns": list(columns), "data": data}
    return json.dumps(table, separators=(",", ":"), allow_nan=False)


def logged_artifacts_tag(existing: str | None, path: str) -> str:
    """The tag's value with ``path`` listed as a table: ``existing`` (the tag's value now, or
    None) with ``{"path": path, "type": "table"}`` appended unless it is there already,
    written as ``log_table`` writes it (``json.dumps``). A value that is not such a list is
    replaced, as it would make ``log_table`` itself fail. ValueError for a path
    ``load_table`` refuses (`TABLE_PATH_FORBIDDEN`, not a relative path)."""
    if TABLE_PATH_FORBIDDEN.intersection(path) or relative_artifact_path(path) != path:
        raise ValueError(f"not a table path load_table takes: {path!r}")
    entry = {"path": path, "type": "table"}
    try:
        listed = json.loads(existing) if existing else []
    except ValueError:
        listed = []
    if not isinstance(listed, list):
        listed = []
    if entry not in listed:
        listed.append(entry)
    return json.dumps(listed)


def _non_finite(cell: Any) -> bool:
    return isinstance(cell, float) and not math.isfinite(cell)


def relative_artifact_path(artifact_file: str) -> str:
    """``artifact_file`` normalised (posix), or ValueError if it is not a path under the run's
    artifact root."""
    path = posixpath.normpath(artifact_file)
    if path.startswith(("/", "../")) or path in ("..", ".") or "\\" in path:
        raise ValueError(f"not a relative artifact path: {artifact_file!r}")
    return path
