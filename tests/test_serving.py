"""Triton serving (docs/serving.md) on real servers: `maskrt serve` on free loopback ports with a
small exported Mask R-CNN, the repository of `maskrt export --triton` in the same bundled
tritonserver, and the `--server` client. References: the in-process Predictor on the same images,
pycocotools for the RLE, Triton's ModelConfig proto for the configs.

One `maskrt serve` process serves every test of the module until the last, which stops it with
SIGTERM while a request is in flight. Every server is killed in a finally (and tritonserver dies
with its parent: PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("maskrt.export.onnx_export")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
pycoco_mask = pytest.importorskip("pycocotools.mask")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from maskrt.runtime import Predictor  # noqa: E402
from maskrt.runtime.commands import synthetic_shapes_image  # noqa: E402
from maskrt.runtime.serving import OUTPUT_NAMES, maskrt_model_config, pack_detections  # noqa: E402
from test_runtime_fakes import CLASS_NAMES  # noqa: E402

pytestmark = pytest.mark.slow  # one ONNX export (~35 s) and two Triton start-ups (~10 s each)
SIZE = 128
CONF = 0.0  # every detection the graph keeps: the untrained model's ~0.3 scores fill D = 30 slots
REPO = Path(__file__).resolve().parents[1]

try:
    from maskrt.runtime.serving import pytriton_root
    pytriton_root()
    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any reason: the test is skipped with it
    HAVE_TRITON = False
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="nvidia-pytriton (bundled tritonserver) not installed")


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_images() -> list[np.ndarray]:
    """Three sizes, none the model's: letterboxing both ways and a non-square pad."""
    return [synthetic_shapes_image(96, 160, seed=1), synthetic_shapes_image(200, 150, seed=2),
            synthetic_shapes_image(64, 64, seed=3)]


test_images.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    from maskrt.export.onnx_export import export_onnx
    from maskrt.model import build_model

    torch.manual_seed(0)
    model = build_model("edge", num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES, min_size=SIZE, max_size=SIZE,
                        box_detections_per_img=30)
    model.eval()
    return export_onnx(model, tmp_path_factory.mktemp("serve") / "edge.onnx", input_size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def predictor(model_path) -> Predictor:
    return Predictor(model_path, backend="onnxruntime", conf=CONF)


class Server:
    def __init__(self, process: subprocess.Popen, http: int, grpc: int, metrics: int, output: Path) -> None:
        self.process, self.http, self.grpc, self.metrics, self.output = process, http, grpc, metrics, output


def start_serve(model: Path, folder: Path, extra: list[str] | None = None) -> Server:
    http, grpc, metrics = free_ports(3)
    output = folder / "serve.out"
    command = [sys.executable, "-m", "maskrt", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
               "--conf", str(CONF), "--max-batch", "8", "--log", str(folder / "triton.log"), *(extra or [])]
    process = subprocess.Popen(command, stdout=open(output, "w"), stderr=subprocess.STDOUT, cwd=REPO)
    server = Server(process, http, grpc, metrics, output)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = output.read_text()
        if "ready on Triton" in text:
            return server
        if process.poll() is not None:
            break
        time.sleep(0.25)
    kill(process)
    raise AssertionError(f"maskrt serve did not become ready:\n{output.read_text()[-2000:]}")


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(30)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    if not HAVE_TRITON:
        pytest.skip("nvidia-pytriton (bundled tritonserver) not installed")
    server = start_serve(model_path, tmp_path_factory.mktemp("server"))
    try:
        yield server
    finally:
        kill(server.process)


def grpc_infer(client, image: np.ndarray) -> dict[str, np.ndarray]:
    item = grpcclient.InferInput("image", [1, *image.shape], "UINT8")
    item.set_data_from_numpy(image[None])
    result = client.infer("maskrt", [item], client_timeout=120)
    return {name: result.as_numpy(name)[0] for name in OUTPUT_NAMES}


def http_infer(client, image: np.ndarray) -> dict[str, np.ndarray]:
    item = httpclient.InferInput("image", [1, *image.shape], "UINT8")
    item.set_data_from_numpy(image[None])
    result = client.infer("maskrt", [item], timeout=120)
    return {name: result.as_numpy(name)[0] for name in OUTPUT_NAMES}


def assert_same_as_predictor(item: dict[str, np.ndarray], expected, image_shape: tuple[int, int]) -> None:
    count = int(item["num_dets"][0])
    assert count == len(expected) > 0
    slots = item["boxes"].shape[0]
    assert item["boxes"].shape == (slots, 4) and item["masks_rle"].shape == (slots,) and slots >= count
    np.testing.assert_allclose(item["boxes"][:count], expected.boxes, atol=1e-4, rtol=0)
    np.testing.assert_allclose(item["scores"][:count], expected.scores, atol=1e-6, rtol=0)
    assert item["labels"][:count].tolist() == expected.labels.tolist()
    assert not item["boxes"][count:].any() and all(r == b"" for r in item["masks_rle"][count:])
    # masks_rle is pycocotools' own encoding of the Predictor's masks, and decodes back to them.
    reference = pycoco_mask.encode(np.asfortranarray(expected.masks.transpose(1, 2, 0).astype(np.uint8)))
    for i in range(count):
        rle = json.loads(item["masks_rle"][i])
        assert rle["size"] == list(image_shape)
        assert rle["counts"].encode() == reference[i]["counts"]
    decoded = pycoco_mask.decode([{"size": list(image_shape), "counts": json.loads(r)["counts"].encode()}
                                  for r in item["masks_rle"][:count]])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), expected.masks)


