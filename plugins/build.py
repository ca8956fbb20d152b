"""`maskrt plugin build`: configure and build the plugin libraries with CMake and nvcc.

Builds, from `plugins/CMakeLists.txt`:
- `libmaskrt_kernels.so`: the MultilevelRoIAlign CUDA kernel behind a C ABI (needs no TensorRT);
- `libmaskrt_plugins.so`: the TensorRT IPluginV3 plugin, only when a TensorRT include folder is
  given (`--tensorrt-include` or `$TENSORRT_INCLUDE_DIR`).
`--cpu-only` builds the CPU twin instead (`maskrt.plugins.cpu`, g++ only, no CMake or nvcc).

Never imports torch.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from maskrt.errors import MaskrtError

PLUGIN_SOURCE_DIR = Path(__file__).resolve().parent
DEFAULT_BUILD_DIR = Path("build/plugins")
# Turing, Ampere, Orin (87, JetPack 6), Ada, Hopper. CUDA 13's nvcc has no sm_72 (Xavier).
DEFAULT_CUDA_ARCHS = "75;80;86;87;89;90"
PLUGIN_LIBRARY = "libmaskrt_plugins.so"
KERNEL_LIBRARY = "libmaskrt_kernels.so"
_ARCH_LIST = re.compile(r"^[0-9]+[af]?(-real|-virtual)?(;[0-9]+[af]?(-real|-virtual)?)*$")


@dataclass(frozen=True)
class PluginBuild:
    """What one build produced. plugin_library is None when no TensorRT headers were given."""

    build_dir: Path
    kernel_library: Path
    plugin_library: Path | None
    tensorrt_include: Path | None
    cuda_archs: str


def find_nvcc() -> str:
    """nvcc from $CUDACXX, PATH, or $CUDA_HOME/bin (default /usr/local/cuda); MaskrtError when there is none."""
    cuda_home = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    candidates = [os.environ.get("CUDACXX", ""), shutil.which("nvcc") or "", str(cuda_home / "bin" / "nvcc")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(Path(candidate).resolve())  # one spelling per nvcc: CMake re-configures on a change
    raise MaskrtError("nvcc not found (tried $CUDACXX, PATH, $CUDA_HOME/bin): install the CUDA toolkit "
                      "to build the MultilevelRoIAlign plugin, or use --cpu-only for the CPU twin")


def find_cmake() -> str:
    """cmake from PATH; MaskrtError when there is none."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise MaskrtError("cmake not found on PATH: install CMake >= 3.18 (e.g. `pip install cmake`) "
                          "to build the MultilevelRoIAlign plugin")
    return cmake


def resolve_tensorrt_include(explicit: str | None) -> Path | None:
    """The TensorRT include folder: the argument, else $TENSORRT_INCLUDE_DIR, else None.

    A folder given but lacking NvInferRuntime.h is a MaskrtError (a wrong path should not
    silently build without the plugin).
    """
    text = explicit or os.environ.get("TENSORRT_INCLUDE_DIR") or ""
    if not text:
        return None
    folder = Path(text).expanduser().resolve()
    if not (folder / "NvInferRuntime.h").is_file():
        raise MaskrtError(f"TensorRT include folder {folder} has no NvInferRuntime.h "
                          "(point --tensorrt-include / TENSORRT_INCLUDE_DIR at TensorRT's include/)")
    return folder


def tensorrt_header_version(include_dir: Path) -> str:
    """'MAJOR.MINOR.PATCH' read from NvInferVersion.h (TensorRT 10 and 11 spell the macros differently)."""
    text = (include_dir / "NvInferVersion.h").read_text(errors="replace")
    parts = []
    for part in ("MAJOR", "MINOR", "PATCH"):
        match = (re.search(rf"#define\s+NV_TENSORRT_{part}\s+(\d+)", text)
                 or re.search(rf"#define\s+TRT_{part}_ENTERPRISE\s+(\d+)", text))
        parts.append(match.group(1) if match else "?")
    return ".".join(parts)


def plugin_library_tensorrt_major(library: str | Path) -> int | None:
    """The TensorRT major whose headers libmaskrt_plugins.so was built against (it serves processes of
    that major only), read from the record the build leaves in the file (without loading it); None
    for a file without the record (not our plugin, or built before the record existed).
    """
    if not Path(library).is_file():
        return None  # a bare name (dlopen searches for it): TensorRT resolves it, and says if it cannot
    try:
        data = Path(library).read_bytes()
    except OSError as err:
        raise MaskrtError(f"cannot read the plugin library {library}: {err.strerror}") from None
    match = re.search(rb"maskrt_plugin_tensorrt_major=(\d+)\0", data)
    return int(match.group(1)) if match else None


