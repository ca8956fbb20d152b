"""`maskrt doctor`: what maskrt needs on this machine, one row per need, each with its fix.

Every probe is guarded: a missing package, a machine without a GPU, a library that fails to
load or a tool that hangs gives a row, never a traceback. Nothing here imports torch (the
torch row reads the installed package's metadata only), so doctor runs on a runtime-only
Jetson install.

A row's status:
- ``ok``: present and usable;
- ``warn``: absent or limited, but not needed by a backend the user named (``--backend``);
- ``fail``: needed by a backend the user named and missing. ``maskrt doctor`` exits 1 only
  when a row fails.

The CUDA architectures of ``libmaskrt_plugins.so`` are read from the library itself: nvcc
embeds one fat binary per translation unit, whose entries name their ``sm_XX`` (see
`cuda_archs_of_library`), so no plugin change and no CUDA tool is needed to read them.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

STATUSES = ("ok", "warn", "fail")
BACKENDS = ("onnxruntime", "tensorrt")
# Which rows each backend cannot run without (row names below).
NEEDED_BY_BACKEND = {
    "onnxruntime": ("python", "numpy", "opencv", "onnxruntime"),
    "tensorrt": ("python", "numpy", "opencv", "tensorrt", "cuda-python", "gpu", "plugin library",
                 "plugin archs"),
}
# L4T release (from /etc/nv_tegra_release) -> JetPack release, for JetPack 5 and 6.
JETPACK_OF_L4T = {
    "35.1": "5.0.2", "35.2": "5.1", "35.3": "5.1.1", "35.4": "5.1.2", "35.5": "5.1.3", "35.6": "5.1.4",
    "36.2": "6.0 DP", "36.3": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
}
JETSON_TENSORRT_INCLUDE = Path("/usr/include/aarch64-linux-gnu")
TRTEXEC_JETPACK = Path("/usr/src/tensorrt/bin/trtexec")
FATBIN_MAGIC = 0xBA55ED50


@dataclass
class Check:
    """One row: what was checked, its status (ok | warn | fail), what was found, how to fix it."""

    name: str
    status: str
    detail: str
    fix: str = ""


# --- small guarded helpers -----------------------------------------------------------------

def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:  # a broken dist-info must not stop doctor
        return None


def _import(name: str) -> tuple[Any | None, str]:
    """(module, "") or (None, why it did not import). Catches everything: a module may fail with OSError."""
    try:
        return importlib.import_module(name), ""
    except ModuleNotFoundError as err:
        top = name.split(".")[0]
        return None, "not installed" if err.name in (None, top, name) else f"fails to import: {err}"
    except Exception as err:  # noqa: BLE001 - any failure to import is a finding, not a crash
        first_line = str(err).splitlines()[0] if str(err) else ""
        return None, f"fails to import: {type(err).__name__}: {first_line}"


def _run_tool(command: Sequence[str], timeout: float = 5.0) -> str | None:
    """stdout of a command, or None when it is absent, fails or takes longer than `timeout` seconds."""
    try:
        result = subprocess.run(list(command), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


# --- the plugin library's CUDA architectures -----------------------------------------------

def cuda_archs_in_fatbins(data: bytes) -> tuple[list[int], list[int]]:
    """(cubin archs, PTX archs) of every CUDA fat binary inside `data` (an ELF shared library).

    A fat binary starts with the magic 0xBA55ED50, a u16 version, a u16 header size (16) and a
    u64 size of its entries. Each entry starts with u16 kind (1 PTX, 2 cubin), u16 version,
    u32 header size, u64 payload size, ..., at byte 28 a u32 `arch` (87 for sm_87); the next
    entry follows the payload. Compressed payloads keep this header, so the archs read the same.
    """
    cubins: set[int] = set()
    ptx: set[int] = set()
    magic = struct.pack("<I", FATBIN_MAGIC)
    start = data.find(magic)
    while start != -1:
        if start + 16 <= len(data):
            version, header_size, entries_size = struct.unpack_from("<HHQ", data, start + 4)
            if header_size == 16 and start + 16 + entries_size <= len(data):
                entry = start + 16
                end = entry + entries_size
                while entry + 32 <= end:
                    kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
                    arch = struct.unpack_from("<I", data, entry + 28)[0]
                    if entry_header < 32 or kind not in (1, 2):
                        break
                    (ptx if kind == 1 else cubins).add(arch)
                    entry += entry_header + payload
        start = data.find(magic, start + 4)
    return sorted(cubins), sorted(ptx)


def cuda_archs_of_library(path: Path) -> tuple[list[int], list[int]]:
    """(cubin archs, PTX archs) embedded in a CUDA shared library; ([], []) when it holds none."""
    return cuda_archs_in_fatbins(path.read_bytes())


def _gpu_runs_library(capability: tuple[int, int], cubins: list[int], ptx: list[int]) -> bool:
    """A GPU runs a cubin of its own major version and an equal or lower minor (sm_86 runs sm_80),
    or JIT-compiles PTX of an equal or lower version."""
    major, minor = capability
    if any(arch // 10 == major and arch % 10 <= minor for arch in cubins):
        return True
    return any(arch <= major * 10 + minor for arch in ptx)


# --- the probes ----------------------------------------------------------------------------

def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info < (3, 10):
        return Check("python", "fail", f"{version} ({sys.executable})",
                     "maskrt needs Python >= 3.10 (JetPack 6 ships 3.10)")
    return Check("python", "ok", f"{version} ({sys.executable}), {platform.machine()}")


def check_numpy() -> Check:
    numpy, why = _import("numpy")
    if numpy is None:
        return Check("numpy", "warn", why, "pip install numpy")
    return Check("numpy", "ok", numpy.__version__)


def check_opencv() -> list[Check]:
    cv2, why = _import("cv2")
    if cv2 is None:
        return [Check("opencv", "warn", why, "pip install opencv-python-headless (on JetPack: sudo apt install "
                                              "nvidia-opencv, which has GStreamer for CSI cameras)"),
                Check("opencv gstreamer", "warn", "OpenCV is not installed", "install OpenCV first")]
    rows = [Check("opencv", "ok", cv2.__version__)]
    try:
        info = cv2.getBuildInformation()
    except Exception as err:  # noqa: BLE001
        return rows + [Check("opencv gstreamer", "warn", f"cannot read OpenCV's build information: {err}", "")]
    match = re.search(r"GStreamer:\s*(.+)", info)
    value = match.group(1).strip() if match else "not listed"
    if value.upper().startswith("YES"):
        rows.append(Check("opencv gstreamer", "ok", f"GStreamer {value} (CSI cameras through nvarguscamerasrc)"))
    else:
        rows.append(Check("opencv gstreamer", "warn", f"this OpenCV has no GStreamer ({value}): USB cameras and "
                          "files work, CSI cameras do not",
                          "for CSI cameras use an OpenCV built with GStreamer: on JetPack `pip uninstall "
                          "opencv-python-headless opencv-python` so JetPack's OpenCV (apt: nvidia-opencv) is used"))
    return rows


def check_onnxruntime() -> Check:
    ort, why = _import("onnxruntime")
    if ort is None:
        return Check("onnxruntime", "warn", why, "pip install onnxruntime (runs .onnx models; not needed for .engine)")
    try:
        providers = ", ".join(ort.get_available_providers())
    except Exception as err:  # noqa: BLE001
        providers = f"providers unreadable: {err}"
    return Check("onnxruntime", "ok", f"{ort.__version__}; providers: {providers}")


def check_tensorrt() -> Check:
    for module_name, kind in (("tensorrt", "full: builds and runs engines"),
                              ("tensorrt_lean", "lean: runs engines, cannot build them")):
        trt, why = _import(module_name)
        if trt is not None:
            version = getattr(trt, "__version__", "?")
            return Check("tensorrt", "ok", f"{module_name} {version} ({kind})")
    return Check("tensorrt", "warn", "neither tensorrt nor tensorrt_lean imports",
                 "JetPack 6 ships TensorRT 10.3 (sudo apt install nvidia-tensorrt; Python: python3-libnvinfer; "
                 "a venv sees it only when made with --system-site-packages); "
                 "on a PC: pip install 'maskrt[tensorrt]' or NVIDIA's tensorrt wheel")


def _cudart() -> tuple[Any | None, str]:
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        module, why = _import(name)
        if module is not None:
            return module, ""
    return None, why


def _cuda_call(function: Callable[..., Any], *args: Any) -> Any:
    """cuda-python returns (error, value...): the value, or None when the call failed."""
    result = function(*args)
    if not isinstance(result, tuple):
        return result
    error, *values = result
    if int(error) != 0:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _cuda_version_text(number: int) -> str:
    return f"{number // 1000}.{(number % 1000) // 10}"


def check_cuda() -> tuple[list[Check], tuple[str, tuple[int, int]] | None]:
    """Rows for cuda-python, the driver / runtime versions and the GPU; and (GPU name, capability)."""
    cudart, why = _cudart()
    version = _installed_version("cuda-python") or _installed_version("cuda-bindings")
    gpu: tuple[str, tuple[int, int]] | None = None
    if cudart is None:
        rows = [Check("cuda-python", "warn", why, "pip install cuda-python of the driver's CUDA major (JetPack 6: "
                                                  "pip install 'cuda-python>=12.6,<13'); the TensorRT backend "
                                                  "uses it for GPU buffers")]
        gpu = _gpu_from_nvidia_smi()
    else:
        rows = [Check("cuda-python", "ok", f"{version or '?'} ({cudart.__name__})")]
        try:
            driver = _cuda_call(cudart.cudaDriverGetVersion)
            runtime = _cuda_call(cudart.cudaRuntimeGetVersion)
            detail = (f"driver supports CUDA {_cuda_version_text(driver) if driver else 'none'}, "
                      f"runtime {_cuda_version_text(runtime) if runtime else '?'}")
            if not driver:
                rows.append(Check("cuda driver", "warn", detail, "install the NVIDIA driver (JetPack has it)"))
            elif runtime and runtime // 1000 > driver // 1000:
                rows.append(Check("cuda driver", "warn", detail,
                                  "the driver is older than cuda-python's CUDA major: install cuda-python of the "
                                  f"driver's major ({driver // 1000}.x) or update the driver"))
            else:
                rows.append(Check("cuda driver", "ok", detail))
            count = _cuda_call(cudart.cudaGetDeviceCount)
            if count:
                props = _cuda_call(cudart.cudaGetDeviceProperties, 0)
                name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) \
                    else str(props.name)
                gpu = (name, (int(props.major), int(props.minor)))
        except Exception as err:  # noqa: BLE001
            rows.append(Check("cuda driver", "warn", f"cuda-python could not query the driver: "
                              f"{type(err).__name__}: {err}", "check the NVIDIA driver and cuda-python's version"))
        if gpu is None:
            gpu = _gpu_from_nvidia_smi()
    if gpu is None:
        rows.append(Check("gpu", "warn", "no CUDA GPU found", "the TensorRT backend needs an NVIDIA GPU; "
                          "on this machine run .onnx models with --backend onnxruntime"))
    else:
        name, (major, minor) = gpu
        rows.append(Check("gpu", "ok", f"{name}, compute capability {major}.{minor} (sm_{major}{minor})"))
    return rows, gpu


def _gpu_from_nvidia_smi() -> tuple[str, tuple[int, int]] | None:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    text = _run_tool([tool, "--query-gpu=name,compute_cap", "--format=csv,noheader"])
    if not text:
        return None
    match = re.match(r"\s*(.+?),\s*(\d+)\.(\d+)", text.splitlines()[0])
    return (match.group(1), (int(match.group(2)), int(match.group(3)))) if match else None


def check_plugin(gpu: tuple[str, tuple[int, int]] | None, plugin: str | None = None) -> list[Check]:
    """Where libmaskrt_plugins.so is, which CUDA archs it holds, whether the GPU is among them."""
    from maskrt.errors import MaskrtError
    from maskrt.runtime.backends.tensorrt import find_plugin_library

    build = "maskrt plugin build --tensorrt-include <TensorRT include/> --cuda-archs <sm>"
    try:
        path = find_plugin_library(plugin)
    except MaskrtError as err:
        return [Check("plugin library", "warn", str(err), f"fix the path, or build it: {build}"),
                Check("plugin archs", "warn", "no plugin library", "")]
    if path is None:
        return [Check("plugin library", "warn", "libmaskrt_plugins.so not found (tried $MASKRT_PLUGIN_LIB, "
                      "./build/plugins/)", f"{build}, or set MASKRT_PLUGIN_LIB"),
                Check("plugin archs", "warn", "no plugin library", "")]
    rows = [Check("plugin library", "ok", str(path))]
    try:
        cubins, ptx = cuda_archs_of_library(path)
    except OSError as err:
        return rows + [Check("plugin archs", "warn", f"cannot read {path}: {err}", "")]
    if not cubins and not ptx:
        return rows + [Check("plugin archs", "warn", "no CUDA code found in the library", f"rebuild it: {build}")]
    archs = ", ".join([f"sm_{a}" for a in cubins] + [f"compute_{a} (PTX)" for a in ptx])
    if gpu is None:
        return rows + [Check("plugin archs", "ok", f"{archs}; no GPU here to compare")]
    name, capability = gpu
    own = f"sm_{capability[0]}{capability[1]}"
    if _gpu_runs_library(capability, cubins, ptx):
        return rows + [Check("plugin archs", "ok", f"{archs}; runs on this {name} ({own})")]
    return rows + [Check("plugin archs", "warn", f"{archs}; none runs on this {name} ({own})",
                         f"rebuild for this GPU: maskrt plugin build --cuda-archs {capability[0]}{capability[1]}")]


def check_build_tools() -> list[Check]:
    """What `maskrt plugin build` and `trtexec` need: nvcc, cmake, TensorRT headers, trtexec."""
    rows = []
    cuda_home = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    nvcc = shutil.which("nvcc") or (str(cuda_home / "bin" / "nvcc") if (cuda_home / "bin" / "nvcc").is_file() else None)
    if nvcc is None:
        rows.append(Check("nvcc", "warn", "not found on PATH or in $CUDA_HOME/bin",
                          "to build the plugin: install the CUDA toolkit (JetPack: sudo apt install nvidia-jetpack)"))
    elif shutil.which("nvcc") is None:
        rows.append(Check("nvcc", "ok", f"{nvcc} (not on PATH; maskrt plugin build finds it)"))
    else:
        rows.append(Check("nvcc", "ok", nvcc))
    cmake = shutil.which("cmake")
    rows.append(Check("cmake", "ok", cmake) if cmake else
                Check("cmake", "warn", "not on PATH", "to build the plugin: sudo apt install cmake (or pip install cmake)"))
    candidates = [os.environ.get("TENSORRT_INCLUDE_DIR", ""), str(JETSON_TENSORRT_INCLUDE),
                  "/usr/include/x86_64-linux-gnu", "/usr/include"]
    include = next((Path(c) for c in candidates if c and (Path(c) / "NvInferRuntime.h").is_file()), None)
    if include is None:
        rows.append(Check("tensorrt headers", "warn", "NvInferRuntime.h not found ($TENSORRT_INCLUDE_DIR, "
                          f"{JETSON_TENSORRT_INCLUDE}, /usr/include)",
                          "to build the plugin: JetPack: sudo apt install libnvinfer-dev; elsewhere set "
                          "TENSORRT_INCLUDE_DIR to TensorRT's include/"))
    else:
        from maskrt.plugins.build import tensorrt_header_version
        try:
            version = tensorrt_header_version(include)
        except OSError:
            version = "?"
        rows.append(Check("tensorrt headers", "ok", f"{include} (TensorRT {version}); pass "
                          f"--tensorrt-include {include} to maskrt plugin build"))
    trtexec = shutil.which("trtexec") or (str(TRTEXEC_JETPACK) if TRTEXEC_JETPACK.is_file() else None)
    rows.append(Check("trtexec", "ok", trtexec) if trtexec else
                Check("trtexec", "warn", f"not on PATH or at {TRTEXEC_JETPACK}",
                      "optional (maskrt build does the same): JetPack: sudo apt install libnvinfer-bin"))
    return rows


def jetson_release(text: str) -> tuple[str, str | None]:
    """('36.4.3', '6.2') from /etc/nv_tegra_release's first line ('# R36 (release), REVISION: 4.3, ...')."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not match:
        return "?", None
    l4t = f"{match.group(1)}.{match.group(2).rstrip('.')}"
    jetpack = JETPACK_OF_L4T.get(l4t) or JETPACK_OF_L4T.get(".".join(l4t.split(".")[:2]))
    return l4t, jetpack