# --- no server ------------------------------------------------------------------------------

def test_configs_parse_as_triton_model_configs():
    text = maskrt_model_config(30, CLASS_NAMES, {"model_path": "/m.onnx", "conf": "0.5"}, max_batch=8, instances=2)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == "maskrt" and config.backend == "python" and config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("image", model_config_pb2.TYPE_UINT8,
                                                                            [-1, -1, 3])]
    assert config.input[0].allow_ragged_batch
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config.output}
    assert outputs == {"num_dets": (model_config_pb2.TYPE_INT32, [1]), "boxes": (model_config_pb2.TYPE_FP32, [30, 4]),
                       "scores": (model_config_pb2.TYPE_FP32, [30]), "labels": (model_config_pb2.TYPE_INT32, [30]),
                       "masks_rle": (model_config_pb2.TYPE_STRING, [30])}
    assert config.instance_group[0].count == 2 and config.HasField("dynamic_batching")
    assert json.loads(config.parameters["class_names"].string_value) == list(CLASS_NAMES)
    assert config.parameters["detections"].string_value == "30"
    # Requests that queue while the model is busy are batched anyway: no added wait by default.
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    delayed = maskrt_model_config(30, CLASS_NAMES, {"model_path": "/m.onnx"}, queue_delay_us=500)
    delayed_config = text_format.Parse(delayed, model_config_pb2.ModelConfig())
    assert delayed_config.dynamic_batching.max_queue_delay_microseconds == 500


def test_onnxruntime_threads_are_the_sessions_intra_op_threads(model_path):
    from maskrt.errors import MaskrtError
    from maskrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    assert OnnxRuntimeBackend(model_path, threads=1).session.get_session_options().intra_op_num_threads == 1
    assert OnnxRuntimeBackend(model_path).session.get_session_options().intra_op_num_threads == 0  # ORT's default
    with pytest.raises(MaskrtError, match="at least 1"):
        OnnxRuntimeBackend(model_path, threads=0)


def test_pack_detections_pads_and_encodes_like_pycocotools(model_path, predictor):
    image = test_images()[1]
    detections = predictor(image)
    packed = pack_detections(detections, 40)
    assert packed["num_dets"].tolist() == [len(detections)] and packed["boxes"].shape == (40, 4)
    assert packed["labels"].dtype == np.int32 and packed["masks_rle"].dtype == object
    reference = pycoco_mask.encode(np.asfortranarray(detections.masks.transpose(1, 2, 0).astype(np.uint8)))
    assert [json.loads(r)["counts"].encode() for r in packed["masks_rle"][:len(detections)]] == \
        [r["counts"] for r in reference]


