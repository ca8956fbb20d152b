"""`make gpu-check` (bench/gpu_check.py, bench/gpu_kernel.py) on a machine without a GPU.

- The dry run (what CI runs): compiles the kernel library for sm_90 and, with
  $TENSORRT_INCLUDE_DIR (and $TENSORRT10_INCLUDE_DIR), the plugin and the GPU harness, runs the
  harness's device-free steps (parser-typed fields, build phase, serialise -> create(kRUNTIME)
  -> attachToContext, the CPU twin on every case), imports every module, writes the report.
  Skipped without nvcc/cmake.
- Every path that does not need a GPU: check 1's comparison logic with the kernel's host
  emulation standing in for the device (and failing when the output is perturbed), the
  torchvision comparison's plumbing with the PyTorch graph op standing in for torchvision, the
  speed figures, detection matching, the sanitizer verdicts, the harness output parser,
  --only, the child-process record, and the JSON/Markdown report.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
import gpu_kernel  # noqa: E402

from maskrt.plugins.kernel_lib import KernelLibrary, RoIAlignAttributes  # noqa: E402

BUILD_DIR = REPO / "build" / "gpu_check_test"  # cached between runs, like the CPU twin's build


def _dry_run(tmp_path: Path, include_env: str | None) -> tuple[subprocess.CompletedProcess, dict]:
    if shutil.which("cmake") is None or (shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file()):
        pytest.skip("nvcc or cmake absent: the dry run compiles the CUDA kernel")
    env = dict(os.environ)
    env.pop("TENSORRT_INCLUDE_DIR", None)
    if include_env:
        if not os.environ.get(include_env):
            pytest.skip(f"{include_env} is unset: the harness compiles only against TensorRT's headers")
        env["TENSORRT_INCLUDE_DIR"] = os.environ[include_env]
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--arch", "90",
                             "--build-dir", str(BUILD_DIR), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=env)
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.md").is_file()
    return result, report


@pytest.fixture(scope="module")
def dry_run_report(tmp_path_factory):
    """The dry run with the TensorRT 11 headers when given, else without any."""
    include_env = "TENSORRT_INCLUDE_DIR" if os.environ.get("TENSORRT_INCLUDE_DIR") else None
    return _dry_run(tmp_path_factory.mktemp("dry"), include_env)


@pytest.fixture(scope="module")
def kernel_library(dry_run_report) -> KernelLibrary:
    return KernelLibrary(dry_run_report[1]["build"]["kernel_library"])


def test_dry_run_builds_imports_and_plans_every_check(dry_run_report):
    result, report = dry_run_report
    assert result.returncode == 0, result.stdout[-3000:]
    assert report["dry_run"] is True and report["result"] == "dry run: ok"
    assert Path(report["build"]["kernel_library"]).is_file()
    assert report["build"]["arch"] == "90"
    for name in ("kernel", "sanitizer", "plugin", "speed", "pytorch", "training", "loop"):
        assert f"would run" in result.stdout and f" {name} (limit" in result.stdout, name
    assert report["imports"]["maskrt.model.convert"] == "ok"
    if report["build"]["tensorrt_include"]:
        # The harness ran every device-free step of every GPU case and all of them passed.
        assert Path(report["build"]["harness"]).is_file()
        line = next(line for line in result.stdout.splitlines() if "harness --no-device" in line)
        passed, total = (int(x) for x in line.split(": ")[1].split(" steps")[0].split(" of "))
        assert passed == total >= 100, line


def test_dry_run_harness_against_tensorrt_10_headers(tmp_path):
    """JetPack 6's TensorRT 10.3 headers: the GPU harness compiles and its device-free steps pass."""
    result, report = _dry_run(tmp_path, "TENSORRT10_INCLUDE_DIR")
    assert result.returncode == 0, result.stdout[-3000:]
    assert report["build"]["tensorrt_version"].startswith("10.")
    assert "harness --no-device" in result.stdout


def test_harness_build_and_device_free_steps_name_every_gpu_step(dry_run_report):
    _, report = dry_run_report
    if not report["build"]["tensorrt_include"]:
        pytest.skip("TENSORRT_INCLUDE_DIR is unset: no harness")
    output = subprocess.run([report["build"]["harness"], report["build"]["plugin_library"], "--no-device"],
                            stdout=subprocess.PIPE, text=True, timeout=60).stdout
    rows = gpu_check.parse_harness_output(output)
    names = {row["name"] for row in rows}
    for case in ("box_pooler_b1_r1000", "b4_special_aligned_sr0_avg", "b3_three_levels_12x6"):
        for dtype in ("fp32", "fp16"):
            for step in ("create_with_parser_fields", "output_type", "output_shape", "formats_supported",
                         "configure", "workspace_size_0", "runtime_create_and_attach"):
                assert f"gpu_{case}_{dtype}_{step}" in names, (case, dtype, step)
    assert all(row["pass"] for row in rows)