def check_jetson(root: Path = Path("/")) -> list[Check]:
    """The Jetson module, L4T / JetPack release and power mode, when this is a Jetson."""
    release = _read_text(root / "etc/nv_tegra_release")
    if release is None:
        return [Check("jetson", "ok", "not a Jetson (no /etc/nv_tegra_release)")]
    model = _read_text(root / "proc/device-tree/model") or "unknown module"
    l4t, jetpack = jetson_release(release)
    rows = []
    described = f"{model}; L4T r{l4t}" + (f" = JetPack {jetpack}" if jetpack else "")
    numbers = tuple(int(part) for part in re.findall(r"\d+", l4t))
    if numbers[:1] == (36,) and numbers >= (36, 4):
        rows.append(Check("jetson", "ok", described))
    elif l4t.startswith("36."):
        rows.append(Check("jetson", "warn", described + " (TensorRT 8.6: no IPluginV3, so no maskrt plugin)",
                          "upgrade to JetPack 6.1 or later (L4T r36.4: TensorRT 10.3, CUDA 12.6); "
                          "ONNX Runtime runs .onnx models meanwhile"))
    else:
        rows.append(Check("jetson", "warn", described,
                          "maskrt's Jetson guide (docs/jetson.md) is written for JetPack 6.1+ (L4T r36.4)"))
    nvpmodel = shutil.which("nvpmodel")
    query = _run_tool([nvpmodel, "-q"]) if nvpmodel else None
    if query:
        match = re.search(r"NV Power Mode:\s*(.+)", query)
        mode = match.group(1).strip() if match else query.strip().splitlines()[0]
        rows.append(Check("power mode", "ok", f"{mode} (sudo nvpmodel -q --verbose lists the modes; "
                          "sudo jetson_clocks pins the clocks for timing)"))
    else:
        rows.append(Check("power mode", "warn", "nvpmodel -q gave nothing (not found, or it needs sudo)",
                          "sudo nvpmodel -q; sudo nvpmodel -m 0 selects the fastest mode on most modules"))
    return rows