def test_user_errors_are_one_line(tmp_path, model_path, capsys):
    from maskrt.cli import main

    cases = [
        (["serve", "--model", str(tmp_path / "missing.onnx")], "model file not found"),
        (["serve", "--model", str(model_path), "--http-port", "9000", "--grpc-port", "9000"], "must differ"),
        (["serve", "--model", str(model_path), "--max-batch", "0"], "--max-batch must be at least 1"),
        (["serve", "--model", str(model_path), "--threads", "0"], "--threads must be at least 1"),
        (["serve", "--model", str(model_path), "--max-queue-delay-us", "-1"], "--max-queue-delay-us must be 0 or more"),
        (["export", "--triton", str(tmp_path / "repo")], "needs --weights, --input-size, --out"),
        (["export", "--triton", str(tmp_path / "repo"), "--model", str(tmp_path / "missing.engine")], "not found"),
        (["infer", "--source", "0"], "needs --model (or --server"),
        (["infer", "--server", "nocolon", "--source", "0"], "must be HOST:PORT"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("maskrt: error: ") and expected in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "repo").exists()


def _metadata(fixed_batch: bool = False) -> dict[str, str]:
    return {"class_names": json.dumps(list(CLASS_NAMES)), "input_size": "[320, 256]", "image_mean": "[0.5, 0.5, 0.5]",
            "detections_per_img": "50", "mask_size": "28", "precision": "fp16", "target": "tensorrt",
            "engine_min_batch": "4" if fixed_batch else "1", "engine_max_batch": "4"}


@pytest.mark.parametrize("fixed_batch", [False, True])
def test_engine_repository_is_a_tensorrt_plan_with_the_plugin_commands(tmp_path, fixed_batch):
    from maskrt.export.triton import write_triton_repository

    engine = tmp_path / "edge.engine"
    engine.write_bytes(b"not parsed: copied as model.plan")
    (tmp_path / "edge.engine.json").write_text(json.dumps(_metadata(fixed_batch)))
    repo = write_triton_repository(engine, tmp_path / "repo", max_batch=4, plugin="/p/libmaskrt_plugins.so")
    graph = text_format.Parse((repo / "maskrt_graph" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    served = text_format.Parse((repo / "maskrt" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert graph.platform == "tensorrt_plan" and (repo / "maskrt_graph" / "1" / "model.plan").is_file()
    assert list(graph.input[0].dims) == ([4] if fixed_batch else []) + [3, 320, 256]
    assert graph.max_batch_size == (0 if fixed_batch else 4)
    assert list(graph.output[4].dims) == ([4] if fixed_batch else []) + [50, 28, 28]
    assert served.max_batch_size == 4 and list(served.output[1].dims) == [50, 4]
    assert served.parameters["graph_fixed_batch"].string_value == ("4" if fixed_batch else "0")
    readme = (repo / "README.md").read_text()
    assert "--backend-config=tensorrt,plugins=/p/libmaskrt_plugins.so" in readme
    assert "LD_PRELOAD=/p/libmaskrt_plugins.so" in readme


def test_tensorrt_target_onnx_names_the_ort_op_library(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from maskrt.export.triton import DEFAULT_ORT_OPS, write_triton_repository

    node = helper.make_node("MultilevelRoIAlign", ["images"], ["masks"], domain="maskrt")
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, 320, 256])
    graph = helper.make_graph([node], "g", [images], [helper.make_tensor_value_info("masks", TensorProto.FLOAT, None)])
    model = helper.make_model(graph)
    for key, value in _metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, tmp_path / "trt.onnx")
    repo = write_triton_repository(tmp_path / "trt.onnx", tmp_path / "repo")
    config = text_format.Parse((repo / "maskrt_graph" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx"
    assert list(config.model_operations.op_library_filename) == [DEFAULT_ORT_OPS]


# --- maskrt serve ---------------------------------------------------------------------------

def test_http_and_grpc_answers_equal_the_in_process_predictor(server, predictor):
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    config = grpc.get_model_config("maskrt", as_json=True)["config"]
    assert json.loads(config["parameters"]["class_names"]["string_value"]) == list(CLASS_NAMES)
    for image in test_images():
        expected = predictor(image)
        assert_same_as_predictor(http_infer(http, image), expected, image.shape[:2])
        assert_same_as_predictor(grpc_infer(grpc, image), expected, image.shape[:2])
    http.close()
    grpc.close()


def test_eight_concurrent_clients_are_all_answered_and_batched(server, predictor):
    images = test_images()
    expected = [predictor(image) for image in images]
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    before = grpc.get_inference_statistics("maskrt", as_json=True)["model_stats"][0]
    answers: list[tuple[int, int, dict]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        connection = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
        for request in range(25):
            which = (index + request) % len(images)
            try:
                item = grpc_infer(connection, images[which])
            except Exception as err:  # noqa: BLE001 - recorded, then asserted empty
                with lock:
                    failures.append(f"client {index} request {request}: {err}")
                continue
            with lock:
                answers.append((index, which, item))
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not failures
    assert len(answers) == 8 * 25
    for _, which, item in answers:
        count = int(item["num_dets"][0])
        assert count == len(expected[which])
        np.testing.assert_allclose(item["boxes"][:count], expected[which].boxes, atol=1e-4, rtol=0)
    after = grpc.get_inference_statistics("maskrt", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 200
    batch_sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after["batch_stats"]}
    assert max(batch_sizes) > 1, batch_sizes
    grpc.close()


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server, predictor):
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    bad = [
        ("FP32", np.zeros((1, 32, 32, 3), np.float32)),  # wrong dtype
        ("UINT8", np.zeros((1, 32, 32), np.uint8)),  # wrong rank
        ("UINT8", np.zeros((1, 0, 0, 3), np.uint8)),  # zero-size image
        ("UINT8", np.zeros((1, 32, 32, 4), np.uint8)),  # four channels
    ]
    for dtype, array in bad:
        item = grpcclient.InferInput("image", list(array.shape), dtype)
        item.set_data_from_numpy(array)
        with pytest.raises(InferenceServerException):
            grpc.infer("maskrt", [item], client_timeout=60)
    image = test_images()[0]
    assert_same_as_predictor(grpc_infer(grpc, image), predictor(image), image.shape[:2])
    grpc.close()


def test_infer_server_client_equals_the_predictor(server, predictor, tmp_path, capsys):
    import cv2

    from maskrt.cli import main
    from maskrt.runtime.backends.triton import TritonPredictor

    remote = TritonPredictor(f"127.0.0.1:{server.grpc}", conf=CONF)
    assert remote.class_names == tuple(CLASS_NAMES)
    image = test_images()[1]
    got, expected = remote(image), predictor(image)
    np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-4, rtol=0)
    assert got.labels.tolist() == expected.labels.tolist() and np.array_equal(got.masks, expected.masks)
    # The CLI's camera/video loop with Triton as the backend, on a still image.
    cv2.imwrite(str(tmp_path / "a.png"), image)
    assert main(["infer", "--server", f"127.0.0.1:{server.grpc}", "--source", str(tmp_path / "a.png"),
                 "--conf", "0", "--save", str(tmp_path / "out")]) == 0
    assert f"a: {len(expected)} detections" in capsys.readouterr().out
    closed = free_ports(1)[0]
    assert main(["infer", "--server", f"127.0.0.1:{closed}", "--source", str(tmp_path / "a.png")]) == 2
    assert capsys.readouterr().err.startswith("maskrt: error: cannot reach Triton at")


def test_shared_memory_client_equals_the_predictor_and_cleans_up(server, predictor, tmp_path, capsys):
    """`maskrt infer --server ... --shm`: the frame goes through Triton's system shared memory
    (a region this client registers), the answers are the in-process Predictor's; the region
    grows for a larger frame and is unregistered and removed on close."""
    import cv2

    from maskrt.cli import main
    from maskrt.runtime.backends.triton import TritonPredictor

    admin = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    images = sorted(test_images(), key=lambda image: image.size)  # small first: the region must grow
    with TritonPredictor(f"127.0.0.1:{server.grpc}", conf=CONF, shm=True) as remote:
        for image in images:
            got, expected = remote(image), predictor(image)
            assert len(got) == len(expected) > 0
            np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-4, rtol=0)
            np.testing.assert_allclose(got.scores, expected.scores, atol=1e-6, rtol=0)
            assert got.labels.tolist() == expected.labels.tolist() and np.array_equal(got.masks, expected.masks)
            regions = admin.get_system_shared_memory_status(as_json=True).get("regions", {})
            assert list(regions) == [remote._region_name]
            assert int(regions[remote._region_name]["byte_size"]) == image.nbytes  # sent through it
        key = Path("/dev/shm") / remote._region_name
        assert key.exists()
    assert admin.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    assert not key.exists()
    # The CLI's loop with --shm, on a still image; --shm alone is one line.
    cv2.imwrite(str(tmp_path / "a.png"), images[-1])
    assert main(["infer", "--server", f"127.0.0.1:{server.grpc}", "--shm", "--source", str(tmp_path / "a.png"),
                 "--conf", "0", "--save", str(tmp_path / "out")]) == 0
    assert f"a: {len(predictor(images[-1]))} detections" in capsys.readouterr().out
    assert main(["infer", "--model", "m.onnx", "--shm", "--source", str(tmp_path / "a.png")]) == 2
    assert capsys.readouterr().err.startswith("maskrt: error: --shm goes with --server")
    admin.close()


def test_shared_memory_the_server_cannot_map_is_one_clear_error(server, monkeypatch):
    """A server on another machine cannot open this machine's region: simulated by making the
    region under another key than the one registered. One MaskrtError; nothing left behind."""
    import tritonclient.utils.shared_memory as shared_memory

    from maskrt.errors import MaskrtError
    from maskrt.runtime.backends.triton import TritonPredictor

    made = []
    create = shared_memory.create_shared_memory_region

    def elsewhere(name, key, byte_size, create_only=False):
        made.append(Path("/dev/shm") / f"{key.lstrip('/')}_elsewhere")
        return create(name, key + "_elsewhere", byte_size, create_only)

    monkeypatch.setattr(shared_memory, "create_shared_memory_region", elsewhere)
    remote = TritonPredictor(f"127.0.0.1:{server.grpc}", conf=CONF, shm=True)
    with pytest.raises(MaskrtError, match="--shm: Triton at .* cannot map this machine's shared memory .*"
                                          "Unable to open shared memory region"):
        remote(test_images()[0])
    remote.close()
    assert made and not any(path.exists() for path in made)


def test_exported_repository_parses_and_answers_in_the_bundled_triton(model_path, predictor, tmp_path):
    from maskrt.cli import main
    from maskrt.export.triton import write_triton_repository
    from maskrt.runtime.serving import start_tritonserver, stop_tritonserver, wait_until_ready

    # The GPU-server repository (onnxruntime_onnx graph): configs parse, the README has the command.
    gpu_repo = tmp_path / "gpu"
    assert main(["export", "--triton", str(gpu_repo), "--model", str(model_path)]) == 0
    for config_path in gpu_repo.glob("*/config.pbtxt"):
        text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    graph = text_format.Parse((gpu_repo / "maskrt_graph" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert graph.platform == "onnxruntime_onnx" and graph.max_batch_size == 8
    assert [o.name for o in graph.output] == ["num_dets", "boxes", "scores", "labels", "masks"]
    assert list(graph.output[4].dims) == [30, 28, 28] and list(graph.output[0].reshape.shape) == []
    assert "tritonserver --model-repository=/models" in (gpu_repo / "README.md").read_text()
    assert (gpu_repo / "maskrt_graph" / "1" / "model.onnx").read_bytes() == model_path.read_bytes()
    assert main(["export", "--triton", str(gpu_repo), "--model", str(model_path)]) == 2  # not empty: refused

    # The same repository with the graph as a Python model over ONNX Runtime, in the bundled Triton.
    if not HAVE_TRITON:
        pytest.skip("nvidia-pytriton (bundled tritonserver) not installed")
    repo = write_triton_repository(model_path, tmp_path / "cpu", graph_backend="python", conf=CONF)
    for config_path in repo.glob("*/config.pbtxt"):
        text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    http, grpc_port, metrics = free_ports(3)
    process = start_tritonserver(repo, tmp_path, "127.0.0.1", http, grpc_port, metrics, tmp_path / "triton.log")
    try:
        wait_until_ready(process, "127.0.0.1", http, 180, tmp_path / "triton.log")
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        for image in test_images()[:2]:
            assert_same_as_predictor(grpc_infer(client, image), predictor(image), image.shape[:2])
        client.close()
    finally:
        stop_tritonserver(process, grace_s=30)
        kill(process)


def pending_requests(metrics_port: int) -> int:
    """Triton's nv_inference_pending_request_count of ``maskrt``: requests queued, not yet executing."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith('nv_inference_pending_request_count{model="maskrt"'):
                return int(float(line.split()[-1]))
    return 0


@needs_triton
def test_two_single_threaded_instances_answer_like_the_predictor(model_path, predictor, tmp_path):
    """`--instances 2 --threads 1` (two one-thread ONNX Runtime graphs side by side): the same answers,
    under concurrent clients."""
    server = start_serve(model_path, tmp_path, ["--instances", "2", "--threads", "1"])
    try:
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
        config = grpc.get_model_config("maskrt", as_json=True)["config"]
        assert config["instance_group"][0]["count"] == 2
        assert config["parameters"]["threads"]["string_value"] == "1"
        images = test_images()
        answers: dict[int, list[dict]] = {}

        def client(index: int) -> None:
            connection = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
            answers[index] = [grpc_infer(connection, image) for image in images]
            connection.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert sorted(answers) == [0, 1, 2, 3]
        for items in answers.values():
            for item, image in zip(items, images):
                assert_same_as_predictor(item, predictor(image), image.shape[:2])
        grpc.close()
    finally:
        kill(server.process)


def test_sigterm_answers_the_requests_in_flight_and_stops(server):
    """Last test of the module: it stops the shared server. 12 requests against max batch 8:
    while the first batch executes the rest wait in Triton's queue; SIGTERM goes out as soon as
    the metrics show them waiting, so those are in flight when it arrives, and must be answered."""
    big = np.ascontiguousarray(np.tile(test_images()[0], (8, 8, 1)))  # 768 x 1280
    results: list[tuple[float, object]] = []
    lock = threading.Lock()

    def request() -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
        try:
            answer: object = grpc_infer(client, big)
        except Exception as err:  # noqa: BLE001 - recorded, then asserted
            answer = err
        with lock:
            results.append((time.monotonic(), answer))
        client.close()

    threads = [threading.Thread(target=request) for _ in range(12)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while (queued := pending_requests(server.metrics)) == 0:
        assert time.monotonic() < deadline and len(results) < 12, "no request ever waited in Triton's queue"
        time.sleep(0.005)
    began = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(60)
    took = time.monotonic() - began
    for thread in threads:
        thread.join(60)
    assert code == 0 and took < 30, (code, took)
    # Every request inside Triton when SIGTERM went out (``queued`` waiting, plus the executing
    # batch) is answered. On a loaded machine a client thread may only send its request after
    # SIGTERM: Triton refuses that one, with an error, which is what a stopping server should do.
    answered = [answer for _, answer in results if isinstance(answer, dict)]
    refused = [answer for _, answer in results if not isinstance(answer, dict)]
    assert len(results) == 12 and len(answered) >= queued, (queued, refused)
    assert all(isinstance(err, InferenceServerException) for err in refused), refused
    assert all(int(answer["num_dets"][0]) > 0 for answer in answered)
    assert sum(done > began for done, answer in results if isinstance(answer, dict)) >= 1  # drained, not dropped
    assert "stopped" in server.output.read_text()
    with socket.socket() as probe:  # nothing listens on the port any more
        assert probe.connect_ex(("127.0.0.1", server.grpc)) != 0
