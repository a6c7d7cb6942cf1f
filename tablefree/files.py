"""What the commands write, and the rules that keep them from losing anyone's work (docs/safety.md).

- Every file is written atomically: to a temporary sibling, fsynced, then renamed over the target,
  so a kill at any moment leaves the old file or the new one, never half of one.
- Temporaries are named `.NAME.tablefree-tmp-PID-HEX`; the next run removes those whose process
  is gone, and nothing else.
- An output directory carries a marker (`.tablefree-output.json`) naming the kind of output and the
  files the command wrote there. A command refuses a non-empty directory that is not its own
  resumable output unless given --force; even then it never removes or overwrites a file it did not
  write, and never writes into, over or above its own inputs.
- JSON is strict: non-finite floats are written as null, never as NaN or Infinity.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import TableFreeError

MARKER = ".tablefree-output.json"
_TEMPORARY = re.compile(r"^\..*\.tablefree-tmp-(\d+)-[0-9a-f]+$")


def temporary_name(target: Path) -> Path:
    """A fresh temporary sibling of `target`, recognisable (and removable once its process is gone) by its name."""
    return target.with_name(f".{target.name}.tablefree-tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write `target` through; on success it is fsynced and renamed over `target`."""
    target = Path(target)
    tmp = temporary_name(target)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_atomic(target: str | Path, data: bytes) -> None:
    target = Path(target)
    try:
        with atomic_path(target) as tmp:
            # os.open applies the umask, so the file gets the usual permissions (mkstemp's would be 0600).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
    except OSError as exc:
        raise TableFreeError(f"could not write {target}: {exc.strerror or exc}") from None


def strict(value):
    """`value` with every non-finite float replaced by None, so it serialises as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def json_text(payload, indent: int | None = 2) -> str:
    # ASCII escapes keep any string (a lone surrogate from an undecodable file name included) writable.
    return json.dumps(strict(payload), indent=indent, allow_nan=False, ensure_ascii=True)


def write_json(target: str | Path, payload) -> None:
    write_atomic(target, (json_text(payload) + "\n").encode("utf-8"))


def read_json(path: str | Path, what: str = "file"):
    """Parse a JSON file this project wrote; a missing, unreadable or damaged one is a clear error."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise TableFreeError(f"the {what} {path} is missing") from None
    except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise TableFreeError(f"the {what} {path} cannot be read ({exc}); it is damaged: restore it or start a new directory") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the temporaries an interrupted write left in `directory` (only ours, only of dead processes)."""
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _TEMPORARY.match(entry.name)
        if not match or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def read_marker(directory: Path) -> dict | None:
    """The marker of an output directory, or None when there is none (or it is not one of ours)."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def write_marker(directory: Path, kind: str, files: Iterable[str] | None = None, extra: dict | None = None) -> None:
    marker = {"kind": kind, "format": 1}
    if files is not None:
        marker["files"] = sorted(files)
    write_json(directory / MARKER, {**marker, **(extra or {})})


