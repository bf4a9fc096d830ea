"""Keep the memory a forward pass frees for the next one (glibc's allocator only).

glibc serves an allocation above its mmap threshold (at most 32 MiB, however it adapts) with a
fresh ``mmap`` and gives it back to the OS when freed, so every such tensor is page-faulted in
again, zero-filled by the kernel, on every pass. An attention pattern is one: [H, T, T] float32 is
37.7 MiB for SmolLM2 (9 heads) at 1024 tokens, and the instrumented pass makes several per layer.
Raising the threshold lets the heap serve them, so a layer reuses what the layer before it freed.
Measured on the 2-core CPU, SmolLM2 at 1024 tokens: a process's first graph (forward + graph)
went from 7.2–7.4 to 6.0–6.1 s (two runs each); later ones, which glibc's adapted threshold
already partly served from the heap, by 0–0.4 s (within the noise of ``llm-flow bench``); the
peak memory rose ~0.3 GB. Why not higher: at 4096 tokens (604 MB patterns, mapped either way)
256 MiB changed nothing beyond the noise (first pass 95 against 90 s, one run each), while a
2 GiB threshold served the patterns from the heap and fragmented it: 19.5 GB peak against 5.9.
"""

from __future__ import annotations

import ctypes
import functools
import platform

MMAP_THRESHOLD = 256 << 20  # bytes: a [32, T, T] float32 pattern up to ~1,400 tokens (see above)
# Free memory at the top of the heap beyond this goes back to the OS.
TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once; False where the C library
    is not glibc (macOS, musl), which keeps its own allocator's behaviour."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
