"""The llama_cpp library itself: importing it (a one-line error naming the extra when it is missing), and where its
log goes."""

from __future__ import annotations

import ctypes
import importlib
import sys
from typing import Any

from powersample.errors import PowerSampleError

INSTALL_HINT = "the llamacpp backend needs llama-cpp-python: pip install llama-cpp-python"
LOG_WARN, LOG_ERROR, LOG_CONT = 3, 4, 5  # ggml_log_level (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 continued


def import_llama_cpp() -> Any:
    """The llama_cpp module, or a one-line PowerSampleError saying how to install it."""
    try:
        import llama_cpp
    except ModuleNotFoundError as e:
        if e.name not in ("llama_cpp", None):
            raise
        raise PowerSampleError(INSTALL_HINT) from None
    return llama_cpp


class _Log:
    """What of llama.cpp's log reaches stderr: the least level shown, and the level a continued message goes on."""

    least = LOG_WARN
    last = 0
    callback: Any = None  # the C callback, kept alive here: llama.cpp holds only its pointer


def route_log(llama_cpp: Any, quiet: bool) -> None:
    """Send llama.cpp's log (process-wide, as llama.cpp keeps it) to stderr from warnings up, or errors only when
    quiet. Our own callback: llama-cpp-python 0.3.36's reads ggml's levels one off, so its warnings (the SWA cache's
    "using full-size SWA cache" on every load of a sliding-window model) print whatever the verbosity, and its
    errors only when verbose."""
    importlib.import_module("llama_cpp._logger")  # importing it sets its callback: done first, so ours stays
    _Log.least = LOG_ERROR if quiet else LOG_WARN
    if _Log.callback is None:
        _Log.callback = llama_cpp.llama_log_callback(_print_log)
        llama_cpp.llama_log_set(_Log.callback, ctypes.c_void_p(0))


def _print_log(level: int, text: bytes, user_data: Any) -> None:
    level = _Log.last if level == LOG_CONT else level
    _Log.last = level
    if level >= _Log.least:
        sys.stderr.write(text.decode("utf-8", errors="replace"))
        sys.stderr.flush()