def check_inputs(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, contains, or lies inside one of the inputs (symlinks followed)."""
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source or target in source.parents:
            raise TableFreeError(f"the output {out} would be written over or around the input {given}; choose an output outside it")
        if source in target.parents:
            raise TableFreeError(f"the output {out} lies inside the input {given}; choose an output outside it")


def claim_output_dir(out: str | Path, kind: str, *, resumable: bool, force: bool = False,
                     inputs: Iterable[str | Path | None] = (), writes: Iterable[str] = ()) -> Path:
    """Check that `out` may receive an output of `kind`, or refuse with a message naming it and --force.

    A missing or empty directory is fine. One with this kind's marker is fine when the output is
    `resumable` (the command continues its own work). Anything else needs `force`, and even then a
    name in `writes` that already exists and was not written by tablefree is refused, never replaced.
    A resumable output's directory is created and marked here; a finished one (a model, a tokenizer)
    is moved into place whole by `install_directory`.
    """
    out = Path(out)
    check_inputs(out, inputs)
    if out.exists() and not out.is_dir():
        raise TableFreeError(f"the output {out} is a file, not a directory; choose another path")
    marker = None
    if out.is_dir():
        clean_stale_temporaries(out)
        marker = read_marker(out)
        own = marker is not None and marker["kind"] == kind
        if own and resumable:
            return out
        if any(e.name != MARKER for e in out.iterdir()):
            if not force:
                what = f"it holds an earlier tablefree {marker['kind']} output" if marker else "it was not made by tablefree"
                raise TableFreeError(
                    f"the output directory {out} exists and is not empty ({what}); choose another directory, or pass "
                    f"--force to write into it (files tablefree did not write are never removed or overwritten)"
                )
            ours = set(marker.get("files") or []) if own else set()
            clash = sorted(n for n in writes if (out / n).exists() and n not in ours)
            if clash:
                raise TableFreeError(
                    f"{out / clash[0]} already exists and was not written by tablefree; move it away first "
                    f"(--force never overwrites files tablefree did not write)"
                )
            if own:
                return out
    if not resumable:
        if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
            raise TableFreeError(f"the output directory {out} is not writable")
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TableFreeError(f"cannot create the output directory {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise TableFreeError(f"the output directory {out} is not writable")
    write_marker(out, kind)
    return out


def install_directory(source: Path, out: Path, kind: str, extra: dict | None = None) -> Path:
    """Move the finished directory `source` into place as `out`, replacing only what tablefree wrote there.

    A missing or empty `out` is replaced in one rename. Otherwise each file moves over its namesake
    if tablefree wrote that namesake (the marker lists it); files of an earlier write that the new
    one lacks are removed; any other file is left alone, and a clash with one is refused before
    anything moves. `extra` is recorded in the marker (a model's weight checksums).
    """
    out = Path(out)
    names = sorted(p.name for p in source.iterdir() if p.name != MARKER)
    normal_permissions(source)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        write_marker(source, kind, names, extra)
        os.replace(source, out)
        return out
    if not out.is_dir():
        raise TableFreeError(f"the output {out} is a file, not a directory; choose another path")
    marker = read_marker(out)
    ours = set(marker.get("files") or []) if marker is not None and marker["kind"] == kind else set()
    clash = [n for n in names if (out / n).exists() and n not in ours]
    if clash:
        raise TableFreeError(f"{out / clash[0]} already exists and was not written by tablefree; move it away first")
    write_marker(out, kind, ours | set(names))  # first, so a kill mid-move leaves every moved file known as ours
    for name in names:
        os.replace(source / name, out / name)
    for name in sorted(ours - set(names)):
        stale = out / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.exists() or stale.is_symlink():
            stale.unlink()
    write_marker(out, kind, names, extra)
    shutil.rmtree(source, ignore_errors=True)
    return out


def normal_permissions(directory: Path) -> None:
    """Give every file in `directory` the permissions the umask allows (some writers create files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


class Stage:
    """A directory being built for `install_directory`: write into `path`; `extra` goes into the marker."""

    def __init__(self, path: Path):
        self.path = path
        self.extra: dict = {}


@contextlib.contextmanager
def staged_directory(out: Path, kind: str) -> Iterator[Stage]:
    """Build `out` beside itself: on success it moves into place (install_directory), on any failure it is removed."""
    stage = Stage(new_temporary_dir(out))
    try:
        yield stage
        install_directory(stage.path, out, kind, stage.extra or None)
    finally:
        shutil.rmtree(stage.path, ignore_errors=True)  # already gone after a move in one rename


def new_temporary_dir(out: Path) -> Path:
    """An empty temporary directory beside `out` (normal permissions: the umask applies, as for save_pretrained)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out.parent)
    tmp = temporary_name(out)
    tmp.mkdir(0o777)
    return tmp
