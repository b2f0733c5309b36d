"""Training checkpoints: one safetensors file per stage, written atomically, read back exactly.

A checkpoint holds everything a run needs to continue as if it had never stopped: the model, the
optimizer (its moment tensors and its hyperparameters), the learning-rate schedule, the EMA
weights, the step, the random-number generators and the loss curve so far.

Why not ``torch.save`` (what ``accelerate.save_state`` does)? It pickles, and unpickling a file can
run arbitrary code. Here every tensor goes into the safetensors payload and everything else (step
counts, learning rates, betas, the curve) into a JSON document stored in the same file's
metadata header. No pickle is ever written or read.

Why one file? Writing it to a temporary name in the same folder, ``fsync``-ing it and then
``os.replace``-ing it over the old one is atomic on POSIX and Windows: a reader (or a crash) sees
either the old checkpoint or the new one, never half of each. A save interrupted mid-write leaves
the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FORMAT = "sdhelpers-training-checkpoint/1"
"""Written into every checkpoint; a file without it is not one of ours."""

_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint can't be used (corrupt, truncated, another stage or config); the message names the file."""


# --------------------------------------------------------------------------- atomic files


def _write_chunks(handle, data: bytes | memoryview) -> None:
    """Write in 1 MiB pieces (a separate function so tests can interrupt a save half-way)."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        handle.write(view[start : start + _CHUNK])


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; folders can't be opened for syncing on Windows, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that ``path`` is always either the old file or the complete new one.

    The bytes go to a hidden temporary file in the same folder (``os.replace`` is only atomic within
    one file system), are flushed and ``fsync``-ed to disk, then renamed over ``path``. If anything
    fails before the rename, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            _write_chunks(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    """:func:`atomic_write_bytes` for a JSON document (indented, UTF-8, ending in a newline)."""
    return atomic_write_bytes(path, (json.dumps(value, indent=1) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- state <-> (JSON, tensors)


def _encode(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """Replace every tensor by a reference into ``tensors``; keep the rest as JSON.

    Tuples and dicts with integer keys (both occur in optimizer states) are tagged so they come
    back as tuples and integer keys: ``load_state_dict`` then sees exactly what ``state_dict`` gave.
    """
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            if any(k.startswith("__") and k.endswith("__") for k in value):
                raise TypeError(f"state: key names like '__x__' are reserved, found one under {key!r}")
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in value.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {"__intkeys__": {str(k): _encode(v, tensors, f"{key}.{k}") for k, v in value.items()}}
        raise TypeError(f"state: dict keys under {key!r} must be all str or all int")
    raise TypeError(
        f"state: {type(value).__name__} under {key!r} can't be stored without pickle; "
        "use tensors, numbers, strings, lists, tuples and dicts"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if set(value) == {"__intkeys__"}:
            return {int(k): _decode(v, tensors) for k, v in value["__intkeys__"].items()}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def state_to_bytes(state: dict[str, Any]) -> bytes:
    """Serialise a nested state (tensors, numbers, strings, lists, tuples, dicts) to safetensors bytes."""
    from safetensors.torch import save

    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    document = _encode(state, tensors, "state")
    return save(tensors, metadata={"format": FORMAT, "state": json.dumps(document, allow_nan=True)})


def state_from_bytes(data: bytes, name: str = "checkpoint") -> dict[str, Any]:
    """Inverse of :func:`state_to_bytes`; raises :class:`CheckpointError` naming ``name`` if unreadable."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        # The metadata sits in the JSON header after an 8-byte little-endian length.
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + header_size]))
        metadata = header.get("__metadata__") or {}
    except Exception as error:  # safetensors raises its own error types; all mean "not readable"
        raise CheckpointError(f"checkpoint: {name} is corrupt or truncated ({type(error).__name__}: {error})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint: {name} is not an sdhelpers training checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        return _decode(json.loads(metadata["state"]), tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint: {name} has a damaged state document ({error})") from None


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` as one safetensors file (see the module docstring)."""
    return atomic_write_bytes(path, state_to_bytes(state))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by :func:`save_state`; a missing or corrupt file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} does not exist")
    return state_from_bytes(path.read_bytes(), str(path))


# --------------------------------------------------------------------------- random number generators


def rng_state() -> dict[str, Any]:
    """The global generators of Python, NumPy and torch (CPU and every CUDA device)."""
    import random

    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where the devices exist)."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def compare_info(saved: dict[str, Any], expected: dict[str, Any], name: str) -> None:
    """Raise :class:`CheckpointError` naming the file and every differing entry, if ``saved != expected``.

    ``expected`` describes the run being resumed (stage, model config, seed, batch size, schedule
    length...). Resuming under a different one would silently train something else.
    """
    saved, expected = _flatten(saved), _flatten(json.loads(json.dumps(expected)))  # tuples -> lists, like the stored copy
    keys = sorted(set(saved) | set(expected))
    differing = [k for k in keys if saved.get(k, "(missing)") != expected.get(k, "(missing)")]
    if differing:
        details = "; ".join(
            f"{k}: checkpoint has {saved.get(k, '(missing)')!r}, this run has {expected.get(k, '(missing)')!r}"
            for k in differing[:4]
        )
        more = f" (and {len(differing) - 4} more)" if len(differing) > 4 else ""
        raise CheckpointError(
            f"checkpoint: {name} was written by a different run and can't be resumed: {details}{more}. "
            "Use the same settings, or start afresh without --resume."
        )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``, so a mismatch is reported at the exact setting that differs."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def guarded(load: Callable[[], Any], name: str) -> Any:
    """Run ``load`` (e.g. ``model.load_state_dict``) and turn any failure into a :class:`CheckpointError`."""
    try:
        return load()
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"checkpoint: {name} does not fit this model ({type(error).__name__}: {str(error)[:300]})") from None
