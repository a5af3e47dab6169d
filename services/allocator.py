"""glibc's allocator tuned for a process that moves megabyte images through memory.

Every result image passes through buffers of about its size (the download, the upload). glibc
serves such buffers with fresh `mmap`s at first, then from the heap, but gives the heap's free
top back to the kernel as soon as it exceeds twice the largest buffer freed so far; under a
load of jobs the heap grows and shrinks by many megabytes, and every page taken again is a
page fault and a page zeroed by the kernel. Measured on the benchmark's load (200 jobs, 1 MiB
results): some 300 page faults per job and about half of the bot's system CPU, gone once buffers
up to `HEAP_BYTES` come from the heap and up to `HEAP_BYTES` of its free top stay with it. The
cost is that the bot keeps up to that much freed memory for its next images, the size of the
default RESULT_MEMORY_BYTES it may hold images in anyway.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

HEAP_BYTES = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit systems
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_image_buffers_on_the_heap(*, tuned_by_operator: bool) -> bool:
    """Tune glibc's malloc as the module says; whether it was done (not on other C libraries,
    such as musl or macOS's, nor over the operator's own tuning: `allocator_tuned_by_operator`)."""
    if tuned_by_operator or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library the interpreter itself runs on
    if not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc: its mallopt, if any, means something else or nothing
    tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, HEAP_BYTES))
    if not tuned:
        log.warning("could not tune glibc's allocator; result images will cost more CPU")
    return tuned
