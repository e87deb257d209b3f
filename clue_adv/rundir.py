"""Run directories: the database that sweeps and reports read.

    <output_dir>/<experiment>[+key=value...]/<task>/<strategy-tag>/seed-<k>/   (+key=value: a --set or grid variant)
        config.yaml     the fully resolved config (the run's identity)
        metrics.jsonl   one JSON object per line: training logs and evaluations, appended and flushed
        summary.json    status (running | completed | failed | interrupted) and the results
        checkpoint/     an unfinished run's last epoch, to resume from (checkpoint.every_epoch; see checkpoint.py)
        tensorboard/, wandb/, trackers.json   the experiment trackers' files (logging.trackers; see trackers.py)

Every whole-file write goes through a temp file + rename, so a kill at any moment leaves either the
old file or the new one. JSONL lines are written with one write() each and readers skip a trailing
partial line, so a line is whole or absent.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from clue_adv.config import INPUT_PATH_FIELDS, RunConfig, dump_config, parse_config, same_place
from clue_adv.errors import ClueAdvError, ConfigError

STATUSES = ("running", "completed", "failed", "interrupted")
LOCK_NAME = ".lock"
# In <output>/<experiment>/: every cell the sweeps planned there, each sweep file's latest plan (sweep writes it,
# report reads it).
SWEEP_MANIFEST = "sweep.json"


def manifest_invocations(data: Any) -> list[dict[str, Any]]:
    """The sweep commands a parsed sweep manifest recorded (`invocations`), oldest first; a manifest from before
    they were recorded gives its sweep file alone (command None), so that a history carried forward keeps it."""
    if not isinstance(data, dict):
        return []
    found = data.get("invocations")
    if isinstance(found, list):
        return [i for i in found if isinstance(i, dict)]
    return [{"sweep": data.get("sweep"), "command": None, "at": data.get("written_at")}] if data.get("sweep") else []


# Fields that say where and how a run is written, not what it computes: not part of its identity.
_NOT_IDENTITY = {"output_dir", "checkpoint", "logging"}
# Paths that are part of a run's identity (data.path is not): compared by the place they name.
_LOCAL_PATHS = [tuple(f.split(".")) for f in INPUT_PATH_FIELDS if f != "data.path"]
# <run>/checkpoint/: a resumable state of an unfinished run (see clue_adv/checkpoint.py)
CHECKPOINT_DIR = "checkpoint"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the permissions an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_directory(final: Path, fill: Callable[[Path], None]) -> None:
    """Replace the directory `final` by one that `fill(tmp)` writes beside it, swapped in by renames: a kill at any
    moment leaves the old directory or the new one whole (at worst under `.<name>.old`, which the next call clears).
    Planted symlinks at the temporary names are removed, never written through."""
    tmp, old = final.parent / f".{final.name}.tmp", final.parent / f".{final.name}.old"
    for stale in (tmp, old):
        if stale.is_symlink():  # rmtree refuses a link silently
            stale.unlink()
        shutil.rmtree(stale, ignore_errors=True)
    fill(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/Infinity; a non-finite metric (e.g. a diverged loss) is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Whole lines only: a line cut short by a kill (no trailing newline, or bad JSON) is skipped."""
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX; elsewhere 0 (no such flag)


def open_in_run_dir(path: Path, mode: str = "a") -> Any:
    """Open a run's log for writing ('a' append or 'w' truncate) without following a symlink at `path`: a link
    planted in a run directory must not make the run write to its target (outside the output folder)."""
    flags = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ClueAdvError(f"{path} is a symbolic link; a run writes only regular files in its folder") from None
        raise
    return os.fdopen(fd, mode, encoding="utf-8")


class JsonlWriter:
    def __init__(self, path: Path) -> None:
        self._file = open_in_run_dir(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_json_safe(record), ensure_ascii=False) + "\n")
        self._file.flush()

    def size(self) -> int:
        """Bytes in the file: every line written so far, whole (a resumed run cuts the file back to this)."""
        self._file.flush()
        return os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        self._file.close()


def run_dir(cfg: RunConfig, output_dir: str | Path | None = None) -> Path:
    root = Path(output_dir if output_dir is not None else cfg.output_dir).expanduser()
    return root / cfg.experiment / cfg.task / cfg.strategy.directory_tag() / f"seed-{cfg.seed}"


def output_root(directory: Path) -> Path:
    """The output directory a run directory made by `run_dir` sits in (<root>/<experiment>/<task>/<tag>/seed-<k>:
    each level one plain name)."""
    return directory.parents[3]


def summary_header(cfg: RunConfig, directory: Path, status: str) -> dict[str, Any]:
    """The fields every summary.json starts with: its status, then which run it is (the report groups by these)."""
    return {
        "status": status,
        "experiment": cfg.experiment,
        "task": cfg.task,
        "strategy": cfg.strategy.name,
        "strategy_tag": directory.parent.name,
        "seed": cfg.seed,
    }


