"""The check that ncp._C runs only with the torch major.minor it was built against (ncp._torch_abi),
and the fused-op self-check (python -m ncp.ops.selfcheck) that the wheel CI step runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ncp.ops
from ncp import _torch_abi
from ncp._torch_abi import TorchMismatchError, check_extension, major_minor, mismatch

CPU_RECORD = {"torch": "2.15.0+cu132", "torch_cuda": "13.2", "cuda_kernels": False, "cxx11_abi": True}
CUDA_RECORD = {**CPU_RECORD, "cuda_kernels": True}
needs_record = pytest.mark.skipif(_torch_abi.read_record() is None,
                                  reason="ncp._C is not built, or built without a build record")


def test_major_minor():
    assert major_minor("2.15.0+cu132") == (2, 15)
    assert major_minor("2.9.1") == (2, 9)
    assert major_minor("2.16.0a0+git1234") == (2, 16)
    with pytest.raises(ValueError):
        major_minor("nightly")


@pytest.mark.parametrize("running", ["2.15.0+cu132", "2.15.0", "2.15.2+cpu", "2.15.1+cu130"])
def test_same_major_minor_is_accepted(running):
    """Patch releases and local labels (+cpu, +cu13x) keep the ABI of a CPU-only build."""
    assert mismatch(CPU_RECORD, running, None if running.endswith("+cpu") else "13.2") is None


@pytest.mark.parametrize("running", ["2.14.1", "2.16.0+cu132", "3.15.0"])
def test_other_major_minor_names_both_versions(running):
    why = mismatch(CPU_RECORD, running, "13.2")
    assert why is not None
    assert "2.15.0+cu132" in why and running in why


def test_cuda_kernels_need_a_cuda_torch_of_the_same_cuda_major():
    assert mismatch(CUDA_RECORD, "2.15.0+cu132", "13.0") is None
    assert "CPU-only" in mismatch(CUDA_RECORD, "2.15.0+cpu", None)
    why = mismatch(CUDA_RECORD, "2.15.0+cu126", "12.6")
    assert "CUDA 13.2" in why and "CUDA 12.6" in why


def test_check_extension_raises_with_the_fix(tmp_path, monkeypatch):
    """A record of another torch, checked against a monkeypatched running torch."""
    (tmp_path / _torch_abi.BUILD_RECORD).write_text(json.dumps(CPU_RECORD))
    monkeypatch.setattr(_torch_abi, "record_path", lambda: tmp_path / _torch_abi.BUILD_RECORD)
    monkeypatch.setattr(torch, "__version__", "2.16.0")
    with pytest.raises(TorchMismatchError) as err:
        check_extension()
    msg = str(err.value)
    assert "torch 2.15.0+cu132" in msg and "torch 2.16.0" in msg
    assert "pip install 'torch==2.15.*'" in msg and "--no-build-isolation" in msg
    monkeypatch.setattr(torch, "__version__", "2.15.3")
    assert check_extension() == CPU_RECORD


def test_check_extension_without_extension_or_record(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(_torch_abi, "record_path", lambda: None)
    assert check_extension() is None  # no ncp._C: the ImportError of loading it is ncp.ops' business
    monkeypatch.setattr(_torch_abi, "record_path", lambda: tmp_path / _torch_abi.BUILD_RECORD)
    assert check_extension() is None
    assert "no build record" in caplog.text


@needs_record
def test_loading_the_extension_under_another_torch_raises():
    """import ncp.ops with the running torch's version monkeypatched: the error names both versions."""
    code = (
        "import torch\n"
        "torch.__version__ = '1.99.0'\n"
        "from ncp._torch_abi import TorchMismatchError\n"
        "try:\n"
        "    import ncp.ops\n"
        "except TorchMismatchError as err:\n"
        "    print(err)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    built = _torch_abi.read_record()["torch"]
    assert f"built against torch {built}" in out.stdout and "torch 1.99.0" in out.stdout


@needs_record
def test_record_matches_the_running_torch():
    """The build record beside the built ncp._C is this torch's (setup.py writes it)."""
    record = _torch_abi.read_record()
    assert major_minor(record["torch"]) == major_minor(torch.__version__)
    assert record["cuda_kernels"] == torch._C._dispatch_has_kernel_for_dispatch_key("ncp::reverse_step", "CUDA")


@needs_record
def test_selfcheck_passes_and_catches_a_wrong_kernel(monkeypatch, capsys):
    from ncp.ops import selfcheck

    assert selfcheck.main(["--device", "cpu"]) == 0
    assert "selfcheck: OK" in capsys.readouterr().out

    def off_by_a_bit(x_t, eps_policy, eps_other, z, coef):
        prev, other = ncp.ops.reference.reverse_step(x_t, eps_policy, eps_other, z, coef)
        return prev * (1 + 1e-3), other

    monkeypatch.setattr(ncp.ops.fused, "reverse_step", off_by_a_bit)
    assert selfcheck.main(["--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "FAIL cpu, contiguous" in err and "reverse_step prev_policy" in err
