"""Frame sources, sinks and the real-time loop behind ``maskrt infer``.

Sources yield good BGR frames and count the bad ones themselves (``dropped``):
- live (camera index, /dev/videoN, rtsp://, http://, a GStreamer pipeline): captured in their
  own thread that keeps only the newest frame (``skipped`` counts the ones overwritten before
  use), and reopens a camera that drops, with exponential back-off;
- a video file: read in order; a frame that fails to decode or comes back empty is counted
  and skipped, the file ends at its frame count or after many failures in a row;
- an image or a folder of images: an image that cannot be decoded is counted and skipped
  (a single undecodable image is an error).
"""
from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import cv2
import numpy as np

from maskrt.errors import MaskrtError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SAVE_SUFFIXES = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v", ".mov": "mp4v"}
STREAM_PREFIXES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://")

# FFmpeg's own log lines ("moov atom not found", "Connection refused") would surround our
# one-line errors; we count and report bad frames ourselves. A user's setting wins.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


@contextlib.contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's warnings ("can't open camera by index") while probing a source."""
    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging is None:
        yield
        return
    previous = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        logging.setLogLevel(previous)


def open_capture(target: int | str, api: int = cv2.CAP_ANY) -> cv2.VideoCapture:
    """cv2.VideoCapture(target, api) without OpenCV's warnings on failure."""
    with quiet_opencv():
        return cv2.VideoCapture(target, api)


def is_good_frame(frame: Any) -> bool:
    """A usable BGR frame: a non-empty uint8 HxWx3 (or HxW) array."""
    return isinstance(frame, np.ndarray) and frame.size > 0 and frame.ndim in (2, 3) and frame.dtype == np.uint8


class Capture(Protocol):
    """What we use of cv2.VideoCapture (tests pass wrappers that fail on purpose)."""

    def read(self) -> tuple[bool, Any]: ...
    def get(self, prop: int) -> float: ...
    def isOpened(self) -> bool: ...
    def release(self) -> None: ...


