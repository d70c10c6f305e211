"""Builds and installs ``ncp`` with its C++/CUDA extension ``ncp._C``.

The CPU kernels are always built. The CUDA kernels are built when a CUDA
toolkit is found (``CUDA_HOME`` / ``nvcc``) or ``FORCE_CUDA=1``; the arch list
defaults to 8.0 and 9.0 (``TORCH_CUDA_ARCH_LIST`` overrides it). Set
``NCP_NO_EXTENSION=1`` to skip the extension (the package then runs on the
pure-PyTorch reference ops, and says so).

Install with ``pip install --no-build-isolation .`` so the installed torch is
used to compile (an isolated build would download a second torch).

A C++ extension of torch only loads into the torch major.minor it was compiled
against, so a build with the extension records that torch twice: the package's
``torch`` requirement becomes ``torch==MAJOR.MINOR.*`` (the wheel's
``Requires-Dist``), and ``ncp/_C_build.json`` beside ``ncp._C`` holds the exact
versions, which ``ncp._torch_abi`` checks before ``ncp._C`` is loaded.
"""
from __future__ import annotations

import glob
import json
import os
import re

from setuptools import find_namespace_packages, setup


def _extensions() -> tuple[list, dict]:
    if os.environ.get("NCP_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    if not cpp_sources:
        return [], {}
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or cpp_extension.CUDA_HOME is not None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # No -std flag: torch's build helper adds the standard its headers need
    # (C++20 for recent torch).
    cxx_flags = ["-O3"]
    if with_cuda and cuda_sources:
        ext = cpp_extension.CUDAExtension(
            "ncp._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DNCP_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            py_limited_api=False,
        )
    else:
        ext = cpp_extension.CppExtension("ncp._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})

    record = _torch_build_record(with_cuda and bool(cuda_sources))

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's builder, plus a check that the built library shares torch's C++ runtime,
        and the record of the torch it was built against (``_C_build.json`` beside it)."""

        def build_extension(self, ext_):
            super().build_extension(ext_)
            so_path = self.get_ext_fullpath(ext_.name)
            _build_checks().check_shared_cxx_runtime(so_path)
            _write_record(os.path.dirname(so_path), record)

        def copy_extensions_to_source(self):
            # Editable installs (pip install -e .) build into a temporary folder and copy the
            # library into python/ncp; its record must go along.
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext_ in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext_)
                src = os.path.join(os.path.dirname(regular_file), BUILD_RECORD)
                self.copy_file(src, os.path.join(os.path.dirname(inplace_file), BUILD_RECORD), level=self.verbose)

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


BUILD_RECORD = "_C_build.json"  # read by python/ncp/_torch_abi.py


def _torch_build_record(with_cuda_kernels: bool) -> dict:
    import torch

    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": with_cuda_kernels,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def _write_record(folder: str, record: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, BUILD_RECORD), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def _torch_requirement(ext_modules: list) -> str:
    """``torch==MAJOR.MINOR.*`` of the torch that compiles the extension; without one, any torch."""
    if not ext_modules:
        return "torch>=2.4"
    import torch

    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return f"torch=={major}.{minor}.*"


def _build_checks():
    """python/ncp/_build_checks.py, loaded by path (importing ncp would need torch & co.)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python", "ncp", "_build_checks.py")
    spec = importlib.util.spec_from_file_location("ncp_build_checks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ext_modules, cmdclass = _extensions()

setup(
    name="ncp",
    version="0.1.0",
    description="Preference alignment (DPO, CPO, SFT) of text-to-image diffusion models in noise-conditioned perceptual space",
    package_dir={"": "python"},
    # Namespace discovery: the data folders (bundle/, configs/) are listed as packages so
    # setuptools ships their files (package_data) without treating them as code.
    packages=find_namespace_packages("python", include=["ncp", "ncp.*"], exclude=["*.__pycache__"]),
    package_data={"": ["*.json", "*.txt", "*.yaml", "*.safetensors", "*.parquet"]},
    python_requires=">=3.10",
    install_requires=[
        _torch_requirement(ext_modules),
        "diffusers>=0.30",
        "transformers>=4.40",
        "peft>=0.12",
        "accelerate>=0.30",
        "safetensors",
        "xxhash",
        "pyarrow>=14",
        "pillow",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"cuda": ["bitsandbytes>=0.43"], "test": ["pytest"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
