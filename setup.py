"""Builds and installs ``ncp`` with its C++/CUDA extension ``ncp._C``.

The CPU kernels are always built. The CUDA kernels are built when a CUDA
toolkit is found (``CUDA_HOME`` / ``nvcc``) or ``FORCE_CUDA=1``; the arch list
defaults to 8.0 and 9.0 (``TORCH_CUDA_ARCH_LIST`` overrides it). Set
``NCP_NO_EXTENSION=1`` to skip the extension (the package then runs on the
pure-PyTorch reference ops, and says so).

Install with ``pip install --no-build-isolation .`` so the installed torch is
used to compile (an isolated build would download a second torch).
"""
from __future__ import annotations

import glob
import os

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

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's builder, plus a check that the built library shares torch's C++ runtime."""

        def build_extension(self, ext_):
            super().build_extension(ext_)
            _build_checks().check_shared_cxx_runtime(self.get_ext_fullpath(ext_.name))

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
        "torch>=2.4",
        "diffusers>=0.30",
        "transformers>=4.40",
        "peft>=0.12",
        "accelerate>=0.30",
        "safetensors",
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