def check_cameras(pattern: str = "/dev/video*") -> Check:
    devices = sorted(glob.glob(pattern))
    if not devices:
        return Check("cameras", "warn", "no /dev/video* devices",
                     "plug in a USB camera or connect a CSI camera (CSI: check `ls /dev/video*` after a reboot "
                     "and `sudo systemctl status nvargus-daemon`); files and rtsp:// sources need no camera")
    return Check("cameras", "ok", ", ".join(devices))


def check_torch() -> Check:
    if importlib.util.find_spec("torch") is None:
        return Check("torch", "warn", "not installed: the runtime (infer, bench, .onnx / .engine) works without it",
                     "for train / export / convert: pip install torch, then pip install 'maskrt[torch]'")
    return Check("torch", "ok", f"{_installed_version('torch') or '?'} (not imported by doctor)")


# --- the report ----------------------------------------------------------------------------

def _guarded(name: str, probe: Callable[[], Any]) -> list[Check]:
    """The probe's rows; an unexpected exception becomes one warn row instead of a traceback."""
    try:
        result = probe()
    except Exception as err:  # noqa: BLE001 - doctor reports, it does not crash
        return [Check(name, "warn", f"could not be checked: {type(err).__name__}: {err}",
                      "report this with the output of `maskrt doctor --json`")]
    return result if isinstance(result, list) else [result]


