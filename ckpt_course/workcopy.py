"""The learner's own copy of the course, so that running it never modifies a file git tracks.

JupyterLab autosaves a notebook's outputs into the file it runs; run in the repository, a lesson
would become a modified tracked file and the learner's next ``git pull`` of a course fix would
conflict. So ``make lab`` first calls ``sync_course`` (``ckpt-course sync-course``), which copies
the lessons (``notebooks/*.ipynb``) and exercises (``exercises/*.ipynb`` and their sources
``exercises/src/*.py``, which grading and ``reset-exercises`` read) into an ignored folder,
``my-course/`` by default, and JupyterLab opens there. Relative paths keep working: the copy has
the same ``notebooks/`` and ``exercises/`` layout, and the lessons find everything else through
the installed package.

A later sync brings a course update in without a merge conflict, by nbgitpuller's rules (it keeps
the learner's changes and never asks the learner to merge), applied per file. A manifest in the
copy (``.ckpt-course-copy.json``) records the course version each file was copied from:

- a course file the copy never had appears (a new lesson);
- a file the learner has not changed since it was copied is updated to the course's new version;
- a file the learner has changed is kept as it is; the sync says that the course has a newer
  version and that ``ckpt-course reset-lessons NAME`` gets it (nbgitpuller, too, keeps the local
  side of a conflict: ``git merge -Xours``);
- a file the learner deleted is restored (as nbgitpuller does);
- a file of the learner's own whose name a new course file takes is moved to a backup first (as
  nbgitpuller renames it).

``reset_lessons`` gives fresh copies of named lessons or exercises (all, if none are named); the
learner's are moved to ``<folder>/backups/<stem>-<time>[-N].ipynb``. A backup never replaces a
file: its name is claimed exclusively (two resets in one second keep both edits), and nothing is
moved before every path has been checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = ".ckpt-course-copy.json"
DEFAULT_COPY = "my-course"
BACKUPS = "backups"
# What the copy holds, as (folder, glob) relative to the course root.
COURSE_FILES = (("notebooks", "*.ipynb"), ("exercises", "*.ipynb"), ("exercises/src", "*.py"))


class WorkCopyError(ValueError):
    """A copy or reset that cannot go ahead without losing or misplacing someone's file."""


# ---------------------------------------------------------------- backups
def check_backup_folder(folder: Path) -> None:
    """Refuse before any work when the backups folder's name is taken by a file."""
    if folder.exists() and not folder.is_dir():
        raise WorkCopyError(f"{folder} is a file, but backups go into a folder of that name: "
                            f"rename or move that file, then run the reset again")


def check_replaceable(path: Path) -> None:
    """Refuse before any work when a notebook's path is a folder (nothing to back up or
    replace: that is someone's folder)."""
    if path.is_dir():
        raise WorkCopyError(f"{path} is a folder, not a notebook: move it elsewhere (e.g. "
                            f"`mv {path} {path.with_name(path.stem + '-folder')}`) and run the "
                            f"reset again")


def move_to_backup(path: Path, folder: Path, stamp: str | None = None) -> Path:
    """Move the file ``path`` into ``folder`` as ``<stem>-<stamp>[-N]<suffix>``; return the new
    path. The name is claimed exclusively (a hard link, or a file opened with O_EXCL), so no
    existing file is ever replaced, even by two moves in the same second."""
    path, folder = Path(path), Path(folder)
    check_backup_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        candidate = folder / f"{path.stem}-{stamp}{'' if n == 1 else f'-{n}'}{path.suffix}"
        if _claim(path, candidate):
            path.unlink()
            return candidate
    raise WorkCopyError(f"{folder} has 9,999 backups of {path.name} from {stamp}: clear some")


