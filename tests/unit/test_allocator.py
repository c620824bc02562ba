"""The training worker's malloc settings: large buffers come from the heap and stay mapped after free."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raylm.train.allocator import glibc_library

PLATFORM = str(Path(__file__).resolve().parents[2] / "platform")

# Fresh interpreter per case: malloc's parameters are process wide and only move one way.
PROBE = """
import ctypes, json, sys
sys.path.insert(0, sys.argv[2])
fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in fields]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = None
if sys.argv[1] == "tuned":
    from raylm.train.allocator import keep_freed_memory
    applied = keep_freed_memory()
buffer = libc.malloc(8 << 20)
mmapped = libc.mallinfo2().hblkhd
libc.free(buffer)
print(json.dumps({"applied": applied, "mmapped": mmapped, "heap_after_free": libc.mallinfo2().arena}))
"""


def _probe(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode, PLATFORM], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(glibc_library() is None, reason="glibc malloc only")
def test_buffers_come_from_the_heap_and_are_not_trimmed_after_free():
    default, tuned = _probe("default"), _probe("tuned")
    assert default["mmapped"] >= 8 << 20  # glibc's default: an 8 MB buffer is its own mmap, unmapped on free
    assert tuned["applied"] is True
    assert tuned["mmapped"] < 8 << 20
    assert tuned["heap_after_free"] >= 8 << 20  # freed, but kept for the next step
