"""`maskrt export --triton REPO`: a Triton model repository for the ``tritonserver`` containers
on GPU servers and for Triton on Jetson (docs/serving.md).

    REPO/
      maskrt_graph/config.pbtxt      the graph: tensorrt_plan (engine) or onnxruntime_onnx
      maskrt_graph/1/model.plan|model.onnx
      maskrt/config.pbtxt            Python backend: letterbox -> BLS call of maskrt_graph ->
      maskrt/1/model.py              postprocess, under the wire contract (runtime/serving.py)
      README.md                      the exact tritonserver commands

The graph model's outputs keep the export's contract (``num_dets`` [B] shown to Triton as [1]
per item by ``reshape``). Our TensorRT plugin reaches Triton's TensorRT backend by ``LD_PRELOAD``
or ``--backend-config=tensorrt,plugins=...``; the TensorRT-target ONNX graph names our ONNX
Runtime op library in ``model_operations``. ``graph_backend="python"`` writes, instead, a
Python-backend graph model over ONNX Runtime: for a Triton that has only the Python backend
(the one nvidia-pytriton bundles, used by the tests on CPU machines).

Never imports torch; reads ONNX metadata with ``onnx`` (without external data).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from maskrt.errors import MaskrtError
from maskrt.runtime.backends import ENGINE_SUFFIXES, check_model_file
from maskrt.runtime.metadata import parse_metadata
from maskrt.runtime.serving import GRAPH_MODEL_NAME, MODEL_NAME, maskrt_model_config, write_maskrt_model

GRAPH_BACKENDS = ("auto", "tensorrt", "onnxruntime", "python")
# Where the README tells users to put our libraries inside the container (mounted with -v).
DEFAULT_PLUGIN = "/opt/maskrt/lib/libmaskrt_plugins.so"
DEFAULT_ORT_OPS = "/opt/maskrt/lib/libmaskrt_ort_ops.so"
GRAPH_OUTPUTS = (  # name, Triton type, dims per item with D detections and M mask size
    ("num_dets", "TYPE_INT32", "1"),
    ("boxes", "TYPE_FP32", "D, 4"),
    ("scores", "TYPE_FP32", "D"),
    ("labels", "TYPE_INT32", "D"),
    ("masks", "TYPE_FP32", "D, M, M"),
)
CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, as nvidia-pytriton 0.7.0 bundles


def read_model(model_path: Path) -> tuple[dict[str, str], int | None, bool]:
    """(metadata strings, fixed batch or None, whether the graph has maskrt custom-op nodes)."""
    if model_path.suffix.lower() in ENGINE_SUFFIXES:
        sidecar = model_path.with_name(model_path.name + ".json")
        try:
            metadata = json.loads(sidecar.read_text())
        except (OSError, ValueError) as err:
            raise MaskrtError(f"cannot read the engine's metadata sidecar {sidecar}: {err}") from None
        low, high = metadata.get("engine_min_batch"), metadata.get("engine_max_batch")
        fixed = int(high) if low is not None and low == high else None
        return {k: str(v) for k, v in metadata.items()}, fixed, False
    if model_path.suffix.lower() != ".onnx":
        raise MaskrtError(f"--model must be a .onnx, .engine or .plan file, got {model_path}")
    try:
        import onnx
    except ImportError:
        raise MaskrtError("reading an ONNX model's metadata needs the onnx package: pip install onnx") from None
    try:
        graph = onnx.load(str(model_path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and friends
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MaskrtError(f"cannot read {model_path} as ONNX: {first}") from None
    metadata = {p.key: p.value for p in graph.metadata_props}
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0] if graph.graph.input else None
    fixed = int(batch_dim.dim_value) if batch_dim is not None and batch_dim.dim_value > 0 else None
    custom = any(node.domain == "maskrt" for node in graph.graph.node)
    return metadata, fixed, custom


def graph_model_config(kind: str, input_size: tuple[int, int], slots: int, mask_size: int, fixed_batch: int | None,
                       max_batch: int, op_library: str | None) -> str:
    """config.pbtxt of ``maskrt_graph``. kind: tensorrt | onnxruntime | python."""
    height, width = input_size
    batch_dims = f"{fixed_batch}, " if fixed_batch else ""
    outputs = []
    for name, dtype, dims in GRAPH_OUTPUTS:
        shape = dims.replace("D", str(slots)).replace("M", str(mask_size))
        if name == "num_dets" and fixed_batch:
            outputs.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {fixed_batch} ] }}')
        elif name == "num_dets" and kind != "python":  # the graph gives [B]: one scalar per item
            outputs.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ 1 ] reshape: {{ shape: [ ] }} }}')
        else:
            outputs.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {batch_dims}{shape} ] }}')
    head = {"tensorrt": 'platform: "tensorrt_plan"\n', "onnxruntime": 'platform: "onnxruntime_onnx"\n',
            "python": 'backend: "python"\n'}[kind]
    text = (
        f'name: "{GRAPH_MODEL_NAME}"\n' + head
        + f"max_batch_size: {0 if fixed_batch else max_batch}\n"
        + f'input [\n  {{ name: "images" data_type: TYPE_FP32 dims: [ {batch_dims}3, {height}, {width} ] }}\n]\n'
        + "output [\n" + ",\n".join(outputs) + "\n]\n"
        + ("instance_group [ { count: 1 kind: KIND_GPU } ]\n" if kind != "python"
           else "instance_group [ { count: 1 kind: KIND_CPU } ]\n")
    )
    if op_library:
        text += f'model_operations {{ op_library_filename: [ "{op_library}" ] }}\n'
    return text


def write_triton_repository(model_path: str | os.PathLike, repo: str | os.PathLike, graph_backend: str = "auto",
                            max_batch: int = 8, instances: int = 1, conf: float = 0.5,
                            plugin: str | None = None, ort_ops: str | None = None) -> Path:
    """Write the repository (see module docstring); returns REPO. Refuses a non-empty REPO."""
    if graph_backend not in GRAPH_BACKENDS:
        raise MaskrtError(f"unknown graph backend {graph_backend!r}: choose one of {', '.join(GRAPH_BACKENDS)}")
    if not 0.0 <= conf <= 1.0:
        raise MaskrtError(f"conf must be in [0, 1], got {conf}")
    path = check_model_file(model_path)
    repo = Path(repo)
    if repo.exists() and any(repo.iterdir()):
        raise MaskrtError(f"{repo} exists and is not empty: choose a new folder for the repository")
    metadata, fixed_batch, custom_ops = read_model(path)
    info = parse_metadata(metadata, str(path))
    if "detections_per_img" not in metadata or "mask_size" not in metadata:
        raise MaskrtError(f"{path}: metadata lacks detections_per_img / mask_size: export it with this maskrt")
    engine = path.suffix.lower() in ENGINE_SUFFIXES
    kind = graph_backend if graph_backend != "auto" else ("tensorrt" if engine else "onnxruntime")
    if engine and kind != "tensorrt":
        raise MaskrtError(f"{path} is a TensorRT engine: only --graph-backend tensorrt serves it")
    if not engine and kind == "tensorrt":
        raise MaskrtError(f"{path} is an ONNX graph: build an engine first (`maskrt build`), or serve it with "
                          "--graph-backend onnxruntime")
    slots, mask_size = int(metadata["detections_per_img"]), int(metadata["mask_size"])
    op_library = (ort_ops or DEFAULT_ORT_OPS) if kind == "onnxruntime" and custom_ops else None

    staging = repo.with_name(f".{repo.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        graph_dir = staging / GRAPH_MODEL_NAME
        (graph_dir / "1").mkdir(parents=True)
        shutil.copyfile(path, graph_dir / "1" / ("model.plan" if engine else "model.onnx"))
        (graph_dir / "config.pbtxt").write_text(graph_model_config(
            kind, info.input_size, slots, mask_size, fixed_batch, max_batch, op_library))
        if kind == "python":
            (graph_dir / "1" / "model.py").write_text(
                '"""maskrt_graph over ONNX Runtime (maskrt.runtime.triton_graph_model): a Triton with only the '
                'Python backend."""\nfrom maskrt.runtime.triton_graph_model import TritonPythonModel  # noqa: F401\n')
        parameters = {"graph_model": GRAPH_MODEL_NAME, "maskrt_metadata": json.dumps(metadata, sort_keys=True),
                      "graph_fixed_batch": str(fixed_batch or 0),
                      "graph_max_batch": str(fixed_batch or max_batch), "conf": str(conf)}
        write_maskrt_model(staging, maskrt_model_config(slots, info.class_names, parameters, max_batch=max_batch,
                                                        instances=instances))
        (staging / "README.md").write_text(repository_readme(kind, path.name, plugin or DEFAULT_PLUGIN, op_library))
        if repo.exists():
            repo.rmdir()
        staging.rename(repo)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return repo


