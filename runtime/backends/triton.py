"""A Triton server as the runtime's backend: ``maskrt infer --server HOST:PORT`` (gRPC).

The server speaks the wire contract of docs/serving.md (``maskrt serve``, or a repository
from ``maskrt export --triton``): the client sends the BGR frame as it is and gets the final
detections back, so it needs neither the model nor ONNX Runtime / TensorRT: a Jetson can send
its camera frames to a GPU server. tritonclient (gRPC) is imported lazily:
``pip install 'maskrt[serve]'``. The masks come back as COCO RLE and are decoded into each mask's
window (``MaskCrops``), never into N full frames.

With ``shm=True`` (``maskrt infer --server ... --shm``) a client on the server's machine puts
each frame in a POSIX shared-memory region that it registers with Triton (Triton's system
shared memory, a Triton core feature that the bundled 2.51 honours): the request then carries
only the region's name, not the frame's bytes (6.2 MB at 1080p).
"""
from __future__ import annotations

import itertools
import json
import os
import weakref
from typing import Sequence

import numpy as np

from maskrt.errors import MaskrtError
from maskrt.runtime.predictor import DEFAULT_CONF, Detections
from maskrt.runtime.masks import rle_strings_to_mask_crops
from maskrt.runtime.serving import INPUT_NAME, MODEL_NAME, OUTPUT_NAMES, image_problem

_REGION_NUMBERS = itertools.count()  # one shared-memory region per TritonPredictor of this process


def _release_region(client, region: dict, timeout_s: float) -> None:
    """Unregister a TritonPredictor's shared-memory region from the server and remove it."""
    if not region:
        return
    import tritonclient.utils.shared_memory as shared_memory
    from tritonclient.utils import InferenceServerException

    handle, name = region.pop("handle"), region.pop("name")
    region.clear()
    try:
        client.unregister_system_shared_memory(name, client_timeout=timeout_s)
    except InferenceServerException:
        pass  # the server may be gone; the region is still ours to remove
    shared_memory.destroy_shared_memory_region(handle)


def _import_grpc():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise MaskrtError("--server needs tritonclient: pip install 'maskrt[serve]'") from None
    return grpcclient