def utc_now() -> str:
    """A timestamp for run files (started_at, finished_at): UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes two configs the same run: all but where it is written, checkpoints, trackers and the folder the
    data is read from (the same CLUE files elsewhere, as README's `--set data.path=...` runs them). A local model
    (or tokenizer, or text file) counts by the directory it names, not by its spelling: `clue_adv/assets/tokenizer`
    from the repository root and its absolute path are the same (a relative one is read from the current
    directory, as when the run was made from it)."""
    out = {k: v for k, v in config.items() if k not in _NOT_IDENTITY}
    if isinstance(out.get("data"), dict):
        out["data"] = {k: v for k, v in out["data"].items() if k != "path"}
    for block, key in _LOCAL_PATHS:
        fields = out.get(block)
        if isinstance(fields, dict) and isinstance(fields.get(key), str):
            out[block] = {**fields, key: same_place(fields[key])}
    return out


def stored_identity(stored: dict[str, Any], parse: Callable[[dict[str, Any]], Any] = parse_config) -> dict[str, Any]:
    """A stored config.yaml's identity as the current schema (`parse`) reads it: a field added since (at its default)
    is filled in, so a run made before an upgrade still matches its unchanged config and is resumed."""
    try:
        return identity(parse(stored).resolved())
    except ClueAdvError:  # a field since removed or renamed: compared as written (and so it differs)
        return identity(stored)


