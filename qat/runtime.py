"""Process-level settings that make CPU training fast: glibc's allocator and torch's threads.

Fake quantization creates a few weight-sized temporaries per layer per step. With glibc's
defaults, large freed blocks go back to the kernel (``munmap``, heap trimming) and the next step
page-faults them in again, zero-filled: on SmolLM2 that costs more than the quantization
arithmetic itself (benchmarks/overhead.py: 1.58x a plain step with the defaults, 1.15x tuned).
Keeping freed memory in the process, as jemalloc and tcmalloc do and as PyTorch's CPU
performance guide recommends, removes that cost. The price is a resident set that stays near its
peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``); a no-op off glibc or with ``QAT_NO_MALLOC_TUNING=1``.

    Returns:
        True when the settings were applied.
    """
    if os.environ.get("QAT_NO_MALLOC_TUNING") == "1" or os.name != "posix":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) and mallopt(_M_TOP_PAD, 1 << 28)
    if not ok:
        log.debug("mallopt refused the allocator settings; keeping glibc defaults")
    return bool(ok)
