// MultilevelRoIAlign: the per-output-element computation, templated on the storage type
// (float or __half), accumulating in float.
//
// Every function here is __host__ __device__: the CUDA kernel calls them per thread, and
// MultilevelRoIAlignKernel.cu also runs them in a plain host loop so that tests on machines
// without a GPU check the very arithmetic the kernel executes. The rules (level mapping,
// sample grid, bilinear) are torchvision's roi_align / LevelMapper, written down in
// plugins/README.md; the statement order follows torchvision's so float rounding matches.
#pragma once

#include "MultilevelRoIAlignKernel.h"

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MASKRT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MASKRT_HOST_DEVICE inline
#endif

namespace maskrt
{

//! The L feature-map base pointers, passed to the kernel by value.
template <typename T>
struct FeatureLevels
{
    T const* data[kMaxFeatureLevels];
};

namespace detail
{

MASKRT_HOST_DEVICE float toFloat(float value)
{
    return value;
}

MASKRT_HOST_DEVICE float toFloat(__half value)
{
    return __half2float(value);
}

MASKRT_HOST_DEVICE void storeFloat(float* destination, float value)
{
    *destination = value;
}

MASKRT_HOST_DEVICE void storeFloat(__half* destination, float value)
{
    *destination = __float2half(value); // round to nearest even
}

//! Index into the feature inputs (0..L-1) of the RoI (x1, y1, x2, y2): torchvision's LevelMapper,
//! k = floor(k0 + log2(sqrt(area) / s0) + 1e-6) clamped to [k_min, k_max], minus k_min, with
//! torchvision's area (x2-x1)*(y2-y1): a RoI inverted on both axes has a positive area and a level
//! by its size. An area <= 0 (zero or one-axis-inverted; torchvision: NaN) is taken as 0, and
//! log2(0) = -inf clamps to k_min; a NaN area also (fmaxf returns the non-NaN operand).
MASKRT_HOST_DEVICE int32_t roiLevelIndex(
    float x1, float y1, float x2, float y2, MultilevelRoIAlignParams const& params)
{
    float const area = fmaxf((x2 - x1) * (y2 - y1), 0.F);
    float const level
        = floorf(static_cast<float>(params.canonicalLevel) + log2f(sqrtf(area) / params.canonicalScale) + 1e-6F);
    float const minLevel = static_cast<float>(params.firstLevel);
    float const maxLevel = static_cast<float>(params.firstLevel + params.numLevels - 1);
    float const clamped = fminf(fmaxf(level, minLevel), maxLevel);
    return static_cast<int32_t>(clamped) - params.firstLevel;
}

//! torchvision's bilinear rule on one H x W plane: 0 outside [-1, H] x [-1, W], coordinates
//! clamped at 0 and at the last row/column. Reads only the four neighbours.
template <typename T>
MASKRT_HOST_DEVICE float bilinearSample(T const* __restrict__ plane, int32_t height, int32_t width, float y, float x)
{
    // Written as "not inside" so that a NaN coordinate also gives 0 (and never reaches the
    // float-to-int conversion below, which is undefined for NaN).
    bool const inside = y >= -1.F && y <= static_cast<float>(height) && x >= -1.F && x <= static_cast<float>(width);
    if (!inside || height <= 0 || width <= 0)
    {
        return 0.F;
    }
    y = fmaxf(y, 0.F);
    x = fmaxf(x, 0.F);
    int32_t yLow = static_cast<int32_t>(y);
    int32_t xLow = static_cast<int32_t>(x);
    int32_t yHigh;
    int32_t xHigh;
    if (yLow >= height - 1)
    {
        yHigh = yLow = height - 1;
        y = static_cast<float>(yLow);
    }
    else
    {
        yHigh = yLow + 1;
    }
    if (xLow >= width - 1)
    {
        xHigh = xLow = width - 1;
        x = static_cast<float>(xLow);
    }
    else
    {
        xHigh = xLow + 1;
    }
    float const ly = y - static_cast<float>(yLow);
    float const lx = x - static_cast<float>(xLow);
    float const hy = 1.F - ly;
    float const hx = 1.F - lx;
    float const w1 = hy * hx;
    float const w2 = hy * lx;
    float const w3 = ly * hx;
    float const w4 = ly * lx;
    float const v1 = toFloat(plane[static_cast<int64_t>(yLow) * width + xLow]);
    float const v2 = toFloat(plane[static_cast<int64_t>(yLow) * width + xHigh]);
    float const v3 = toFloat(plane[static_cast<int64_t>(yHigh) * width + xLow]);
    float const v4 = toFloat(plane[static_cast<int64_t>(yHigh) * width + xHigh]);
    return w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4;
}

//! Adaptive sample count along one side: min(ceil(bin size), kAdaptiveGridMax). A bin of size <= 0
//! or NaN has no samples (torchvision gets 0 there too, through an empty loop). The cap is the
//! contract's: it bounds the work of one output (TensorRT times the plugin on arbitrary data).
MASKRT_HOST_DEVICE int32_t adaptiveGrid(float binSize)
{
    return binSize > 0.F ? static_cast<int32_t>(fminf(ceilf(binSize), static_cast<float>(kAdaptiveGridMax))) : 0;
}

//! The value of output element `index` of the [B, R, C, outputHeight, outputWidth] output,
//! as float. Reads the RoI's four coordinates and only the feature cells its samples touch.
template <typename T>
MASKRT_HOST_DEVICE float poolOutputElement(MultilevelRoIAlignParams const& params, T const* __restrict__ rois,
    FeatureLevels<T> const& features, int64_t index)
{
    int32_t const pw = static_cast<int32_t>(index % params.outputWidth);
    int32_t const ph = static_cast<int32_t>((index / params.outputWidth) % params.outputHeight);
    int64_t const planeIndex = index / (static_cast<int64_t>(params.outputWidth) * params.outputHeight);
    int32_t const channel = static_cast<int32_t>(planeIndex % params.channels);
    int64_t const roiIndex = planeIndex / params.channels; // b * R + r
    int64_t const image = roiIndex / params.numRois;

    T const* roi = rois + roiIndex * 4;
    float const x1 = toFloat(roi[0]);
    float const y1 = toFloat(roi[1]);
    float const x2 = toFloat(roi[2]);
    float const y2 = toFloat(roi[3]);

    if (!(isfinite(x1) && isfinite(y1) && isfinite(x2) && isfinite(y2)))
    {
        // A corrupt RoI (NaN or infinite corner) pools nothing. torchvision has no rule here;
        // following its arithmetic would mean an endless adaptive grid for an infinite RoI.
        return 0.F;
    }
    int32_t const level = roiLevelIndex(x1, y1, x2, y2, params);
    float const scale = params.spatialScales[level];
    int32_t const height = params.heights[level];
    int32_t const width = params.widths[level];
    T const* plane = features.data[level] + (image * params.channels + channel) * static_cast<int64_t>(height) * width;

    float const offset = params.aligned ? 0.5F : 0.F;
    float const roiStartW = x1 * scale - offset;
    float const roiStartH = y1 * scale - offset;
    float const roiEndW = x2 * scale - offset;
    float const roiEndH = y2 * scale - offset;
    float roiWidth = roiEndW - roiStartW;
    float roiHeight = roiEndH - roiStartH;
    if (!params.aligned)
    {
        // Legacy mode: malformed (tiny or inverted) RoIs are forced to 1x1 feature cells.
        roiWidth = fmaxf(roiWidth, 1.F);
        roiHeight = fmaxf(roiHeight, 1.F);
    }
    float const binHeight = roiHeight / static_cast<float>(params.outputHeight);
    float const binWidth = roiWidth / static_cast<float>(params.outputWidth);
    int32_t const gridH = params.samplingRatio > 0 ? params.samplingRatio : adaptiveGrid(binHeight);
    int32_t const gridW = params.samplingRatio > 0 ? params.samplingRatio : adaptiveGrid(binWidth);
    bool const hasSamples = gridH > 0 && gridW > 0;

    float sum = 0.F;
    float maximum = -INFINITY;
    for (int32_t iy = 0; iy < gridH; ++iy)
    {
        float const y = roiStartH + static_cast<float>(ph) * binHeight
            + static_cast<float>(iy + .5F) * binHeight / static_cast<float>(gridH);
        for (int32_t ix = 0; ix < gridW; ++ix)
        {
            float const x = roiStartW + static_cast<float>(pw) * binWidth
                + static_cast<float>(ix + .5F) * binWidth / static_cast<float>(gridW);
            float const value = bilinearSample(plane, height, width, y, x);
            sum += value;
            maximum = fmaxf(maximum, value);
        }
    }
    if (params.mode == 1)
    {
        return hasSamples ? maximum : 0.F;
    }
    int64_t const count = hasSamples ? static_cast<int64_t>(gridH) * gridW : 1;
    return sum / static_cast<float>(count);
}

} // namespace detail
} // namespace maskrt