class FrameSource(Protocol):
    """Where frames come from; ``dropped`` counts bad frames, ``skipped`` unused live frames."""

    name: str
    live: bool
    dropped: int
    skipped: int

    def frames(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (frame name, BGR frame) for each good frame, in order."""
        ...

    def close(self) -> None: ...


class VideoFileSource:
    """A video file read frame by frame, in order; bad frames are counted and skipped."""

    live = False

    def __init__(self, capture: Capture, name: str, max_consecutive_failures: int = 25) -> None:
        self.capture, self.name = capture, name
        self.max_consecutive_failures = max_consecutive_failures
        self.dropped = 0
        self.skipped = 0

    def frames(self) -> Iterator[tuple[str, np.ndarray]]:
        frame_count = int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        index = 0
        failures_in_a_row = 0
        while True:
            ok, frame = self.capture.read()
            index += 1
            if ok and is_good_frame(frame):
                failures_in_a_row = 0
                yield f"frame_{index:06d}", frame
                continue
            # A failed read at the end of the file is its end, not a dropped frame.
            position = int(self.capture.get(cv2.CAP_PROP_POS_FRAMES) or 0)
            if not ok and (frame_count <= 0 or position >= frame_count or index > frame_count):
                return
            self.dropped += 1
            failures_in_a_row += 1
            if failures_in_a_row >= self.max_consecutive_failures:
                return

    def close(self) -> None:
        self.capture.release()


class ImageSource:
    """An image file or the images of a folder, sorted by name."""

    live = False

    def __init__(self, paths: list[Path], name: str) -> None:
        self.paths, self.name = paths, name
        self.dropped = 0
        self.skipped = 0

    def frames(self) -> Iterator[tuple[str, np.ndarray]]:
        for path in self.paths:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if not is_good_frame(image):
                if len(self.paths) == 1:
                    raise MaskrtError(f"cannot decode image {path}: not an image file or corrupt")
                self.dropped += 1
                continue
            yield path.stem, image

    def close(self) -> None:
        pass


class LiveSource:
    """A camera or network stream read in its own thread, keeping only the newest frame.

    ``open_capture`` makes a fresh capture (called again to reopen after the camera drops).
    After ``failures_before_reopen`` failed reads in a row the capture is reopened, waiting
    ``backoff_s`` first, doubled after each unsuccessful reopen up to ``max_backoff_s``. With no
    good frame for ``give_up_s`` seconds the source ends.
    """

    live = True

    def __init__(self, open_capture: Callable[[], Capture], name: str, failures_before_reopen: int = 5,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, give_up_s: float = 30.0) -> None:
        self.open_capture, self.name = open_capture, name
        self.failures_before_reopen = failures_before_reopen
        self.backoff_s, self.max_backoff_s, self.give_up_s = backoff_s, max_backoff_s, give_up_s
        self.dropped = 0
        self.skipped = 0
        self.reopens = 0
        self._capture = open_capture()
        if not self._capture.isOpened():
            self._capture.release()
            raise MaskrtError(f"cannot open live source {name}: no such camera or stream, or it is busy")
        self._newest: np.ndarray | None = None
        self._sequence = 0
        self._last_good = time.monotonic()
        self._finished = False
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._capture_loop, name=f"capture {name}", daemon=True)
        self._thread.start()

    def _capture_loop(self) -> None:
        failures = 0
        backoff = self.backoff_s
        try:
            while not self._stop.is_set():
                ok, frame = self._capture.read()
                if ok and is_good_frame(frame):
                    failures, backoff = 0, self.backoff_s
                    with self._changed:
                        if self._newest is not None:
                            self.skipped += 1  # the consumer was busy: keep only the newest
                        self._newest = frame
                        self._sequence += 1
                        self._last_good = time.monotonic()
                        self._changed.notify_all()
                    continue
                self.dropped += 1
                failures += 1
                if time.monotonic() - self._last_good > self.give_up_s:
                    break
                if failures >= self.failures_before_reopen:
                    # The camera dropped: wait, reopen, and wait longer each time it fails again.
                    self._capture.release()
                    if self._stop.wait(backoff):
                        break
                    self._capture = self.open_capture()
                    self.reopens += 1
                    failures = 0
                    backoff = min(backoff * 2, self.max_backoff_s)
        finally:
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    def frames(self) -> Iterator[tuple[str, np.ndarray]]:
        while True:
            with self._changed:
                while self._newest is None and not self._finished and not self._stop.is_set():
                    self._changed.wait(0.5)
                if self._newest is None:
                    return
                frame, self._newest = self._newest, None
                sequence = self._sequence
            yield f"frame_{sequence:06d}", frame

    def close(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout=5.0)
        self._capture.release()


def open_source(spec: str) -> FrameSource:
    """'0' | '/dev/videoN' | 'rtsp://...' | 'src ! ... ! appsink' | video file | image | folder -> a FrameSource."""
    if spec.isdigit() or spec.startswith("/dev/video"):
        target: int | str = int(spec) if spec.isdigit() else spec
        return LiveSource(lambda: open_capture(target), f"camera {spec}")
    if spec.lower().startswith(STREAM_PREFIXES):
        return LiveSource(lambda: open_capture(spec), spec)
    if " ! " in spec:  # a GStreamer pipeline ending in appsink (Jetson CSI cameras: nvarguscamerasrc)
        return LiveSource(lambda: open_capture(spec, cv2.CAP_GSTREAMER), "GStreamer pipeline")
    path = Path(spec)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise MaskrtError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return ImageSource(images, str(path))
    if not path.exists():
        raise MaskrtError(f"source not found: {spec} (give a camera index, /dev/videoN, a URL, a video, an image or a folder)")
    if path.stat().st_size == 0:
        raise MaskrtError(f"source file is empty: {path}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSource([path], str(path))
    capture = open_capture(str(path))
    if not capture.isOpened():
        capture.release()
        raise MaskrtError(f"cannot open video {path}: not a video OpenCV can decode")
    return VideoFileSource(capture, str(path))


class FrameSink:
    """Where overlaid frames go: a video file (by suffix) or a folder of PNGs."""

    def __init__(self, target: str, fps: float = 30.0) -> None:
        self.path = Path(target)
        self.fps = fps if fps and fps > 0 else 30.0
        self.codec = VIDEO_SAVE_SUFFIXES.get(self.path.suffix.lower())
        self.writer: Any = None
        self.written = 0
        if self.codec is None:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.parent.exists():
            raise MaskrtError(f"cannot save to {self.path}: folder {self.path.parent} does not exist")

    def write(self, name: str, frame: np.ndarray) -> None:
        if self.codec is None:
            cv2.imwrite(str(self.path / f"{name}.png"), frame)
        else:
            if self.writer is None:  # the size is known with the first frame
                h, w = frame.shape[:2]
                self.size = (w, h)
                self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*self.codec), self.fps, (w, h))
                if not self.writer.isOpened():
                    raise MaskrtError(f"cannot write video {self.path} with codec {self.codec}")
            if (frame.shape[1], frame.shape[0]) != self.size:  # a stream that changed size mid-way
                frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
            self.writer.write(frame)
        self.written += 1

    def close(self) -> None:
        """Finalise the video (writes its index; without this an .mp4 is unreadable)."""
        if self.writer is not None:
            self.writer.release()
            self.writer = None


STAGES = ("decode", "preprocess", "inference", "postprocess", "draw", "encode")


@dataclass
class LoopStats:
    """What ``run_loop`` measured: per-frame latency (frame decoded -> overlay drawn, queue waits
    included), milliseconds per stage, and the wall time."""

    frames: int = 0
    dropped: int = 0
    skipped: int = 0
    reopens: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    stage_ms: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in STAGES})
    wall_s: float = 0.0
    interrupted: bool = False

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else 0.0

    def stage_percentiles(self) -> dict[str, dict[str, float]]:
        """{stage: {"p50": ms, "p99": ms}} for the stages that ran."""
        return {name: {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}
                for name, values in self.stage_ms.items() if values}

    def summary(self) -> str:
        """The one line printed at the end of ``maskrt infer``."""
        line = (f"frames {self.frames}, dropped {self.dropped}, skipped {self.skipped}, "
                f"latency p50 {self.percentile_ms(50):.1f} ms p99 {self.percentile_ms(99):.1f} ms, "
                f"{self.fps:.1f} FPS")
        if self.reopens:
            line += f", reopened {self.reopens}x"
        return line + (" (stopped by Ctrl-C)" if self.interrupted else "")


def _identity(value: Any) -> Any:
    return value


@dataclass
class FrameStages:
    """A frame's work, split into the stages the pipelined loop overlaps.

    preprocess(frame) -> prepared; infer(prepared) -> outputs; postprocess(frame, prepared,
    outputs) -> result; draw(frame, result) -> (overlay BGR, text). ``FrameStages.serial(process)``
    wraps one ``process(frame) -> (overlay, text)`` callable as the draw stage.
    """

    preprocess: Callable[[np.ndarray], Any]
    infer: Callable[[Any], Any]
    postprocess: Callable[[np.ndarray, Any, Any], Any]
    draw: Callable[[np.ndarray, Any], tuple[np.ndarray, str]]

    @staticmethod
    def serial(process: Callable[[np.ndarray], tuple[np.ndarray, str]]) -> "FrameStages":
        return FrameStages(preprocess=_identity, infer=_identity, postprocess=lambda frame, prepared, outputs: None,
                           draw=lambda frame, result: process(frame))


class _End:
    """Sent down the pipeline after the last frame; carries a stage's exception, if any."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class _Handoff:
    """A bounded FIFO between two stage threads whose put/get give up when ``stop`` is set."""

    def __init__(self, size: int, stop: threading.Event) -> None:
        self.items: collections.deque = collections.deque()
        self.size, self.stop = size, stop
        self.changed = threading.Condition()

    def put(self, item: Any) -> bool:
        with self.changed:
            while len(self.items) >= self.size and not self.stop.is_set():
                self.changed.wait(0.1)
            if self.stop.is_set():
                return False
            self.items.append(item)
            self.changed.notify_all()
            return True

    def get(self) -> Any:
        with self.changed:
            while not self.items and not self.stop.is_set():
                self.changed.wait(0.1)
            if self.stop.is_set():
                return _End()
            item = self.items.popleft()
            self.changed.notify_all()
            return item


def run_loop(source: FrameSource, process: FrameStages | Callable[[np.ndarray], tuple[np.ndarray, str]],
             sink: FrameSink | None = None, show: bool = False, max_frames: int | None = None,
             on_frame: Callable[[str, str], None] | None = None, opencv_threads: int | None = 1) -> LoopStats:
    """Feed every good frame of ``source`` through ``process`` and save / show the overlays with
    FPS and latency drawn on, until the source ends, ``max_frames`` frames, 'q'/Esc in the
    window, or Ctrl-C. The sink is finalised and the source closed in every case.

    Pipelined: decode + preprocess, inference, postprocess + draw each run in their own thread
    and the calling thread writes / shows, so the loop runs at the pace of its slowest stage,
    not of their sum. Frames stay in order (one thread per stage, FIFO hand-offs of 2 frames;
    1 for a live source, which keeps only its newest frame while the model is busy).
    ``process`` is a FrameStages, or one callable frame -> (overlay, text) run as the draw stage.
    ``opencv_threads``: cv2.setNumThreads while the loop runs (1: the stages already use the
    cores; OpenCV's own thread pool on top would oversubscribe them); None leaves it.
    """
    from maskrt.runtime.draw import draw_status

    stages = process if isinstance(process, FrameStages) else FrameStages.serial(process)
    stats = LoopStats()
    stop = threading.Event()  # tells the stage threads to quit
    depth = 1 if source.live else 2
    prepared_q, inferred_q, drawn_q = _Handoff(depth, stop), _Handoff(depth, stop), _Handoff(depth, stop)
    times = stats.stage_ms

    def timed(name: str, fn: Callable, *args: Any) -> Any:
        begin = time.perf_counter()
        value = fn(*args)
        times[name].append((time.perf_counter() - begin) * 1000.0)  # list.append is atomic
        return value

    def read_and_prepare() -> None:
        error = None
        try:
            frames = iter(source.frames())
            while not stop.is_set():
                begin = time.perf_counter()
                item = next(frames, None)
                if item is None:
                    break
                decoded = time.perf_counter()
                times["decode"].append((decoded - begin) * 1000.0)
                name, frame = item
                if not prepared_q.put((name, frame, decoded, timed("preprocess", stages.preprocess, frame))):
                    break
        except BaseException as err:  # handed to the calling thread, which re-raises it
            error = err
        prepared_q.put(_End(error))

    def relay(inbox: _Handoff, outbox: _Handoff, work: Callable[[tuple], tuple]) -> None:
        """One stage's thread: ``work`` on each item in order; the end, or a failure, is passed on."""
        while True:
            item = inbox.get()
            if isinstance(item, _End):
                outbox.put(item)
                return
            try:
                result = work(item)
            except BaseException as err:  # handed down to the calling thread, which re-raises it
                outbox.put(_End(err))
                return
            if not outbox.put(result):
                return

    def infer(item: tuple) -> tuple:
        name, frame, decoded, prepared = item
        return name, frame, decoded, prepared, timed("inference", stages.infer, prepared)

    def finish(item: tuple) -> tuple:
        name, frame, decoded, prepared, outputs = item
        result = timed("postprocess", stages.postprocess, frame, prepared, outputs)
        overlay, text = timed("draw", stages.draw, frame, result)
        return name, overlay, text, (time.perf_counter() - decoded) * 1000.0

    # Ctrl-C sets a flag that the loop reads between frames, so it never lands inside a frame's
    # write (the saved count and the file would disagree by one). A second Ctrl-C interrupts at
    # once. Handlers can only be installed from the main thread; elsewhere KeyboardInterrupt is
    # caught below as before.
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        if stop_requested.is_set():
            raise KeyboardInterrupt
        stop_requested.set()
        stop.set()  # frames still in the stages are dropped, never half-written

    # signal.signal may return None (a handler not set from Python), so whether one was
    # installed is its own flag.
    handler_installed = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, request_stop) if handler_installed else None
    previous_threads = cv2.getNumThreads()
    if opencv_threads is not None:
        cv2.setNumThreads(opencv_threads)
    workers = [threading.Thread(target=read_and_prepare, name="maskrt decode+preprocess", daemon=True),
               threading.Thread(target=relay, args=(prepared_q, inferred_q, infer), name="maskrt inference",
                                daemon=True),
               threading.Thread(target=relay, args=(inferred_q, drawn_q, finish), name="maskrt postprocess+draw",
                                daemon=True)]
    start = time.perf_counter()
    smoothed_fps = 0.0
    last_done = start
    failure: BaseException | None = None
    try:
        for worker in workers:
            worker.start()
        while not stop_requested.is_set():
            item = drawn_q.get()
            if isinstance(item, _End):
                if isinstance(item.error, KeyboardInterrupt):
                    stats.interrupted = True
                elif item.error is not None:
                    failure = item.error
                break
            name, overlay, text, latency_ms = item
            stats.frames += 1
            stats.latencies_ms.append(latency_ms)
            now = time.perf_counter()
            instant_fps = 1.0 / max(now - last_done, 1e-9)
            smoothed_fps = instant_fps if stats.frames == 1 else 0.9 * smoothed_fps + 0.1 * instant_fps
            last_done = now
            if source.live or not isinstance(source, ImageSource):
                draw_status(overlay, [f"{smoothed_fps:.1f} FPS", f"{latency_ms:.1f} ms"])
            if on_frame is not None:
                on_frame(name, text)
            if sink is not None:
                timed("encode", sink.write, name, overlay)
            if show:
                cv2.imshow("maskrt", overlay)
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    break
            if max_frames is not None and stats.frames >= max_frames:
                break
    except KeyboardInterrupt:
        stats.interrupted = True
    finally:
        stop.set()
        if source.live:  # wakes the reader from a wait for the next camera frame
            source.close()
        for worker in workers:
            worker.join(timeout=10.0)
        if handler_installed:
            signal.signal(signal.SIGINT, previous_handler if previous_handler is not None else signal.SIG_DFL)
        if opencv_threads is not None:
            cv2.setNumThreads(previous_threads)
        stats.interrupted = stats.interrupted or stop_requested.is_set()
        stats.wall_s = time.perf_counter() - start
        if sink is not None:
            sink.close()
        if not source.live:  # a file is released only once its reader has stopped reading
            source.close()
        if show:
            cv2.destroyAllWindows()
        stats.dropped, stats.skipped = source.dropped, source.skipped
        stats.reopens = getattr(source, "reopens", 0)
    if failure is not None:
        raise failure
    return stats


def check_display() -> None:
    """Raise a one-line MaskrtError when this OpenCV cannot open a window (headless build, no display)."""
    if os.name != "nt" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise MaskrtError("--show needs a display (no $DISPLAY): use --save instead")
    try:
        cv2.namedWindow("maskrt", cv2.WINDOW_NORMAL)
    except cv2.error:
        raise MaskrtError("--show needs OpenCV with GUI support (opencv-python, not opencv-python-headless)") from None
