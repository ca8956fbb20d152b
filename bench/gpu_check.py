"""`make gpu-check`: prove the GPU half of maskrt in one command (docs/gpu.md).

    python3 bench/gpu_check.py [--out runs/gpu_check] [--only kernel,plugin] [--dry-run]

Builds the CUDA kernel, the TensorRT plugin library and the plugin harness for the GPU found
(its architecture only), then runs each check in its own process with a time limit:

1. kernel     the CUDA kernel = the contract (CPU twin) and = torchvision's MultiScaleRoIAlign
2. sanitizer  compute-sanitizer memcheck + racecheck on small launches (a refusal is reported)
3. plugin     the IPluginV3 plugin on the GPU through its creator, without TensorRT's libraries
4. speed      kernel time vs torchvision's CUDA op and vs the DRAM floor
5. pytorch    maskrt's PyTorch model on CUDA = torchvision's maskrcnn_resnet50_fpn; latency ratio
6. training   training on CUDA under autocast: losses finite and falling; step time ratio
7. loop       the 1080p camera loop with overlays saved, beside the model on CUDA: loop / model alone

Writes OUT/gpu_check.json and OUT/gpu_check.md after every check (a run cut short keeps what
finished). Exit status 1 only when a correctness check fails or cannot finish; speed goals
missed are reported, not failed. `--dry-run` (no GPU needed) compiles the kernels and the
harness, runs the harness's device-free steps, imports every module the run needs and prints
what it would run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # gpu_kernel, beside this file

import gpu_kernel  # noqa: E402  (numpy + maskrt.plugins only: no torch)

HARNESS_SOURCE = REPO / "plugins" / "multilevel_roi_align" / "MultilevelRoIAlignPluginCheck.cpp"
CPU_TWIN_SOURCE = REPO / "plugins" / "cpu" / "MultilevelRoIAlignCpu.cpp"
HARNESS_NAME = "maskrt_plugin_check_gpu"
DEFAULT_BUDGET_S = 360.0  # of the 8 minutes: the probe and the build (~1 min) come before


@dataclasses.dataclass(frozen=True)
class Check:
    """One check: its number, what it proves, its time limit, and whether it proves correctness
    (then a failure, an error or a timeout makes the exit status 1)."""

    number: int
    name: str
    title: str
    limit_s: float
    correctness: bool


CHECKS = [
    Check(1, "kernel", "CUDA kernel = contract (CPU twin) and = torchvision MultiScaleRoIAlign", 90, True),
    Check(2, "sanitizer", "compute-sanitizer memcheck + racecheck", 140, True),
    Check(3, "plugin", "IPluginV3 plugin on the GPU via its creator (no TensorRT libraries)", 60, True),
    Check(4, "speed", "kernel time vs torchvision and the DRAM floor", 90, False),
    Check(5, "pytorch", "PyTorch model on CUDA = torchvision maskrcnn_resnet50_fpn; eager latency", 150, True),
    Check(6, "training", "training on CUDA under autocast; step time vs torchvision", 150, True),
    Check(7, "loop", "1080p camera loop with overlays beside the model on CUDA: loop / model alone", 75, False),
]
CHECKS_BY_NAME = {check.name: check for check in CHECKS}


class NotRun(Exception):
    """A check that cannot run here (missing tool, headers, API): reported, never a failure."""


# ---- options ---------------------------------------------------------------------------------

def parse_only(text: str | None) -> list[Check]:
    """'--only kernel,plugin' -> those checks in run order; None/'' -> all. Unknown names: ValueError."""
    if not text:
        return list(CHECKS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CHECKS_BY_NAME]
    if unknown or not names:
        raise ValueError(f"unknown check(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(CHECKS_BY_NAME)}")
    return [check for check in CHECKS if check.name in names]


def tensorrt_include_dir() -> Path | None:
    """$TENSORRT_INCLUDE_DIR, else third_party/TensorRT/include in the repository; None if neither has the headers."""
    for candidate in (os.environ.get("TENSORRT_INCLUDE_DIR"), str(REPO / "third_party" / "TensorRT" / "include")):
        if candidate and (Path(candidate) / "NvInferRuntime.h").is_file():
            return Path(candidate).resolve()
    return None


# ---- environment ---------------------------------------------------------------------------------

_PROBE = r"""
import json, sys
info = {}
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        info["device"] = torch.cuda.get_device_name(0)
        info["arch"] = f"{major}{minor}"
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as error:
    info["torch_error"] = f"{type(error).__name__}: {error}"
try:
    import torchvision
    info["torchvision"] = torchvision.__version__
    from torchvision.ops import roi_align  # noqa: F401  (its compiled ops)
