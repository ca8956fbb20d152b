"""`maskrt doctor`: every row on a machine without GPU or TensorRT, stand-in TensorRT and
cuda-python modules, the plugin library's CUDA architectures read from real nvcc output, and
the Jetson release files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from maskrt import doctor
from maskrt.cli import main

NO_GPU_MODULES = ("tensorrt", "tensorrt_lean", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart")
KERNEL_SOURCE = '__global__ void twice(float* x) { x[threadIdx.x] *= 2.f; }\n' \
                'extern "C" void launch(float* x) { twice<<<1, 32>>>(x); }\n'


@pytest.fixture
def no_gpu_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This machine as a user without TensorRT, cuda-python, GPU or plugin library would have it."""
    for name in NO_GPU_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError
    monkeypatch.delenv("MASKRT_PLUGIN_LIB", raising=False)
    monkeypatch.delenv("TENSORRT_INCLUDE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./build/plugins here
    monkeypatch.setattr(doctor, "_gpu_from_nvidia_smi", lambda: None)
    # A plugin library the developer built in the repository's build/plugins must not count here.
    from maskrt.runtime.backends import tensorrt as tensorrt_backend
    found = tensorrt_backend.find_plugin_library
    monkeypatch.setattr(tensorrt_backend, "find_plugin_library",
                        lambda plugin=None: found(plugin) if plugin or os.environ.get("MASKRT_PLUGIN_LIB") else None)


def _rows(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {check.name: check for check in checks}


def test_no_gpu_no_tensorrt_rows_warn_with_fixes(no_gpu_stack, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows(doctor.run_checks())
    for name in ("tensorrt", "cuda-python", "gpu", "plugin library"):
        assert rows[name].status == "warn", name
        assert rows[name].fix, name
    assert "JetPack 6 ships TensorRT 10.3" in rows["tensorrt"].fix
    assert "maskrt plugin build" in rows["plugin library"].fix
    assert rows["python"].status == "ok" and rows["numpy"].status == "ok" and rows["onnxruntime"].status == "ok"
    assert "CPUExecutionProvider" in rows["onnxruntime"].detail
    assert all(check.status in doctor.STATUSES for check in rows.values())

    # No backend named: nothing fails, exit 0; the table shows each fix under its row.
    assert main(["doctor"]) == 0
    table = capsys.readouterr().out
    assert "tensorrt" in table and "fix: JetPack 6 ships TensorRT 10.3" in table
    # TensorRT named: what it needs is missing -> fail rows, exit 1. ONNX Runtime named: all there.
    assert main(["doctor", "--backend", "tensorrt", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    failed = {row["name"] for row in report["checks"] if row["status"] == "fail"}
    assert failed == {"tensorrt", "cuda-python", "gpu", "plugin library", "plugin archs"}
    assert all(set(row) == {"name", "status", "detail", "fix"} for row in report["checks"])
    assert main(["doctor", "--backend", "onnxruntime"]) == 0


def test_doctor_runs_without_torch_and_without_traceback() -> None:
    """A runtime-only install: torch cannot be imported at all; doctor still reports every row."""
    code = ("import sys; sys.modules['torch'] = None; from maskrt.cli import main; "
            "code = main(['doctor', '--json']); assert 'torch' not in sys.modules or sys.modules['torch'] is None; "
            "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["checks"]}
    assert rows["torch"]["status"] == "warn" and "runtime" in rows["torch"]["detail"]


def test_stand_in_tensorrt_reports_its_version(no_gpu_stack, monkeypatch: pytest.MonkeyPatch) -> None:
    full = types.ModuleType("tensorrt")
    full.__version__ = "10.3.0.30"
    monkeypatch.setitem(sys.modules, "tensorrt", full)
    row = doctor.check_tensorrt()
    assert (row.status, row.detail) == ("ok", "tensorrt 10.3.0.30 (full: builds and runs engines)")

    lean = types.ModuleType("tensorrt_lean")
    lean.__version__ = "11.4.0.106"
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", lean)
    row = doctor.check_tensorrt()
    assert row.status == "ok" and row.detail.startswith("tensorrt_lean 11.4.0.106 (lean")


def _stand_in_cudart(major: int, minor: int, name: bytes = b"Orin") -> types.ModuleType:
    """cuda-python's runtime module as its calls answer: (error, value...) tuples."""
    runtime = types.ModuleType("cuda.bindings.runtime")
    runtime.cudaDriverGetVersion = lambda: (0, 12060)
    runtime.cudaRuntimeGetVersion = lambda: (0, 12060)
    runtime.cudaGetDeviceCount = lambda: (0, 1)
    runtime.cudaGetDeviceProperties = lambda device: (0, types.SimpleNamespace(name=name, major=major, minor=minor))
    return runtime


def _nvcc_library(tmp_path: Path, gencode: list[str]) -> Path:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA architectures test compiles a small CUDA library")
    source = tmp_path / "twice.cu"
    source.write_text(KERNEL_SOURCE)
    library = tmp_path / "libtwice.so"
    flags = [flag for code in gencode for flag in ("-gencode", code)]
    subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", *flags, str(source), "-o", str(library)],
                   check=True, capture_output=True, timeout=300)
    return library


def test_cuda_archs_read_from_nvcc_output(tmp_path: Path) -> None:
    library = _nvcc_library(tmp_path, ["arch=compute_80,code=sm_80", "arch=compute_87,code=sm_87",
                                       "arch=compute_90,code=compute_90"])
    assert doctor.cuda_archs_of_library(library) == ([80, 87], [90])
    assert doctor.cuda_archs_in_fatbins(b"no cuda here" * 100) == ([], [])


def test_plugin_archs_against_the_gpu(no_gpu_stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    library = _nvcc_library(tmp_path, ["arch=compute_87,code=sm_87"])
    monkeypatch.setenv("MASKRT_PLUGIN_LIB", str(library))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _stand_in_cudart(8, 7))
    rows = _rows(doctor.run_checks(["tensorrt"]))
    assert rows["cuda-python"].status == "ok"
    assert rows["cuda driver"].detail == "driver supports CUDA 12.6, runtime 12.6"
    assert rows["gpu"].detail == "Orin, compute capability 8.7 (sm_87)"
    assert rows["plugin library"].detail == str(library)
    assert rows["plugin archs"].status == "ok" and rows["plugin archs"].detail.startswith("sm_87; runs on this Orin")
    assert rows["tensorrt"].status == "fail"  # still missing, and asked for

    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _stand_in_cudart(7, 5, b"Tesla T4"))
    rows = _rows(doctor.run_checks())
    assert rows["plugin archs"].status == "warn"
    assert rows["plugin archs"].fix == "rebuild for this GPU: maskrt plugin build --cuda-archs 75"


def test_binary_compatibility_rule() -> None:
    """A cubin runs on its own major version at an equal or higher minor; PTX JIT-compiles upwards."""
    assert doctor._gpu_runs_library((8, 7), [80], [])  # sm_80 cubin on Orin
    assert doctor._gpu_runs_library((8, 6), [80, 90], [])
    assert not doctor._gpu_runs_library((9, 0), [80, 86, 87], [])
    assert not doctor._gpu_runs_library((8, 0), [86], [])
    assert doctor._gpu_runs_library((9, 0), [87], [87])  # compute_87 PTX JIT on Hopper
    assert not doctor._gpu_runs_library((7, 5), [87], [87])


def test_jetson_release_files(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    release = tmp_path / "etc/nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
                       "DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    rows = doctor.check_jetson(tmp_path)
    assert rows[0].status == "ok"
    assert rows[0].detail == "NVIDIA Jetson AGX Orin Developer Kit; L4T r36.4.3 = JetPack 6.2"
    assert rows[1].name == "power mode"

    release.write_text("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64\n")
    row = doctor.check_jetson(tmp_path)[0]
    assert row.status == "warn" and "JetPack 6.0" in row.detail and "JetPack 6.1" in row.fix
    assert doctor.check_jetson(tmp_path / "elsewhere")[0].detail.startswith("not a Jetson")
    assert doctor.jetson_release("garbage") == ("?", None)


def test_cameras_row(tmp_path: Path) -> None:
    assert doctor.check_cameras(str(tmp_path / "video*")).status == "warn"
    (tmp_path / "video0").touch()
    row = doctor.check_cameras(str(tmp_path / "video*"))
    assert (row.status, row.detail) == ("ok", str(tmp_path / "video0"))


def test_a_probe_that_raises_becomes_a_row(no_gpu_stack, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> doctor.Check:
        raise OSError("device tree unreadable")

    monkeypatch.setattr(doctor, "check_jetson", broken)
    rows = _rows(doctor.run_checks())
    assert rows["jetson"].status == "warn" and "OSError: device tree unreadable" in rows["jetson"].detail
    assert "torch" in rows  # the rows after it are still there
