"""Progress bars off a terminal become log lines; ONNX Runtime's quantisation pre-processing
advice does not reach stderr during int8 export, while other warnings still do."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap

from tqdm import tqdm

from maskrt.progress import LineWriter, progress_options


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_lines_not_carriage_returns() -> None:
    log = io.StringIO()
    options = progress_options(log)
    assert options["mininterval"] == 10.0 and isinstance(options["file"], LineWriter)
    options["mininterval"] = 0  # every update, so that the test needs no clock
    for _ in tqdm(range(4), desc="train", **options):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("train:") for line in lines)
    assert "4/4" in lines[-1] and text.endswith("\n")


def test_a_terminal_gets_the_live_bar() -> None:
    terminal = _Terminal()
    options = progress_options(terminal)
    assert options == {"file": terminal, "dynamic_ncols": True}
    for _ in tqdm(range(3), **options):
        pass
    assert "\r" in terminal.getvalue()


QUANTIZE = textwrap.dedent('''
    import logging, sys
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from maskrt.export.precision import without_quant_preprocess_advice

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, sys.argv[1] + "/fp32.onnx")

    class Images(CalibrationDataReader):
        def __init__(self):
            self.left = [{"x": np.ones((1, 3, 8, 8), np.float32)}]
        def get_next(self):
            return self.left.pop() if self.left else None

    def quantize():
        quantize_static(sys.argv[1] + "/fp32.onnx", sys.argv[1] + "/int8.onnx", Images(),
                        quant_format=QuantFormat.QDQ)
        logging.warning("a real problem stays visible")

    if sys.argv[2] == "wrapped":
        with without_quant_preprocess_advice():
            quantize()
    else:
        quantize()
    print("quantized")
''')


def _quantize(tmp_path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", QUANTIZE, str(tmp_path), mode], capture_output=True,
                          text=True, timeout=300)


def test_ort_preprocessing_advice_does_not_reach_stderr(tmp_path) -> None:
    bare = _quantize(tmp_path, "bare")
    assert bare.returncode == 0 and "quantized" in bare.stdout, bare.stderr
    assert "pre-processing before quantization" in bare.stderr  # what ORT says unfiltered
    wrapped = _quantize(tmp_path, "wrapped")
    assert wrapped.returncode == 0 and "quantized" in wrapped.stdout, wrapped.stderr
    assert "pre-processing before quantization" not in wrapped.stderr
    assert "a real problem stays visible" in wrapped.stderr
