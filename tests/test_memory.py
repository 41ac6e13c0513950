"""Returning freed heap pages to the system (twin_store/services/memory.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc")
def test_release_gives_back_the_freed_heap_that_glibc_keeps() -> None:
    """200 MB of 4 kB blocks freed under a block still in use: glibc keeps the pages (the heap's top is not
    free), so RSS stays up, as htwin's did after its bootstrap; ``release_freed_memory`` returns them."""
    code = (
        "import gc\n"
        "from twin_store.services.memory import release_freed_memory\n"
        "def rss():\n"
        "    return next(int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
        "blocks = [bytes(4000) for _ in range(50_000)]\n"
        "keep = bytearray(4000)\n"
        "del blocks\n"
        "gc.collect()\n"
        "kept = rss()\n"
        "ok = release_freed_memory()\n"
        "print(kept, rss(), ok)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    kept, released, ok = out.stdout.split()
    assert ok == "True"
    assert int(kept) - int(released) > 150, out.stdout
