"""Crash-safe directories for checkpoints and saved models.

Resumable checkpoints live in ``<run>/checkpoints/step-<global step>/`` and ``<run>/checkpoints/LATEST`` names the
current one. A new checkpoint is written into a temporary directory, every file and directory in it is
fsync'ed, it is renamed to its final name, and only then is ``LATEST`` replaced (a small file written to a temporary
name, fsync'ed and ``os.replace``'d, which is atomic). A crash at any point therefore leaves ``LATEST`` naming a
complete checkpoint: the previous one until the new one is entirely on disk. Older checkpoints and leftover
temporary directories are removed after the switch.

Saved models (``<run>/model``, the best one so far) are replaced by the same write-fsync-rename, then a swap of the
old and new directories; should the process die between the two renames, ``load_latest_model`` finds the old
one under ``.model.old``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Optional, Union

LATEST = "LATEST"
PREFIX = "step-"


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (and `root` itself)."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(directory))


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def staging_dir(parent: Path, name: str) -> Iterator[Path]:
    """A fresh temporary directory next to where `name` will go; removed if the block fails."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_name(global_step: int) -> str:
    return f"{PREFIX}{global_step:09d}"


@contextlib.contextmanager
def new_checkpoint(checkpoints_dir: Union[str, os.PathLike], global_step: int) -> Iterator[Path]:
    """Write a checkpoint into the yielded directory; on leaving the block it becomes LATEST (see module doc)."""
    root = Path(checkpoints_dir)
    name = checkpoint_name(global_step)
    with staging_dir(root, name) as tmp:
        yield tmp
        fsync_tree(tmp)
        final = root / name
        if final.exists():  # the same step written again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    write_text_atomic(root / LATEST, name + "\n")
    for entry in root.iterdir():  # older checkpoints and leftovers of crashed writes
        if entry.name not in (name, LATEST) and (entry.name.startswith(PREFIX) or entry.name.startswith(".")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def latest_checkpoint(checkpoints_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The directory LATEST names, or None when there is no complete checkpoint."""
    root = Path(checkpoints_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = root / name
    if not name.startswith(PREFIX) or not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a checkpoint directory")
    return path


def replace_dir(target: Union[str, os.PathLike], write) -> Path:
    """Atomically (write + fsync + rename, then swap) replace directory `target` by what `write(tmp_dir)` writes."""
    target = Path(target)
    with staging_dir(target.parent, target.name) as tmp:
        write(tmp)
        fsync_tree(tmp)
        old = target.parent / f".{target.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    shutil.rmtree(target.parent / f".{target.name}.old", ignore_errors=True)
    return target


def existing_model_dir(target: Union[str, os.PathLike]) -> Path:
    """`target`, or its `.old` twin left by a crash between the two renames of `replace_dir`."""
    target = Path(target)
    if target.is_dir():
        return target
    old = target.parent / f".{target.name}.old"
    if old.is_dir():
        return old
    raise FileNotFoundError(f"{target}: no saved model there")
