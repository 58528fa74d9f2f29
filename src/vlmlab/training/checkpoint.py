"""Atomic, verifiable training checkpoints for exact resume (RELIABILITY.md T1, T2, M1, M3).

Role: the only code that writes or reads a checkpoint directory. A checkpoint is a directory of

- ``<name>.safetensors`` per tensor group (model, optimizer, rng, ...): safetensors only, never pickle (M1);
- ``state.json``: everything else (step, epoch, scheduler scalars, dataloader position, optimizer metadata);
- any extra files a caller adds through ``write_extra`` (resolved config, tokenizer);
- ``manifest.json``, written last: ``{"files": {relative name: {"sha256", "bytes"}}, "complete": true}``.

Protocol (the HF Trainer's temp directory + rename, made crash-proof):

1. remove leftovers ``*.tmp-<pid>`` / ``*.old-<pid>`` of dead processes in the same parent directory;
2. write everything into ``<path>.tmp-<pid>``, fsync every file, write the manifest, fsync the directory;
3. move an existing ``<path>`` aside to ``<path>.old-<pid>`` (POSIX cannot rename onto a non-empty directory),
   ``os.replace`` the temp directory to ``<path>``, fsync the parent, delete the old one.

So a directory under its final name is always complete, a ``kill -9`` at any moment leaves the previous
checkpoints byte-identical, and loading checks every file against the manifest's sha256 so a flipped bit is an
error, never silently wrong weights (M3).

``optimizer_state_to_tensors`` / ``rng_state`` turn an optimizer's ``state_dict()`` and the python/numpy/torch RNG
states into (tensors, JSON metadata) pairs that round-trip exactly through a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from vlmlab.errors import CheckpointError
from vlmlab.io import fsync_dir, write_directory

__all__ = [
    "MANIFEST_NAME",
    "STATE_NAME",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "optimizer_state_from_tensors",
    "optimizer_state_to_tensors",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

MANIFEST_NAME = "manifest.json"
STATE_NAME = "state.json"
TENSOR_SUFFIX = ".safetensors"
MANIFEST_VERSION = 1

# Leftovers of an interrupted save: "<name>.tmp-<pid>" (being written) and "<name>.old-<pid>" (moved aside).
_LEFTOVER_RE = re.compile(r"^(?P<base>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
# Tensor group names become file names: keep them to one safe path component.
_GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HASH_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    state: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically and return ``path``.

    ``tensors[name]`` becomes ``<name>.safetensors`` (tensors are moved to CPU, made contiguous, and cloned where
    they share memory, e.g. tied embeddings, so both keys are kept). ``state`` becomes ``state.json``.
    ``write_extra(tmpdir)`` may add files or subdirectories; they are covered by the manifest too.
    If ``path`` already holds a checkpoint it is replaced; a directory that is not a checkpoint is refused.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    _cleanup_leftovers(parent)  # first: it may move a rolled-back checkpoint back to ``path``

    def write(tmp: Path) -> None:
        for name, group in tensors.items():
            if not _GROUP_NAME_RE.match(name) or name.endswith(".json"):
                raise ValueError(f"tensor group name {name!r} must be a plain file stem ([A-Za-z0-9_.-])")
            safetensors.torch.save_file(
                _prepare_for_safetensors(name, group), str(tmp / f"{name}{TENSOR_SUFFIX}")
            )
        # allow_nan stays on: python floats like inf (best-loss sentinels) must round-trip exactly.
        (tmp / STATE_NAME).write_text(
            json.dumps(state, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        if write_extra is not None:
            write_extra(tmp)
        files = _hash_and_fsync_tree(tmp)
        manifest = {"format_version": MANIFEST_VERSION, "files": files, "complete": True}
        _write_fsynced(tmp / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        fsync_dir(tmp)

    what = f"a vlmlab checkpoint (no {MANIFEST_NAME})"
    return write_directory(path, write, replaceable=_is_replaceable, what=what, synced=True)


def _is_replaceable(path: Path) -> bool:
    """Only overwrite our own checkpoints (or an empty directory), never an arbitrary user directory."""
    if not path.is_dir():
        return False
    return (path / MANIFEST_NAME).exists() or not any(path.iterdir())


def _prepare_for_safetensors(group_name: str, group: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing storage: safetensors refuses shared or strided memory."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, t in group.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"tensors[{group_name!r}][{key!r}] is a {type(t).__name__}, expected a torch.Tensor"
            )
        t = t.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        # A tied weight, a view or a second slice of one buffer: give it its own storage. Conservative (any
        # second tensor on a storage is cloned, overlapping or not) but simple, and both keys are kept.
        if ptr and ptr in seen_storages:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr:
            seen_storages.add(ptr)
        out[key] = t
    return out


def _write_fsynced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _hash_and_fsync_tree(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root`` (except the manifest), fsyncing files and directories.

    safetensors and ``write_extra`` do not fsync what they write, so durability is enforced here, once.
    """
    files: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            full = Path(dirpath) / fname
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST_NAME:
                continue
            if full.is_symlink():
                raise CheckpointError(f"{root}: {rel}: symlinks are not allowed in a checkpoint")
            digest = hashlib.sha256()
            size = 0
            with open(full, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                os.fsync(f.fileno())
            files[rel] = {"sha256": digest.hexdigest(), "bytes": size}
        if Path(dirpath) != root:
            fsync_dir(dirpath)
    return files


def _pid_alive(pid: int) -> bool:
    """Whether another live process may still be writing a leftover (then it is not ours to delete)."""
    if pid == os.getpid():
        return False  # our own leftovers are from a save that already failed
    if os.name != "posix":
        return False  # os.kill(pid, 0) would terminate the process on Windows; assume dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _cleanup_leftovers(parent: Path) -> None:
    """Remove ``*.tmp-<pid>`` / ``*.old-<pid>`` directories left by killed saves in ``parent``.

    A kill between "move old aside" and "rename new into place" leaves ``<name>`` missing and only
    ``<name>.old-<pid>``: that one is moved back, so the previous checkpoint reappears under its name.
    """
    for entry in sorted(parent.iterdir()):
        m = _LEFTOVER_RE.match(entry.name)
        if m is None or not entry.is_dir() or entry.is_symlink() or _pid_alive(int(m["pid"])):
            continue
        target = parent / m["base"]
        if m["kind"] == "old" and not target.exists() and is_complete(entry):
            os.replace(entry, target)
            fsync_dir(parent)
        else:
            shutil.rmtree(entry, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Loading and discovery


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table, or ``CheckpointError`` if the directory is missing, incomplete or malformed."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise CheckpointError(
            f"{path}: {MANIFEST_NAME} missing: incomplete checkpoint (save was interrupted)"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {MANIFEST_NAME}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise CheckpointError(f"{path}: {MANIFEST_NAME}: not marked complete")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: {MANIFEST_NAME}: 'files' must be an object")
    for rel, entry in files.items():
        parts = Path(rel).parts
        # A manifest must not point outside its directory (a crafted checkpoint could otherwise make us read
        # arbitrary files).
        if not rel or Path(rel).is_absolute() or ".." in parts or rel.startswith("/"):
            raise CheckpointError(f"{path}: {MANIFEST_NAME}: bad file name {rel!r}")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise CheckpointError(f"{path}: {MANIFEST_NAME}: bad entry for {rel}")
    return files


def _check_files(path: Path, files: dict[str, dict[str, Any]], verify: bool) -> None:
    for rel, entry in files.items():
        full = path / rel
        if not full.is_file():
            raise CheckpointError(f"{path}: {rel}: file listed in {MANIFEST_NAME} is missing")
        size = full.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{path}: {rel}: size mismatch ({size} bytes, manifest says {entry['bytes']}): "
                "file was truncated or modified"
            )
        if verify:
            digest = hashlib.sha256()
            with open(full, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise CheckpointError(f"{path}: {rel}: checksum mismatch: file was modified or corrupted")


def load_checkpoint(
    path: str | os.PathLike[str], *, verify: bool = True
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Load ``(tensors by file stem, state)`` from a checkpoint directory.

    Every file in the manifest must exist with its recorded size; with ``verify`` (the default) its sha256 is
    checked too. A ``.safetensors`` file not in the manifest is refused as unverified. Any problem raises
    ``CheckpointError`` naming the directory and the file.
    """
    path = Path(path)
    files = _read_manifest(path)
    _check_files(path, files, verify)
    if STATE_NAME not in files:
        raise CheckpointError(f"{path}: {STATE_NAME}: not listed in {MANIFEST_NAME}")

    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for full in sorted(path.glob(f"*{TENSOR_SUFFIX}")):
        rel = full.name
        if rel not in files:
            raise CheckpointError(f"{path}: {rel}: not listed in {MANIFEST_NAME} (unverified file)")
        try:
            tensors[full.name[: -len(TENSOR_SUFFIX)]] = safetensors.torch.load_file(str(full))
        except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError
            raise CheckpointError(f"{path}: {rel}: unreadable safetensors ({type(e).__name__}: {e})") from e
    try:
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {STATE_NAME}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {STATE_NAME}: expected a JSON object, got {type(state).__name__}")
    return tensors, state


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a finished checkpoint: a valid manifest whose files all exist with their sizes.

    Cheap (no hashing); ``load_checkpoint`` does the full sha256 check.
    """
    path = Path(path)
    try:
        _check_files(path, _read_manifest(path), verify=False)
    except (CheckpointError, OSError):
        return False
    return True


def latest_checkpoint(run_dir: str | os.PathLike[str], prefix: str = "step-") -> Path | None:
    """The complete ``run_dir/<prefix><int>`` checkpoint with the largest step, or None.

    Temp (``.tmp-<pid>``), moved-aside (``.old-<pid>``) and incomplete directories never match.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
    steps: list[tuple[int, Path]] = []
    for entry in run_dir.iterdir():
        m = pattern.match(entry.name)
        if m is not None and entry.is_dir():
            steps.append((int(m[1]), entry))
    for _, entry in sorted(steps, key=lambda s: s[0], reverse=True):
        if is_complete(entry):
            return entry
    return None


# ----------------------------------------------------------------------------------------------------------------
# Optimizer (and any state_dict of tensors + JSON scalars) <-> (flat tensors, JSON metadata)

# Markers for what JSON cannot express directly. A real dict whose only key is a marker is escaped via _ITEMS.
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"  # dicts with non-string keys (optimizer state is keyed by int param id)
_MARKERS = frozenset({_TENSOR, _TUPLE, _ITEMS})
_OPTIM_FORMAT = "vlmlab-optimizer-state"


def _encode(obj: Any, key_path: list[str], sink: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``obj``; tensors go into ``sink`` under a dotted key derived from their position."""
    if isinstance(obj, torch.Tensor):
        key = ".".join(key_path)
        n = 1
        while key in sink:  # keys containing "." could collide after joining; keep each one unique
            key = f"{'.'.join(key_path)}#{n}"
            n += 1
        sink[key] = obj.detach()
        return {_TENSOR: key}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, [*key_path, str(i)], sink) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, [*key_path, str(i)], sink) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _MARKERS)
        if plain:
            return {k: _encode(v, [*key_path, k], sink) for k, v in obj.items()}
        return {
            _ITEMS: [
                [_encode(k, [*key_path, "key"], sink), _encode(v, [*key_path, str(k)], sink)]
                for k, v in obj.items()
            ]
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"cannot store {type(obj).__name__} at {'.'.join(key_path)} in a checkpoint (not JSON/tensor)"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (marker, value), *_ = obj.items()
            if marker == _TENSOR:
                if value not in tensors:
                    raise CheckpointError(f"optimizer state: tensor {value!r} missing from the checkpoint")
                return tensors[value]
            if marker == _TUPLE:
                return tuple(_decode(v, tensors) for v in value)
            if marker == _ITEMS:
                return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def optimizer_state_to_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors (``state.{param_id}.{key}``) and JSON metadata.

    Exact: tensor ``step`` counters, tuples (``betas``), int keys, None/bool/float options all round-trip, so
    ``optimizer_state_from_tensors`` returns a dict equal to ``sd``. Works for any state_dict made of tensors and
    JSON scalars (LR schedulers, grad scalers). The tensors alias the live optimizer state: save them before the
    next step.
    """
    sink: dict[str, torch.Tensor] = {}
    encoded = _encode(sd, [], sink)
    return sink, {"format": _OPTIM_FORMAT, "version": 1, "state_dict": encoded}


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``optimizer_state_to_tensors``: the dict to pass to ``optimizer.load_state_dict``."""
    if not isinstance(meta, dict) or meta.get("format") != _OPTIM_FORMAT or "state_dict" not in meta:
        raise CheckpointError(f"optimizer state metadata is not in {_OPTIM_FORMAT!r} format")
    return _decode(meta["state_dict"], tensors)


# ----------------------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Capture python ``random``, numpy's global RNG, torch CPU and (if available) every CUDA device's RNG.

    Large state vectors go into tensors (int64 holds Mersenne Twister's uint32 words exactly); scalars go into
    JSON metadata. Restore with ``set_rng_state``.
    """
    py_version, py_words, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    tensors = {
        "python": torch.tensor(py_words, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch_cpu": torch.get_rng_state(),
    }
    meta: dict[str, Any] = {
        "python": {"version": py_version, "gauss_next": py_gauss},
        "numpy": {
            "name": np_name,
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": np_gauss,
        },
        "cuda_devices": 0,
    }
    if torch.cuda.is_available():
        cuda_states = torch.cuda.get_rng_state_all()
        for i, s in enumerate(cuda_states):
            tensors[f"torch_cuda.{i}"] = s
        meta["cuda_devices"] = len(cuda_states)
    return tensors, meta


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured, so the following draws repeat exactly."""
    try:
        py, nm = meta["python"], meta["numpy"]
        random.setstate((py["version"], tuple(int(x) for x in tensors["python"].tolist()), py["gauss_next"]))
        np.random.set_state(
            (
                nm["name"],
                tensors["numpy"].numpy().astype(np.uint32),
                nm["pos"],
                nm["has_gauss"],
                nm["cached_gaussian"],
            )
        )
        torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
        n_cuda = int(meta.get("cuda_devices", 0))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"rng state is incomplete or malformed ({type(e).__name__}: {e})") from e
    if n_cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available != n_cuda:
            # Resuming on other hardware is legitimate (e.g. debugging on CPU) but cannot be bitwise exact.
            warnings.warn(
                f"checkpoint has RNG state for {n_cuda} CUDA device(s), this machine has {available}: "
                "restoring the overlap only, resume will not be exact",
                stacklevel=2,
            )
        for i in range(min(n_cuda, available)):
            key = f"torch_cuda.{i}"
            if key not in tensors:
                raise CheckpointError(f"rng state: {key} missing although cuda_devices={n_cuda}")
            torch.cuda.set_rng_state(tensors[key].to(torch.uint8), device=i)
