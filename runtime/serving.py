"""Serving maskrt on Triton Inference Server: the wire contract and `maskrt serve`.

The wire contract (docs/serving.md), the same for `maskrt serve` and for the repository that
`maskrt export --triton` writes: one model ``maskrt``, max batch >= 1, dynamic batching.

- input ``image``: UINT8 [H, W, 3] BGR per request item (a request carries [1, H, W, 3]); any
  size, and items of different sizes are batched together (``allow_ragged_batch``).
- outputs per item, D = the model's detections per image, padded past ``num_dets``:
  ``num_dets`` INT32 [1]; ``boxes`` FP32 [D, 4] xyxy in the image's pixels; ``scores`` FP32 [D];
  ``labels`` INT32 [D] indexing ``class_names`` (a JSON list in the config's parameters);
  ``masks_rle`` BYTES [D], the COCO compressed RLE of each mask in the image's pixels as JSON
  ``{"size": [h, w], "counts": "..."}`` (empty past ``num_dets``).

The detections are the in-process ``Predictor(model, conf=...)``'s: the Triton model
(``maskrt.runtime.triton_model``, run by Triton's Python backend) *is* that Predictor.

`maskrt serve` runs the ``tritonserver`` binary (Triton 2.51) and Python backend that the
``nvidia-pytriton`` wheel bundles, on a model repository it writes in a temporary folder. It
does not use PyTriton's ``Triton.bind`` proxy: that proxy, like every Python-backend model,
hands tensors across with the stub's pybind11 NumPy bridge, which is built for NumPy 1 and
reads NumPy 2 arrays as empty. The stub therefore gets a NumPy 1 of its own
(``<venv>/maskrt-triton-site``, first on its PYTHONPATH; `make setup` installs it), while the
rest of maskrt keeps NumPy 2.

Never imports torch; tritonclient only on the client side (``maskrt.runtime.backends.triton``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from importlib.util import find_spec
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from maskrt.errors import MaskrtError
from maskrt.runtime.masks import mask_crops_to_rle_strings

MODEL_NAME = "maskrt"
GRAPH_MODEL_NAME = "maskrt_graph"
INPUT_NAME = "image"
# (name, Triton data type, dims with D for the detections per image)
OUTPUTS = (
    ("num_dets", "TYPE_INT32", ("1",)),
    ("boxes", "TYPE_FP32", ("D", "4")),
    ("scores", "TYPE_FP32", ("D",)),
    ("labels", "TYPE_INT32", ("D",)),
    ("masks_rle", "TYPE_STRING", ("D",)),
)
OUTPUT_NAMES = tuple(name for name, _, _ in OUTPUTS)
STUB_SITE_NAME = "maskrt-triton-site"  # NumPy 1 for the Python-backend stub, inside the venv
STUB_SITE_ENV = "MASKRT_TRITON_SITE"
EXIT_TIMEOUT_S = 20  # Triton's drain: in-flight requests get this long after SIGTERM


# --- the wire contract ------------------------------------------------------------------------

def image_problem(batch: np.ndarray) -> str | None:
    """Why a request's ``image`` tensor [B, H, W, 3] cannot be served, or None when it can.
    Triton itself checks the dtype (UINT8) and rank against the config; this catches the rest."""
    if batch.dtype != np.uint8:
        return f"input 'image' must be UINT8, got {batch.dtype}"
    if batch.ndim != 4 or batch.shape[3] != 3:
        return f"input 'image' must be [H, W, 3] BGR per item, got {list(batch.shape[1:])}"
    if batch.shape[0] == 0 or batch.shape[1] == 0 or batch.shape[2] == 0:
        return f"input 'image' is empty: shape {list(batch.shape)}"
    return None


def pack_detections(detections, slots: int) -> dict[str, np.ndarray]:
    """One image's Detections -> the contract's outputs for one item (no batch axis), padded
    to ``slots`` detections: num_dets int32 [1], boxes float32 [D,4], scores float32 [D],
    labels int32 [D], masks_rle object [D] of JSON bytes (b"" past num_dets)."""
    count = len(detections)
    if count > slots:
        raise MaskrtError(f"{count} detections do not fit the {slots} output slots")
    boxes = np.zeros((slots, 4), np.float32)
    scores = np.zeros(slots, np.float32)
    labels = np.zeros(slots, np.int32)
    rles = np.full(slots, b"", dtype=object)
    boxes[:count] = detections.boxes
    scores[:count] = detections.scores
    labels[:count] = detections.labels
    # All masks' RLE strings in one NumPy pass over the crops (runtime/masks.py).
    size = [int(v) for v in detections.image_size]
    for i, counts in enumerate(mask_crops_to_rle_strings(detections.mask_crops)):
        rles[i] = json.dumps({"size": size, "counts": counts}, separators=(",", ":")).encode()
    return {"num_dets": np.array([count], np.int32), "boxes": boxes, "scores": scores, "labels": labels,
            "masks_rle": rles}


# --- model configuration ----------------------------------------------------------------------

def _parameters_text(parameters: Mapping[str, str]) -> str:
    entries = [f'  {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(str(value))} }} }}'
               for key, value in parameters.items()]
    return "parameters [\n" + ",\n".join(entries) + "\n]\n"


def maskrt_model_config(slots: int, class_names: Sequence[str], parameters: Mapping[str, str],
                        max_batch: int = 8, instances: int = 1, queue_delay_us: int = 0) -> str:
    """config.pbtxt of the ``maskrt`` Python-backend model (text format of Triton's ModelConfig).
    ``parameters`` tell triton_model.py what to run; class_names and detections are added."""
    if max_batch < 1:
        raise MaskrtError(f"--max-batch must be at least 1, got {max_batch}")
    if instances < 1:
        raise MaskrtError(f"--instances must be at least 1, got {instances}")
    if queue_delay_us < 0:
        raise MaskrtError(f"--max-queue-delay-us must be 0 or more, got {queue_delay_us}")
    outputs = []
    for name, dtype, dims in OUTPUTS:
        shape = ", ".join(str(slots) if d == "D" else d for d in dims)
        outputs.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {shape} ] }}')
    all_parameters = {"class_names": json.dumps(list(class_names)), "detections": str(slots), **parameters}
    return (
        f'name: "{MODEL_NAME}"\n'
        'backend: "python"\n'
        f"max_batch_size: {max_batch}\n"
        "input [\n"
        f'  {{ name: "{INPUT_NAME}" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] allow_ragged_batch: true }}\n'
        "]\n"
        "output [\n" + ",\n".join(outputs) + "\n]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
        + _parameters_text(all_parameters)
    )


MODEL_PY = '''"""Triton Python-backend entry point of maskrt's wire contract (docs/serving.md).
The code lives in the installed maskrt package: pip install 'maskrt[serve]' where Triton runs."""
from maskrt.runtime.triton_model import TritonPythonModel  # noqa: F401
'''


def write_maskrt_model(repo: Path, config_text: str) -> Path:
    """Write ``repo/maskrt/{config.pbtxt, 1/model.py}``; returns the model folder."""
    folder = Path(repo) / MODEL_NAME
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config_text)
    (folder / "1" / "model.py").write_text(MODEL_PY)
    return folder


def detections_per_image(metadata: Mapping[str, str], probe=None) -> int:
    """D: the model's ``detections_per_img`` metadata, else the boxes output's D of ``probe()``."""
    if "detections_per_img" in metadata:
        return int(metadata["detections_per_img"])
    if probe is None:
        raise MaskrtError("the model's metadata lacks detections_per_img")
    return int(probe()["boxes"].shape[1])


# --- the bundled Triton -----------------------------------------------------------------------

def pytriton_root() -> Path:
    """The installed ``pytriton`` package folder (not imported: only its files are used)."""
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MaskrtError("`maskrt serve` needs Triton from nvidia-pytriton: `make setup`, or "
                          "pip install 'maskrt[serve]' && pip install --no-deps nvidia-pytriton==0.7.0")
    return Path(list(spec.submodule_search_locations)[0])


def stub_site() -> Path | None:
    """Folder with NumPy 1 for the Python-backend stub: $MASKRT_TRITON_SITE, else
    <venv>/maskrt-triton-site; None where this interpreter's own NumPy is already 1.x."""
    if int(np.__version__.split(".")[0]) < 2:
        return None
    folder = Path(os.environ.get(STUB_SITE_ENV) or Path(sys.prefix) / STUB_SITE_NAME)
    if not (folder / "numpy").is_dir():
        raise MaskrtError(
            f"Triton's Python-backend stub needs NumPy 1 (its pybind11 misreads NumPy {np.__version__}); "
            f"none in {folder}: run `make setup`, or pip install --target {folder} 'numpy<2'")
    return folder


def prepare_stub_environment(folder: Path) -> Path:
    """A virtual environment for the Python-backend stub, layered over this one: NumPy 1 first,
    then this interpreter's site-packages (maskrt, OpenCV, ONNX Runtime). The stub runs Python
    isolated (PYTHONPATH is ignored) and takes its environment from the ``python`` first on
    PATH, so the layering is a venv of its own whose ``.pth`` names the folders in order.
    Returns its bin folder; nothing is installed."""
    import site

    numpy1 = stub_site()
    base = Path(getattr(sys, "_base_executable", sys.executable))
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        os.symlink(base, bin_dir / name)
    version = ".".join(str(v) for v in sys.version_info[:3])
    (folder / "pyvenv.cfg").write_text(
        f"home = {base.parent}\ninclude-system-site-packages = false\nversion = {version}\n")
    site_packages = folder / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site_packages.mkdir(parents=True, exist_ok=True)
    # Plain lines are appended to sys.path in order; an "import" line runs, and addsitedir also
    # processes that folder's own .pth files (the editable install of maskrt among them).
    lines = [str(numpy1)] if numpy1 else []
    lines += [f"import site; site.addsitedir({p!r})" for p in site.getsitepackages() if Path(p).is_dir()]
    (site_packages / "maskrt-layers.pth").write_text("\n".join(lines) + "\n")
    return bin_dir


def triton_environment(root: Path, workdir: Path) -> dict[str, str]:
    """Environment for the bundled tritonserver: this interpreter's libpython first (the stub
    links libpython3.X, and another build's fails), the wheel's libraries, and the stub's own
    environment (``prepare_stub_environment``) first on PATH."""
    env = dict(os.environ)
    libs = [str(sysconfig.get_config_var("LIBDIR")), str(root.parent / "nvidia_pytriton.libs"),
            str(root / "tritonserver" / "external_libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = str(prepare_stub_environment(workdir / "stub-env")) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONHOME", None)
    return env


def prepare_backends(root: Path, folder: Path) -> Path:
    """A backend folder for this Python: the wheel's Python backend with the stub of this
    interpreter's version beside it (the wheel keeps one stub per Python version)."""
    source = root / "tritonserver" / "backends" / "python"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise MaskrtError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
    target = folder / "python"
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            os.symlink(item, target / item.name)
    os.symlink(stub, target / "triton_python_backend_stub")
    return folder


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies, so no tritonserver outlives it."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_tritonserver(repo: Path, workdir: Path, host: str, http_port: int, grpc_port: int, metrics_port: int,
                       log_path: Path, verbose: bool = False) -> subprocess.Popen:
    """Start the bundled tritonserver on ``repo``; returns the process (not yet ready)."""
    root = pytriton_root()
    binary = root / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise MaskrtError(f"no tritonserver binary in {root}: reinstall nvidia-pytriton")
    backends = prepare_backends(root, workdir / "backends")
    command = [
        str(binary), f"--model-repository={repo}", f"--backend-directory={backends}",
        f"--http-address={host}", f"--http-port={http_port}",
        f"--grpc-address={host}", f"--grpc-port={grpc_port}",
        f"--metrics-address={host}", f"--metrics-port={metrics_port}",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}", "--strict-readiness=true",
        f"--backend-config=python,shm-region-prefix-name=maskrt{os.getpid()}-{http_port}",
        # Start the stub's shared memory at 32 MiB, growing by 32 MiB: a batch of 1080p frames
        # (6 MB each) then needs no resizing round trips (the default is 1 MiB + 1 MiB steps).
        f"--backend-config=python,shm-default-byte-size={32 << 20}",
        f"--backend-config=python,shm-growth-byte-size={32 << 20}",
        f"--log-verbose={1 if verbose else 0}",
    ]
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(command, env=triton_environment(root, workdir), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    finally:
        log.close()


def wait_until_ready(process: subprocess.Popen, host: str, http_port: int, timeout_s: float,
                     log_path: Path, should_stop=lambda: False) -> bool:
    """Poll Triton's HTTP readiness (server and model) until ready; a clear error when the
    server exits or the time runs out (with the log's last error line). Returns False when
    ``should_stop()`` turned true first (a signal during start-up), True when ready."""
    address = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{address}:{http_port}/v2/models/{MODEL_NAME}/ready"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if should_stop():
            return False
        if process.poll() is not None:
            raise MaskrtError(f"tritonserver exited (code {process.returncode}) before the model was ready: "
                              f"{_last_error(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise MaskrtError(f"Triton was not ready after {timeout_s:.0f} s: {_last_error(log_path)} (log: {log_path})")


def _last_error(log_path: Path) -> str:
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("E") and "NVML" not in line and "CudaDriver" not in line
              and "DCGM" not in line and "modification time" not in line]
    return (errors[-1] if errors else (lines[-1] if lines else "empty log"))[:400]


def stop_tritonserver(process: subprocess.Popen, grace_s: float = EXIT_TIMEOUT_S + 5) -> int:
    """SIGTERM (Triton stops taking requests and drains the in-flight ones), then SIGKILL
    after ``grace_s``; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def serve_repository_parameters(model: str, backend: str, conf: float, plugin: str | None,
                                threads: int | None = None) -> dict[str, str]:
    """Parameters of the ``maskrt`` model that runs the graph in-process (``maskrt serve``);
    ``threads``: ONNX Runtime's intra-op threads per instance (None: ORT's default)."""
    parameters = {"model_path": str(Path(model).resolve()), "backend": backend, "conf": str(conf)}
    if plugin:
        parameters["plugin"] = str(Path(plugin).resolve())
    if threads is not None:
        if threads < 1:
            raise MaskrtError(f"--threads must be at least 1, got {threads}")
        parameters["threads"] = str(threads)
    return parameters


def serve_command(args: argparse.Namespace) -> int:
    """`maskrt serve`: a Triton server on this machine with the one model ``maskrt``."""
    from maskrt.runtime.predictor import Predictor

    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    for flag, port in ports.items():
        if not 0 < port < 65536:
            raise MaskrtError(f"{flag} must be a port number, got {port}")
    if len(set(ports.values())) != 3:
        raise MaskrtError("--http-port, --grpc-port and --metrics-port must differ")
    # Open the model here first: a bad model is one clear line, not a Triton log.
    predictor = Predictor(args.model, backend=args.backend, conf=args.conf, plugin=args.plugin)
    if args.threads is not None and predictor.backend.name != "onnxruntime":
        raise MaskrtError(f"--threads applies to ONNX Runtime models only, not {predictor.backend.name}")
    slots = detections_per_image(predictor.metadata, lambda: predictor.infer(predictor.preprocess(
        [np.zeros((32, 32, 3), np.uint8)])[0]))
    config = maskrt_model_config(slots, predictor.class_names,
                                 serve_repository_parameters(args.model, args.backend, args.conf, args.plugin,
                                                             args.threads),
                                 max_batch=args.max_batch, instances=args.instances,
                                 queue_delay_us=args.max_queue_delay_us)
    del predictor
    workdir = Path(tempfile.mkdtemp(prefix="maskrt-serve-"))
    log_path = Path(args.log) if args.log else workdir / "tritonserver.log"
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    process = None
    try:
        write_maskrt_model(workdir / "models", config)
        process = start_tritonserver(workdir / "models", workdir, args.host, args.http_port, args.grpc_port,
                                     args.metrics_port, log_path)
        if not wait_until_ready(process, args.host, args.http_port, args.ready_timeout, log_path,
                                should_stop=lambda: stop["signal"] is not None):
            print("maskrt serve: stopped before the model was ready", flush=True)
            return 0
        print(f"maskrt serve: model '{MODEL_NAME}' ({args.model}) ready on Triton 2.51", flush=True)
        print(f"  HTTP     http://{args.host}:{args.http_port}/v2/models/{MODEL_NAME}", flush=True)
        print(f"  gRPC     {args.host}:{args.grpc_port}", flush=True)
        print(f"  metrics  http://{args.host}:{args.metrics_port}/metrics", flush=True)
        print(f"  log      {log_path}   (Ctrl-C or SIGTERM drains in-flight requests and stops)", flush=True)
        while stop["signal"] is None and process.poll() is None:
            time.sleep(0.2)
        if process.poll() is not None and stop["signal"] is None:
            raise MaskrtError(f"tritonserver stopped unexpectedly (code {process.returncode}): {_last_error(log_path)}")
        print("maskrt serve: draining in-flight requests and stopping", flush=True)
        code = stop_tritonserver(process)
        print(f"maskrt serve: stopped (tritonserver exit code {code})", flush=True)
        return 0
    finally:
        if process is not None:
            stop_tritonserver(process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(workdir, ignore_errors=True)  # the log too, unless --log put it elsewhere
