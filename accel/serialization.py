"""One allow-listed loader for every versioned JSON object the plugin writes: configs, schedules, policies
and plans.

Every such object serialises to ``{"type": "accel....", "version": N, ...}``. A class joins the allow-list
with :func:`json_type`; :func:`from_dict` and :func:`load` dispatch on ``type`` over that list only (never
``pickle``, never ``eval``), check the version, and can insist on the kind expected::

    schedule = accel.serialization.load("fora2.json", expected=Schedule)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_TYPES: dict[str, tuple[type, frozenset[int], Callable[[dict], Any]]] = {}


def json_type(type_name: str, versions: int | Iterable[int] = 1) -> Callable[[type[T]], type[T]]:
    """Class decorator: put ``cls`` on the allow-list as ``type_name``, read by ``cls.from_dict`` for the
    given versions."""
    allowed = frozenset([versions] if isinstance(versions, int) else versions)

    def decorator(cls: type[T]) -> type[T]:
        _TYPES[type_name] = (cls, allowed, cls.from_dict)
        return cls

    return decorator


def registered_types() -> dict[str, type]:
    """``{type name: class}`` of the allow-list."""
    return {name: cls for name, (cls, _, _) in _TYPES.items()}


def from_dict(
    data: Any, expected: type | tuple[type, ...] | None = None, source: str = "object", **options: Any
) -> Any:
    """The object ``data`` describes, through the allow-list.

    Args:
        data: a JSON object with ``type`` and ``version``.
        expected: the class (or classes) the caller accepts; another allowed type is refused too.
        source: what ``data`` came from, for the error message (e.g. a file path).
        **options: passed on to the class's ``from_dict`` (e.g. a plan's ``sidecar`` tensors).

    Raises:
        ValueError: not a JSON object, an unknown type, an unsupported version, an unexpected kind, or the
            class's own validation failed; the message names ``source``.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object with 'type' and 'version', got {type(data).__name__}")
    name = data.get("type")
    accepted = {n for n, (cls, _, _) in _TYPES.items() if expected is None or _is(cls, expected)}
    if name not in _TYPES or name not in accepted:
        raise ValueError(f"{source}: type {name!r} is not one of {sorted(accepted)}")
    cls, versions, loader = _TYPES[name]
    if data.get("version") not in versions:
        raise ValueError(
            f"{source}: {name} version {data.get('version')!r} is not supported; this build reads "
            f"{', '.join(map(str, sorted(versions)))}"
        )
    try:
        return loader(data, **options)
    except (TypeError, KeyError) as error:
        raise ValueError(f"{source}: bad {name}: {error}") from None


def _is(cls: type, expected: type | tuple[type, ...]) -> bool:
    return issubclass(cls, expected)


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; ``ValueError`` naming the file if it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def load(path: str | Path, expected: type | tuple[type, ...] | None = None, **options: Any) -> Any:
    """Read a JSON file through :func:`from_dict`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not JSON, or :func:`from_dict` refuses it; the message names the path.
    """
    return from_dict(read_json(path), expected, source=str(path), **options)


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary)`` on a temporary file of this process beside ``path``, then rename it over
    ``path`` (``os.replace``, atomic on one file system): an interruption at any point leaves the old file or the
    new one, never half of one, and concurrent writers never share a temporary file (each gets its own name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json(data: Any, path: str | Path, **options: Any) -> Path:
    """Write ``data`` as indented JSON atomically (see :func:`write_atomically`); ``options`` go to
    ``json.dumps`` (e.g. ``allow_nan=False``, ``default=...``)."""
    text = json.dumps(data, indent=1, **options) + "\n"
    return write_atomically(path, lambda temporary: temporary.write_text(text))


class FolderInUse(ValueError):
    """Another process holds the output folder's lock (:func:`lock_folder`)."""


@contextmanager
def lock_folder(folder: str | Path, command: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``fcntl.flock`` on ``folder/.accel.lock``, released when the process
    ends, even by ``kill -9``) while the block runs, so two runs never write one output folder at once.

    Raises:
        FolderInUse: another process holds it; the message names the folder and the holder.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not guarded against each other
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".accel.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderInUse(f"{folder} is in use by {holder}; wait for it to finish or pass another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{command} (pid {os.getpid()})")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