class TritonPredictor:
    """Detections from a Triton server's ``maskrt`` model, like ``Predictor`` in process.

    server: "HOST:PORT" of Triton's gRPC endpoint. conf: keep detections with score >= conf
    (on top of the server's own threshold). timeout_s: per request. shm: send the frames
    through system shared memory (the server must run on this machine); one request at a time.
    ``close()`` (or ``with``) unregisters and removes the region.
    """

    def __init__(self, server: str, conf: float = DEFAULT_CONF, model: str = MODEL_NAME,
                 timeout_s: float = 30.0, shm: bool = False) -> None:
        if not 0.0 <= conf <= 1.0:
            raise MaskrtError(f"conf must be in [0, 1], got {conf}")
        if ":" not in server:
            raise MaskrtError(f"--server must be HOST:PORT (Triton's gRPC port, 8001 by default), got {server!r}")
        grpcclient = _import_grpc()
        from tritonclient.utils import InferenceServerException

        self._errors = InferenceServerException
        self._grpc = grpcclient
        self.server, self.model, self.conf, self.timeout_s = server, model, float(conf), timeout_s
        self.client = grpcclient.InferenceServerClient(url=server)
        try:
            ready = self.client.is_model_ready(model, client_timeout=timeout_s)
            config = self.client.get_model_config(model, as_json=True, client_timeout=timeout_s)["config"]
        except InferenceServerException as err:
            raise MaskrtError(f"cannot reach Triton at {server}: {err.message().splitlines()[0]}") from None
        if not ready:
            raise MaskrtError(f"Triton at {server} has no ready model {model!r}")
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        if "class_names" not in parameters:
            raise MaskrtError(f"model {model!r} at {server} is not a maskrt model (no class_names parameter)")
        self.class_names: tuple[str, ...] = tuple(json.loads(parameters["class_names"]))
        self.shm = bool(shm)
        # (tritonclient shm handle, name, byte size) once a frame needs it; released by close(),
        # or when this object is collected, or at exit (weakref.finalize), so no region outlives us.
        self._region: dict[str, object] = {}
        self._region_name = f"maskrt_{os.getpid()}_{next(_REGION_NUMBERS)}"
        self._release = weakref.finalize(self, _release_region, self.client, self._region, self.timeout_s)

    def close(self) -> None:
        """Unregister and remove the shared-memory region (if any) and close the connection."""
        self._release()
        self.client.close()

    def __enter__(self) -> "TritonPredictor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _shared_input(self, batch: np.ndarray):
        """The frame in this client's registered region (made, or remade larger, on demand)."""
        import tritonclient.utils.shared_memory as shared_memory

        if self._region.get("size", 0) < batch.nbytes:
            _release_region(self.client, self._region, self.timeout_s)
            name = self._region_name
            handle = shared_memory.create_shared_memory_region(name, "/" + name, batch.nbytes)
            try:
                self.client.register_system_shared_memory(name, "/" + name, batch.nbytes,
                                                          client_timeout=self.timeout_s)
            except self._errors as err:
                shared_memory.destroy_shared_memory_region(handle)
                raise MaskrtError(f"--shm: Triton at {self.server} cannot map this machine's shared memory (it must "
                                  f"run on the same machine): {err.message().splitlines()[0]}") from None
            self._region.update(handle=handle, name=name, size=batch.nbytes)
        shared_memory.set_shared_memory_region(self._region["handle"], [batch])
        item = self._grpc.InferInput(INPUT_NAME, list(batch.shape), "UINT8")
        item.set_shared_memory(self._region["name"], batch.nbytes)
        return item

    def __call__(self, bgr: np.ndarray, conf: float | None = None) -> Detections:
        """One BGR uint8 image [h,w,3] -> its Detections (masks as crops; ``.masks`` gives full frames)."""
        return self.unpack(self.request(bgr), bgr.shape[:2], conf)

    def request(self, bgr: np.ndarray) -> dict[str, np.ndarray]:
        """Send one BGR image; its item of the contract's outputs (the loop's infer stage)."""
        batch = np.ascontiguousarray(bgr)[None]
        problem = image_problem(batch)
        if problem:
            raise MaskrtError(problem)
        if self.shm:
            item = self._shared_input(batch)
        else:
            item = self._grpc.InferInput(INPUT_NAME, list(batch.shape), "UINT8")
            item.set_data_from_numpy(batch)
        try:
            result = self.client.infer(self.model, [item], client_timeout=self.timeout_s,
                                       outputs=[self._grpc.InferRequestedOutput(n) for n in OUTPUT_NAMES])
        except self._errors as err:
            raise MaskrtError(f"Triton at {self.server}: {err.message().splitlines()[0]}") from None
        return {name: result.as_numpy(name)[0] for name in OUTPUT_NAMES}

    def batch(self, images: Sequence[np.ndarray], conf: float | None = None) -> list[Detections]:
        return [self(image, conf=conf) for image in images]

    def unpack(self, item: dict[str, np.ndarray], image_size: tuple[int, int], conf: float | None = None) -> Detections:
        """One item of the contract's outputs -> Detections, keeping score >= conf."""
        threshold = self.conf if conf is None else float(conf)
        count = int(item["num_dets"][0])
        scores = item["scores"][:count].astype(np.float32)
        keep = np.flatnonzero(scores >= threshold)
        size = (int(image_size[0]), int(image_size[1]))
        try:
            crops = rle_strings_to_mask_crops([json.loads(item["masks_rle"][i])["counts"] for i in keep], size)
        except (ValueError, KeyError) as err:
            raise MaskrtError(f"Triton at {self.server} sent a mask that is not a COCO RLE of a {size[0]}x{size[1]} "
                              f"image: {err}") from None
        return Detections(boxes=item["boxes"][keep].astype(np.float32), scores=scores[keep],
                          labels=item["labels"][keep].astype(np.int64), mask_crops=crops, class_names=self.class_names)