def run_checks(backends: Sequence[str] = (), plugin: str | None = None) -> list[Check]:
    """Every row, with the rows the named backends need turned from warn into fail."""
    checks = [*_guarded("python", check_python), *_guarded("numpy", check_numpy),
              *_guarded("opencv", check_opencv), *_guarded("onnxruntime", check_onnxruntime),
              *_guarded("tensorrt", check_tensorrt)]
    gpu: tuple[str, tuple[int, int]] | None = None
    try:
        cuda_rows, gpu = check_cuda()
    except Exception as err:  # noqa: BLE001
        cuda_rows = [Check("cuda-python", "warn", f"could not be checked: {type(err).__name__}: {err}", "")]
    checks += cuda_rows
    checks += _guarded("plugin library", lambda: check_plugin(gpu, plugin))
    checks += _guarded("build tools", check_build_tools)
    checks += _guarded("jetson", check_jetson)
    checks += _guarded("cameras", check_cameras)
    checks += _guarded("torch", check_torch)
    needed = {name for backend in backends for name in NEEDED_BY_BACKEND[backend]}
    for check in checks:
        if check.status == "warn" and check.name in needed:
            check.status = "fail"
    return checks


def format_table(checks: Sequence[Check]) -> str:
    """A plain-text table: name, status, detail; each row not ok followed by its fix."""
    width = max(len(c.name) for c in checks)
    lines = [f"{'check'.ljust(width)}  status  detail"]
    for check in checks:
        lines.append(f"{check.name.ljust(width)}  {check.status.ljust(6)}  {check.detail}")
        if check.status != "ok" and check.fix:
            lines.append(f"{''.ljust(width)}  {''.ljust(6)}  fix: {check.fix}")
    failed = [c.name for c in checks if c.status == "fail"]
    warned = [c.name for c in checks if c.status == "warn"]
    lines.append("")
    lines.append(f"{len(checks) - len(failed) - len(warned)} ok, {len(warned)} warn, {len(failed)} fail"
                 + (f" (missing for the backend asked for: {', '.join(failed)})" if failed else ""))
    return "\n".join(lines)


def doctor_command(args: argparse.Namespace) -> int:
    """Print the table (or JSON with --json); exit 1 when a row the named backends need fails."""
    checks = run_checks(args.backend or (), plugin=args.plugin)
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(format_table(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0