def repository_readme(kind: str, model_name: str, plugin: str, op_library: str | None) -> str:
    """The repository's README: what is in it and the exact tritonserver commands."""
    lines = [
        "# maskrt model repository",
        "",
        f"Written by `maskrt export --triton` from `{model_name}`. Models: `{GRAPH_MODEL_NAME}` (the graph, "
        f"{kind}) and `{MODEL_NAME}` (Python backend: letterbox, BLS call of the graph, postprocessing; "
        "the wire contract of maskrt's docs/serving.md). Clients talk to `maskrt`.",
        "",
        "The `maskrt` model imports the maskrt package: install it into the server's Python first",
        "(`pip install 'maskrt[serve]'`, or mount a wheel and pip install it in the container).",
        "",
    ]
    if kind == "tensorrt":
        lines += [
            "## GPU server (tritonserver container, Triton 2.51 = 24.10)",
            "",
            f"The engine and `{Path(plugin).name}` must be built with the TensorRT of that Triton release",
            "(`maskrt plugin build`, `maskrt build` inside the same container image).",
            "",
            "```bash",
            f"docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \\",
            f"  -v $PWD:/models -v /path/to/lib:{Path(plugin).parent} {CONTAINER} \\",
            "  bash -c \"pip install maskrt[serve] && tritonserver --model-repository=/models "
            f"--backend-config=tensorrt,plugins={plugin}\"",
            "```",
            "",
            "or load the plugin into the whole process:",
            f"`LD_PRELOAD={plugin} tritonserver --model-repository=/models`.",
            "",
            "## Jetson (JetPack 6, Triton's Jetson release tarball)",
            "",
            "Build the plugin and the engine on the Jetson itself (TensorRT 10.3), then:",
            "",
            "```bash",
            f"LD_PRELOAD={plugin} ./tritonserver/bin/tritonserver --model-repository=$PWD "
            "--backend-directory=./tritonserver/backends",
            "```",
        ]
    elif kind == "onnxruntime":
        lines += [
            "## GPU server (tritonserver container, Triton 2.51 = 24.10)",
            "",
            "```bash",
            "docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD:/models \\",
            (f"  -v /path/to/lib:{Path(op_library).parent} " if op_library else "  ")
            + f"{CONTAINER} \\",
            "  bash -c \"pip install maskrt[serve] && tritonserver --model-repository=/models\"",
            "```",
        ]
        if op_library:
            lines += ["", f"The graph is the TensorRT target: its MultilevelRoIAlign nodes run in `{op_library}` "
                      "(named in `maskrt_graph/config.pbtxt`, `model_operations`), built with `maskrt.plugins.ort."
                      "build_native_library` against that container's ONNX Runtime headers."]
    else:
        lines += [
            "## Any Triton with the Python backend (CPU)",
            "",
            "`maskrt_graph` here is a Python model over ONNX Runtime. For example with the tritonserver that",
            "nvidia-pytriton bundles, or simply `maskrt serve --model MODEL.onnx`:",
            "",
            "```bash",
            "tritonserver --model-repository=$PWD",
            "```",
        ]
    lines += ["", "Check: `curl localhost:8000/v2/models/maskrt/ready`; client: `maskrt infer --server HOST:8001 "
              "--source 0`.", ""]
    return "\n".join(lines)


def export_triton_command(args: argparse.Namespace, model_path: str) -> int:
    """The `--triton REPO` part of `maskrt export`: ``model_path`` is --model or the fresh --out."""
    repo = write_triton_repository(model_path, args.triton, graph_backend=args.graph_backend,
                                   max_batch=args.max_batch, conf=args.conf, plugin=args.plugin)
    print(f"wrote Triton model repository {repo}: models {GRAPH_MODEL_NAME} + {MODEL_NAME}; "
          f"commands in {repo / 'README.md'}")
    return 0