except Exception as error:
    info["torchvision_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
print(json.dumps(info))
"""


def _run_text(command: list[str], timeout: float = 30) -> str | None:
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def probe_environment() -> dict[str, Any]:
    """Device, driver, CUDA, torch/torchvision versions; from subprocesses (this process stays torch-free)."""
    info: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "host": platform.node(), "python": platform.python_version()}
    text = _run_text([sys.executable, "-c", _PROBE], timeout=120)
    if text:
        try:
            info.update(json.loads(text.strip().splitlines()[-1]))
        except (json.JSONDecodeError, IndexError):
            info["probe_error"] = text[-300:]
    smi = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total",
                     "--format=csv,noheader"])
    if smi and smi.strip():
        fields = [field.strip() for field in smi.strip().splitlines()[0].split(",")]
        if len(fields) >= 3:
            info.setdefault("device", fields[0])
            info["driver"] = fields[1]
            info.setdefault("arch", fields[2].replace(".", ""))
    nvcc = _run_text(["nvcc", "--version"]) or ""
    match = re.search(r"release ([0-9.]+)", nvcc)
    info["nvcc"] = match.group(1) if match else None
    info["commit"] = (_run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "").strip() or None
    return info


# ---- build -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Built:
    """What the build produced (paths as str for JSON); None where it was not built."""

    arch: str
    kernel_library: str | None = None
    plugin_library: str | None = None
    harness: str | None = None
    tensorrt_include: str | None = None
    tensorrt_version: str | None = None
    cpu_twin: str | None = None
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


def build_harness(include: Path, out: Path) -> Path:
    """The plugin harness in GPU mode: this file + the CPU twin, host code only, linked with cudart (static) and libdl."""
    from maskrt.plugins.build import find_nvcc
    command = [find_nvcc(), "-std=c++17", "-O2", "-DMASKRT_PLUGIN_CHECK_GPU", "-Xcompiler", "-Wall,-Wextra",
               "-isystem", str(include), "-I", str(CPU_TWIN_SOURCE.parent), str(HARNESS_SOURCE),
               str(CPU_TWIN_SOURCE), "-o", str(out), "-ldl"]
    stamp = out.with_suffix(".command")
    sources = (HARNESS_SOURCE, CPU_TWIN_SOURCE, CPU_TWIN_SOURCE.with_suffix(".h"))
    if (out.is_file() and stamp.is_file() and stamp.read_text() == " ".join(command)
            and all(source.stat().st_mtime < out.stat().st_mtime for source in sources)):
        return out  # built from these sources with this command already
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"harness build failed: {result.stdout.strip()[-800:]}")
    stamp.write_text(" ".join(command))
    return out


def build_all(build_dir: Path, arch: str, log: Callable[[str], None]) -> Built:
    """Kernel library (+ plugin library and harness when TensorRT headers are found) for `arch`, and the CPU twin."""
    from maskrt.plugins.build import build_plugins, tensorrt_header_version
    from maskrt.plugins.cpu import library_path

    built = Built(arch=arch)
    include = tensorrt_include_dir()
    built.tensorrt_include = str(include) if include else None
    try:
        built.cpu_twin = str(library_path())
    except Exception as error:  # noqa: BLE001  (reported in the table)
        built.errors["cpu_twin"] = str(error)
    start = time.perf_counter()
    try:
        # One folder per arch and header set: switching either does not rebuild the other.
        tag = f"sm{arch}-" + (f"trt{tensorrt_header_version(include)}" if include else "no-trt")
        result = build_plugins(build_dir / tag, str(include) if include else None, arch)
        built.kernel_library = str(result.kernel_library)
        built.plugin_library = str(result.plugin_library) if result.plugin_library else None
        built.tensorrt_version = tensorrt_header_version(include) if include else None
        log(f"built {result.kernel_library.name}" + (f" and {result.plugin_library.name}" if result.plugin_library
                                                      else "") + f" for sm_{arch} in {time.perf_counter() - start:.0f} s")
    except Exception as error:  # noqa: BLE001
        built.errors["plugins"] = str(error)
        log(f"plugin build FAILED: {error}")
    if include is not None and built.plugin_library:
        try:
            built.harness = str(build_harness(include, build_dir / f"sm{arch}-trt{built.tensorrt_version}" / HARNESS_NAME))
            log(f"built {HARNESS_NAME} against TensorRT {built.tensorrt_version} headers")
        except Exception as error:  # noqa: BLE001
            built.errors["harness"] = str(error)
            log(f"harness build FAILED: {error}")
    return built


# ---- figures and the report ---------------------------------------------------------------------

def figure(name: str, value: float | None, unit: str = "", goal: str | None = None, passed: bool | None = None,
           kind: str = "correctness", detail: str | None = None) -> dict:
    """One row of the table. passed None = informational (no goal)."""
    row = {"name": name, "value": value, "unit": unit, "goal": goal, "pass": passed, "kind": kind}
    if detail:
        row["detail"] = detail
    return row


def check_status(figures: list[dict], error: str | None = None, not_run: str | None = None) -> str:
    """'not run: why' | 'error: why' | 'fail' (a correctness figure failed) | 'goal missed' | 'pass'."""
    if not_run:
        return f"not run: {not_run}"
    if any(f.get("pass") is False and f.get("kind") == "correctness" for f in figures):
        return "fail"
    if error:
        return f"error: {error}"
    if any(f.get("pass") is False for f in figures):
        return "goal missed"
    return "pass"


def is_failure(check: Check, status: str) -> bool:
    """Does this status make the exit status 1? Correctness failures, and errors/timeouts of correctness checks."""
    return status == "fail" or (check.correctness and status.startswith("error"))


def summarise(entries: list[dict], failures: list[str]) -> str:
    """One line: 'FAIL: kernel, plugin' or 'no failure: 4 passed, 1 goal missed, 1 not run'."""
    if failures:
        return "FAIL: " + ", ".join(failures)
    counts: dict[str, int] = {}
    for entry in entries:
        kind = entry["status"].split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return "no failure: " + ", ".join(f"{count} {kind if kind != 'pass' else 'passed'}"
                                      for kind, count in counts.items())


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    if unit in ("max rel. error",) or (value != 0 and abs(value) < 1e-2):
        return f"{value:.2e}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def render_markdown(report: dict) -> str:
    """gpu_check.md: the environment, a table row per figure, and the list of what did not run."""
    env = report.get("environment", {})
    lines = ["# maskrt GPU check", "",
             f"- device: {env.get('device', 'none')} (sm_{env.get('arch', '?')}), driver {env.get('driver', '?')}, "
             f"CUDA {env.get('torch_cuda') or '?'} (torch) / nvcc {env.get('nvcc') or '?'}",
             f"- torch {env.get('torch', '?')}, torchvision {env.get('torchvision', env.get('torchvision_error', '?'))}",
             f"- date {env.get('date', '?')}, commit {env.get('commit', '?')}, wall {report.get('wall_s', 0):.0f} s"
             + (" (dry run)" if report.get("dry_run") else ""),
             f"- result: **{report.get('result', 'incomplete')}**", "",
             "| # | check | figure | value | goal | result |", "|---|---|---|---|---|---|"]
    not_run = []
    for entry in report.get("checks", []):
        status = entry["status"]
        label = f"{entry['number']} | {entry['name']}"
        if not entry["figures"]:
            lines.append(f"| {label} | - | - | - | {status} |")
        for row in entry["figures"]:
            verdict = {True: "pass", False: "FAIL" if row.get("kind") == "correctness" else "goal missed",
                       None: "-"}[row.get("pass")]
            value = format_value(row.get("value"), row.get("unit", ""))
            unit = f" {row['unit']}" if row.get("unit") and row.get("unit") != "max rel. error" else ""
            detail = f" ({row['detail']})" if row.get("detail") else ""
            lines.append(f"| {label} | {row['name']}{detail} | {value}{unit} | {row.get('goal') or '-'} | {verdict} |")
        if entry["figures"] and not status.startswith("pass"):
            lines.append(f"| {label} | (check) | - | - | {status} |")
        if status.startswith("not run") or status.startswith("error"):
            not_run.append(f"- {entry['number']} {entry['name']}: {status}")
    lines += ["", "## Not run", ""]
    lines += not_run or ["- every selected check ran"]
    lines += ["- any TensorRT engine (no TensorRT builder on these machines): the ONNX parser's mapping to the "
              "plugin, an engine build, engine inference"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    """gpu_check.json and gpu_check.md, each replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(report, indent=2, default=str)),
                       ("gpu_check.md", render_markdown(report))):
        handle, temporary = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, out / name)


