"""What content cache keys cost: every image's bytes hashed (edgeship's key) against a size-and-mtime walk of
the same files (what a key trusting dates would read), in one run, on one image folder.

Prints the folder's size, each method's time (median of ``--repeat`` runs: the page cache warm after the
first, or emptied before each run with ``--drop-caches``, as root), their ratio, and the machine's load
(figures of different runs are not comparable; the ratio is).

    python benchmarks/cache_keys.py [IMAGES_DIR] [--repeat 5] [--drop-caches]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from edgeship._assets import shared_assets
from edgeship._cache_keys import image_set_digest
from edgeship.runtime.images import list_images


def _stat_walk(files: list[Path]) -> int:
    """What a date-trusting key reads: each file's size and mtime."""
    return hash(tuple((os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files))


def _median_s(fn: Callable[[], object], repeat: int, drop: bool) -> float:
    times = []
    for _ in range(repeat):
        if drop:  # the files read from disk, not from memory
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    default = shared_assets() / "data" / "imagenet-sample" if shared_assets() else None
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", type=Path, nargs="?", default=default, help="image folder (default: the shared 500)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before each run (root)")
    args = ap.parse_args()
    if args.images is None:
        ap.error("give an image folder (no ../shared here)")
    images = list_images(args.images, minimum=1)
    files = [Path(f) for f in images.files]
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    load = os.getloadavg()[0]
    content = _median_s(lambda: image_set_digest(images), args.repeat, args.drop_caches)
    dates = _median_s(lambda: _stat_walk(files), args.repeat, args.drop_caches)
    print(
        f"{len(files)} images, {size_mb:.1f} MB, load average {load:.1f} (1 min), median of {args.repeat} runs"
        f"{', page cache emptied before each' if args.drop_caches else ''}"
    )
    print(f"content key (sha256 of every file): {content * 1e3:8.1f} ms")
    print(f"size and mtime of every file:       {dates * 1e3:8.1f} ms")
    print(f"content / dates: {content / dates:.0f}x, {content * 1e3 / len(files):.2f} ms an image")


main()
