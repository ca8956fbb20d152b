// MultilevelRoIAlign: the CUDA kernel, its launcher, and a C ABI for ctypes
// (libmaskrt_kernels.so: the GPU test harness bench/gpu_kernel.py and the host-emulation tests).
// Needs no TensorRT header.
#include "MultilevelRoIAlignKernel.cuh"

#include <algorithm>
#include <cmath>
#include <cstdlib>

namespace maskrt
{
namespace
{

constexpr int32_t kThreadsPerBlock = 256;
// Grid-stride loop: beyond this many blocks each thread handles several outputs.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

//! One thread per output element (grid-stride), consecutive threads along output_width so
//! neighbouring threads write neighbouring outputs and sample neighbouring feature cells.
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock) multilevelRoIAlignKernel(MultilevelRoIAlignParams params,
    T const* __restrict__ rois, FeatureLevels<T> features, T* __restrict__ output, int64_t total)
{
    int64_t const stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
    for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total; index += stride)
    {
        detail::storeFloat(output + index, detail::poolOutputElement(params, rois, features, index));
    }
}

int64_t outputElementCount(MultilevelRoIAlignParams const& params)
{
    return static_cast<int64_t>(params.batchSize) * params.numRois * params.channels * params.outputHeight
        * params.outputWidth;
}

bool isPowerOfTwo(float value)
{
    int exponent = 0;
    return value > 0.F && std::frexp(value, &exponent) == 0.5F;
}

} // namespace

char const* validateMultilevelRoIAlignParams(MultilevelRoIAlignParams const& params)
{
    if (params.batchSize < 0 || params.numRois < 0 || params.channels < 0)
    {
        return "batch size, RoI count and channel count must be >= 0";
    }
    if (params.outputHeight < 1 || params.outputWidth < 1)
    {
        return "output_height and output_width must be >= 1";
    }
    if (params.samplingRatio < 0)
    {
        return "sampling_ratio must be >= 0 (0 = adaptive)";
    }
    if (params.aligned != 0 && params.aligned != 1)
    {
        return "aligned must be 0 or 1";
    }
    if (params.mode != 0 && params.mode != 1)
    {
        return "mode must be 0 (avg) or 1 (max)";
    }
    if (params.numLevels < 1 || params.numLevels > kMaxFeatureLevels)
    {
        return "the number of feature levels must be 1..5";
    }
    if (!(params.canonicalScale > 0.F) || !std::isfinite(params.canonicalScale))
    {
        return "canonical_scale must be a finite number > 0";
    }
    for (int32_t level = 0; level < params.numLevels; ++level)
    {
        if (!isPowerOfTwo(params.spatialScales[level]))
        {
            return "each spatial scale must be a power of two";
        }
        if (level > 0 && params.spatialScales[level] * 2.F != params.spatialScales[level - 1])
        {
            return "spatial scales must halve from one level to the next (consecutive FPN levels)";
        }
        if (params.heights[level] < 0 || params.widths[level] < 0)
        {
            return "feature map sizes must be >= 0";
        }
        // Level order: each map half the previous one (rounded either way), as the scales say.
        // Maps in another order would pool silently from the wrong level.
        if (level > 0
            && (std::abs(2 * static_cast<int64_t>(params.heights[level]) - params.heights[level - 1]) > 1
                || std::abs(2 * static_cast<int64_t>(params.widths[level]) - params.widths[level - 1]) > 1))
        {
            return "feature maps must be finest first, each half the previous one in H and W (rounded either way), "
                   "as spatial_scales say";
        }
    }
    if (params.firstLevel != static_cast<int32_t>(std::lround(-std::log2(params.spatialScales[0]))))
    {
        return "firstLevel must be round(-log2(spatial_scales[0]))";
    }
    return nullptr;
}

template <typename T>
cudaError_t multilevelRoIAlignForward(MultilevelRoIAlignParams const& params, T const* rois,
    T const* const* features, T* output, cudaStream_t stream)
{
    if (validateMultilevelRoIAlignParams(params) != nullptr)
    {
        return cudaErrorInvalidValue;
    }
    int64_t const total = outputElementCount(params);
    if (total == 0)
    {
        return cudaSuccess; // R == 0 (no RoIs) is legal: nothing to write.
    }
    FeatureLevels<T> levels{};
    for (int32_t level = 0; level < params.numLevels; ++level)
    {
        levels.data[level] = features[level];
    }
    int64_t const blocks = std::min((total + kThreadsPerBlock - 1) / kThreadsPerBlock, kMaxBlocks);
    multilevelRoIAlignKernel<T>
        <<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(params, rois, levels, output, total);
    return cudaGetLastError();
}

template cudaError_t multilevelRoIAlignForward<float>(
    MultilevelRoIAlignParams const&, float const*, float const* const*, float*, cudaStream_t);
template cudaError_t multilevelRoIAlignForward<__half>(
    MultilevelRoIAlignParams const&, __half const*, __half const* const*, __half*, cudaStream_t);

} // namespace maskrt