def _first_error_line(log: str) -> str:
    for line in log.splitlines():
        if re.search(r"error|Error|ERROR", line):
            return line.strip()[:300]
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


def _run(command: list[str], log_path: Path, what: str) -> None:
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with log_path.open("a") as log:
        log.write("$ " + " ".join(command) + "\n" + result.stdout + "\n")
    if result.returncode != 0:
        raise MaskrtError(f"{what} failed: {_first_error_line(result.stdout)} (full log: {log_path})")


def _forget_other_compiler(build_path: Path, nvcc: str) -> None:
    """Drops a CMake cache made with another nvcc.

    CMake cannot switch compilers in place: it wipes its cache and re-configures without the
    -D values just given (so TENSORRT_INCLUDE_DIR would silently vanish).
    """
    cache = build_path / "CMakeCache.txt"
    if not cache.is_file():
        return
    match = re.search(r"^CMAKE_CUDA_COMPILER:\w+=(.*)$", cache.read_text(errors="replace"), re.MULTILINE)
    if match and match.group(1).strip() and Path(match.group(1).strip()).resolve() != Path(nvcc):
        cache.unlink()
        shutil.rmtree(build_path / "CMakeFiles", ignore_errors=True)


def build_plugins(build_dir: str | Path = DEFAULT_BUILD_DIR, tensorrt_include: str | None = None,
                  cuda_archs: str | None = None) -> PluginBuild:
    """Configures and builds plugins/CMakeLists.txt into build_dir; returns what was built."""
    cmake = find_cmake()
    nvcc = find_nvcc()
    include_dir = resolve_tensorrt_include(tensorrt_include)
    archs = (cuda_archs or DEFAULT_CUDA_ARCHS).strip()
    if not _ARCH_LIST.match(archs):
        raise MaskrtError(f"--cuda-archs must be a ';'-separated list of SM numbers like '87;90', got {archs!r}")
    build_path = Path(build_dir).resolve()
    build_path.mkdir(parents=True, exist_ok=True)
    log_path = build_path / "build.log"
    log_path.write_text("")

    _forget_other_compiler(build_path, nvcc)
    configure = [cmake, "-S", str(PLUGIN_SOURCE_DIR), "-B", str(build_path),
                 f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
                 # Always passed, empty when absent, so an earlier configure's value does not linger.
                 f"-DTENSORRT_INCLUDE_DIR={include_dir or ''}"]
    if not (build_path / "CMakeCache.txt").exists() and shutil.which("ninja"):
        configure += ["-G", "Ninja"]  # a generator can only be chosen on the first configure
    _run(configure, log_path, "cmake configure")
    _run([cmake, "--build", str(build_path), "--parallel", str(min(os.cpu_count() or 1, 4))],
         log_path, "cmake build")

    kernel_library = build_path / KERNEL_LIBRARY
    plugin_library = build_path / PLUGIN_LIBRARY if include_dir else None
    for library in (kernel_library, plugin_library):
        if library is not None and not library.is_file():
            raise MaskrtError(f"the build finished but {library} is missing (full log: {log_path})")
    if plugin_library is None and (build_path / PLUGIN_LIBRARY).exists():
        (build_path / PLUGIN_LIBRARY).unlink()  # stale, from a build with headers: not this build's
    return PluginBuild(build_path, kernel_library, plugin_library, include_dir, archs)


def plugin_build_command(args: argparse.Namespace) -> int:
    """`maskrt plugin build`: build the libraries and say what was (and was not) built."""
    if args.cpu_only:
        from maskrt.plugins.cpu import library_path
        print(f"built the CPU twin: {library_path()}")
        return 0
    built = build_plugins(args.build_dir, args.tensorrt_include, args.cuda_archs)
    print(f"built {built.kernel_library} (CUDA archs {built.cuda_archs})")
    if built.plugin_library is not None:
        version = tensorrt_header_version(built.tensorrt_include)  # type: ignore[arg-type]
        print(f"built {built.plugin_library} against TensorRT {version} headers in {built.tensorrt_include}: "
              f"it serves TensorRT {version.split('.')[0]}.x processes only (build once per major)")
        print(f"use it: trtexec --onnx=model.onnx --dynamicPlugins={built.plugin_library}")
    else:
        print(f"no TensorRT include folder (--tensorrt-include or $TENSORRT_INCLUDE_DIR): built the kernel "
              f"library only, NOT {PLUGIN_LIBRARY}")
    return 0
