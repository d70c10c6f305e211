"""The torch that ``ncp._C`` was built against, checked before the extension is loaded.

A torch C++ extension links torch's C++ libraries (libc10, libtorch_cpu, ...), whose
ABI changes between torch minor versions: loaded into another major.minor it fails
with an undefined symbol, or loads and misbehaves. ``setup.py`` writes what the
extension was built against to ``_C_build.json`` beside it (torch's version, the CUDA
version of that torch, whether the CUDA kernels were compiled), and pins the wheel's
``torch`` requirement to the same ``major.minor``; :func:`check_extension` compares the
record with the running torch and raises :class:`TorchMismatchError`, naming both
versions and the fixes, instead of letting the load fail obscurely.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

BUILD_RECORD = "_C_build.json"  # written by setup.py beside the built ncp._C


class TorchMismatchError(RuntimeError):
    """ncp._C was built against a torch whose binary interface differs from the running one."""


def major_minor(version: str) -> tuple[int, int]:
    """``"2.15.0+cu132"`` -> ``(2, 15)``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a torch version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def record_path() -> Path | None:
    """Where the build record of the importable ``ncp._C`` is (None when there is no ncp._C)."""
    try:
        spec = importlib.util.find_spec("ncp._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).with_name(BUILD_RECORD)


def read_record(path: Path | None = None) -> dict | None:
    """The build record of ``ncp._C``, or None when there is none."""
    path = record_path() if path is None else path
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def mismatch(record: dict, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why an extension built as ``record`` cannot load into this torch (None when it can)."""
    built = record["torch"]
    if major_minor(built) != major_minor(torch_version):
        return (
            f"ncp._C was built against torch {built}, but this Python runs torch {torch_version}: "
            f"a torch C++ extension only loads into the torch major.minor it was compiled against "
            f"({'.'.join(map(str, major_minor(built)))}, not {'.'.join(map(str, major_minor(torch_version)))})."
        )
    if record.get("cuda_kernels"):
        built_cuda = record.get("torch_cuda")
        if torch_cuda is None:
            return (
                f"ncp._C was built with CUDA kernels against torch {built} (CUDA {built_cuda}), but this "
                f"Python runs torch {torch_version}, a CPU-only build that lacks the CUDA libraries it links."
            )
        if built_cuda and built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
            return (
                f"ncp._C was built with CUDA kernels against torch {built} (CUDA {built_cuda}), but this "
                f"Python runs torch {torch_version} (CUDA {torch_cuda}): the CUDA major versions differ."
            )
    return None


def fix_hint(record: dict) -> str:
    major, minor = major_minor(record["torch"])
    return (
        f"Fix it either way: install the torch it was built for (pip install 'torch=={major}.{minor}.*'), "
        f"or rebuild ncp against the torch you have: in a clone of ncp, "
        f"pip install --no-build-isolation --force-reinstall --no-deps . (or bash scripts/setup.sh)."
    )


def check_extension(torch_version: str | None = None, torch_cuda: str | None = None) -> dict | None:
    """Raises :class:`TorchMismatchError` when ``ncp._C`` cannot work with the running torch.

    ``torch_version``/``torch_cuda`` default to the running torch's. Returns the build
    record (None when there is no ``ncp._C``, or a build without a record, which is
    logged: an extension built before records were written, to rebuild).
    """
    path = record_path()
    if path is None:  # no extension: importing it raises the ImportError that ncp.ops handles
        return None
    record = read_record(path)
    if record is None:
        logger.warning(
            "ncp._C has no build record (%s): it was built before ncp recorded its torch; if loading it "
            "fails, rebuild it (pip install --no-build-isolation -e .)", path
        )
        return None
    if torch_version is None:
        import torch

        torch_version, torch_cuda = torch.__version__, torch.version.cuda
    why = mismatch(record, torch_version, torch_cuda)
    if why is not None:
        raise TorchMismatchError(f"{why} {fix_hint(record)}")
    return record