# ---- check 1's logic with the kernel's host emulation as the device ---------------------------------

def test_contract_suite_passes_on_host_emulation_and_covers_the_contract(kernel_library):
    figures = gpu_kernel.run_contract(gpu_kernel.host_emulation_runner(kernel_library), None)
    assert len(figures) == 34  # 2 dtypes x B 1/4 x aligned x sampling x mode + R = 0 per dtype
    assert all(f["pass"] for f in figures), [f for f in figures if not f["pass"]]
    names = " ".join(f["name"] for f in figures)
    for part in ("b1_", "b4_", "aligned0", "aligned1", "sr0", "sr2", "_avg_", "_max_", "float16", "zero_rois"):
        assert part in names, part


def test_contract_comparison_fails_on_a_wrong_kernel(kernel_library):
    """A kernel off by 1e-4 of the largest value fails float32 (1e-5) but not float16 (1e-2)."""
    def wrong(rois, features, attrs):
        out = kernel_library.host_emulation(rois, features, attrs).astype(np.float64)
        out.flat[out.size // 2] += 1e-4 * np.abs(out).max()
        return out

    cases = [c for c in gpu_kernel.contract_cases() if c.batch == 4 and c.attrs.mode == 0][:1]
    fp16_case = [c for c in gpu_kernel.contract_cases() if c.dtype == "float16" and c.rois][0]
    assert gpu_kernel.compare_with_cpu_twin(cases[0], wrong)["pass"] is False
    assert gpu_kernel.compare_with_cpu_twin(fp16_case, wrong)["pass"] is True


def test_contract_cases_hold_every_special_roi_kind():
    rois, features = gpu_kernel.make_inputs(gpu_kernel.contract_cases()[0])
    first = rois[0].astype(np.float64)
    width = first[:, 2] - first[:, 0]
    height = first[:, 3] - first[:, 1]
    assert (width == 0).any() and (height == 0).any() and (width < 0).any()  # zero-size, inverted
    assert (first[:, 0] < 0).any() and (first[:, 2] > 384).any()  # out of the image
    assert np.isnan(first).any()
    assert [f.shape[2:] for f in features] == [(64, 96), (32, 48), (16, 24), (8, 12)]


def test_torchvision_comparison_plumbing_with_the_graph_op_as_stand_in(kernel_library):
    """torchvision does not load here: the PyTorch graph op (same contract) stands in, so that the
    shapes, dtypes and reshapes of the comparison are exercised; a real mismatch would fail it."""
    import torch
    from maskrt.model.ops.graph_ops import multilevel_roi_align

    def stand_in(rois, features, output_size, sampling_ratio, image_size):
        assert rois.dtype == np.float32 and all(f.dtype == np.float32 for f in features)
        out = multilevel_roi_align(torch.from_numpy(rois), [torch.from_numpy(f) for f in features],
                                   list(gpu_kernel.SCALES), output_size, output_size, sampling_ratio, False)
        return out.double().numpy()

    case = gpu_kernel.torchvision_cases()[0]
    small = gpu_kernel.KernelCase(case.name, "float32", 2, 64, 4, 256, 384, case.attrs, False, 3)
    result = gpu_kernel.compare_with_torchvision(small, gpu_kernel.host_emulation_runner(kernel_library), stand_in)
    assert result["pass"], result
    rois, _ = gpu_kernel.make_inputs(small)
    sides = np.sqrt((rois[..., 2] - rois[..., 0]) * (rois[..., 3] - rois[..., 1]))
    for boundary in gpu_kernel.LEVEL_SIDES:  # kept away from the level boundaries
        assert np.all(np.abs(sides / boundary - 1) >= 0.02)


def test_relative_error():
    assert gpu_kernel.relative_error(np.array([1.0, 2.0]), np.array([1.0, 4.0])) == 0.5
    assert gpu_kernel.relative_error(np.array([np.nan]), np.array([1.0])) == math.inf
    assert gpu_kernel.relative_error(np.zeros((2, 0)), np.zeros((2, 0))) == 0.0
    with pytest.raises(ValueError):
        gpu_kernel.relative_error(np.zeros(2), np.zeros(3))


def test_speed_figures_against_the_floor_and_torchvision():
    case = gpu_kernel.speed_cases()[0]  # box pooler, float32
    assert gpu_kernel.floor_bytes(case) == (1000 * 256 * 49 + 1000 * 4) * 4
    floor_ms = gpu_kernel.floor_bytes(case) / 3000e9 * 1e3
    figures = gpu_kernel.speed_figures(case, ours_ms=3 * floor_ms, torchvision_ms=5 * floor_ms, copy_gbps=3000.0)
    by_name = {f["name"].split(",")[0]: f for f in figures}
    assert by_name["kernel / DRAM floor"]["value"] == pytest.approx(3.0)
    assert by_name["kernel / DRAM floor"]["pass"] is False
    assert by_name["kernel / torchvision"]["value"] == pytest.approx(0.6)
    assert by_name["kernel / torchvision"]["pass"] is True
    assert all(f["kind"] == "speed" for f in figures)


# ---- checks 2, 3, 5, 6: their pure parts -----------------------------------------------------------

def test_sanitizer_verdicts():
    assert gpu_check.sanitizer_verdict("========= ERROR SUMMARY: 0 errors\n", 0) == (True, "0 errors, exit 0")
    assert gpu_check.sanitizer_verdict("========= Invalid __global__ read\n========= ERROR SUMMARY: 3 errors\n",
                                       99)[0] is False
    passed, detail = gpu_check.sanitizer_verdict("========= Error: Device not supported\n", 1)
    assert passed is None and "Device not supported" in detail
    assert gpu_check.sanitizer_verdict("Traceback...\n", 1)[0] is None  # no summary: not a verdict
    racecheck = "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n"
    assert gpu_check.sanitizer_verdict(racecheck, 99) == (False, "2 errors, exit 99")
    clean = "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    assert gpu_check.sanitizer_verdict(clean, 0)[0] is True


def test_harness_output_parser():
    output = ("PASS one_creator\n  logged: something\nINFO device H100 sm_90\n"
              "PASS gpu_a_fp32_matches_cpu_twin max_rel=1.2e-07 tol=1e-05\n"
              "FAIL gpu_b_fp16_matches_cpu_twin max_rel=0.5 tol=0.01: max_rel=0.5 tol=0.01\n"
              "FAIL gpu_c_fp32_enqueue: enqueue returned non-zero\n3 failures\n")
    rows = gpu_check.parse_harness_output(output)
    assert [r["name"] for r in rows] == ["one_creator", "gpu_a_fp32_matches_cpu_twin", "gpu_b_fp16_matches_cpu_twin",
                                         "gpu_c_fp32_enqueue"]
    assert rows[1]["value"] == pytest.approx(1.2e-7) and rows[1]["goal"] == "<= 1e-05" and rows[1]["pass"]
    assert rows[2]["pass"] is False and rows[2]["value"] == 0.5
    assert rows[3]["detail"] == "enqueue returned non-zero"


def _detections(boxes, scores, labels):
    return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "scores": np.array(scores, np.float32),
            "labels": np.array(labels, np.int64)}