// ---- C ABI for ctypes ------------------------------------------------------------------------
namespace
{

maskrt::MultilevelRoIAlignParams makeParams(int32_t batchSize, int32_t numRois, int32_t channels,
    int32_t outputHeight, int32_t outputWidth, int32_t samplingRatio, int32_t aligned, int32_t mode, int32_t numLevels,
    int32_t const* heights, int32_t const* widths, float const* spatialScales, float canonicalScale,
    int32_t canonicalLevel)
{
    maskrt::MultilevelRoIAlignParams params;
    params.batchSize = batchSize;
    params.numRois = numRois;
    params.channels = channels;
    params.outputHeight = outputHeight;
    params.outputWidth = outputWidth;
    params.samplingRatio = samplingRatio;
    params.aligned = aligned;
    params.mode = mode;
    params.numLevels = numLevels;
    params.canonicalScale = canonicalScale;
    params.canonicalLevel = canonicalLevel;
    int32_t const count = std::min(std::max(numLevels, 0), maskrt::kMaxFeatureLevels);
    for (int32_t level = 0; level < count; ++level)
    {
        params.heights[level] = heights[level];
        params.widths[level] = widths[level];
        params.spatialScales[level] = spatialScales[level];
    }
    params.firstLevel = count > 0 && spatialScales[0] > 0.F
        ? static_cast<int32_t>(std::lround(-std::log2(spatialScales[0])))
        : 0;
    return params;
}

template <typename T>
void hostEmulation(maskrt::MultilevelRoIAlignParams const& params, T const* rois, T const* const* features, T* output)
{
    maskrt::FeatureLevels<T> levels{};
    for (int32_t level = 0; level < params.numLevels; ++level)
    {
        levels.data[level] = features[level];
    }
    int64_t const total = static_cast<int64_t>(params.batchSize) * params.numRois * params.channels
        * params.outputHeight * params.outputWidth;
    for (int64_t index = 0; index < total; ++index)
    {
        maskrt::detail::storeFloat(output + index, maskrt::detail::poolOutputElement(params, rois, levels, index));
    }
}

} // namespace

#define MASKRT_PARAM_LIST                                                                                              \
    int32_t batchSize, int32_t numRois, int32_t channels, int32_t outputHeight, int32_t outputWidth,                   \
        int32_t samplingRatio, int32_t aligned, int32_t mode, int32_t numLevels, int32_t const *heights,               \
        int32_t const *widths, float const *spatialScales, float canonicalScale, int32_t canonicalLevel
#define MASKRT_PARAM_NAMES                                                                                             \
    batchSize, numRois, channels, outputHeight, outputWidth, samplingRatio, aligned, mode, numLevels, heights, widths, \
        spatialScales, canonicalScale, canonicalLevel

extern "C"
{

//! Launches the kernel on device pointers. dtype: 0 = float32, 1 = float16. stream may be null.
//! Returns a cudaError_t (0 = success; 1 = cudaErrorInvalidValue for bad parameters).
__attribute__((visibility("default"))) int32_t maskrt_multilevel_roi_align_forward(int32_t dtype,
    void const* rois, void const* const* features, void* output, MASKRT_PARAM_LIST, void* stream)
{
    maskrt::MultilevelRoIAlignParams const params = makeParams(MASKRT_PARAM_NAMES);
    auto const cudaStream = static_cast<cudaStream_t>(stream);
    if (dtype == 0)
    {
        return maskrt::multilevelRoIAlignForward<float>(params, static_cast<float const*>(rois),
            reinterpret_cast<float const* const*>(features), static_cast<float*>(output), cudaStream);
    }
    if (dtype == 1)
    {
        return maskrt::multilevelRoIAlignForward<__half>(params, static_cast<__half const*>(rois),
            reinterpret_cast<__half const* const*>(features), static_cast<__half*>(output), cudaStream);
    }
    return cudaErrorInvalidValue;
}

//! Runs the kernel's own per-element code in a host loop on host pointers (no GPU needed):
//! what the tests use to check the kernel arithmetic on machines without a GPU.
//! Returns 0, or 1 (cudaErrorInvalidValue) for bad parameters or dtype.
__attribute__((visibility("default"))) int32_t maskrt_multilevel_roi_align_host_emulation(int32_t dtype,
    void const* rois, void const* const* features, void* output, MASKRT_PARAM_LIST)
{
    maskrt::MultilevelRoIAlignParams const params = makeParams(MASKRT_PARAM_NAMES);
    if (maskrt::validateMultilevelRoIAlignParams(params) != nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (dtype == 0)
    {
        hostEmulation<float>(params, static_cast<float const*>(rois), reinterpret_cast<float const* const*>(features),
            static_cast<float*>(output));
        return cudaSuccess;
    }
    if (dtype == 1)
    {
        hostEmulation<__half>(params, static_cast<__half const*>(rois),
            reinterpret_cast<__half const* const*>(features), static_cast<__half*>(output));
        return cudaSuccess;
    }
    return cudaErrorInvalidValue;
}

//! The validation message for these parameters, or null when they are valid.
__attribute__((visibility("default"))) char const* maskrt_multilevel_roi_align_check(MASKRT_PARAM_LIST)
{
    return maskrt::validateMultilevelRoIAlignParams(makeParams(MASKRT_PARAM_NAMES));
}

} // extern "C"
