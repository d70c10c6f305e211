"""The build's check that ncp._C shares torch's C++ runtime (python/ncp/_build_checks.py).

A GPU image's compiler wrapper once linked libstdc++ statically into the extension; every
TORCH_CHECK failure then crashed Python. The check reads the library's DT_NEEDED entries.
"""
from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path

import pytest

from ncp import _build_checks

CXX = shutil.which("g++")
SOURCE = '#include <string>\n#include <stdexcept>\nvoid f(const std::string& s) { throw std::runtime_error(s); }\n'


def _shared_library(tmp_path: Path, *flags: str) -> str:
    src = tmp_path / "lib.cpp"
    src.write_text(SOURCE)
    out = tmp_path / f"lib{len(flags)}.so"
    subprocess.run([CXX, "-shared", "-fPIC", *flags, str(src), "-o", str(out)], check=True)
    return str(out)


@pytest.mark.skipif(CXX is None, reason="needs g++")
def test_dynamic_runtime_passes_and_is_listed(tmp_path):
    so = _shared_library(tmp_path)
    assert "libstdc++.so.6" in _build_checks.elf_needed(so)
    _build_checks.check_shared_cxx_runtime(so)  # no error


@pytest.mark.skipif(CXX is None, reason="needs g++")
def test_static_runtime_is_rejected_naming_the_file(tmp_path):
    so = _shared_library(tmp_path, "-static-libstdc++")
    needed = _build_checks.elf_needed(so)
    assert not any(n.startswith("libstdc++") for n in needed)
    with pytest.raises(RuntimeError, match=r"lib1\.so \(removed\) does not link the C\+\+ runtime dynamically.*CXX="):
        _build_checks.check_shared_cxx_runtime(so)
    assert not Path(so).exists()


def test_non_elf_files_are_not_checked(tmp_path):
    f = tmp_path / "x.dylib"
    f.write_bytes(b"\xcf\xfa\xed\xfe" + bytes(60))
    assert _build_checks.elf_needed(str(f)) is None
    _build_checks.check_shared_cxx_runtime(str(f))


def test_the_installed_extension_passes():
    built = glob.glob(str(Path(_build_checks.__file__).parent / "_C*.so"))
    if not built:
        pytest.skip("ncp._C is not built")
    _build_checks.check_shared_cxx_runtime(built[0])
