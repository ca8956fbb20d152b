"""RoIAlign, RoIPool and their FPN multilevel forms, vectorised over RoIs.

Semantics are torchvision's C++ kernels (``roi_align_kernel.cpp``, ``roi_pool_kernel.cpp``)
and ``poolers.py`` (``MultiScaleRoIAlign``, ``LevelMapper``), restated in
``plugins/README.md`` ("The MultilevelRoIAlign contract").

How the vectorisation works: every output bin of every RoI reads a fixed-size set of
feature cells (RoIAlign: 4 bilinear corners x the sampling grid; RoIPool: the cells of
the largest window). Their flat indices into a channels-last copy of the feature map
[N*H*W, C] and their weights are computed as small [K, ...] tensors (the "sample plan"),
one ``index_select`` gathers the C-vectors, and a batched matmul (avg) or a max reduces
them. RoIs are processed in chunks so the gathered temporary stays under
``_GATHER_BUDGET`` values; with adaptive sampling (grid size per RoI) RoIs are sorted by
grid size first, so a chunk's padded grid (largest grid in the chunk, extra samples masked
out) wastes little. Gradients are explicit (``roi_align_backward``, RoIPool's arg-max):
the backward rebuilds the same sample plans and ``index_add``s into one buffer, where
autograd through every chunk's gather would allocate a map-sized buffer per chunk.

float32 CPU forwards (``roi_align``, and ``multilevel_roi_align_eager`` in one call for all
levels) and the gradients of float32 CPU average pooling (``roi_align_backward``,
``multilevel_roi_align_backward_eager``) run the native kernels of ``native_cpu.py``
(``native/roi_align_cpu.cpp``) where they build; the vectorised PyTorch forward and backward
above are the fallback and compute the same numbers (to float32 rounding).
docs/performance.md has the measurements.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from maskrt.errors import MaskrtError
from maskrt.model.ops import native_cpu

# Max number of gathered feature values (K_chunk * bins * taps * C) held at once: 1M floats
# = 4 MiB per chunk, whatever the number of RoIs. The gather is memory-bound; chunks that
# stay near the caches measured ~25% faster on CPU than 32 MiB ones (bench/ops.py).
_GATHER_BUDGET = 1 << 20

# Adaptive sampling (sampling_ratio 0) takes at most this many samples per bin side: the
# MultilevelRoIAlign contract's cap (plugins/README.md), the same in every implementation.
ADAPTIVE_GRID_MAX = 64

# avg RoIs whose window of cells is well below their tap count use the window form
# (tests switch it off to check both forms against the same references).
_WINDOW_FORM = True

# float32 CPU forwards and average-mode backwards run the native kernels (native_cpu.py) where
# they load; tests switch them off to hold the pure-PyTorch path, the fallback, to the same
# references (_NATIVE_CPU both, _NATIVE_BACKWARD the backward alone; bench/train_steps.py too).
_NATIVE_CPU = True
_NATIVE_BACKWARD = True


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        size = (output_size, output_size)
    else:
        size = tuple(int(s) for s in output_size)
    if len(size) != 2 or min(size) < 1:
        raise MaskrtError(f"output_size must be an int or (height, width) with values >= 1, got {output_size}")
    return size  # type: ignore[return-value]


def convert_boxes_to_roi_format(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image boxes [L_i,4] -> rois [sum L_i, 5] = (batch_index, x1, y1, x2, y2)."""
    for b in boxes:
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise MaskrtError(f"each per-image box tensor must be [L,4] xyxy, got {shape}")
    concat = torch.cat(list(boxes), dim=0)
    ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
    return torch.cat([ids, concat], dim=1)


def _as_rois(input: Tensor, boxes: Tensor | Sequence[Tensor]) -> Tensor:
    if not isinstance(input, Tensor) or input.dim() != 4:
        shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise MaskrtError(f"RoI op input must be a feature map Tensor[N,C,H,W], got {shape}")
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise MaskrtError(
                f"boxes must be Tensor[K,5] (batch_index, x1, y1, x2, y2) or a list of Tensor[L,4], got {tuple(boxes.shape)}"
            )
        return boxes
    return convert_boxes_to_roi_format(boxes)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32 for half types (the contract), else in the input's own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _channels_last_rows(input: Tensor, dtype: torch.dtype) -> Tensor:
    """[N,C,H,W] -> [N*H*W, C]: one row per feature cell, so a gather reads contiguous C-vectors."""
    n, c, h, w = input.shape
    return input.to(dtype).permute(0, 2, 3, 1).reshape(n * h * w, c)


def _chunks_by_cost(cost_h: Tensor, cost_w: Tensor, per_unit: int) -> list[tuple[int, int]]:
    """Split sorted RoIs into [start, stop) chunks whose padded cost fits the gather budget.

    cost_h, cost_w: [K] int64 per-RoI grid sizes (the chunk pads to their running maxima);
    a chunk costs (RoIs) * max(cost_h) * max(cost_w) * per_unit. The loop runs per chunk.
    """
    k = cost_h.shape[0]
    chunks = []
    start = 0
    while start < k:
        h_max = torch.cummax(cost_h[start:], 0).values.clamp(min=1)
        w_max = torch.cummax(cost_w[start:], 0).values.clamp(min=1)
        count = torch.arange(1, k - start + 1, device=cost_h.device)
        fits = int(((count * h_max * w_max * per_unit) <= _GATHER_BUDGET).sum())
        stop = start + max(fits, 1)  # cost is non-decreasing in count, so the fitting ones are a prefix
        chunks.append((start, stop))
        start = stop
    return chunks


