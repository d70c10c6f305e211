"""Build-time checks of the compiled extension (stdlib only: setup.py loads this file by path)."""
from __future__ import annotations

import os
import struct
from pathlib import Path


def elf_needed(path: str) -> list[str] | None:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared library (None if not one)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []
    entries = [struct.unpack_from("<qQ", data, off) for off in range(dynamic[0], dynamic[0] + dynamic[1], 16)]
    strtab_vaddr = next(val for tag, val in entries if tag == 5)  # DT_STRTAB
    strtab = next(off + strtab_vaddr - va for va, off, size in loads if va <= strtab_vaddr < va + size)
    return [data[strtab + val:data.index(b"\0", strtab + val)].decode() for tag, val in entries if tag == 1]


def check_shared_cxx_runtime(so_path: str) -> None:
    """Fails the build when the extension carries a private copy of libstdc++.

    Such a library (a compiler wrapper that adds -static-libstdc++ makes one) loads and runs,
    but every C++ exception it throws -- each TORCH_CHECK that rejects a bad argument -- then
    crashes Python with a segmentation fault instead of raising a RuntimeError. Seen on a GPU
    image whose CXX=/opt/gcc/bin/g++ wrapper did this (see benchmarks/RESULTS_ARCHIVE.md, Ops, GPU).
    """
    needed = elf_needed(so_path)
    if needed is None:  # not ELF (macOS, Windows): nothing to check
        return
    if not any(name.startswith("libstdc++") or name.startswith("libc++") for name in needed):
        os.remove(so_path)  # an in-place build must not leave it behind to be imported
        raise RuntimeError(
            f"{so_path} (removed) does not link the C++ runtime dynamically (its needed libraries: {', '.join(needed)}); "
            f"the compiler (CXX={os.environ.get('CXX', 'c++')}) probably links libstdc++ statically. Every error "
            "the ops raise would then crash Python instead of raising. Build with a compiler that links it "
            "dynamically, e.g. CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++."
        )
