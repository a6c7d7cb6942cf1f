"""What the commands write, and the rules that keep them from losing anyone's work (docs/safety.md).

- Every file is written atomically: to a temporary sibling, fsynced, then renamed over the target,
  so a kill at any moment leaves the old file or the new one, never half of one.
- Temporaries are named `.NAME.tablefree-tmp-PID-HEX`; the next run removes those whose process
  is gone, and nothing else.
- An output directory carries a marker (`.tablefree-output.json`) naming the kind of output and the
  files the command wrote there. A command refuses a non-empty directory that is not its own
  resumable output unless given --force; even then it never removes or overwrites a file it did not
  write, and never writes into, over or above its own inputs.
- One command at a time writes a directory: each holds `output_lock(OUT)` for its whole run, a flock on
  `.NAME.tablefree-lock` beside OUT that the kernel releases when the process ends (a kill -9 included).
- Nothing is written through a symlink inside an output directory: a symlink where a command would
  write is refused, whatever the flags (OUT itself may be one, for a resumable output).
- JSON is strict: non-finite floats are written as null, never as NaN or Infinity.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import TableFreeError, WriteError, summary

MARKER = ".tablefree-output.json"
LOCK_SUFFIX = ".tablefree-lock"
_TEMPORARY = re.compile(r"^\..*\.tablefree-tmp-(\d+)-[0-9a-f]+$")
_LOCK = re.compile(rf"^\..*{re.escape(LOCK_SUFFIX)}$")
_LIBRARY_IO_ERROR = re.compile(r"\(os error \d+\)$")  # how safetensors and tokenizers (Rust) report one


def refused_write(exc: BaseException) -> bool:
    """Whether `exc` is the file system refusing a write: an OSError, or safetensors' or tokenizers' report of one."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, Exception) and not isinstance(exc, TableFreeError) and bool(_LIBRARY_IO_ERROR.search(str(exc)))


def write_error(what: str, exc: BaseException, kept: str = "") -> WriteError:
    """The one-line error for a write the environment refused; a full disk is named as such."""
    # safetensors' and tokenizers' own errors carry no errno, only the operating system's message with its number
    full = getattr(exc, "errno", None) == errno.ENOSPC or f"(os error {errno.ENOSPC})" in str(exc)
    reason = "the disk is full" if full else (getattr(exc, "strerror", None) or summary(exc))
    return WriteError(f"could not write {what}: {reason}{kept}")


def refuse_symlink(path: Path) -> Path:
    """`path`, unless it is a symbolic link: writing there would change whatever it points to."""
    if path.is_symlink():
        raise TableFreeError(f"{path} is a symbolic link; tablefree never writes through one (it could overwrite what "
                             f"it points to): move it away, or choose another output directory")
    return path