def _axis_taps(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torchvision's bilinear rule along one axis.

    coord [...] sample coordinates in feature cells -> (low, high) int64 indices,
    (w_low, w_high) weights and ``inside`` (False where the sample lies beyond -1 or size:
    such a sample contributes 0).
    """
    inside = (coord >= -1.0) & (coord <= size)
    # Samples that contribute nothing (outside, or NaN from a 0-sample grid) read cell 0
    # with weight 0, so no index is ever out of range.
    coord = torch.where(inside, coord, torch.zeros_like(coord)).clamp(min=0)
    low = coord.floor()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    coord = torch.where(at_edge, low, coord)
    high = torch.where(at_edge, low, low + 1)
    frac = coord - low
    return low.long(), high.long(), 1.0 - frac, frac, inside


class _AxisTaps(NamedTuple):
    """One axis of a chunk's sample points, per RoI k, bin p, sample g: [k, P, G]."""

    low: Tensor     # int64 cell below the sample (torchvision's clamping at the map edge)
    high: Tensor    # int64 cell above
    w_low: Tensor   # bilinear weight of ``low``; 0 for samples outside the map or the RoI's grid
    w_high: Tensor  # bilinear weight of ``high``; same zeros
    real: Tensor    # bool: sample index < the RoI's own grid size (adaptive grids are padded)


class _SamplePlan(NamedTuple):
    """Tap form: for every output bin, 4 bilinear corners per sample, gathered one by one."""

    index: Tensor   # [bins, S*4] int64 rows of the channels-last map (corner fastest)
    weight: Tensor  # [bins, S*4] bilinear weights, 0 for samples outside the map or the RoI's grid
    real: Tensor    # [bins, S] bool: the sample belongs to the RoI's own grid
    count: Tensor   # [bins, 1] samples per bin of the RoI's own grid, at least 1 (the avg divisor)


class _WindowPlan(NamedTuple):
    """Window form (avg only): the RoI's window of cells is gathered once and the bilinear
    average is separable, out[k] = weight_y[k] @ window[k] @ weight_x[k]^T per channel.
    Cheaper than taps when samples outnumber cells (small RoIs, 14x14 masks)."""

    index: Tensor     # [k, Lh*Lw] int64 rows of the channels-last map (window row-major)
    weight_y: Tensor  # [k, ph, Lh] summed bilinear row weights of each bin, divided by the count
    weight_x: Tensor  # [k, pw, Lw] summed bilinear column weights of each bin


def _roi_geometry(rois: Tensor, spatial_scale: float, aligned: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """rois [k,5] -> (x_start, y_start, roi_w, roi_h) [k] in feature cells, the kernel's arithmetic."""
    offset = 0.5 if aligned else 0.0
    x_start = rois[:, 1] * spatial_scale - offset
    y_start = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x_start
    roi_h = rois[:, 4] * spatial_scale - offset - y_start
    if not aligned:
        # Legacy mode forces malformed RoIs to be at least 1x1 cell.
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    return x_start, y_start, roi_w, roi_h


def _axis_samples(start: Tensor, extent: Tensor, pooled: int, grid: Tensor, grid_max: int, size: int) -> _AxisTaps:
    """Sample coordinates along one axis, same arithmetic order as the C++ kernel:
    start + p*bin + (i+0.5)*bin/grid for bins p < pooled, samples i < grid_max."""
    k = start.shape[0]
    dtype, device = start.dtype, start.device
    bin_size = (extent / pooled)[:, None, None]
    g = grid.to(dtype)[:, None, None]
    i = torch.arange(grid_max, device=device, dtype=dtype)[None, None, :]
    p = torch.arange(pooled, device=device, dtype=dtype)[None, :, None]
    coord = start[:, None, None] + p * bin_size + (i + 0.5) * bin_size / g
    low, high, w_low, w_high, inside = _axis_taps(coord, size)
    real = (i < g).expand(k, pooled, grid_max)
    keep = (inside & real).to(dtype)
    return _AxisTaps(low, high, w_low * keep, w_high * keep, real)


def _sample_plan(height: int, width: int, batch: Tensor, ys: _AxisTaps, xs: _AxisTaps, count: Tensor) -> _SamplePlan:
    """Tap plan of a chunk: ys [k, ph, Gh], xs [k, pw, Gw], batch and count [k]."""
    k, ph, grid_h_max = ys.low.shape
    pw, grid_w_max = xs.low.shape[1:]

    # Broadcast to samples [k, ph, pw, gh, gw] and stack the 4 corners on a last axis.
    def along_y(t: Tensor) -> Tensor:
        return t[:, :, None, :, None]

    def along_x(t: Tensor) -> Tensor:
        return t[:, None, :, None, :]

    base = (batch * (height * width))[:, None, None, None, None]
    row_lo, row_hi = along_y(ys.low * width), along_y(ys.high * width)
    col_lo, col_hi = along_x(xs.low), along_x(xs.high)
    index = torch.stack((base + row_lo + col_lo, base + row_lo + col_hi, base + row_hi + col_lo, base + row_hi + col_hi), dim=-1)
    wy_lo, wy_hi = along_y(ys.w_low), along_y(ys.w_high)
    wx_lo, wx_hi = along_x(xs.w_low), along_x(xs.w_high)
    weight = torch.stack((wy_lo * wx_lo, wy_lo * wx_hi, wy_hi * wx_lo, wy_hi * wx_hi), dim=-1)
    real = along_y(ys.real) & along_x(xs.real)
    bins = k * ph * pw
    samples = grid_h_max * grid_w_max
    count = count[:, None].expand(k, ph * pw).reshape(bins, 1)
    return _SamplePlan(index.reshape(bins, samples * 4), weight.reshape(bins, samples * 4), real.reshape(bins, samples), count)


def _axis_window(taps: _AxisTaps) -> tuple[Tensor, Tensor]:
    """The cells one axis's taps touch: (first cell [k], weights [k, P, L]) where weights[k, p, j]
    sums the bilinear weights bin p puts on cell first+j. L = the chunk's longest span."""
    k, pooled, _ = taps.low.shape
    used_low, used_high = taps.w_low != 0, taps.w_high != 0
    far = torch.iinfo(torch.int64).max
    first = torch.minimum(torch.where(used_low, taps.low, far).amin((1, 2)), torch.where(used_high, taps.high, far).amin((1, 2)))
    last = torch.maximum(torch.where(used_low, taps.low, -1).amax((1, 2)), torch.where(used_high, taps.high, -1).amax((1, 2)))
    unused = last < first  # no sample inside the map: an all-zero window of one cell
    first = torch.where(unused, torch.zeros_like(first), first)
    last = torch.where(unused, torch.zeros_like(last), last)
    span = int((last - first).max()) + 1
    weights = torch.zeros((k, pooled, span), dtype=taps.w_low.dtype, device=taps.w_low.device)
    # Unused taps carry weight 0; clamping only keeps their (ignored) index in range.
    weights.scatter_add_(2, (taps.low - first[:, None, None]).clamp(0, span - 1), taps.w_low)
    weights.scatter_add_(2, (taps.high - first[:, None, None]).clamp(0, span - 1), taps.w_high)
    return first, weights


def _window_plan(height: int, width: int, batch: Tensor, ys: _AxisTaps, xs: _AxisTaps, count: Tensor) -> _WindowPlan:
    first_y, weight_y = _axis_window(ys)
    first_x, weight_x = _axis_window(xs)
    span_y, span_x = weight_y.shape[2], weight_x.shape[2]
    device = batch.device
    # Window cells past a shorter RoI's own span have zero weight; clamping keeps them in the map.
    cell_y = (first_y[:, None] + torch.arange(span_y, device=device)).clamp(max=height - 1)
    cell_x = (first_x[:, None] + torch.arange(span_x, device=device)).clamp(max=width - 1)
    index = (batch * (height * width))[:, None, None] + cell_y[:, :, None] * width + cell_x[:, None, :]
    return _WindowPlan(index.reshape(batch.shape[0], span_y * span_x), weight_y / count[:, None, None], weight_x)


def _sample_plans(
    height: int, width: int, channels: int, rois: Tensor, pooled: tuple[int, int], spatial_scale: float,
    sampling_ratio: int, aligned: bool, mode: str,
) -> Iterator[tuple[Tensor, _SamplePlan | _WindowPlan]]:
    """Chunks of RoIs and their plans: yields (positions [k] into rois, plan).

    avg RoIs whose window of cells is well below their tap count take the window form,
    the rest the tap form. Within a form RoIs are visited sorted by cost, so each chunk's
    padding (grid or window of its largest member) is close to every member's own.
    """
    ph, pw = pooled
    k = rois.shape[0]
    x_start, y_start, roi_w, roi_h = _roi_geometry(rois, spatial_scale, aligned)
    if sampling_ratio > 0:
        grid_h = torch.full((k,), sampling_ratio, dtype=torch.int64, device=rois.device)
        grid_w = grid_h
    else:
        # at most ADAPTIVE_GRID_MAX per side (the MultilevelRoIAlign contract's cap; torchvision has none)
        grid_h = torch.ceil(torch.nan_to_num(roi_h / ph, nan=0.0)).clamp(min=0, max=ADAPTIVE_GRID_MAX).long()
        grid_w = torch.ceil(torch.nan_to_num(roi_w / pw, nan=0.0)).clamp(min=0, max=ADAPTIVE_GRID_MAX).long()
    count = (grid_h * grid_w).clamp(min=1).to(rois.dtype)
    taps = ph * pw * grid_h.clamp(min=1) * grid_w.clamp(min=1) * 4
    # Cells a window spans: the RoI's extent plus the bilinear neighbours, within the map.
    window_h = (torch.ceil(torch.nan_to_num(roi_h.abs(), nan=0.0, posinf=height)) + 2).clamp(max=height).long()
    window_w = (torch.ceil(torch.nan_to_num(roi_w.abs(), nan=0.0, posinf=width)) + 2).clamp(max=width).long()
    # The window form does more arithmetic (two small matmuls) per gathered cell: measured on
    # CPU (bench/ops.py cases) it wins while cells < ~0.7 x taps.
    use_window = (3 * window_h * window_w < 2 * taps) & (mode == "avg" and _WINDOW_FORM)

    for window_form in (False, True):
        members = torch.where(use_window == window_form)[0]
        if members.numel() == 0:
            continue
        if window_form:
            cost_h, cost_w, per_unit = window_h[members], window_w[members], channels
        else:
            cost_h, cost_w, per_unit = grid_h[members], grid_w[members], ph * pw * 4 * channels
        order = torch.argsort(cost_h * cost_w, stable=True)
        members, cost_h, cost_w = members[order], cost_h[order], cost_w[order]
        for start, stop in _chunks_by_cost(cost_h, cost_w, per_unit):
            positions = members[start:stop]
            g_h, g_w = grid_h[positions], grid_w[positions]
            ys = _axis_samples(y_start[positions], roi_h[positions], ph, g_h, max(int(g_h.max()), 1), height)
            xs = _axis_samples(x_start[positions], roi_w[positions], pw, g_w, max(int(g_w.max()), 1), width)
            batch = rois[positions, 0].long()
            build = _window_plan if window_form else _sample_plan
            yield positions, build(height, width, batch, ys, xs, count[positions])


def _sample_values(rows: Tensor, plan: _SamplePlan) -> Tensor:
    """Bilinear value of every sample: [bins, S, C]."""
    bins, taps = plan.index.shape
    gathered = rows.index_select(0, plan.index.reshape(-1)).view(bins, taps // 4, 4, rows.shape[1])
    return (gathered * plan.weight.view(bins, taps // 4, 4, 1)).sum(2)


def _window_average(rows: Tensor, plan: _WindowPlan) -> Tensor:
    """Window form forward: [k, ph, pw, C]."""
    k, ph, span_y = plan.weight_y.shape
    pw, span_x = plan.weight_x.shape[1:]
    channels = rows.shape[1]
    window = rows.index_select(0, plan.index.reshape(-1)).view(k, span_y, span_x * channels)
    along_y = torch.bmm(plan.weight_y, window).view(k, ph, span_x, channels)               # [k, ph, Lw, C]
    along_y = along_y.transpose(1, 2).reshape(k, span_x, ph * channels)
    pooled = torch.bmm(plan.weight_x, along_y).view(k, pw, ph, channels)                  # [k, pw, ph, C]
    return pooled.transpose(1, 2)


def _window_average_backward(grad_bins: Tensor, plan: _WindowPlan) -> Tensor:
    """Window form backward: grad_bins [k, ph, pw, C] -> gradient of the window cells [k*Lh*Lw, C]."""
    k, ph, span_y = plan.weight_y.shape
    pw, span_x = plan.weight_x.shape[1:]
    channels = grad_bins.shape[-1]
    grad_rows_y = torch.bmm(plan.weight_y.transpose(1, 2), grad_bins.reshape(k, ph, pw * channels))  # [k, Lh, pw*C]
    grad_rows_y = grad_rows_y.view(k, span_y, pw, channels).transpose(1, 2).reshape(k, pw, span_y * channels)
    grad_window = torch.bmm(plan.weight_x.transpose(1, 2), grad_rows_y).view(k, span_x, span_y, channels)
    return grad_window.transpose(1, 2).reshape(k * span_y * span_x, channels)


def _max_over_samples(values: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """values [bins,S,C] -> (max over the bin's own samples [bins,C] (0 if none), argmax [bins,C])."""
    values = torch.where(real[:, :, None], values, torch.full_like(values, -math.inf))
    best, arg = values.max(dim=1)  # first max on ties, in sample order
    return torch.where(real.any(dim=1, keepdim=True), best, torch.zeros_like(best)), arg


def _prepare(input: Tensor, boxes: Tensor | Sequence[Tensor], output_size, mode: str) -> tuple[Tensor, tuple[int, int], torch.dtype]:
    if mode not in ("avg", "max"):
        raise MaskrtError(f"roi_align mode must be 'avg' or 'max', got {mode!r}")
    rois = _as_rois(input, boxes)
    _check_batch_index(rois, input.shape[0])
    compute = _compute_dtype(input.dtype)
    return rois.detach().to(compute), _pair(output_size), compute


def _check_batch_index(rois: Tensor, batch: int) -> None:
    """Each RoI's image index must name an image of the input (else the gather reads garbage)."""
    if rois.shape[0] and not bool(((rois[:, 0] >= 0) & (rois[:, 0] < batch)).all()):
        raise MaskrtError(f"RoI batch indices must lie in [0, {batch - 1}] (the input has {batch} images)")


def _native_applies(compute: torch.dtype, features: Sequence[Tensor]) -> bool:
    """The native kernel runs float32 work on the CPU (float64 stays on the PyTorch path)."""
    return (_NATIVE_CPU and compute == torch.float32 and all(f.device.type == "cpu" for f in features)
            and native_cpu.enabled())


def _native_layout(feature: Tensor, boxes: Tensor, spatial_scale: float) -> Tensor:
    """The map as the native kernel takes it: float32; channels-last maps as they are. The kernel
    reads each cell's C-vector with vector loads, so an NCHW map is copied to channels-last
    first, whole (one copy, cheaper than strided reads when the RoIs cover the map), or, where
    the RoIs pooling from it read fewer cells than the map has (few RoIs on a large map: the mask
    pooler's 100 RoIs on an 800x1344 image's P2), passed as it is: the kernel then copies each
    RoI's window of cells. boxes [K,4] xyxy: the RoIs at this map."""
    feature = feature.to(torch.float32)
    if feature.dim() != 4 or feature.is_contiguous(memory_format=torch.channels_last):
        return feature
    height, width = feature.shape[-2:]
    sides = (boxes[:, 2:] - boxes[:, :2]).abs().mul(spatial_scale).add(2.0).nan_to_num(0.0)
    cells = sides[:, 0].clamp(max=width) * sides[:, 1].clamp(max=height)
    if float(cells.sum()) < feature.shape[0] * height * width:
        return feature
    return feature.contiguous(memory_format=torch.channels_last)


def _roi_align_forward(input: Tensor, rois: Tensor, pooled: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    """input [N,C,H,W], rois [K,5] (compute dtype) -> [K,C,ph,pw] in input's dtype."""
    n, channels, height, width = input.shape
    ph, pw = pooled
    if rois.shape[0] == 0 or channels == 0:
        return input.new_zeros((rois.shape[0], channels, ph, pw))
    if _native_applies(rois.dtype, [input]):
        features = [_native_layout(input, rois[:, 1:], spatial_scale)]
        return native_cpu.roi_align_forward(features, [spatial_scale], rois, None, pooled, sampling_ratio, aligned, mode).to(input.dtype)
    rows = _channels_last_rows(input, rois.dtype)
    results, visited = [], []
    for positions, plan in _sample_plans(height, width, channels, rois, pooled, spatial_scale, sampling_ratio, aligned, mode):
        if isinstance(plan, _WindowPlan):
            pooled_bins = _window_average(rows, plan)
        elif mode == "avg":
            bins = plan.index.shape[0]
            gathered = rows.index_select(0, plan.index.reshape(-1)).view(bins, -1, channels)
            pooled_bins = torch.bmm((plan.weight / plan.count)[:, None, :], gathered)[:, 0]
        else:
            pooled_bins = _max_over_samples(_sample_values(rows, plan), plan.real)[0]
        results.append(pooled_bins.reshape(-1, ph, pw, channels))
        visited.append(positions)
    output = torch.cat(results, dim=0) if len(results) > 1 else results[0]
    positions = torch.cat(visited) if len(visited) > 1 else visited[0]
    output = output[torch.argsort(positions)]
    return output.permute(0, 3, 1, 2).contiguous().to(input.dtype)


class _RoIAlignFunction(torch.autograd.Function):
    """Autograd for roi_align through ``roi_align_backward``: one gradient buffer for all
    chunks (autograd through each chunk's gather would allocate a map-sized buffer per chunk)."""

    @staticmethod
    def forward(ctx, input: Tensor, rois: Tensor, pooled: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
        ctx.save_for_backward(input, rois)
        ctx.settings = (spatial_scale, sampling_ratio, aligned, mode)
        return _roi_align_forward(input, rois, pooled, spatial_scale, sampling_ratio, aligned, mode)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple:
        input, rois = ctx.saved_tensors
        grad_input = roi_align_backward(grad_output, input, rois, *ctx.settings) if ctx.needs_input_grad[0] else None
        return grad_input, None, None, None, None, None, None


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
) -> Tensor:
    """RoIAlign with torchvision's semantics. input [N,C,H,W], boxes [K,5] or list of [L_i,4] -> [K,C,ph,pw].

    ``sampling_ratio <= 0`` = adaptive (ceil(roi_h/ph) x ceil(roi_w/pw) samples per bin).
    ``mode="max"`` takes the max of the bin's bilinear samples (a sample outside the map is 0).
    Differentiable w.r.t. ``input`` (not the boxes, as torchvision), via ``roi_align_backward``.
    float16 input is computed in float32 and returned as float16. Autocast is off inside
    (its bf16 bmm would round the bilinear weights): the result is the same under autocast.
    """
    rois, pooled, compute = _prepare(input, boxes, output_size, mode)
    with torch.autocast(input.device.type, enabled=False):
        return _RoIAlignFunction.apply(input, rois, pooled, float(spatial_scale), int(sampling_ratio), bool(aligned), mode)


def roi_align_backward(
    grad_output: Tensor,
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
) -> Tensor:
    """Gradient of ``roi_align`` w.r.t. its input, computed without autograd.

    grad_output [K,C,ph,pw], input [N,C,H,W] (its values are read only for mode "max",
    to find each bin's arg-max sample) -> grad_input [N,C,H,W]. avg spreads each bin's
    gradient over its samples' 4 corners with the bilinear weights / count; max sends it to
    the corners of the first arg-max sample. Autocast is off inside, as in ``roi_align``.
    """
    with torch.autocast(input.device.type, enabled=False):
        return _roi_align_backward(grad_output, input, boxes, spatial_scale, sampling_ratio, aligned, mode)


def _roi_align_backward(grad_output: Tensor, input: Tensor, boxes: Tensor | Sequence[Tensor], spatial_scale: float,
                        sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    rois, (ph, pw), compute = _prepare(input, boxes, tuple(grad_output.shape[-2:]), mode)
    n, channels, height, width = input.shape
    if mode == "avg" and rois.shape[0] and _NATIVE_BACKWARD and _native_applies(compute, [input]):
        grad = native_cpu.roi_align_backward(grad_output, [tuple(input.shape)], [spatial_scale], rois, None,
                                             sampling_ratio, aligned)[0]
        return grad.to(input.dtype)
    grad_rows = torch.zeros((n * height * width, channels), dtype=compute, device=input.device)
    if rois.shape[0] == 0 or channels == 0:
        return grad_rows.view(n, height, width, channels).permute(0, 3, 1, 2).to(input.dtype)
    grad_bins_all = grad_output.to(compute).permute(0, 2, 3, 1)  # [K, ph, pw, C]
    rows = _channels_last_rows(input, compute) if mode == "max" else None
    for positions, plan in _sample_plans(height, width, channels, rois, (ph, pw), float(spatial_scale), sampling_ratio, aligned, mode):
        if isinstance(plan, _WindowPlan):
            grad_rows.index_add_(0, plan.index.reshape(-1), _window_average_backward(grad_bins_all[positions], plan))
            continue
        bins, taps = plan.index.shape
        grad_bins = grad_bins_all[positions].reshape(bins, channels)
        if mode == "avg":
            contributions = (plan.weight / plan.count)[:, :, None] * grad_bins[:, None, :]  # [bins, taps, C]
            grad_rows.index_add_(0, plan.index.reshape(-1), contributions.reshape(bins * taps, channels))
            continue
        values = _sample_values(rows, plan)
        _, arg = _max_over_samples(values, plan.real)  # [bins, C]
        has_samples = plan.real.any(dim=1, keepdim=True)
        corners = torch.arange(4, device=input.device)
        tap = arg[:, :, None] * 4 + corners  # [bins, C, 4]: the arg-max sample's corners
        index = plan.index.gather(1, tap.reshape(bins, -1)).view(bins, channels, 4)
        weight = plan.weight.gather(1, tap.reshape(bins, -1)).view(bins, channels, 4)
        contributions = weight * (grad_bins * has_samples)[:, :, None]
        channel = torch.arange(channels, device=input.device)[None, :, None]
        grad_rows.view(-1).index_add_(0, (index * channels + channel).reshape(-1), contributions.reshape(-1))
    return grad_rows.view(n, height, width, channels).permute(0, 3, 1, 2).contiguous().to(input.dtype)


def _round_half_away(x: Tensor) -> Tensor:
    """C's round(): halves go away from zero (torch.round rounds halves to even)."""
    floor = torch.floor(x)
    frac = x - floor
    up = (frac > 0.5) | ((frac == 0.5) & (x > 0))
    return floor + up.to(x.dtype)


def _roi_pool_forward(input: Tensor, rois: Tensor, pooled: tuple[int, int], spatial_scale: float) -> tuple[Tensor, Tensor]:
    """input [N,C,H,W], rois [K,5] -> (output [K,C,ph,pw], argmax [K,C,ph,pw] int64 row of the
    channels-last map, -1 for an empty bin)."""
    n, channels, height, width = input.shape
    ph, pw = pooled
    if rois.shape[0] == 0 or channels == 0:
        empty = (rois.shape[0], channels, ph, pw)
        return input.new_zeros(empty), torch.full(empty, -1, dtype=torch.int64, device=input.device)
    compute = rois.dtype
    rows = _channels_last_rows(input, compute)
    # Integer RoI in cells and per-bin windows [k, ph] / [k, pw], as the C++ kernel computes them.
    start_w = _round_half_away(rois[:, 1] * spatial_scale)
    start_h = _round_half_away(rois[:, 2] * spatial_scale)
    end_w = _round_half_away(rois[:, 3] * spatial_scale)
    end_h = _round_half_away(rois[:, 4] * spatial_scale)
    roi_w = (end_w - start_w + 1).clamp(min=1)
    roi_h = (end_h - start_h + 1).clamp(min=1)
    bin_h = roi_h / ph
    bin_w = roi_w / pw
    bins_y = torch.arange(ph, device=rois.device, dtype=compute)
    bins_x = torch.arange(pw, device=rois.device, dtype=compute)
    h_lo = (torch.floor(bins_y[None] * bin_h[:, None]) + start_h[:, None]).clamp(0, height).long()
    h_hi = (torch.ceil((bins_y[None] + 1) * bin_h[:, None]) + start_h[:, None]).clamp(0, height).long()
    w_lo = (torch.floor(bins_x[None] * bin_w[:, None]) + start_w[:, None]).clamp(0, width).long()
    w_hi = (torch.ceil((bins_x[None] + 1) * bin_w[:, None]) + start_w[:, None]).clamp(0, width).long()
    win_h = (h_hi - h_lo).clamp(min=0)
    win_w = (w_hi - w_lo).clamp(min=0)
    order = torch.argsort(win_h.amax(1) * win_w.amax(1), stable=True)
    batch = rois[:, 0].long()[order]
    h_lo, win_h, w_lo, win_w = h_lo[order], win_h[order], w_lo[order], win_w[order]

    results, argmaxes = [], []
    for start, stop in _chunks_by_cost(win_h.amax(1), win_w.amax(1), ph * pw * channels):
        sl = slice(start, stop)
        wh_max = max(int(win_h[sl].max()), 1)
        ww_max = max(int(win_w[sl].max()), 1)
        dy = torch.arange(wh_max, device=rois.device)
        dx = torch.arange(ww_max, device=rois.device)
        in_y = dy[None, None, :] < win_h[sl, :, None]  # [kc, ph, wh]
        in_x = dx[None, None, :] < win_w[sl, :, None]  # [kc, pw, ww]
        # Clamp padded window positions to a valid cell; they are masked out below.
        cell_y = (h_lo[sl, :, None] + dy).clamp(max=height - 1)
        cell_x = (w_lo[sl, :, None] + dx).clamp(max=width - 1)
        bins = (stop - start) * ph * pw
        index = (batch[sl] * (height * width))[:, None, None, None, None] + cell_y[:, :, None, :, None] * width + cell_x[:, None, :, None, :]
        index = index.reshape(bins, wh_max * ww_max)
        inside = (in_y[:, :, None, :, None] & in_x[:, None, :, None, :]).reshape(bins, wh_max * ww_max, 1)
        gathered = rows.index_select(0, index.reshape(-1)).view(bins, wh_max * ww_max, channels)
        gathered = torch.where(inside, gathered, torch.full_like(gathered, -math.inf))
        best, arg = gathered.max(dim=1)  # first max in row-major window order, like the kernel
        nonempty = inside.any(dim=1)
        results.append(torch.where(nonempty, best, torch.zeros_like(best)).view(-1, ph, pw, channels))
        argmax_row = torch.where(nonempty, index.gather(1, arg), torch.full_like(arg, -1))
        argmaxes.append(argmax_row.view(-1, ph, pw, channels))
    restore = torch.argsort(order)
    output = torch.cat(results, dim=0)[restore].permute(0, 3, 1, 2).contiguous().to(input.dtype)
    argmax = torch.cat(argmaxes, dim=0)[restore].permute(0, 3, 1, 2).contiguous()
    return output, argmax


class _RoIPoolFunction(torch.autograd.Function):
    """Autograd for roi_pool: each bin's gradient goes to its arg-max cell, as torchvision."""

    @staticmethod
    def forward(ctx, input: Tensor, rois: Tensor, pooled: tuple[int, int], spatial_scale: float) -> Tensor:
        output, argmax = _roi_pool_forward(input, rois, pooled, spatial_scale)
        ctx.save_for_backward(argmax)
        ctx.input_shape, ctx.input_dtype = input.shape, input.dtype
        ctx.mark_non_differentiable(argmax)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple:
        (argmax,) = ctx.saved_tensors
        n, channels, height, width = ctx.input_shape
        compute = _compute_dtype(ctx.input_dtype)
        grad_rows = torch.zeros(n * height * width * channels, dtype=compute, device=grad_output.device)
        valid = argmax >= 0
        channel = torch.arange(channels, device=argmax.device)[None, :, None, None].expand_as(argmax)
        grad_rows.index_add_(0, (argmax * channels + channel)[valid], grad_output.to(compute)[valid])
        grad_input = grad_rows.view(n, height, width, channels).permute(0, 3, 1, 2).contiguous().to(ctx.input_dtype)
        return grad_input, None, None, None


def roi_pool(input: Tensor, boxes: Tensor | Sequence[Tensor], output_size: int | Sequence[int], spatial_scale: float = 1.0) -> Tensor:
    """RoIPool (Fast R-CNN) with torchvision's semantics. input [N,C,H,W], boxes [K,5] or list -> [K,C,ph,pw].

    The RoI is rounded to cells (C round), bins are floor/ceil cell windows clipped to the
    map, each bin is the max of its cells, an empty bin is 0. The gradient goes to the first
    arg-max cell of each bin (row-major), as torchvision.
    """
    rois = _as_rois(input, boxes)
    _check_batch_index(rois, input.shape[0])
    pooled = _pair(output_size)
    rois = rois.detach().to(_compute_dtype(input.dtype))
    return _RoIPoolFunction.apply(input, rois, pooled, float(spatial_scale))


def fpn_level(boxes: Tensor, k_min: int, k_max: int, canonical_scale: float = 224.0, canonical_level: int = 4) -> Tensor:
    """FPN level of each box (torchvision's LevelMapper, eq. 1 of the FPN paper). boxes [..., 4] -> int64 [...].

    k = floor(canonical_level + log2(sqrt(area)/canonical_scale) + 1e-6), clamped to
    [k_min, k_max]; area = (x2-x1)*(y2-y1) as torchvision's (a box inverted on both axes has a
    positive area), and an area <= 0 or NaN goes to k_min (plugins/README.md).
    """
    if boxes.shape[-1] != 4:
        raise MaskrtError(f"fpn_level boxes must be [..., 4] xyxy, got {tuple(boxes.shape)}")
    boxes = boxes.detach()
    if boxes.dtype not in (torch.float32, torch.float64):
        boxes = boxes.float()
    area = torch.nan_to_num((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]), nan=0.0).clamp(min=0)
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_scale) + 1e-6)
    return level.clamp(min=k_min, max=k_max).to(torch.int64)


def infer_spatial_scales(feature_shapes: Sequence[Sequence[int]], image_size: Sequence[int]) -> list[float]:
    """Scale of each feature map relative to the (padded) image: 2**round(log2(H_l / H)).

    feature_shapes: shapes ending in (H_l, W_l); image_size (H, W). Uses heights, as torchvision.
    """
    scales = []
    for shape in feature_shapes:
        approx = float(shape[-2]) / float(image_size[0])
        if approx <= 0:
            raise MaskrtError(f"cannot infer a feature scale from feature shape {tuple(shape)} and image size {tuple(image_size)}")
        scales.append(2.0 ** round(math.log2(approx)))
    return scales


def _levels_from_scales(spatial_scales: Sequence[float]) -> tuple[int, int]:
    """(k_min, k_max) of consecutive power-of-two scales 2**-k_min, ..., 2**-k_max (the contract)."""
    if not 1 <= len(spatial_scales) <= 5:
        raise MaskrtError(f"spatial_scales must name 1 to 5 feature levels, got {list(spatial_scales)}")
    if any(not (float(s) > 0) for s in spatial_scales):
        raise MaskrtError(f"spatial_scales must be positive, got {list(spatial_scales)}")
    k_min = round(-math.log2(spatial_scales[0]))
    k_max = k_min + len(spatial_scales) - 1
    if any(float(s) != 2.0 ** -(k_min + i) for i, s in enumerate(spatial_scales)):
        raise MaskrtError(
            f"spatial_scales must be consecutive halving powers of two (e.g. [0.25, 0.125, 0.0625, 0.03125]), "
            f"got {list(spatial_scales)}"
        )
    return k_min, k_max


def _multilevel_pool(
    rois: Tensor, features: Sequence[Tensor], spatial_scales: Sequence[float], levels: Tensor, output_size: tuple[int, int], pool,
) -> Tensor:
    """rois [K,5], levels [K] (index into features) -> [K,C,ph,pw], each RoI pooled by ``pool`` at its level."""
    channels = features[0].shape[1]
    compute = features[0].dtype
    result = features[0].new_zeros((rois.shape[0], channels) + output_size, dtype=compute)
    # Without autograd each level's RoIs are copied into place; with it, index_put (not in-place
    # on a leaf) routes each level's gradient back, at the cost of a copy of the whole result.
    tracked = torch.is_grad_enabled() and any(f.requires_grad for f in features)
    for level, (feature, scale) in enumerate(zip(features, spatial_scales)):
        idx = torch.where(levels == level)[0]
        if idx.numel() == 0:
            continue
        pooled = pool(feature, rois[idx], output_size, scale)
        if tracked:
            result = result.index_put((idx,), pooled.to(compute))
        else:
            result.index_copy_(0, idx, pooled.to(compute))
    return result


def multi_scale_roi_align(
    features: Sequence[Tensor],
    boxes: Sequence[Tensor],
    image_sizes: Sequence[Sequence[int]],
    output_size: int | Sequence[int],
    sampling_ratio: int,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    aligned: bool = False,
) -> Tensor:
    """torchvision's MultiScaleRoIAlign. features: per level [N,C,H_l,W_l] (finest first),
    boxes: per image [L_i,4] in image pixels, image_sizes: per image (h, w) -> [sum L_i, C, ph, pw].

    The scales are inferred from the feature heights vs the largest image height; each box
    pools at its ``fpn_level``.
    """
    if len(features) == 0:
        raise MaskrtError("multi_scale_roi_align needs at least one feature map")
    if len(image_sizes) == 0:
        raise MaskrtError("multi_scale_roi_align needs the image sizes")
    output_size = _pair(output_size)
    rois = convert_boxes_to_roi_format(boxes)
    max_h = max(int(s[0]) for s in image_sizes)
    max_w = max(int(s[1]) for s in image_sizes)
    scales = infer_spatial_scales([f.shape for f in features], (max_h, max_w))

    def pool(feature: Tensor, level_rois: Tensor, size: tuple[int, int], scale: float) -> Tensor:
        return roi_align(feature, level_rois, size, scale, sampling_ratio, aligned)

    if len(features) == 1:
        return pool(features[0], rois, output_size, scales[0])
    k_min, k_max = _levels_from_scales(scales)
    levels = fpn_level(rois[:, 1:], k_min, k_max, canonical_scale, canonical_level) - k_min
    return _multilevel_pool(rois, features, scales, levels, output_size, pool)


def _batched_rois(rois: Tensor) -> Tensor:
    """rois [B,R,4] -> [B*R,5] with the image index prepended."""
    if rois.dim() != 3 or rois.shape[-1] != 4:
        raise MaskrtError(f"rois must be Tensor[B,R,4] xyxy, got {tuple(rois.shape)}")
    b, r, _ = rois.shape
    batch_index = torch.arange(b, device=rois.device, dtype=rois.dtype).repeat_interleave(r)
    return torch.cat([batch_index[:, None], rois.reshape(b * r, 4)], dim=1)


def _check_features(rois: Tensor, features: Sequence[Tensor], spatial_scales: Sequence[float]) -> None:
    if len(features) != len(spatial_scales):
        raise MaskrtError(f"got {len(features)} feature maps but {len(spatial_scales)} spatial_scales")
    for feature in features:
        if feature.dim() != 4 or feature.shape[0] != rois.shape[0] or feature.shape[1] != features[0].shape[1]:
            raise MaskrtError(
                f"feature maps must be [B,C,H_l,W_l] with the rois' B={rois.shape[0]} and one C, got "
                f"{[tuple(f.shape) for f in features]}"
            )
    # Level order (the contract): each map half the previous one, rounded either way, finest first.
    # Maps in another order would pool silently from the wrong level.
    for previous, feature in zip(features, features[1:]):
        if any(abs(2 * int(feature.shape[d]) - int(previous.shape[d])) > 1 for d in (2, 3)):
            raise MaskrtError(
                f"feature maps must be finest first, each half the previous one (as spatial_scales "
                f"{list(spatial_scales)}): got H x W {[tuple(f.shape[2:]) for f in features]}"
            )


def multilevel_roi_align_eager(
    rois: Tensor,
    features: Sequence[Tensor],
    spatial_scales: Sequence[float],
    output_height: int = 7,
    output_width: int = 7,
    sampling_ratio: int = 2,
    aligned: bool = False,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    mode: str = "avg",
) -> Tensor:
    """The MultilevelRoIAlign contract in eager PyTorch. rois [B,R,4] (image pixels),
    features: L maps [B,C,H_l,W_l] -> [B,R,C,output_height,output_width].

    RoI r of image b pools from image b's maps at level fpn_level(...) - k_min.
    Differentiable w.r.t. the features. (The graph op ``multilevel_roi_align`` wraps this.)
    Without autograd, float32 CPU work runs the native kernel in one call for all levels
    (``native_cpu.py``); otherwise, or where it is unavailable, one ``roi_align`` per level.
    """
    flat = _batched_rois(rois)
    _check_features(rois, features, spatial_scales)
    b, r, _ = rois.shape
    channels = features[0].shape[1]
    size = _pair((output_height, output_width))
    k_min, k_max = _levels_from_scales(spatial_scales)
    levels = fpn_level(rois.reshape(b * r, 4), k_min, k_max, canonical_scale, canonical_level) - k_min

    def pool(feature: Tensor, level_rois: Tensor, out: tuple[int, int], scale: float) -> Tensor:
        return roi_align(feature, level_rois, out, scale, sampling_ratio, aligned, mode)

    compute = _compute_dtype(features[0].dtype)
    tracked = torch.is_grad_enabled() and any(f.requires_grad for f in features)
    if mode in ("avg", "max") and not tracked and _native_applies(compute, features):
        # One native call pools every RoI at its level straight into the output.
        boxes = flat[:, 1:].detach()
        maps = [_native_layout(f, boxes[levels == index], scale) for index, (f, scale) in enumerate(zip(features, spatial_scales))]
        pooled = native_cpu.roi_align_forward(maps, spatial_scales, flat.detach().to(compute), levels, size,
                                              sampling_ratio, aligned, mode)
        return pooled.view(b, r, channels, *size).to(features[0].dtype)
    pooled = _multilevel_pool(flat, features, spatial_scales, levels, size, pool)
    return pooled.view(b, r, channels, *size).to(features[0].dtype)


def multilevel_roi_align_backward_eager(
    grad_output: Tensor,
    rois: Tensor,
    features: Sequence[Tensor],
    spatial_scales: Sequence[float],
    output_height: int = 7,
    output_width: int = 7,
    sampling_ratio: int = 2,
    aligned: bool = False,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    mode: str = "avg",
) -> list[Tensor]:
    """Gradient of ``multilevel_roi_align_eager`` w.r.t. each feature map, without autograd.

    grad_output [B,R,C,oh,ow] -> one [B,C,H_l,W_l] per level (zeros where no RoI pooled).
    """
    flat = _batched_rois(rois)
    _check_features(rois, features, spatial_scales)
    b, r, _ = rois.shape
    k_min, k_max = _levels_from_scales(spatial_scales)
    levels = fpn_level(rois.reshape(b * r, 4), k_min, k_max, canonical_scale, canonical_level) - k_min
    grad_flat = grad_output.reshape(b * r, features[0].shape[1], output_height, output_width)
    if mode == "avg" and _NATIVE_BACKWARD and _native_applies(_compute_dtype(features[0].dtype), features):
        # One native call spreads every RoI's gradient at its level.
        grads = native_cpu.roi_align_backward(grad_flat, [tuple(f.shape) for f in features], spatial_scales,
                                              flat.detach().to(torch.float32), levels, sampling_ratio, aligned)
        return [g.to(f.dtype) for g, f in zip(grads, features)]
    grads = []
    for level, (feature, scale) in enumerate(zip(features, spatial_scales)):
        idx = torch.where(levels == level)[0]
        if idx.numel() == 0:
            grads.append(torch.zeros_like(feature))
            continue
        grads.append(roi_align_backward(grad_flat[idx], feature, flat[idx], scale, sampling_ratio, aligned, mode))
    return grads


def multilevel_roi_pool(
    rois: Tensor, features: Sequence[Tensor], spatial_scales: Sequence[float], output_size: int | Sequence[int],
    canonical_scale: float = 224.0, canonical_level: int = 4,
) -> Tensor:
    """RoIPool with the multilevel RoIAlign's level rule (for the RoIAlign-vs-RoIPool ablation).

    rois [B,R,4] image pixels, features: L maps [B,C,H_l,W_l] -> [B,R,C,ph,pw].
    """
    flat = _batched_rois(rois)
    _check_features(rois, features, spatial_scales)
    b, r, _ = rois.shape
    channels = features[0].shape[1]
    size = _pair(output_size)
    k_min, k_max = _levels_from_scales(spatial_scales)
    levels = fpn_level(rois.reshape(b * r, 4), k_min, k_max, canonical_scale, canonical_level) - k_min
    pooled = _multilevel_pool(flat, features, spatial_scales, levels, size, roi_pool)
    return pooled.view(b, r, channels, *size)