def differing_fields(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dicts (`model.compile`, not `model`)."""
    out: list[str] = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differing_fields(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def read_summary(directory: Path) -> dict[str, Any] | None:
    path = directory / "summary.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or not UTF-8
        return None
    return data if isinstance(data, dict) else None  # a damaged or hand-edited file is no summary


def read_config(directory: Path) -> dict[str, Any] | None:
    path = directory / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError):  # ValueError: not UTF-8
        return None
    return data if isinstance(data, dict) else None


def never_trained(directory: Path) -> bool:
    """Whether `directory` holds only the trace of an attempt that ended before its first training step (a setup
    failure: a missing file, an unreachable hub): no step logged, no evaluation, no checkpoint, nobody holding its
    lock. Such a folder holds no result, so a changed config may take it over."""
    summary = read_summary(directory)
    if summary is None or summary.get("status") not in ("failed", "interrupted"):
        return False
    if (directory / CHECKPOINT_DIR).exists() or run_lock_held(directory):
        return False
    return not any(r.get("type") in ("train", "eval") for r in read_jsonl(directory / "metrics.jsonl"))


def existing_state(
    cfg: RunConfig,
    directory: Path,
    parse: Callable[[dict[str, Any]], Any] = parse_config,
    *,
    force: bool = False,
) -> str:
    """What is already in `directory` for this config: 'absent', 'completed', or 'incomplete'.
    A directory holding a *different* config is an error, never silently overwritten, unless that run never trained
    (see never_trained: 'absent', it is started over) or `force` (the user asked to rerun: 'absent', with a warning
    naming what is replaced). `cfg` may be any config with `resolved()` (e.g. a pretrain config) whose stored form
    `parse` reads."""
    _check_can_be_a_directory(directory)  # before training setup, not after minutes of loading
    stored = read_config(directory)
    if stored is None:
        return "absent"
    ours = identity(cfg.resolved())
    theirs = stored_identity(stored, parse)
    if theirs != ours:
        changed = differing_fields(theirs, ours)
        if never_trained(directory):
            return "absent"
        if force:
            print(
                f"warning: --force replaces the run in {directory}, which has a different config "
                f"(differs in: {', '.join(changed)})",
                file=sys.stderr,
            )
            return "absent"
        raise ConfigError(
            f"{directory} holds a run with a different config (differs in: {', '.join(changed)}); "
            "choose another experiment name or output directory, delete that run, or rerun with --force to "
            "replace it"
        )
    summary = read_summary(directory)
    return "completed" if summary and summary.get("status") == "completed" else "incomplete"


def check_writable(directory: Path) -> None:
    """Fail now, not after minutes of setup, when the run directory could not be created or written: create and
    at once remove a probe folder in the nearest existing folder of its path (where the first missing folder
    would be made). Nothing is left behind, and nothing is created before setup has succeeded."""
    _check_can_be_a_directory(directory)
    try:
        existing = next(p for p in (directory, *directory.parents) if p.is_dir())
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".clue-adv-write-probe-"))
    except OSError as e:
        raise ClueAdvError(f"cannot write to output folder {directory}: {e.strerror or e}") from None


def first_non_directory(directory: Path) -> Path | None:
    """The nearest existing one of `directory` and the folders above it, when it is not a directory (a file, a
    broken link): mkdir there would fail with a bare NotADirectoryError / FileExistsError. None otherwise."""
    for path in (directory, *directory.parents):
        if path.exists() or path.is_symlink():
            return None if path.is_dir() else path
    return None


def _check_can_be_a_directory(directory: Path) -> None:
    """Raise if `directory` or a folder above it exists but is a file (e.g. `-o` names a file)."""
    if (path := first_non_directory(directory)) is not None:
        raise ClueAdvError(f"output folder {directory}: {path} exists and is not a directory")


# Locks this process holds, by resolved run directory. flock belongs to an open file description, so a second
# open() of the same .lock in this process would conflict with the first: a rerun here (--force, an in-process
# sweep) must reuse the held one.
_held_locks: dict[Path, int] = {}


def acquire_run_lock(directory: Path) -> None:
    """Take an exclusive, non-blocking flock on `<directory>/.lock`, held until `release_run_lock` or until this
    process exits (the kernel drops it on exit, even on SIGKILL, so a stale lock cannot outlive its holder).
    A second guard besides PR_SET_PDEATHSIG: an orphaned or hand-started worker on the same run dir is refused."""
    key = Path(directory).resolve()
    if key in _held_locks:
        return
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the pdeath signal is then the only guard
        return
    try:
        fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as e:
        raise ClueAdvError(f"cannot open the run lock {key / LOCK_NAME}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ClueAdvError(
                f"run folder {key} is in use: another process holds its lock ({key / LOCK_NAME}) and is "
                "training into it; wait for it to finish or stop it"
            ) from None
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a filesystem without flock (some NFS)
            print(f"warning: cannot lock {key}: {e.strerror or e}; not guarded against a second run", file=sys.stderr)
            return
        raise ClueAdvError(f"cannot lock run folder {key}: {e.strerror or e}") from None
    _held_locks[key] = fd


def release_run_lock(directory: Path) -> None:
    """Drop the lock `acquire_run_lock` took on `directory` (no-op when this process holds none)."""
    fd = _held_locks.pop(Path(directory).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def run_lock_held(directory: Path) -> bool:
    """Whether some process (this one included) holds `directory`'s run lock: a 'running' summary whose lock is
    free was left by a process that died."""
    key = Path(directory).resolve()
    if key in _held_locks:
        return True
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(key / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def start_run(cfg: RunConfig, directory: Path) -> None:
    """Make the directory a fresh run: config.yaml, empty metrics, summary status 'running'. Takes the run lock
    first, so nothing of a run another process is writing is touched; the caller releases it with
    `release_run_lock` when the run ends (otherwise it is held until the process exits)."""
    _check_can_be_a_directory(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClueAdvError(f"cannot create output folder {directory}: {e.strerror or e}") from None
    acquire_run_lock(directory)
    for name in ("metrics.jsonl", "summary.json"):
        (directory / name).unlink(missing_ok=True)
    remove_checkpoint(directory)  # an earlier attempt's: this run starts over
    atomic_write_text(directory / "config.yaml", dump_config(cfg))


def resume_run(cfg: RunConfig, directory: Path, metrics_bytes: int) -> None:
    """Make the directory a run resumed from its checkpoint: metrics.jsonl cut back to the lines it had then (what
    the interrupted epoch logged is logged again), config.yaml rewritten (it records the output folder). The
    caller holds the run lock."""
    with open_in_run_dir(directory / "metrics.jsonl", "a") as f:
        f.truncate(metrics_bytes)
    atomic_write_text(directory / "config.yaml", dump_config(cfg))


def remove_checkpoint(directory: Path) -> None:
    path = directory / CHECKPOINT_DIR
    if path.is_symlink():  # planted: removed, never followed (rmtree refuses a link silently)
        path.unlink()
    shutil.rmtree(path, ignore_errors=True)


def find_run_dirs(root: Path) -> list[Path]:
    """Every run directory under `root` (a `seed-<k>` directory with a config.yaml), sorted; `root`
    may be a results root, an experiment, a task or a single run. Hidden directories are skipped."""
    root = Path(root)
    found = []
    for config in root.rglob("config.yaml"):
        directory = config.parent
        relative = directory.relative_to(root).parts if directory != root else ()
        if directory.name.startswith("seed-") and not any(p.startswith(".") for p in relative):
            found.append(directory)
    return sorted(found)


# A run whose process died (kill -9, a crashed machine) leaves its summary saying `running`. Its lock tells: a
# live training process holds it. summary.json does not record the host, and a run on another node (Slurm on a
# shared filesystem) may hold a lock this node cannot see, so a free lock alone is not proof: the run must also
# have written nothing for this long (a live run writes metrics every few log steps).
STALE_AFTER_S = 600.0
STALE_NOTE = "its process stopped without finishing (killed or the machine went down): its lock is free"


def last_update(directory: Path) -> float | None:
    """When the run last wrote its metrics or summary (a POSIX time), or None when it wrote neither."""
    times = [p.stat().st_mtime for p in (directory / "metrics.jsonl", directory / "summary.json") if p.is_file()]
    return max(times) if times else None


def stale_running(directory: Path, summary: dict[str, Any]) -> bool:
    """Whether a run whose summary says `running` was in fact left by a process that died: it was started by a
    version that locks (`.lock` exists), nothing holds the lock, and it has not written for STALE_AFTER_S."""
    if summary.get("status", "running") != "running" or not (directory / LOCK_NAME).is_file():
        return False
    updated = last_update(directory)
    if updated is None or time.time() - updated < STALE_AFTER_S:
        return False
    return not run_lock_held(directory)