# ---- the checks (each runs in a child process: `--child NAME`) --------------------------------------

def _load_kernel(built: dict):
    from maskrt.plugins.kernel_lib import KernelLibrary
    if not built.get("kernel_library"):
        raise RuntimeError(f"the kernel library was not built: {built.get('errors', {}).get('plugins', '?')}")
    return KernelLibrary(built["kernel_library"])


def check_kernel(built: dict, emit: Callable[[dict], None]) -> None:
    library = _load_kernel(built)
    device = gpu_kernel.open_device("torch")
    run_torchvision = gpu_kernel.torchvision_runner("cuda")
    if run_torchvision is None:
        emit(figure("kernel vs torchvision", None, goal=None, passed=None, detail="torchvision does not import"))
    gpu_kernel.run_contract(gpu_kernel.gpu_runner(library, device), run_torchvision, emit=emit)


# What compute-sanitizer prints when it cannot instrument this device (some virtualised GPUs).
SANITIZER_REFUSALS = ("Device not supported", "not supported on this device", "Unable to find injection")


def sanitizer_verdict(output: str, returncode: int) -> tuple[bool | None, str]:
    """(passed, detail) from compute-sanitizer's output; passed None when the tool refused the device."""
    for marker in SANITIZER_REFUSALS:
        if marker in output:
            return None, f"refused: {marker}"
    match = (re.search(r"ERROR SUMMARY: (\d+) error", output)
             or re.search(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", output))
    if match is None:
        return None, f"no summary (exit {returncode}): {output.strip().splitlines()[-1][:200] if output.strip() else ''}"
    errors = int(match.group(1))
    return errors == 0 and returncode == 0, f"{errors} errors, exit {returncode}"


def check_sanitizer(built: dict, emit: Callable[[dict], None]) -> None:
    tool = shutil.which("compute-sanitizer") or (
        "/usr/local/cuda/bin/compute-sanitizer" if Path("/usr/local/cuda/bin/compute-sanitizer").is_file() else None)
    if tool is None:
        raise NotRun("compute-sanitizer not found")
    if not built.get("kernel_library"):
        raise RuntimeError("the kernel library was not built")
    kernel_run = [sys.executable, str(BENCH / "gpu_kernel.py"), "--lib", built["kernel_library"],
                  "--suite", "small", "--device", "cuda-python"]
    runs = []
    if _has_cuda_python():  # the kernel from Python without torch (torch under the sanitizer takes minutes)
        runs += [("memcheck", "kernel (small contract cases)", kernel_run),
                 ("racecheck", "kernel (small contract cases)", kernel_run)]
    else:
        emit(figure("kernel under compute-sanitizer", None, "", "0 errors", None,
                    detail="not run: cuda-python does not import"))
    if built.get("harness"):
        runs.append(("memcheck", "plugin harness (--small)", [built["harness"], built["plugin_library"], "--small"]))
    if not runs:
        raise NotRun("neither cuda-python nor the plugin harness is available to run under the sanitizer")
    refused = 0
    for tool_name, target, command in runs:
        try:
            result = subprocess.run([tool, "--tool", tool_name, "--error-exitcode", "99", *command],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=40)
            passed, detail = sanitizer_verdict(result.stdout, result.returncode)
        except subprocess.TimeoutExpired:  # slow under the tool: no verdict, not a failure
            passed, detail = None, "timed out after 40 s"
        refused += passed is None
        emit(figure(f"{tool_name}, {target}", None, "", "0 errors", passed, detail=detail))
    if refused == len(runs):
        raise NotRun("compute-sanitizer gave no verdict here (refused the device or timed out): reported, not a failure")


def parse_harness_output(output: str) -> list[dict]:
    """The harness's PASS/FAIL lines -> figures (max_rel values where it prints them)."""
    rows = []
    for line in output.splitlines():
        match = re.match(r"(PASS|FAIL) (\S+)(?: max_rel=(\S+) tol=(\S+))?(?:: (.*))?$", line.strip())
        if not match:
            continue
        verdict, name, value, tolerance, why = match.groups()
        rows.append(figure(name, float(value) if value else None, "max rel. error" if value else "",
                           f"<= {tolerance}" if tolerance else "passes", verdict == "PASS", detail=why or None))
    return rows


def check_plugin(built: dict, emit: Callable[[dict], None]) -> None:
    if not built.get("tensorrt_include"):
        raise NotRun("no TensorRT headers ($TENSORRT_INCLUDE_DIR or third_party/TensorRT/include)")
    if not built.get("harness"):
        raise RuntimeError(f"the harness was not built: {built.get('errors')}")
    command = [built["harness"], built["plugin_library"],
               "--fp32-tol", repr(gpu_kernel.TOLERANCE["float32"]), "--fp16-tol", repr(gpu_kernel.TOLERANCE["float16"])]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=50)
    rows = parse_harness_output(result.stdout)
    gpu_rows = [row for row in rows if row["name"].startswith("gpu_")]
    interface_rows = [row for row in rows if not row["name"].startswith("gpu_")]
    failed_interface = [row["name"] for row in interface_rows if not row["pass"]]
    emit(figure(f"interface checks (TensorRT {built.get('tensorrt_version')} headers)", len(interface_rows) - len(failed_interface),
                "passed", f"all {len(interface_rows)}", not failed_interface,
                detail="failed: " + ", ".join(failed_interface) if failed_interface else None))
    for row in gpu_rows:
        if row["unit"] or not row["pass"]:  # numbers, and any failure, one row each
            emit(row)
    passed = sum(1 for row in gpu_rows if row["pass"])
    emit(figure("GPU steps passed (create, build phase, attach, enqueue, clone, recreate)", passed, "",
                f"all {len(gpu_rows)}", passed == len(gpu_rows) and len(gpu_rows) > 0))
    if result.returncode != 0 and passed == len(gpu_rows) and not failed_interface:
        emit(figure("harness exit status", result.returncode, "", "0", False, detail=result.stdout.strip()[-300:]))


def check_speed(built: dict, emit: Callable[[dict], None]) -> None:
    library = _load_kernel(built)
    device = gpu_kernel.open_device("torch")
    gpu_kernel.run_speed(library, device, emit)


def match_detections(ours: dict, theirs: dict, box_tolerance: float, score_tolerance: float) -> dict:
    """Greedy one-to-one matching of two detection sets (NumPy arrays: boxes [N,4], scores [N], labels [N]).

    A pair matches when labels agree, every box coordinate differs by <= box_tolerance px and the
    scores by <= score_tolerance. Unmatched detections whose score lies within score_tolerance of
    either set's lowest kept score are `at_cut` (a cut-off effect: the 100-detection cap or the
    score threshold), not counted as mismatches."""
    import numpy as np
    order = np.argsort(-theirs["scores"], kind="stable")
    used = np.zeros(len(ours["scores"]), bool)
    worst_box, worst_score, unmatched = 0.0, 0.0, []
    for j in order:
        candidates = np.flatnonzero((~used) & (ours["labels"] == theirs["labels"][j]))
        if len(candidates):
            box_error = np.abs(ours["boxes"][candidates] - theirs["boxes"][j]).max(axis=1)
            best = candidates[int(np.argmin(box_error))]
            score_error = abs(float(ours["scores"][best]) - float(theirs["scores"][j]))
            if box_error.min() <= box_tolerance and score_error <= score_tolerance:
                used[best] = True
                worst_box = max(worst_box, float(box_error.min()))
                worst_score = max(worst_score, score_error)
                continue
        unmatched.append(float(theirs["scores"][j]))
    unmatched += [float(s) for s in ours["scores"][~used]]
    cut = max(min(ours["scores"], default=0.0), min(theirs["scores"], default=0.0)) if (
        len(ours["scores"]) and len(theirs["scores"])) else 0.0
    at_cut = [s for s in unmatched if abs(s - cut) <= score_tolerance]
    return {"ours": int(len(ours["scores"])), "theirs": int(len(theirs["scores"])), "matched": int(used.sum()),
            "unmatched": len(unmatched) - len(at_cut), "at_cut": len(at_cut), "max_box_error": worst_box,
            "max_score_error": worst_score}


def torchvision_maskrcnn(torch, num_classes: int, frozen_bn: bool = True):
    """torchvision's maskrcnn_resnet50_fpn (v1) with random weights, as its constructor builds it with
    COCO weights: FrozenBatchNorm2d and 3 trainable stages (`weights=None` alone would give
    trainable BatchNorm2d in every stage, not the model anyone fine-tunes or runs)."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.mask_rcnn import MaskRCNN
    from torchvision.models.resnet import resnet50
    from torchvision.ops.misc import FrozenBatchNorm2d
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else torch.nn.BatchNorm2d)
    return MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes)


def random_torchvision_detector(torch, image):
    """A random-weight torchvision Mask R-CNN whose activations and scores look like a trained one's:
    batch-norm statistics taken from `image` (so activations stay normalised through 50 layers,
    also in float16), then RPN and class logits spread (so that scores differ)."""
    torch.manual_seed(0)
    calibration = torchvision_maskrcnn(torch, 91, frozen_bn=False).cuda().eval()
    for module in calibration.backbone.body.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0  # running statistics := this batch's
    calibration.backbone.body.train()
    with torch.no_grad():
        calibration.backbone.body(calibration.transform([image])[0].tensors)
    model = torchvision_maskrcnn(torch, 91, frozen_bn=True).cuda().eval()
    model.load_state_dict(calibration.state_dict())  # FrozenBatchNorm2d drops num_batches_tracked itself
    _calibrate_logits(torch, model, image)
    return model


def _calibrate_logits(torch, model, image) -> None:
    """Random weights give near-uniform class scores (all below 0.05): scale the RPN objectness and
    class-logit weights so that their logits have a spread of ~3 on this image, so that scores differ."""
    captured: dict[str, Any] = {}

    def keep(name):
        def hook(module, inputs):
            captured.setdefault(name, inputs[0].detach().float())
        return hook

    handles = [model.rpn.head.cls_logits.register_forward_pre_hook(keep("rpn")),
               model.roi_heads.box_predictor.cls_score.register_forward_pre_hook(keep("cls"))]
    with torch.no_grad():
        model([image])
    for handle in handles:
        handle.remove()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in (("rpn", model.rpn.head.cls_logits), ("cls", model.roi_heads.box_predictor.cls_score)):
            features = captured[name]
            fan_in = layer.weight[0].numel()
            rms = float(features.pow(2).mean().sqrt()) or 1.0
            weight = torch.randn(layer.weight.shape, generator=generator) * (3.0 / (rms * math.sqrt(fan_in)))
            layer.weight.copy_(weight.to(layer.weight))
            layer.bias.copy_((torch.randn(layer.bias.shape, generator=generator) * 0.5).to(layer.bias))


def _median_ms(torch, run: Callable[[], Any], iters: int) -> float:
    samples = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return float(sorted(samples)[len(samples) // 2])


def set_tf32(torch, enabled: bool) -> None:
    """TF32 for cuDNN convolutions and matmuls on or off (PyTorch's defaults: convolutions on)."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def check_pytorch(built: dict, emit: Callable[[dict], None]) -> None:
    import numpy as np
    import torch
    try:
        import torchvision.models.detection  # noqa: F401
    except Exception as error:  # noqa: BLE001
        raise NotRun(f"torchvision does not import ({type(error).__name__})") from error
    from maskrt.model.convert import from_torchvision

    generator = torch.Generator().manual_seed(0)
    # A smooth random image (low-frequency noise upsampled): 800 x 1333, what both resize to.
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 25, 42, generator=generator), size=(800, 1333),
                                            mode="bilinear", align_corners=False)[0].clamp(0, 1).cuda()
    theirs = random_torchvision_detector(torch, image)
    ours = from_torchvision({k: v.detach().cpu() for k, v in theirs.state_dict().items()}).eval().cuda()

    def detections(model, autocast: bool) -> dict:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            result = model([image])[0]
        return {key: result[key].float().cpu().numpy() if key != "labels" else result[key].cpu().numpy()
                for key in ("boxes", "scores", "labels")}

    # float32: every detection matched. float16 autocast: the two models round differently (e.g. a
    # batch norm folded into the conv or not), which can flip an NMS decision near IoU 0.5 or a
    # detection at the 100 cut: 95 % matched, within float16's own spacing.
    for precision, autocast, box_tol, score_tol, unmatched_share in (("fp32", False, 1e-2, 1e-3, 0.0),
                                                                     ("fp16 autocast", True, 1.0, 1e-2, 0.05)):
        # float32 means IEEE float32: cuDNN's default TF32 convolutions (10-bit mantissa) would make
        # two equal models differ by ~1e-3 wherever their weights are arranged differently.
        set_tf32(torch, enabled=autocast)
        a, b = detections(ours, autocast), detections(theirs, autocast)
        match = match_detections(a, b, box_tol, score_tol)
        allowed = int(unmatched_share * max(match["ours"], match["theirs"]))
        emit(figure(f"detections matched, {precision}", match["matched"], f"of {match['theirs']}",
                    ("all" if allowed == 0 else f"all but {unmatched_share:.0%}")
                    + f" (box <= {box_tol:g} px, score <= {score_tol:g})",
                    match["unmatched"] <= allowed and match["theirs"] > 0,
                    detail=f"ours {match['ours']}, unmatched {match['unmatched']}, at the cut {match['at_cut']}, "
                           f"max box error {match['max_box_error']:.2e} px, max score error "
                           f"{match['max_score_error']:.1e}"))
        for model in (ours, theirs):  # warm-up (cuDNN autotuning, allocator)
            for _ in range(2):
                detections(model, autocast)
        ours_ms, theirs_ms = [], []
        for _ in range(3):  # interleaved
            ours_ms.append(_median_ms(torch, lambda: detections(ours, autocast), 5))
            theirs_ms.append(_median_ms(torch, lambda: detections(theirs, autocast), 5))
        ratio = float(np.median(ours_ms)) / float(np.median(theirs_ms))
        emit(figure(f"eager latency ours / torchvision, {precision}, 800x1333", ratio, "x", "<= 1", ratio <= 1.0,
                    kind="speed", detail=f"{np.median(ours_ms):.1f} ms vs {np.median(theirs_ms):.1f} ms"))


def synthetic_batch(torch, count: int, size: int, num_classes: int, seed: int, device: str) -> tuple[list, list]:
    """`count` images [3, size, size] in [0, 1] with 1-4 filled rectangles each, and their targets
    (boxes, labels 1..num_classes-1, uint8 masks). NumPy only: no pycocotools."""
    import numpy as np
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(count):
        image = rng.uniform(0.0, 0.3, (3, size, size)).astype(np.float32)
        boxes, labels, masks = [], [], []
        for _ in range(int(rng.integers(1, 5))):
            w, h = rng.integers(size // 8, size // 2, 2)
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            label = int(rng.integers(1, num_classes))
            image[:, y:y + h, x:x + w] = ((np.arange(3) * 0.3 + label * 0.1) % 1.0 + 0.2)[:, None, None]
            mask = np.zeros((size, size), np.uint8)
            mask[y:y + h, x:x + w] = 1
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
            masks.append(mask)
        images.append(torch.from_numpy(image).to(device))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                        "labels": torch.tensor(labels, dtype=torch.int64, device=device),
                        "masks": torch.from_numpy(np.stack(masks)).to(device)})
    return images, targets


def losses_falling(losses: list[float], window: int = 10) -> bool:
    """Finite, and the mean of the last `window` below the mean of the first `window`."""
    if len(losses) < 2 * window or not all(math.isfinite(x) for x in losses):
        return False
    return sum(losses[-window:]) / window < sum(losses[:window]) / window


def trainer_device_option() -> str | None:
    """The name of TrainConfig's device field when the trainer has one (detected by inspection), else None."""
    try:
        from maskrt.train.trainer import TrainConfig
    except Exception:  # noqa: BLE001  (e.g. pycocotools absent)
        return None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return "device" if "device" in names else None


def trainer_step_api() -> tuple[Any, str | None]:
    """(the maskrt.train.trainer module, None) when it has the device API (TrainConfig.device,
    train_step, resolve_precision, make_grad_scaler; detected by inspection), else (None, why)."""
    try:
        from maskrt.train import trainer
    except Exception as error:  # noqa: BLE001  (it reads COCO through pycocotools, absent on the GPU machines)
        return None, f"maskrt.train.trainer does not import ({type(error).__name__}: {str(error)[:80]})"
    has_device = "device" in {f.name for f in dataclasses.fields(trainer.TrainConfig)}
    if not has_device or not all(hasattr(trainer, name) for name in ("train_step", "resolve_precision",
                                                                        "make_grad_scaler")):
        return None, "trainer has no device option"
    return trainer, None


def check_training(built: dict, emit: Callable[[dict], None]) -> None:
    import torch
    from maskrt.model.presets import build_model

    num_classes, steps = 5, 50
    device = torch.device("cuda")
    images, targets = synthetic_batch(torch, 2, 512, num_classes, seed=0, device="cuda")
    trainer, why_not = trainer_step_api()
    precision = trainer.resolve_precision("auto", device) if trainer else "auto"
    if precision not in ("bf16", "fp16"):  # autocast is what this check is about
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if trainer is None:
        emit(figure("steps through the trainer's train_step", None, "", "used", None,
                    detail=f"not run: {why_not}; the same step written here instead"))

    def make_step(model, via_trainer: bool = True) -> Callable[[], float]:
        model.train().to(device)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(parameters, lr=0.005, momentum=0.9)
        if trainer is not None and via_trainer:
            scaler = trainer.make_grad_scaler(precision, device)
            return lambda: float(trainer.train_step(model, optimizer, images, targets, precision, scaler)["loss"])
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16

        def step() -> float:  # what the trainer's train_step does (autocast, scaler, clipping at 10)
            with torch.autocast("cuda", dtype=dtype):
                losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, 10.0)
            scaler.step(optimizer)
            scaler.update()
            return float(loss.detach())
        return step

    # 50 steps of each preset on one fixed batch: finite, falling losses.
    for preset in ("r50_fpn", "edge"):
        torch.manual_seed(0)
        step = make_step(build_model(preset, num_classes))
        losses, times = [], []
        for _ in range(steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            losses.append(step())
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        step_ms = sorted(times[5:])[len(times[5:]) // 2]
        emit(figure(f"{preset}: {steps} steps under {precision} autocast, losses finite and falling", losses[-1],
                    "loss", "finite, last 10 < first 10", losses_falling(losses),
                    detail=f"first {losses[0]:.3f}, last {losses[-1]:.3f}, step {step_ms:.0f} ms"
                           + (", trainer's train_step" if trainer else "")))

    # Step time: ours (r50_fpn, torchvision's settings) vs torchvision's train step, same batch, interleaved.
    try:
        import torchvision.models.detection  # noqa: F401
    except Exception as error:  # noqa: BLE001
        emit(figure("train step ours / torchvision", None, "x", "<= 1", None,
                    detail=f"not run: torchvision does not import ({type(error).__name__})"))
    else:
        from maskrt.model.convert import TORCHVISION_SETTINGS
        torch.manual_seed(0)
        # The same step code for both (the one written here): only the models differ.
        ours = make_step(build_model("r50_fpn", num_classes, **TORCHVISION_SETTINGS), via_trainer=False)
        theirs = make_step(torchvision_maskrcnn(torch, num_classes, frozen_bn=True), via_trainer=False)
        for run in (ours, theirs, ours, theirs):
            run()
        ours_ms, theirs_ms = [], []
        for _ in range(3):
            ours_ms.append(_median_ms(torch, ours, 5))
            theirs_ms.append(_median_ms(torch, theirs, 5))
        ratio = sorted(ours_ms)[1] / sorted(theirs_ms)[1]
        emit(figure("train step ours / torchvision (r50_fpn, 2 x 512 px -> 800, autocast)", ratio, "x", "<= 1",
                    ratio <= 1.0, kind="speed",
                    detail=f"{sorted(ours_ms)[1]:.0f} ms vs {sorted(theirs_ms)[1]:.0f} ms"))

    # The trainer itself on CUDA (engineer #16's device option), when it exists here.
    option = trainer_device_option()
    if option is None:
        emit(figure("maskrt train on CUDA (TrainConfig device option)", None, "", "runs", None,
                    detail="not run: trainer has no device option (or does not import: it reads COCO through "
                           "pycocotools)"))
    else:
        emit(figure("maskrt train on CUDA (TrainConfig device option)", None, "", "runs", None,
                    detail="not run: the trainer reads its data through pycocotools, absent here (`make gpu-wheels` "
                           "on a networked machine first: its wheel travels in third_party/wheels)"
                    if not _has_pycocotools() else _run_trainer(option, emit)))


def _has_cuda_python() -> bool:
    try:
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        try:
            from cuda import cudart  # noqa: F401
        except ImportError:
            return False
    return True


def _has_pycocotools() -> bool:
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        return False
    return True


def _run_trainer(option: str, emit: Callable[[dict], None]) -> str:
    """train() with device='cuda' for 50 steps of each preset on a small synthetic COCO set."""
    from maskrt.train.synthetic import write_dataset
    from maskrt.train.trainer import TrainConfig, train

    notes = []
    with tempfile.TemporaryDirectory() as folder:
        data = write_dataset(Path(folder) / "data", train=16, val=2, size=256, seed=0)
        for preset in ("r50_fpn", "edge"):
            out = Path(folder) / f"run-{preset}"
            config = TrainConfig(data=str(data), out=str(out), preset=preset, epochs=100.0, progress=False,
                                 log_every=1, **{option: "cuda"})
            summary = train(config, stop_after_steps=50)
            losses = [json.loads(line).get("loss", math.nan)
                      for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            losses = [x for x in losses if isinstance(x, (int, float))]
            emit(figure(f"maskrt train {preset} on CUDA, 50 steps: losses finite and falling",
                        losses[-1] if losses else None, "loss", "finite, last 10 < first 10",
                        losses_falling(losses), detail=f"precision {config.precision}, step {summary.get('step')}"))
            notes.append(preset)
    return "ran: " + ", ".join(notes)


class TorchModelBackend:
    """The runtime's Backend interface (``maskrt.runtime.backends``) over the PyTorch model on a
    device, running what the ONNX export traces (``DetectBatchGraph``): the GPU machines have
    neither TensorRT nor onnxruntime-gpu, so this is the GPU engine the loop check can run."""

    name = "pytorch"
    fixed_batch = None
    max_batch = None

    def __init__(self, model, input_size: tuple[int, int], device: str) -> None:
        import torch

        from maskrt.export.onnx_export import DetectBatchGraph, model_metadata
        from maskrt.runtime.backends import OUTPUT_NAMES

        self.torch, self.device, self.output_names = torch, device, OUTPUT_NAMES
        self.graph = DetectBatchGraph(model.eval().to(device))
        self.metadata = model_metadata(model, input_size, "onnx", "fp32")

    def run(self, images):
        with self.torch.inference_mode():
            outputs = self.graph(self.torch.from_numpy(images).to(self.device))
        return {name: value.cpu().numpy() for name, value in zip(self.output_names, outputs)}  # .cpu() waits


def loop_figures(device: str, detections: int, draw_threads: int, size: tuple[int, int], frames: int,
                 rounds: int, folder: Path) -> dict[str, Any]:
    """``maskrt bench --source --draw``'s rounds (``bench_round``: the model alone on the letterboxed
    frame, then the pipelined loop with overlays encoded to mp4) with the seeded untrained ``edge``
    at 512 px on ``device``, every frame ``detections`` detections (score threshold 0), on a
    synthetic clip of ``size`` (h, w). Medians over rounds, each round's ratio kept."""
    import statistics

    import torch

    from maskrt.model import build_model
    from maskrt.runtime.commands import bench_round, predictor_stages, write_synthetic_video
    from maskrt.runtime.predictor import Predictor
    from maskrt.runtime.video import open_source

    torch.manual_seed(0)
    names = ["__background__", "circle", "square", "triangle"]
    model = build_model("edge", num_classes=len(names), class_names=names, min_size=512, max_size=512,
                        box_score_thresh=0.0, box_detections_per_img=detections)
    predictor = Predictor.from_backend(TorchModelBackend(model, (512, 512), device), conf=0.0, source="edge")
    clip = write_synthetic_video(folder / f"clip{size[0]}.mp4", size[0], size[1], frames)
    probe = open_source(str(clip))
    try:
        frame = next(iter(probe.frames()))[1]
    finally:
        probe.close()
    inputs, _ = predictor.preprocess([frame])
    for _ in range(3):  # warm-up: cuDNN's choices, the allocator
        predictor.infer(inputs)
    stages = predictor_stages(predictor, conf=0.0, draw_threads=draw_threads)
    results = [bench_round(predictor, inputs, stages, open_source(str(clip)), frames, folder / "overlay.mp4")[0]
               for _ in range(rounds)]
    return {"engine_fps": statistics.median(r["engine_fps"] for r in results),
            "loop_fps": statistics.median(r["loop_fps"] for r in results),
            "ratio": statistics.median(r["ratio"] for r in results), "ratios": [r["ratio"] for r in results]}


def check_loop(built: dict, emit: Callable[[dict], None]) -> None:
    import torch

    if not torch.cuda.is_available():
        raise NotRun("torch has no CUDA device")
    with tempfile.TemporaryDirectory() as folder:
        for detections, draw_threads in ((10, 1), (100, 4)):
            result = loop_figures("cuda", detections, draw_threads, (1080, 1920), 30, 3, Path(folder))
            emit(figure(f"1080p loop with overlays / model alone, {detections} detections, {draw_threads} drawing "
                        f"thread{'s' if draw_threads > 1 else ''}", result["ratio"], "x", ">= 0.9",
                        result["ratio"] >= 0.9, kind="speed",
                        detail=f"loop {result['loop_fps']:.1f} FPS, model alone {result['engine_fps']:.1f} images/s "
                               f"(PyTorch eager, fp32); rounds " + " / ".join(f"{r:.2f}" for r in result["ratios"])))


CHECK_FUNCTIONS: dict[str, Callable[[dict, Callable[[dict], None]], None]] = {
    "kernel": check_kernel, "sanitizer": check_sanitizer, "plugin": check_plugin, "speed": check_speed,
    "pytorch": check_pytorch, "training": check_training, "loop": check_loop,
}


def run_child(name: str, built: dict, record: Path) -> int:
    """Runs one check in this process, appending each figure to `record` (JSON lines) as it comes,
    then one {"status": ...} line. The parent reads what is there, also after a timeout."""
    def emit(row: dict) -> None:
        with record.open("a") as stream:
            stream.write(json.dumps({"figure": row}, default=float) + "\n")
        print(json.dumps(row, default=float), flush=True)

    error = not_run = None
    try:
        CHECK_FUNCTIONS[name](built, emit)
    except NotRun as reason:
        not_run = str(reason)
    except Exception as exception:  # noqa: BLE001  (recorded; the parent decides what it means)
        error = f"{type(exception).__name__}: {str(exception).splitlines()[0][:300] if str(exception) else ''}"
        traceback.print_exc()
    with record.open("a") as stream:
        stream.write(json.dumps({"error": error, "not_run": not_run}) + "\n")
    return 0


def read_record(record: Path) -> tuple[list[dict], str | None, str | None, bool]:
    """(figures, error, not_run, finished) from a child's JSON-lines record."""
    figures, error, not_run, finished = [], None, None, False
    if record.is_file():
        for line in record.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "figure" in item:
                figures.append(item["figure"])
            else:
                error, not_run, finished = item.get("error"), item.get("not_run"), True
    return figures, error, not_run, finished


# ---- the run ------------------------------------------------------------------------------------

def dry_run(checks: list[Check], built: Built, env: dict, log: Callable[[str], None]) -> tuple[int, dict]:
    """No GPU: the build (already done), the harness's device-free steps, every import; the plan."""
    problems = []
    if built.errors:
        problems += [f"build {what}: {why}" for what, why in built.errors.items()]
    if built.harness:
        result = subprocess.run([built.harness, built.plugin_library, "--no-device"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=120)
        rows = parse_harness_output(result.stdout)
        log(f"harness --no-device: {sum(r['pass'] for r in rows)} of {len(rows)} steps pass (exit {result.returncode})")
        if result.returncode != 0:
            problems.append("harness --no-device: " + "; ".join(r["name"] for r in rows if not r["pass"]))
    imports = {}
    for module in ("numpy", "maskrt.plugins.cpu", "maskrt.plugins.kernel_lib", "maskrt.plugins.build", "torch",
                   "maskrt.model", "maskrt.model.convert", "maskrt.model.presets", "torchvision",
                   "torchvision.models.detection", "cuda.bindings.runtime", "maskrt.train.trainer",
                   "maskrt.export.onnx_export", "maskrt.runtime.commands", "cv2"):
        try:
            __import__(module)
            imports[module] = "ok"
        except Exception as error:  # noqa: BLE001
            imports[module] = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    optional = {"torchvision", "torchvision.models.detection", "cuda.bindings.runtime", "maskrt.train.trainer"}
    for module, state in imports.items():
        log(f"import {module}: {state}")
        if state != "ok" and module not in optional:
            problems.append(f"import {module}: {state}")
    tools = {name: shutil.which(name) for name in ("nvcc", "compute-sanitizer", "nvidia-smi")}
    log("tools: " + ", ".join(f"{k} {'found' if v else 'absent'}" for k, v in tools.items()))
    log(f"TensorRT headers: {built.tensorrt_include or 'absent'}; training device option: "
        f"{trainer_device_option() or 'absent'}")
    for check in checks:
        log(f"would run {check.number} {check.name} (limit {check.limit_s:.0f} s): {check.title}")
    report = {"dry_run": True, "environment": env, "build": dataclasses.asdict(built), "imports": imports,
              "checks": [{"number": c.number, "name": c.name, "title": c.title, "status": "not run: dry run",
                          "figures": [], "seconds": 0.0} for c in checks],
              "result": "dry run: " + ("ok" if not problems else "problems: " + "; ".join(problems))}
    return (1 if problems else 0), report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--only", help="comma-separated subset of: " + ",".join(CHECKS_BY_NAME))
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: compile, run the harness's device-free steps, import, print the plan")
    parser.add_argument("--arch", help="SM architecture to build for (default: the GPU's; 90 in a dry run)")
    parser.add_argument("--build-dir", default=str(REPO / "build" / "gpu_check"), help="build cache folder")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall seconds for all checks after the build; a check that would not fit is not started")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--built", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        return run_child(args.child, json.loads(Path(args.built).read_text()), Path(args.record))
    try:
        checks = parse_only(args.only)
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out).resolve()  # the checks run with the repository as their working directory
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[gpu-check {time.perf_counter() - started:5.0f} s] {message}", flush=True)

    env = probe_environment()
    arch = args.arch or env.get("arch") or ("90" if args.dry_run else None)
    if arch is None:
        log("no CUDA GPU found (torch.cuda and nvidia-smi): use --dry-run on a machine without one")
        report = {"environment": env, "checks": [], "result": "no GPU"}
        write_report(out, report)
        return 1
    if not args.dry_run and not env.get("device"):
        log("warning: no device name found; running anyway")
    log(f"device {env.get('device', 'none')}, sm_{arch}, driver {env.get('driver', '?')}, torch {env.get('torch')}, "
        f"torchvision {env.get('torchvision', 'absent')}")
    build_dir = Path(args.build_dir)
    built = build_all(build_dir, arch, log)

    if args.dry_run:
        status, report = dry_run(checks, built, env, log)
        report["wall_s"] = time.perf_counter() - started
        write_report(out, report)
        log(report["result"])
        return status

    report: dict[str, Any] = {"environment": env, "build": dataclasses.asdict(built), "checks": [],
                              "result": "incomplete"}
    write_report(out, report)
    built_file = out / "built.json"
    built_file.write_text(json.dumps(dataclasses.asdict(built)))
    checks_started = time.perf_counter()
    failures = []
    for check in checks:
        left = args.budget_s - (time.perf_counter() - checks_started)
        entry: dict[str, Any] = {"number": check.number, "name": check.name, "title": check.title, "figures": []}
        if left < 20:
            entry.update(status="not run: out of the time budget", seconds=0.0)
        else:
            limit = min(check.limit_s, left)
            record = out / "records" / f"{check.name}.jsonl"
            record.parent.mkdir(parents=True, exist_ok=True)
            record.unlink(missing_ok=True)
            log(f"check {check.number} {check.name} (limit {limit:.0f} s) ...")
            start = time.perf_counter()
            timed_out = False
            with (out / "records" / f"{check.name}.log").open("w") as child_log:
                try:
                    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", check.name,
                                    "--built", str(built_file), "--record", str(record)],
                                   stdout=child_log, stderr=subprocess.STDOUT, timeout=limit, cwd=REPO)
                except subprocess.TimeoutExpired:
                    timed_out = True
            figures, error, not_run, finished = read_record(record)
            if timed_out:
                error = f"timed out after {limit:.0f} s"
            elif not finished:
                error = f"the check's process died (see {record.with_suffix('.log')})"
            entry.update(figures=figures, status=check_status(figures, error, not_run),
                         seconds=round(time.perf_counter() - start, 1))
        if is_failure(check, entry["status"]):
            failures.append(check.name)
        report["checks"].append(entry)
        report["wall_s"] = time.perf_counter() - started
        write_report(out, report)
        log(f"check {check.number} {check.name}: {entry['status']} ({entry['seconds']:.0f} s)")
    report["result"] = summarise(report["checks"], failures)
    report["wall_s"] = time.perf_counter() - started
    write_report(out, report)
    log(f"{report['result']}; wrote {out / 'gpu_check.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
