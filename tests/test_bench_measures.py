"""What two benchmarks measure: bench/serve.py's steady rate (answers while every client is in
flight) and bench/loop_paced.py's loop beside an engine that leaves the CPU free (the real
loop, the engine's outputs replayed in frame order after a wait)."""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steady_rate_counts_the_answers_while_every_client_is_in_flight():
    serve = load_bench("serve")
    # Client A answered at 1..5 s, client B at 1.5, 2.5, 3.5 and 6 s: every client is in flight
    # from 1.5 s (B's first answer) to 5 s (A's last); after 1.5 and up to 5 come A's 2, 3, 4, 5
    # and B's 2.5, 3.5: 6 answers in 3.5 s.
    assert serve.steady_rate([[1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 2.5, 3.5, 6.0]]) == pytest.approx(6 / 3.5)
    # A slow start and a long tail do not count: the whole run's rate here is 8 answers in 10 s;
    # from 4 s to 5 s both clients are in flight and 4 answers come (4.5 and 5 from each).
    assert serve.steady_rate([[0.5, 4.0, 4.5, 5.0], [4.0, 4.5, 5.0, 10.0]]) == pytest.approx(4.0)
    assert serve.steady_rate([[1.0], [2.0]]) is None  # one answer each: no window


def test_paced_inference_replays_the_outputs_in_frame_order_after_the_wait():
    loop_paced = load_bench("loop_paced")
    from maskrt.runtime.video import FrameStages

    outputs = [{"frame": np.array([k])} for k in range(4)]
    real = FrameStages(preprocess=lambda frame: frame, infer=lambda prepared: pytest.fail("the engine ran"),
                       postprocess=lambda frame, prepared, result: result, draw=lambda frame, result: (frame, ""))
    paced = loop_paced.paced_stages(real, outputs, 15.0)
    assert paced.preprocess is real.preprocess and paced.draw is real.draw
    for k in range(4):
        begin = time.perf_counter()
        assert paced.infer(None) is outputs[k]
        assert time.perf_counter() - begin >= 0.015


def test_loop_paced_runs_every_frame_and_never_beats_the_engines_pace(tmp_path, monkeypatch, capsys):
    from maskrt.runtime.commands import write_synthetic_video
    from test_runtime_fakes import standard_fake

    loop_paced = load_bench("loop_paced")
    model = standard_fake(tmp_path / "fake.onnx")
    video = write_synthetic_video(tmp_path / "clip.mp4", 96, 128, frames=8)
    out = tmp_path / "paced.json"
    monkeypatch.setattr(sys, "argv", ["loop_paced.py", "--model", str(model), "--source", str(video),
                                      "--paces", "0", "25", "--frames", "6", "--rounds", "1", "--json", str(out)])
    assert loop_paced.main() == 0
    report = json.loads(out.read_text())
    assert [entry["pace_ms"] for entry in report["paces"]] == [0, 25]
    for entry in report["paces"]:
        assert len(entry["runs"]) == 1 and entry["loop_fps"] > 0
    free, paced = report["paces"]
    assert free["loop_vs_engine"] is None
    # Frames leave the inference stage one by one, each after >= 25 ms: never more than 40 FPS.
    assert paced["loop_fps"] <= 1000 / 25 and 0 < paced["loop_vs_engine"] <= 1.0
    assert paced["stage_p50_ms"]["inference"] >= 25
    assert "| 25 ms | 40.0 |" in capsys.readouterr().out
    # A clip shorter than --frames is one clear line.
    monkeypatch.setattr(sys, "argv", ["loop_paced.py", "--model", str(model), "--source", str(video),
                                      "--frames", "50"])
    with pytest.raises(SystemExit, match="has 8 good frames, fewer than --frames 50"):
        loop_paced.main()