def lock_path(out: str | Path) -> Path:
    """Where the lock of the output directory `out` lives: beside it, so that it also covers creating it."""
    real = Path(out).resolve()  # every name of one directory (a symlink, `.`) shares its lock
    return real.parent / f".{real.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(out: str | Path, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Hold the output directory `out` for one command's whole run; while another holds it, refuse at once.

    The lock is a flock, which the kernel releases when its process ends however it ends, so a kill
    never leaves a directory locked. The file names the holder (pid and command line) for the refusal,
    and is removed when the lock is given back (one left by a kill is removed by the next run there).
    `inputs` are checked first (check_inputs), so not even the lock is written inside one.
    """
    out = Path(out)
    check_inputs(out, inputs)
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = _take_lock(path, out)
    except OSError as exc:
        raise write_error(f"the lock {path} of the output directory {out}", exc) from None
    try:
        yield out
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while holding it, so nobody holds a removed file: see _take_lock
        os.close(handle)


def _take_lock(path: Path, out: Path) -> int:
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            os.close(handle)
            raise TableFreeError(f"the output directory {out} is in use by another tablefree command ({holder}); wait "
                                 f"until it ends, or choose another directory") from None
        except BaseException:
            os.close(handle)
            raise
        if _still_at(handle, path):
            break
        os.close(handle)  # its holder removed it as it ended: lock the file now at `path`
    try:
        holder = {"pid": os.getpid(), "command": shlex.join(getattr(sys, "orig_argv", sys.argv))}
        os.ftruncate(handle, 0)
        os.pwrite(handle, json_text(holder, indent=None).encode("ascii"), 0)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(handle)
        raise
    return handle


def _still_at(handle: int, path: Path) -> bool:
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(handle)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _lock_holder(handle: int) -> str:
    """'pid N: COMMAND LINE' of the process holding a lock, read from its file."""
    for _ in range(100):  # its holder writes it just after taking the lock
        try:
            holder = json.loads(os.pread(handle, 1 << 16, 0))
            return f"pid {int(holder['pid'])}: {holder['command']}"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.01)
    return "a process that has not said which yet"


def _remove_stale_lock(path: Path) -> bool:
    """Remove a lock file that no process holds (a killed holder's); True when removed."""
    try:
        handle = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _still_at(handle, path):
            return False
        path.unlink()
        return True
    except OSError:  # held (BlockingIOError), or not ours to remove
        return False
    finally:
        os.close(handle)


def temporary_name(target: Path) -> Path:
    """A fresh temporary sibling of `target`, recognisable (and removable once its process is gone) by its name."""
    return target.with_name(f".{target.name}.tablefree-tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write `target` through; on success it is fsynced and renamed over `target`."""
    target = refuse_symlink(Path(target))
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
        raise write_error(str(target), exc) from None


def append_text(target: Path, text: str) -> None:
    """Append `text` to `target` (created if missing) in one write, never through a symlink."""
    try:
        handle = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            refuse_symlink(target)
        raise write_error(str(target), exc) from None
    try:
        with os.fdopen(handle, "a", encoding="utf-8") as stream:
            stream.write(text)
    except OSError as exc:
        raise write_error(str(target), exc) from None


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
    """Remove the temporaries and locks an interrupted run left in `directory` (only ours, only of dead processes)."""
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if _LOCK.match(entry.name) and _remove_stale_lock(entry):
            removed.append(entry)
            continue
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

    The caller holds `output_lock(out)`. A symlink at the marker or at a name in `writes` (a path
    below `out`) is refused whatever the flags, and so is a symlink `out` for a finished output.
    A missing or empty directory is fine. One with this kind's marker is fine when the output is
    `resumable` (the command continues its own work). Anything else needs `force`, and even then a
    name in `writes` that already exists and was not written by tablefree is refused, never replaced.
    A resumable output's directory is created and marked here; a finished one (a model, a tokenizer)
    is moved into place whole by `install_directory`.
    """
    out = Path(out)
    check_inputs(out, inputs)
    if not resumable:  # a finished output moves in whole (install_directory), never through a symlink
        refuse_symlink(out)
    if out.exists() and not out.is_dir():
        raise TableFreeError(f"the output {out} is a file, not a directory; choose another path")
    marker = None
    if out.is_dir():
        for name in (MARKER, *writes):
            for depth in range(1, len(Path(name).parts) + 1):
                refuse_symlink(out.joinpath(*Path(name).parts[:depth]))
        clean_stale_temporaries(out)
        marker = read_marker(out)
        own = marker is not None and marker["kind"] == kind
        if own and resumable:
            return out
        if any(e.name != MARKER and not _LOCK.match(e.name) for e in out.iterdir()):
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
    out = refuse_symlink(Path(out))
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
    for name in (MARKER, *names):
        refuse_symlink(out / name)
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
    """Build `out` beside itself: on success it moves into place (install_directory), on any failure it is removed.

    A write the file system refuses (a full disk), by whichever library, is a WriteError naming `out`.
    """
    stage = None
    try:
        stage = Stage(new_temporary_dir(out))
        yield stage
        install_directory(stage.path, out, kind, stage.extra or None)
    except Exception as exc:
        if refused_write(exc):
            raise write_error(str(out), exc) from None
        raise
    finally:
        if stage is not None:
            shutil.rmtree(stage.path, ignore_errors=True)  # already gone after a move in one rename


def new_temporary_dir(out: Path) -> Path:
    """An empty temporary directory beside `out` (normal permissions: the umask applies, as for save_pretrained)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out.parent)
    tmp = temporary_name(out)
    tmp.mkdir(0o777)
    return tmp
