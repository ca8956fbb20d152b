/*
 * MultilevelRoIAlignCpu.h: the CPU twin of the maskrt::MultilevelRoIAlign TensorRT plugin.
 *
 * Plain C++17, no CUDA, no TensorRT, no ONNX Runtime headers. It implements the contract in
 * plugins/README.md (machine-readable: plugins/multilevel_roi_align.json) independently of the
 * CUDA kernel, so that a GPU test compares two implementations written apart. Callers:
 *   - maskrt.plugins.cpu (ctypes) for the Python reference and ONNX Runtime's Python fallback;
 *   - MultilevelRoIAlignOrt.cpp, the native ONNX Runtime custom-op library.
 *
 * The entry point has C linkage and returns an error code instead of throwing.
 */
#ifndef MASKRT_MULTILEVEL_ROI_ALIGN_CPU_H
#define MASKRT_MULTILEVEL_ROI_ALIGN_CPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes of maskrt_multilevel_roi_align_cpu; maskrt_cpu_error_string names each. */
enum MaskrtCpuStatus {
  MASKRT_CPU_OK = 0,
  MASKRT_CPU_NULL_POINTER = 1,      /* a required pointer is NULL */
  MASKRT_CPU_BAD_SHAPE = 2,         /* negative B/R/C, H or W < 1, levels not in 1..5 */
  MASKRT_CPU_BAD_OUTPUT_SIZE = 3,   /* output_height or output_width < 1 */
  MASKRT_CPU_BAD_SCALES = 4,        /* spatial_scales not positive powers of two halving per level */
  MASKRT_CPU_BAD_ATTRIBUTE = 5,     /* aligned or mode not 0/1, canonical_scale <= 0 */
  MASKRT_CPU_BAD_DTYPE = 6,         /* dtype not MASKRT_CPU_FLOAT32 / MASKRT_CPU_FLOAT16 */
  MASKRT_CPU_OUT_OF_MEMORY = 7,
  MASKRT_CPU_BAD_LEVEL_ORDER = 8    /* a map is not half the previous one in H or W (rounded either way) */
};

/* Element type of every tensor of one call (rois, features and output share it). */
enum MaskrtCpuDtype {
  MASKRT_CPU_FLOAT32 = 0,
  MASKRT_CPU_FLOAT16 = 1 /* IEEE binary16 as uint16 bits; computed in float32 */
};

/*
 * Pools every RoI from the FPN level its area selects.
 *
 * rois            [batch, num_rois, 4] x1, y1, x2, y2 in input-image pixels
 * features        num_levels pointers; level l is [batch, channels, heights[l], widths[l]]
 * heights, widths num_levels map sizes
 * spatial_scales  num_levels scales, finest first (e.g. 0.25, 0.125, 0.0625, 0.03125)
 * sampling_ratio  samples per bin side; <= 0 = adaptive (ceil(roi size / output size))
 * aligned         0 = torchvision legacy, 1 = half-pixel offset
 * mode            0 = average, 1 = maximum
 * output          [batch, num_rois, channels, output_height, output_width]
 * Returns MASKRT_CPU_OK or an error code; on error the output is untouched.
 */
int maskrt_multilevel_roi_align_cpu(const void* rois, const void* const* features, const int64_t* heights,
                                    const int64_t* widths, int32_t num_levels, int64_t batch, int64_t num_rois,
                                    int64_t channels, const float* spatial_scales, int32_t output_height,
                                    int32_t output_width, int32_t sampling_ratio, int32_t aligned,
                                    float canonical_scale, int32_t canonical_level, int32_t mode, int32_t dtype,
                                    void* output);

/* A static, human-readable name for an error code. */
const char* maskrt_cpu_error_string(int code);

/* The FPN level index (0-based feature input) the contract's level rule picks for one RoI. */
int32_t maskrt_cpu_roi_level(float x1, float y1, float x2, float y2, const float* spatial_scales,
                             int32_t num_levels, float canonical_scale, int32_t canonical_level);

#ifdef __cplusplus
}
#endif

#endif /* MASKRT_MULTILEVEL_ROI_ALIGN_CPU_H */
