"""Shard files mapped into memory, and their pages brought in and given back.

A CPU stage streams an uncompressed unit without copying it: the unit's tensors are
views of its shard file, mapped once for the stage's lifetime, so the page cache's pages
are the weights. Streaming then means paging: before a unit runs, the loader thread
maps its pages in (``MADV_POPULATE_READ``: read from disk if the page cache lacks them),
and after it ran they are unmapped again (``MADV_DONTNEED``), so what the stage holds
mapped stays within its budget. The ``madvise`` calls go through ctypes, which releases
the GIL, so paging on the loader thread does not stall the forward.

Maps ask for 2 MiB pages (``MADV_HUGEPAGE``): where the kernel and file system give them
(Linux with transparent huge pages in ``madvise`` or ``always`` mode, a file system with
large folios such as ext4 or XFS on recent kernels), mapping a unit in or out costs a
few page-table entries instead of one per 4 KiB page. The kernel maps whole pages, so a
unit streamed in chunks (the head) may have up to one such page mapped past either end
of the chunk in use.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os

import torch

PAGE = mmap.PAGESIZE
# Mapping a page in may map its neighbours within an aligned window of up to this many
# bytes too (a 2 MiB huge page, or the kernel's fault-around), so pages are mapped out
# in such windows.
MAP_GRAIN = 2 * 2**20
# madvise advice values (Linux).
MADV_DONTNEED, MADV_POPULATE_READ = 4, 22

_libc = None
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def drop_from_page_cache(path: os.PathLike) -> None:
    """Ask the kernel to drop a file's pages from the page cache (those no process maps)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def huge_pages_possible() -> bool:
    """Whether the kernel may back a mapping that asks for it with 2 MiB pages
    (transparent huge pages in ``madvise`` or ``always`` mode)."""
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _madvise():
    """libc's ``madvise``, or None where there is none to call."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            lib.madvise.restype = ctypes.c_int
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


class Mapping:
    """One shard file mapped copy-on-write (never written: its pages stay the page
    cache's), with its tensors as views of the map.

    Args:
        path: the safetensors file.
        data_start: offset of the tensor data in the file (after the header).
        specs: ``{name: (dtype, shape, begin, end)}`` byte ranges relative to ``data_start``.
        random: the tensors are read a row here and there (an embedding): no read-around.
    """

    def __init__(self, path: os.PathLike, data_start: int, specs: dict[str, tuple], random: bool = False):
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.path = os.fspath(path)
        self.map.madvise(mmap.MADV_RANDOM if random else mmap.MADV_SEQUENTIAL)
        self.huge = False  # asked for 2 MiB pages, and the kernel may give them
        if not random and hasattr(mmap, "MADV_HUGEPAGE") and huge_pages_possible():
            # 2 MiB pages where the kernel and file system allow: mapping a unit in and
            # out then costs a few page-table entries, not one per 4 KiB
            with contextlib.suppress(OSError):
                self.map.madvise(mmap.MADV_HUGEPAGE)
                self.huge = True
        whole = torch.frombuffer(self.map, dtype=torch.uint8)
        self.base = whole.data_ptr()
        self.tensors: dict[str, torch.Tensor] = {}
        self.spans: dict[str, tuple[int, int]] = {}
        for name, (dtype, shape, begin, end) in specs.items():
            lo = data_start + begin
            self.tensors[name] = whole[lo:data_start + end].view(dtype).view(shape)
            self.spans[name] = (lo, data_start + end)

    def span(self, name: str, rows: tuple[int, int] | None = None) -> tuple[int, int]:
        """File offsets ``[lo, hi)`` of tensor ``name``, or of its rows ``[a, b)``."""
        lo, hi = self.spans[name]
        if rows is None:
            return lo, hi
        t = self.tensors[name]
        row = t[0].numel() * t.element_size() if t.dim() else 0
        return lo + rows[0] * row, lo + rows[1] * row

    def drop_cached(self) -> None:
        """Ask the kernel to drop the file from the page cache (what no process maps), so
        the next read brings it back in 2 MiB pages: pages read another way (written by
        ``split``, read by ``cp``) are 4 KiB ones, and stay so while cached."""
        drop_from_page_cache(self.path)

    def page_in(self, lo: int, hi: int) -> None:
        """Map the pages of file bytes ``[lo, hi)`` in, reading what the page cache lacks."""
        a, b = lo - lo % PAGE, hi
        if b <= a:
            return
        libc = _madvise()
        if libc is not None:
            if libc.madvise(self.base + a, b - a, MADV_POPULATE_READ) == 0:
                return
            e = ctypes.get_errno()
            if e != errno.EINVAL:  # EFAULT: the file is shorter than mapped; EIO: the disk failed
                raise OSError(e, f"reading {self.path} into memory: {os.strerror(e)}")
        # No MADV_POPULATE_READ (a kernel before 5.14, or not Linux): touch one byte per
        # page, on a torch op, which releases the GIL too.
        view = torch.frombuffer(self.map, dtype=torch.uint8, count=b - a, offset=a)
        view[::PAGE].sum()

    def page_out(self, lo: int, hi: int) -> None:
        """Unmap the pages that hold file bytes ``[lo, hi)``, and those the kernel mapped
        around them (see :data:`MAP_GRAIN`); they stay in the page cache, and a later
        touch maps them again (a neighbour still in use maps its pages back as it runs)."""
        a, b = lo - lo % MAP_GRAIN, min(-(-hi // MAP_GRAIN) * MAP_GRAIN, len(self.map))
        libc = _madvise()
        if b > a and libc is not None:
            if libc.madvise(self.base + a, b - a, MADV_DONTNEED) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"madvise(MADV_DONTNEED) on {self.path}: {os.strerror(e)}")