def _claim(source: Path, candidate: Path) -> bool:
    """Put ``source``'s bytes at ``candidate`` if no file is there; False if one is."""
    try:
        os.link(source, candidate)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: an exclusive create, then a copy
        pass
    try:
        with open(candidate, "xb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out)
        return True
    except FileExistsError:
        return False


# ---------------------------------------------------------------- where things are
def course_root() -> Path:
    """The course's repository: the folder above the package, where notebooks/ is."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "notebooks").is_dir():
        raise WorkCopyError(f"no notebooks/ next to the package ({root}): the course is used "
                            "from its repository; pass --course DIR, the folder of the clone")
    return root


def find_copy(course: Path, start: Path | None = None) -> Path:
    """The learner's copy: the folder holding the manifest at or above ``start`` (the current
    folder, e.g. JupyterLab's terminal inside the copy), else ``<course>/my-course``."""
    start = Path.cwd() if start is None else Path(start)
    for folder in (start, *start.resolve().parents):
        if (folder / MANIFEST).is_file():
            return folder
    return Path(course) / DEFAULT_COPY


def check_copy_folder(copy: Path, course: Path) -> None:
    """The copy must be a folder of its own, not the course or one of its tracked folders, and
    not inside another copy (a copy in a copy)."""
    copy_r, course_r = Path(copy).resolve(), Path(course).resolve()
    if copy.exists() and not copy.is_dir():
        raise WorkCopyError(f"{copy} is a file: name a folder for your copy of the course")
    tracked = [course_r] + [course_r / d for d in ("notebooks", "exercises", "solutions",
                                                   "ckpt_course", "tests", "docs", "bench")]
    if any(copy_r == t or t in copy_r.parents and t != course_r for t in tracked):
        raise WorkCopyError(f"{copy} is part of the course itself: your copy goes in a folder "
                            f"of its own, e.g. {Path(course) / DEFAULT_COPY}")
    outer = next((f for f in copy_r.parents if (f / MANIFEST).is_file()), None)
    if outer is not None:
        raise WorkCopyError(f"{copy} is inside your copy {outer}: sync that copy (--into "
                            f"{outer}), or name a folder outside it")


# ---------------------------------------------------------------- the copy
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _course_digest(course: Path, name: str) -> str:
    """The digest to record for a file copied from the course: that of the committed version
    where git has one. A lesson a learner ran in the clone itself, before copies existed, differs
    from it, so its copy counts as the learner's and no update ever replaces it."""
    try:
        done = subprocess.run(["git", "-C", str(course), "show", f"HEAD:{name}"],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is None or done.returncode != 0:
        return _digest(course / name)  # not a clone, or not committed: the file as it is
    return hashlib.sha256(done.stdout).hexdigest()


def course_files(course: Path) -> list[str]:
    """Relative paths of every file the copy holds, e.g. 'notebooks/1_why....ipynb'."""
    found = []
    for folder, pattern in COURSE_FILES:
        found += sorted(p.relative_to(course).as_posix() for p in (course / folder).glob(pattern)
                        if p.is_file() and not p.name.startswith("_"))
    return found


def _read_manifest(copy: Path) -> dict[str, str]:
    try:
        files = json.loads((copy / MANIFEST).read_text(encoding="utf-8"))["files"]
        return {str(k): str(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # none yet, or unreadable: every file is judged by its content


def _write_manifest(copy: Path, files: dict[str, str]) -> None:
    """Our own bookkeeping file (not the learner's): written whole, then renamed into place."""
    tmp = copy / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": dict(sorted(files.items()))}, indent=1)
                   + "\n", encoding="utf-8")
    os.replace(tmp, copy / MANIFEST)


@dataclass
class SyncReport:
    """What a sync or reset did, one list per action (relative paths)."""

    copy: Path
    copied: list[str] = field(default_factory=list)  # new in the copy
    updated: list[str] = field(default_factory=list)  # unchanged by the learner, course newer
    restored: list[str] = field(default_factory=list)  # deleted by the learner, copied again
    kept: list[str] = field(default_factory=list)  # changed by the learner, course newer
    fresh: list[str] = field(default_factory=list)  # reset: the course's version, anew
    backups: list[Path] = field(default_factory=list)  # the learner's files, moved aside

    def __str__(self) -> str:
        lines = [f"{verb} {name}" for verb, names in (
            ("new", self.copied), ("updated", self.updated), ("restored", self.restored),
            ("fresh copy of", self.fresh))
            for name in names]
        lines += [f"kept your {name}: the course has a newer version; `ckpt-course reset-lessons "
                  f"{Path(name).with_suffix('').as_posix()}` gets it (yours goes to backups/)"
                  for name in self.kept]
        lines += [f"your file was moved to {b}" for b in self.backups]
        return "\n".join(lines + [f"your copy of the course: {self.copy}"])


def _backup_folder(copy: Path, name: str) -> Path:
    return copy / Path(name).parent / BACKUPS


def _precheck(copy: Path, names) -> None:
    for name in names:
        check_replaceable(copy / name)
        check_backup_folder(_backup_folder(copy, name))


def sync_course(course: Path, copy: Path, stamp: str | None = None) -> SyncReport:
    """Bring ``copy`` up to date with ``course`` by the rules in the module docstring."""
    course, copy = Path(course), Path(copy)
    check_copy_folder(copy, course)
    names = course_files(course)
    if not names:
        raise WorkCopyError(f"{course} has no notebooks/*.ipynb: pass --course DIR, the clone")
    _precheck(copy, names)
    recorded, report = _read_manifest(copy), SyncReport(copy)
    for name in names:
        target = copy / name
        if target.exists() and _digest(target) == _digest(course / name):
            recorded.setdefault(name, _course_digest(course, name))
            continue  # already the course's version
        if not target.exists():
            (report.restored if name in recorded else report.copied).append(name)
        elif name not in recorded:  # the learner's own file where a new course file goes
            report.backups.append(move_to_backup(target, _backup_folder(copy, name), stamp))
            report.copied.append(name)
        elif _digest(target) == recorded[name]:  # untouched since it was copied
            report.updated.append(name)
        else:  # the learner's: kept, whatever the course did
            report.kept.append(name)
            continue
        _copy_file(course / name, target)
        recorded[name] = _course_digest(course, name)
    _write_manifest(copy, recorded)
    return report


def _copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def reset_lessons(names, course: Path, copy: Path, stamp: str | None = None) -> SyncReport:
    """Fresh copies of the lessons and exercises named (all if none): each of the learner's that
    differs from the course's is moved to a backup first. A name is a stem or file name
    (``3b_pitfalls``, ``1_why_activations_eat_memory.ipynb``), or with its folder
    (``exercises/3b_pitfalls``) where a lesson and an exercise share the stem."""
    course, copy = Path(course), Path(copy)
    check_copy_folder(copy, course)
    notebooks = [n for n in course_files(course) if n.endswith(".ipynb")]
    chosen = [n for name in names for n in _named(name, notebooks)] if names else notebooks
    _precheck(copy, chosen)
    recorded, report = _read_manifest(copy), SyncReport(copy)
    for name in dict.fromkeys(chosen):
        source, target = course / name, copy / name
        if target.exists() and _digest(target) != _digest(source):
            report.backups.append(move_to_backup(target, _backup_folder(copy, name), stamp))
        if not target.exists():
            _copy_file(source, target)
        report.fresh.append(name)
        recorded[name] = _course_digest(course, name)
    for name in course_files(course):  # the exercises' sources, which grading reads
        if name.endswith(".py") and not (copy / name).exists():
            _copy_file(course / name, copy / name)
            recorded[name] = _course_digest(course, name)
    _write_manifest(copy, recorded)
    return report


def _named(name: str, notebooks: list[str]) -> list[str]:
    """The one notebook ``name`` means, or an error that lists what there is."""
    wanted = Path(name).with_suffix("") if name.endswith(".ipynb") else Path(name)
    if len(wanted.parts) > 1:
        found = [n for n in notebooks if Path(n).with_suffix("") == wanted]
    else:
        found = [n for n in notebooks if Path(n).stem == wanted.name]
    if len(found) == 1:
        return found
    if found:
        raise WorkCopyError(f"{name} names a lesson and an exercise: say which, "
                            f"{' or '.join(str(Path(n).with_suffix('')) for n in found)}")
    known = ", ".join(sorted({Path(n).stem for n in notebooks}))
    raise WorkCopyError(f"no lesson or exercise named {name}; the course has: {known}")
