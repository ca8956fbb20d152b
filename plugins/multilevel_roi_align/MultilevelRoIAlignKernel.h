// MultilevelRoIAlign: host-side interface of the CUDA kernel (no TensorRT headers).
//
// The contract is plugins/README.md (machine-readable: plugins/multilevel_roi_align.json).
// Tensors are NCHW-contiguous:
//   rois      [B, R, 4]          x1, y1, x2, y2 in input-image pixels
//   features  L x [B, C, H_l, W_l]  finest level first (P2..P5)
//   output    [B, R, C, outputHeight, outputWidth]
// T is float or __half; every sum and interpolation is done in float.
#pragma once

#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace maskrt
{

//! The most feature levels one op pools from (P2..P6).
constexpr int32_t kMaxFeatureLevels = 5;
//! Adaptive sampling (sampling_ratio 0) takes at most this many samples per bin side (contract:
//! plugins/README.md). Bounds the work per output: TensorRT times the plugin on arbitrary data.
constexpr int32_t kAdaptiveGridMax = 64;

//! Everything the kernel needs besides the pointers; plain data, passed to the kernel by value.
struct MultilevelRoIAlignParams
{
    int32_t batchSize{0};    //!< B
    int32_t numRois{0};      //!< R (per image; may be 0)
    int32_t channels{0};     //!< C
    int32_t outputHeight{7}; //!< bins along y
    int32_t outputWidth{7};  //!< bins along x
    int32_t samplingRatio{2}; //!< samples per bin side; 0 = adaptive (ceil(roi_size / bins))
    int32_t aligned{0};       //!< 1 = half-pixel offset (ROIAlignV2); 0 = torchvision legacy
    int32_t mode{0};          //!< 0 = average, 1 = maximum
    int32_t numLevels{4};     //!< L, 1..kMaxFeatureLevels
    int32_t firstLevel{2};    //!< k_min = round(-log2(spatialScales[0]))
    int32_t canonicalLevel{4};   //!< k0 of the FPN level rule
    float canonicalScale{224.F}; //!< s0 of the FPN level rule
    int32_t heights[kMaxFeatureLevels]{};  //!< H_l
    int32_t widths[kMaxFeatureLevels]{};   //!< W_l
    float spatialScales[kMaxFeatureLevels]{}; //!< feature size / input size per level
};

//! Launches the pooling of all B*R RoIs on `stream`. `features` is a host array of L device
//! pointers. Returns cudaErrorInvalidValue for bad parameters, else the launch's error.
//! Launches nothing (and succeeds) when the output is empty (B*R*C == 0).
template <typename T>
cudaError_t multilevelRoIAlignForward(MultilevelRoIAlignParams const& params, T const* rois,
    T const* const* features, T* output, cudaStream_t stream);

//! Checks params for what the kernel relies on; returns nullptr when valid, else a message.
char const* validateMultilevelRoIAlignParams(MultilevelRoIAlignParams const& params);

} // namespace maskrt