def test_match_detections():
    theirs = _detections([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]], [0.9, 0.5, 0.051], [1, 2, 3])
    same = gpu_check.match_detections(theirs, theirs, 1e-2, 1e-3)
    assert same["matched"] == 3 and same["unmatched"] == 0
    moved = _detections([[0, 0, 10, 10], [5, 5, 20.5, 20], [30, 30, 40, 40]], [0.9, 0.5, 0.051], [1, 2, 3])
    result = gpu_check.match_detections(moved, theirs, 1e-2, 1e-3)
    assert result["matched"] == 2 and result["unmatched"] == 2  # one each side
    relabelled = _detections([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]], [0.9, 0.5, 0.051], [1, 7, 3])
    assert gpu_check.match_detections(relabelled, theirs, 1e-2, 1e-3)["unmatched"] == 2
    # The lowest-scoring detection missing on one side: a cut-off effect, not a mismatch.
    cut = _detections([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.5], [1, 2])
    theirs_cut = _detections([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]], [0.9, 0.5, 0.4995], [1, 2, 3])
    result = gpu_check.match_detections(cut, theirs_cut, 1e-2, 1e-3)
    assert result["unmatched"] == 0 and result["at_cut"] == 1


def test_losses_falling():
    assert gpu_check.losses_falling([5.0 - 0.05 * i for i in range(50)])
    assert not gpu_check.losses_falling([5.0] * 50)
    assert not gpu_check.losses_falling([5.0 - 0.05 * i for i in range(49)] + [math.nan])
    assert not gpu_check.losses_falling([1.0, 0.5])


