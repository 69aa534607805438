"""Crash-safe file writing helpers shared by the training loop (``train/runtime``) and the
Hugging Face scorer cache (``hf/cache``): the clean-up of temporary files that a writer killed
inside an atomic write left behind."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temps(path: Path, glob: str, pattern: str) -> list[Path]:
    """Remove the temporary files that killed writers of ``path`` left beside it: only names
    matching ``glob`` and, in full, the regular expression ``pattern`` whose first group is the
    writer's pid; only in ``path``'s directory; only of processes that are gone (a live writer,
    another rank, keeps its file). Returns what was removed."""
    path = Path(path)
    rx = re.compile(pattern)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(glob):
        m = rx.fullmatch(tmp.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed
