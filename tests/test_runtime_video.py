"""The real-time loop: a generated video with failed and empty frames, a camera that drops and
is reopened, Ctrl-C that still finalises the saved video, and `maskrt infer` on a file."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from maskrt.cli import main
from maskrt.runtime import Predictor, draw_detections
from maskrt.runtime.video import FrameSink, LiveSource, VideoFileSource, run_loop
from test_runtime_fakes import standard_fake

FRAMES = 12


@pytest.fixture(scope="module")
def fake_model(tmp_path_factory) -> Path:
    return standard_fake(tmp_path_factory.mktemp("fake") / "fake.onnx")


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (80, 64))
    assert writer.isOpened()
    for i in range(FRAMES):
        frame = np.full((64, 80, 3), 20 * i, np.uint8)
        cv2.putText(frame, str(i), (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
        writer.write(frame)
    writer.release()
    return path


class FlakyCapture:
    """A cv2.VideoCapture whose reads fail ((False, None)) or come back empty at given indices."""

    def __init__(self, path: Path, failing: set[int], empty: set[int]) -> None:
        self.capture = cv2.VideoCapture(str(path))
        self.failing, self.empty = failing, empty
        self.index = 0

    def read(self):
        ok, frame = self.capture.read()  # the real frame is consumed either way
        index, self.index = self.index, self.index + 1
        if index in self.failing:
            return False, None
        if index in self.empty and ok:
            return True, np.empty((0, 0, 3), np.uint8)
        return ok, frame

    def get(self, prop):
        return self.capture.get(prop)

    def isOpened(self):
        return self.capture.isOpened()

    def release(self):
        self.capture.release()


def _processor(predictor: Predictor):
    def process(frame):
        detections = predictor(frame)
        return draw_detections(frame, detections), f"{len(detections)}"
    return process


def _count_frames(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def test_video_with_failed_and_empty_frames_runs_to_the_end(tmp_path, fake_model, video):
    predictor = Predictor(fake_model)
    source = VideoFileSource(FlakyCapture(video, failing={3, 7}, empty={5}), str(video))
    out = tmp_path / "out.mp4"
    stats = run_loop(source, _processor(predictor), sink=FrameSink(str(out), fps=10.0))
    assert (stats.frames, stats.dropped) == (FRAMES - 3, 3)
    assert len(stats.latencies_ms) == FRAMES - 3 and stats.fps > 0
    summary = stats.summary()
    assert summary.startswith(f"frames {FRAMES - 3}, dropped 3, skipped 0, latency p50 ")
    assert _count_frames(out) == FRAMES - 3  # the mp4 was finalised and is readable


def test_max_frames_and_ctrl_c_finalise_the_video(tmp_path, fake_model, video):
    predictor = Predictor(fake_model)
    stats = run_loop(VideoFileSource(cv2.VideoCapture(str(video)), "clip"), _processor(predictor), max_frames=4)
    assert stats.frames == 4 and not stats.interrupted

    calls = []

    def interrupted_on_fifth(frame):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return frame.copy(), ""

    out = tmp_path / "stopped.avi"
    stats = run_loop(VideoFileSource(cv2.VideoCapture(str(video)), "clip"), interrupted_on_fifth,
                     sink=FrameSink(str(out), fps=10.0))
    assert stats.interrupted and stats.frames == 4
    assert "stopped by Ctrl-C" in stats.summary()
    assert _count_frames(out) == 4


class DroppingCamera:
    """A fake camera: each opened instance gives `good` frames, then fails forever (the cable
    was pulled); the next instance (a reopen) works again. Records every open."""

    opens: list[float] = []

    def __init__(self, good: int = 3) -> None:
        DroppingCamera.opens.append(time.monotonic())
        self.good = good
        self.reads = 0

    def read(self):
        time.sleep(0.002)
        self.reads += 1
        if self.reads <= self.good:
            return True, np.full((32, 40, 3), len(DroppingCamera.opens) * 10, np.uint8)
        return False, None

    def get(self, prop):
        return 0.0

    def isOpened(self):
        return True

    def release(self):
        pass


def test_camera_that_drops_is_reopened_with_backoff():
    DroppingCamera.opens = []
    source = LiveSource(DroppingCamera, "fake camera", failures_before_reopen=2, backoff_s=0.02,
                        max_backoff_s=0.08, give_up_s=5.0)
    seen = []
    stats = run_loop(source, lambda frame: (frame.copy(), ""), max_frames=7,
                     on_frame=lambda name, text: seen.append(name))
    assert stats.frames == 7
    assert stats.reopens >= 2 and len(DroppingCamera.opens) == stats.reopens + 1
    assert stats.dropped >= 2 * stats.reopens  # failed reads before each reopen are counted
    assert "reopened" in stats.summary()
    gaps = np.diff(DroppingCamera.opens)
    assert gaps[0] >= 0.02 - 1e-3  # waited for the back-off before reopening
    assert not source._thread.is_alive()  # the capture thread stopped with the loop


def test_live_source_keeps_only_the_newest_frame():
    class FastCamera(DroppingCamera):
        def __init__(self):
            super().__init__(good=10**9)

    DroppingCamera.opens = []
    source = LiveSource(FastCamera, "fast camera", give_up_s=5.0)
    slow = threading.Event()

    def slow_process(frame):
        slow.wait(0.05)  # slower than the camera: frames in between must be skipped, not queued
        return frame, ""

    stats = run_loop(source, slow_process, max_frames=3)
    assert stats.frames == 3 and stats.skipped > 0 and stats.dropped == 0


def test_infer_cli_on_a_video_file(tmp_path, fake_model, video, capsys):
    out = tmp_path / "overlay.mp4"
    assert main(["infer", "--model", str(fake_model), "--source", str(video), "--save", str(out),
                 "--max-frames", "5", "--conf", "0.2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("frames 5, dropped 0, skipped 0, latency p50")
    assert lines[1] == f"saved 5 frames to {out}"
    capture = cv2.VideoCapture(str(out))
    ok, first = capture.read()
    capture.release()
    assert ok and first.shape == (64, 80, 3)


def test_unopenable_gstreamer_pipeline_is_one_error():
    from maskrt.errors import MaskrtError
    from maskrt.runtime.video import open_source
    # pip's OpenCV has no GStreamer (and this machine no such camera): either way, one clear error.
    with pytest.raises(MaskrtError, match="cannot open live source GStreamer pipeline"):
        open_source("nosuchelementsrc ! appsink")


def test_ctrl_c_on_the_real_cli_finalises_the_saved_video(tmp_path, fake_model):
    import os
    import signal
    import subprocess
    import sys

    long_video = tmp_path / "long.avi"
    writer = cv2.VideoWriter(str(long_video), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (80, 64))
    frame = np.zeros((64, 80, 3), np.uint8)
    for i in range(3000):
        frame[:] = i % 256
        writer.write(frame)
    writer.release()
    out = tmp_path / "partial.mp4"
    process = subprocess.Popen([sys.executable, "-m", "maskrt", "infer", "--model", str(fake_model), "--source",
                                str(long_video), "--save", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.02)  # the writer exists once the first frame is written
    time.sleep(0.2)
    assert process.poll() is None, "finished before it could be interrupted"
    os.kill(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "(stopped by Ctrl-C)" in stdout and "Traceback" not in stderr
    written = int(stdout.strip().splitlines()[-1].split()[1])  # "saved N frames to ..."
    assert 0 < written < 3000
    assert _count_frames(out) == written  # finalised: every written frame can be read back


def _frame_numbers(path: Path) -> list[int]:
    """The frame index each frame of a video carries: its grey level / 20 (see ``video``), read in
    the bottom-right corner, where neither the digit nor the fake model's overlays reach."""
    capture = cv2.VideoCapture(str(path))
    numbers = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        numbers.append(int(round(float(frame[46:, 62:, 0].mean()) / 20.0)))
    capture.release()
    return numbers