def test_synthetic_batch_trains_the_edge_model_one_step_on_cpu():
    """The training check's batch is what the model's training forward takes (shown on the CPU)."""
    import torch
    from maskrt.model.presets import build_model
    images, targets = gpu_check.synthetic_batch(torch, 2, 128, 5, seed=0, device="cpu")
    assert images[0].shape == (3, 128, 128) and 0 <= float(images[0].min()) and float(images[0].max()) <= 1
    for target in targets:
        boxes, masks = target["boxes"], target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape[0] == boxes.shape[0] == target["labels"].shape[0]
        for box, mask in zip(boxes, masks):  # each box is its mask's extent
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    torch.manual_seed(0)
    model = build_model("edge", 5).train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and len(losses) == 5


def test_trainer_device_option_is_detected_by_inspection():
    from maskrt.train.trainer import TrainConfig
    import dataclasses
    has_device = "device" in {f.name for f in dataclasses.fields(TrainConfig)}
    assert gpu_check.trainer_device_option() == ("device" if has_device else None)


def test_loop_check_runs_the_product_loop_beside_the_pytorch_model(tmp_path):
    """Check 7 on the CPU: the PyTorch model behind the runtime's Backend interface gives the
    graph's five outputs with the runtime's dtypes and shapes, the Predictor over it keeps every
    slot at score threshold 0, and ``bench_round``'s loop runs every frame of a small clip."""
    import torch

    from maskrt.model import build_model
    from maskrt.runtime.predictor import Predictor

    torch.manual_seed(0)
    model = build_model("edge", num_classes=3, class_names=["__background__", "a", "b"], min_size=128,
                        max_size=128, box_score_thresh=0.0, box_detections_per_img=7)
    backend = gpu_check.TorchModelBackend(model, (128, 128), "cpu")
    predictor = Predictor.from_backend(backend, conf=0.0, source="edge")
    image = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    inputs, _ = predictor.preprocess([image, image])
    outputs = backend.run(inputs)
    assert outputs["num_dets"].dtype == np.int32 and outputs["num_dets"].shape == (2,)
    assert outputs["boxes"].shape == (2, 7, 4) and outputs["masks"].shape == (2, 7, 28, 28)
    assert outputs["labels"].dtype == np.int32 and outputs["scores"].dtype == np.float32
    assert len(predictor(image)) == int(outputs["num_dets"][0]) == 7
    result = gpu_check.loop_figures("cpu", 5, 2, (120, 160), 4, 2, tmp_path)
    assert len(result["ratios"]) == 2 and result["loop_fps"] > 0 and result["engine_fps"] > 0
    assert (tmp_path / "overlay.mp4").stat().st_size > 0


# ---- options, the child record, the report -----------------------------------------------------------

def test_parse_only():
    assert [c.name for c in gpu_check.parse_only(None)] == ["kernel", "sanitizer", "plugin", "speed", "pytorch",
                                                             "training", "loop"]
    assert [c.name for c in gpu_check.parse_only("training, kernel")] == ["kernel", "training"]  # run order
    with pytest.raises(ValueError, match="unknown check.*kernal"):
        gpu_check.parse_only("kernal")
    with pytest.raises(ValueError):
        gpu_check.parse_only(",")


def test_bad_only_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--only", "nope", "--dry-run"])
    assert exit_info.value.code == 2
    assert "unknown check(s) nope" in capsys.readouterr().err


