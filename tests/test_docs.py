"""The configuration page lists every setting with its variable and default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rlm_mlflow import Settings
from rlm_mlflow._settings import env_name

DOC = Path(__file__).parents[1] / "docs" / "configuration.md"


def test_every_setting_is_documented_with_its_env_var_and_default() -> None:
    rows = {
        line.split("|")[1].strip(): line
        for line in DOC.read_text().splitlines()
        if line.startswith("| `")
    }
    for f in dataclasses.fields(Settings):
        row = rows.get(f"`{f.name}`")
        assert row is not None, f"{f.name} missing from {DOC.name}"
        assert f"`{env_name(f.name)}`" in row
        assert f"`{f.default}`" in row or (f.default == "" and "`` (" in row)