def test_pipelined_loop_keeps_frame_order_counts_drops_and_times_every_stage(tmp_path, fake_model, video):
    from maskrt.runtime.commands import predictor_stages
    from maskrt.runtime.video import FrameStages

    predictor = Predictor(fake_model, conf=0.2)
    stages = predictor_stages(predictor)
    jitter = np.random.default_rng(0)

    def uneven(fn):  # stages of uneven, random speed: order must not depend on timing
        def wrapped(*args):
            time.sleep(float(jitter.uniform(0, 0.01)))
            return fn(*args)
        return wrapped

    shaken = FrameStages(uneven(stages.preprocess), uneven(stages.infer), uneven(stages.postprocess),
                         uneven(stages.draw))
    source = VideoFileSource(FlakyCapture(video, failing={2, 8}, empty={4}), str(video))
    out = tmp_path / "ordered.avi"
    stats = run_loop(source, shaken, sink=FrameSink(str(out), fps=10.0))
    assert (stats.frames, stats.dropped) == (FRAMES - 3, 3) and not stats.interrupted
    kept = [i for i in range(FRAMES) if i not in {2, 4, 8}]
    assert _frame_numbers(out) == kept  # the saved video holds the good frames in their order
    assert all(len(stats.stage_ms[name]) == FRAMES - 3 for name in ("preprocess", "inference", "postprocess",
                                                                      "draw", "encode"))
    assert set(stats.stage_percentiles()) == {"decode", "preprocess", "inference", "postprocess", "draw", "encode"}
    assert all(latency > 0 for latency in stats.latencies_ms)


