"""Keep freed host memory inside the process, so big CPU tensors stop paying page faults on every step.

glibc serves every allocation above its mmap threshold (at most 32 MB, adaptive) with a fresh ``mmap`` and hands
it back with ``munmap`` when freed. A training step on the CPU allocates the same large buffers again and again
(the full-catalogue logits: 70 MB per Beauty step; a validation chunk's scores: 50 MB), so each one is faulted in
page by page every time: about 20 ms per 70 MB here, 1.8 s of a 19 s Beauty epoch. Raising the mmap and trim
thresholds to 1 GiB makes glibc recycle those blocks from the heap instead (the effect jemalloc or tcmalloc via
``LD_PRELOAD`` would have, without a new dependency). Resident memory stays at the peak instead of shrinking
between steps, which a training or evaluation process reaches anyway. Not glibc (macOS, musl): nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; True when glibc accepted them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    accepted = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    log.debug("glibc mallopt thresholds %s", "set" if accepted else "refused")
    return accepted