def test_child_record_keeps_figures_and_reports_not_run_and_errors(tmp_path, monkeypatch):
    def emits_then_fails(built, emit):
        emit(gpu_check.figure("first", 1e-7, "max rel. error", "<= 1e-05", True))
        raise RuntimeError("launch failed\nsecond line")

    def not_here(built, emit):
        raise gpu_check.NotRun("no TensorRT headers")

    monkeypatch.setitem(gpu_check.CHECK_FUNCTIONS, "kernel", emits_then_fails)
    monkeypatch.setitem(gpu_check.CHECK_FUNCTIONS, "plugin", not_here)
    record = tmp_path / "kernel.jsonl"
    gpu_check.run_child("kernel", {}, record)
    figures, error, not_run, finished = gpu_check.read_record(record)
    assert finished and not_run is None and error == "RuntimeError: launch failed"
    assert [f["name"] for f in figures] == ["first"]
    kernel = gpu_check.CHECKS_BY_NAME["kernel"]
    status = gpu_check.check_status(figures, error, not_run)
    assert status.startswith("error") and gpu_check.is_failure(kernel, status)

    record = tmp_path / "plugin.jsonl"
    gpu_check.run_child("plugin", {}, record)
    figures, error, not_run, finished = gpu_check.read_record(record)
    status = gpu_check.check_status(figures, error, not_run)
    assert status == "not run: no TensorRT headers" and not gpu_check.is_failure(gpu_check.CHECKS_BY_NAME["plugin"], status)
    # A record cut short (timeout): figures so far, not finished.
    partial = tmp_path / "speed.jsonl"
    partial.write_text(json.dumps({"figure": gpu_check.figure("x", 1.0)}) + "\n")
    assert gpu_check.read_record(partial)[3] is False and len(gpu_check.read_record(partial)[0]) == 1


def test_summary_line():
    entries = [{"status": "pass"}, {"status": "goal missed"}, {"status": "not run: no TensorRT headers"},
               {"status": "pass"}]
    assert gpu_check.summarise(entries, []) == "no failure: 2 passed, 1 goal missed, 1 not run"
    assert gpu_check.summarise(entries, ["kernel", "plugin"]) == "FAIL: kernel, plugin"


def test_status_rules():
    ok = gpu_check.figure("a", 1e-7, "max rel. error", "<= 1e-05", True)
    bad = gpu_check.figure("b", 1e-3, "max rel. error", "<= 1e-05", False)
    slow = gpu_check.figure("c", 1.3, "x", "<= 0.8", False, kind="speed")
    assert gpu_check.check_status([ok]) == "pass"
    assert gpu_check.check_status([ok, bad]) == "fail"
    assert gpu_check.check_status([ok, slow]) == "goal missed"
    speed = gpu_check.CHECKS_BY_NAME["speed"]
    assert not gpu_check.is_failure(speed, "goal missed")
    assert not gpu_check.is_failure(speed, "error: timed out after 120 s")  # not a correctness check
    assert gpu_check.is_failure(gpu_check.CHECKS_BY_NAME["pytorch"], "error: timed out after 180 s")


def test_report_json_and_markdown(tmp_path):
    report = {"environment": {"device": "NVIDIA H100 80GB HBM3", "arch": "90", "driver": "580.1", "torch": "2.11",
                              "torch_cuda": "13.0", "torchvision": "0.26", "date": "2026-11-27 18:00 UTC",
                              "commit": "abc1234", "nvcc": "13.0"},
              "wall_s": 301.0, "result": "FAIL: kernel",
              "checks": [{"number": 1, "name": "kernel", "status": "fail", "seconds": 20.0, "figures": [
                  gpu_check.figure("kernel vs CPU twin, b1", 2.5e-4, "max rel. error", "<= 1e-05", False)]},
                  {"number": 4, "name": "speed", "status": "goal missed", "seconds": 30.0, "figures": [
                      gpu_check.figure("kernel / torchvision, box", 0.95, "x", "<= 0.8", False, kind="speed",
                                       detail="torchvision 120.0 us")]},
                  {"number": 3, "name": "plugin", "status": "not run: no TensorRT headers", "seconds": 0.0,
                   "figures": []}]}
    gpu_check.write_report(tmp_path, report)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["result"] == "FAIL: kernel"
    text = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H100 80GB HBM3 (sm_90), driver 580.1" in text and "2026-11-27" in text
    assert "| 1 | kernel | kernel vs CPU twin, b1 | 2.50e-04 | <= 1e-05 | FAIL |" in text
    assert "| 4 | speed | kernel / torchvision, box (torchvision 120.0 us) | 0.95 x | <= 0.8 | goal missed |" in text
    assert "- 3 plugin: not run: no TensorRT headers" in text
    assert "any TensorRT engine" in text
    assert not list(tmp_path.glob(".gpu_check*"))  # no temporary left behind


def test_tensorrt_include_lookup(monkeypatch, tmp_path):
    monkeypatch.setenv("TENSORRT_INCLUDE_DIR", str(tmp_path))
    assert gpu_check.tensorrt_include_dir() in (None, (REPO / "third_party" / "TensorRT" / "include").resolve())
    (tmp_path / "NvInferRuntime.h").write_text("")
    assert gpu_check.tensorrt_include_dir() == tmp_path.resolve()