def test_a_failing_stage_is_raised_after_the_video_is_finalised(tmp_path, video):
    from maskrt.errors import MaskrtError
    from maskrt.runtime.video import FrameStages

    def infer(prepared):
        if prepared[0, 0, 0] >= 90:  # frame 5 on (grey level 20 * index, give or take MJPG)
            raise MaskrtError("the engine failed")
        return prepared

    stages = FrameStages(lambda frame: frame, infer, lambda frame, prepared, outputs: None,
                         lambda frame, result: (frame.copy(), ""))
    out = tmp_path / "partial.avi"
    with pytest.raises(MaskrtError, match="the engine failed"):
        run_loop(VideoFileSource(cv2.VideoCapture(str(video)), "clip"), stages, sink=FrameSink(str(out), fps=10.0))
    assert _frame_numbers(out) == [0, 1, 2, 3, 4]  # finalised, every frame before the failure


def test_bench_source_reports_stages_and_the_ratio_to_the_engine(tmp_path, fake_model, capsys):
    import json

    from maskrt.runtime.commands import write_synthetic_video

    clip = write_synthetic_video(tmp_path / "clip.mp4", 72, 128, frames=6)
    report = tmp_path / "bench.json"
    assert main(["bench", "--model", str(fake_model), "--source", str(clip), "--draw", "--iters", "4",
                 "--warmup", "1", "--rounds", "2", "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    assert figures["resolution"] == [72, 128] and figures["draw"] is True and len(figures["rounds"]) == 2
    assert all(r["frames"] == 4 and r["engine_fps"] > 0 and r["loop_fps"] > 0 for r in figures["rounds"])
    assert set(figures["stages_ms"]) == {"decode", "preprocess", "inference", "postprocess", "draw", "encode"}
    assert figures["detections_per_frame"] == 3  # the fake graph keeps 3, bench's default conf is 0.0
    assert figures["machine"]["cores"] >= 1 and figures["machine"]["cpu"]
    ratios = [r["loop_fps"] / r["engine_fps"] for r in figures["rounds"]]
    assert figures["loop_vs_engine"] == pytest.approx(sum(ratios) / 2)  # the median of two rounds
    # CPU time per frame: the loop does the engine's work and more (decode, drawing, encoding).
    assert all(r["engine_cpu_ms_per_image"] > 0 and r["loop_cpu_ms_per_frame"] > 0 for r in figures["rounds"])
    assert figures["loop_cpu_ms_per_frame"] == pytest.approx(
        sum(r["loop_cpu_ms_per_frame"] for r in figures["rounds"]) / 2)
    assert "loop" in capsys.readouterr().out
    image = tmp_path / "still.png"
    cv2.imwrite(str(image), np.full((40, 60, 3), 90, np.uint8))
    assert main(["bench", "--model", str(fake_model), "--source", str(image), "--iters", "3", "--rounds", "1",
                 "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    assert figures["rounds"][0]["frames"] == 3 and "encode" not in figures["stages_ms"]


def test_loop_on_a_stalled_camera_stops_at_once():
    class StalledCamera(DroppingCamera):  # 1 frame, then nothing (failed reads) for 30 s
        def __init__(self):
            super().__init__(good=1)

    DroppingCamera.opens = []
    source = LiveSource(StalledCamera, "stalled camera", failures_before_reopen=10**9, give_up_s=30.0)
    begin = time.monotonic()
    stats = run_loop(source, lambda frame: (frame.copy(), ""), max_frames=1)
    assert stats.frames == 1 and time.monotonic() - begin < 5.0  # not the 30 s give-up, nor a join timeout
    assert not source._thread.is_alive()


def test_bench_draw_without_source_and_bad_rounds_are_one_line_errors(fake_model, capsys):
    assert main(["bench", "--model", str(fake_model), "--draw"]) == 2
    assert "--draw needs --source" in capsys.readouterr().err
    assert main(["bench", "--model", str(fake_model), "--source", "0", "--rounds", "0"]) == 2
    assert "--rounds must be positive" in capsys.readouterr().err


def test_threads_set_the_engines_intra_op_threads_for_infer_and_bench(tmp_path, fake_model, video, capsys,
                                                                       monkeypatch):
    """`--threads N` reaches ONNX Runtime's session (the one `maskrt serve --threads` sets), for
    `maskrt infer` and for both halves of `maskrt bench --source` (engine alone and loop)."""
    import json

    from maskrt.runtime import commands

    assert Predictor(fake_model, threads=1).backend.session.get_session_options().intra_op_num_threads == 1
    opened = []

    class RecordingPredictor(Predictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self.backend.session.get_session_options().intra_op_num_threads)

    monkeypatch.setattr(commands, "Predictor", RecordingPredictor)
    assert main(["infer", "--model", str(fake_model), "--source", str(video), "--threads", "1",
                 "--max-frames", "2"]) == 0
    assert opened == [1]
    report = tmp_path / "bench.json"
    image = tmp_path / "still.png"
    cv2.imwrite(str(image), np.full((40, 60, 3), 90, np.uint8))
    for threads, expected in ((["--threads", "1"], 1), ([], None)):
        assert main(["bench", "--model", str(fake_model), "--source", str(image), "--iters", "2", "--rounds", "1",
                     "--json", str(report)] + threads) == 0
        assert json.loads(report.read_text())["engine_threads"] == expected
    assert opened == [1, 1, 0]  # 0: ONNX Runtime's default, reported as null
    # --draw-threads: the overlays drawn in bands (the same pixels, tests/test_runtime_crops.py).
    out = tmp_path / "overlay.avi"
    assert main(["infer", "--model", str(fake_model), "--source", str(video), "--draw-threads", "2",
                 "--max-frames", "3", "--conf", "0.2", "--save", str(out)]) == 0
    assert _count_frames(out) == 3
    assert main(["bench", "--model", str(fake_model), "--source", str(image), "--iters", "2", "--rounds", "1",
                 "--draw", "--draw-threads", "2", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["draw_threads"] == 2
    capsys.readouterr()


def test_bad_threads_are_one_line_errors(tmp_path, fake_model, capsys):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00fake serialized engine")
    (tmp_path / "model.engine.json").write_text("{}")
    cases = [
        (["infer", "--model", str(fake_model), "--source", "0", "--threads", "0"], "threads must be at least 1"),
        (["bench", "--model", str(fake_model), "--threads", "0"], "threads must be at least 1"),
        (["infer", "--model", str(engine), "--source", "0", "--threads", "1"], "ONNX Runtime models only"),
        (["infer", "--server", "host:8001", "--source", "0", "--threads", "1"], "maskrt serve --threads"),
        (["infer", "--model", str(fake_model), "--source", "0", "--draw-threads", "0"], "--draw-threads must be at"),
        (["bench", "--model", str(fake_model), "--source", "0", "--draw-threads", "0"], "--draw-threads must be at"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("maskrt: error: ") and expected in err and err.count("\n") == 1, (argv, err)
