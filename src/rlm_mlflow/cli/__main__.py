"""``python -m rlm_mlflow.cli``: the same as the ``rlm-mlflow`` command."""

from __future__ import annotations

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
