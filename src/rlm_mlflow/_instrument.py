"""What ``rlm-mlflow instrument`` can tell from a command before it runs it: whether the
command's Python will skip the ``sitecustomize`` that instrument puts on PYTHONPATH.

``-I`` and ``-E`` make Python ignore PYTHONPATH, ``-S`` skips the site module that imports
any ``sitecustomize``: under them nothing can be forwarded, and the user should hear so
rather than find an empty experiment. Read from the command's own argv (a Python
interpreter and its options) or, for a script run by name, from its shebang line.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence

#: Interpreter flags under which our sitecustomize never runs, and why.
BLIND_FLAGS = {
    "I": "-I (isolated mode) ignores PYTHONPATH",
    "E": "-E ignores PYTHONPATH",
    "S": "-S skips the site module, which imports sitecustomize",
}
_PYTHON = re.compile(r"(python|pypy)[0-9.]*(\.exe)?")
_TAKE_ARGUMENT = frozenset("WX")  # the rest of the word, or the next word, is theirs
_END_OPTIONS = frozenset("cm")  # take an argument, and end the interpreter's options
_LONG_WITH_ARGUMENT = frozenset({"--check-hash-based-pycs"})
_SHEBANG_BYTES = 1024


def blind_flags(command: Sequence[str], path: str | None = None) -> list[str]:
    """The flags (``I``, ``E``, ``S``) under which ``command``'s Python skips our
    sitecustomize, in the order they come; empty when it runs, or when ``command`` is not
    Python (as far as argv and a shebang line tell). ``path``: the PATH that finds it."""
    if not command:
        return []
    if is_python(command[0]):
        return _flags(command[1:])
    interpreter = _shebang(shutil.which(command[0], path=path))
    if interpreter and is_python(interpreter[0]):
        return _flags(interpreter[1:])
    return []


def is_python(program: str) -> bool:
    return _PYTHON.fullmatch(os.path.basename(program)) is not None


def _flags(arguments: Sequence[str]) -> list[str]:
    """The blind flags among a Python interpreter's options (those before its script,
    ``-c`` or ``-m``), combined short flags (``-IS``) too."""
    found: list[str] = []
    words = iter(arguments)
    for word in words:
        if word == "--" or not word.startswith("-") or word == "-":
            break  # the script (or stdin): what follows is the script's
        if word.startswith("--"):
            if word in _LONG_WITH_ARGUMENT:
                next(words, None)
            continue
        for i, flag in enumerate(word[1:], start=1):
            if flag in BLIND_FLAGS and flag not in found:
                found.append(flag)
            if flag in _END_OPTIONS:
                return found
            if flag in _TAKE_ARGUMENT:
                if i == len(word) - 1:
                    next(words, None)
                break
    return found


def _shebang(file: str | None) -> list[str] | None:
    """A script's ``#!`` line as argv (the interpreter first; through ``/usr/bin/env``, the
    program env runs), or None for anything else, including what cannot be read."""
    if file is None:
        return None
    try:
        with open(file, "rb") as script:
            head = script.read(_SHEBANG_BYTES)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
    if words and os.path.basename(words[0]) == "env":
        words = words[1:]
        while words and (words[0].startswith("-") or "=" in words[0]):
            words = words[1:]  # env's own options (-S, -i, ...) and VAR=value
    return words or None


def warning(flags: Sequence[str]) -> str:
    """The one line ``instrument`` says for them."""
    why = "; ".join(BLIND_FLAGS[flag] for flag in flags)
    drop = "/".join(f"-{flag}" for flag in flags)
    return (
        f"rlm-mlflow instrument: cannot instrument this command, its Python runs with {why}, "
        f"so nothing is forwarded (drop {drop}, or call rlm_mlflow.autolog() in the script)"
    )
