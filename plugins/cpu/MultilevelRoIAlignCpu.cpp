// MultilevelRoIAlignCpu.cpp: plain C++ implementation of maskrt::MultilevelRoIAlign (see the header).
//
// Written from the contract (plugins/README.md), not from the CUDA kernel, so the two can check
// each other. Arithmetic is float32 throughout, in the order torchvision's RoIAlign uses, so the
// results match the PyTorch graph op to float32 rounding. Single-threaded on purpose: it is a
// reference and a CI fallback, and the machines it runs on are shared.
#include "MultilevelRoIAlignCpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

namespace {

constexpr int32_t kMaxLevels = 5;
// Adaptive sampling takes at most this many samples per bin side (the contract's cap).
constexpr int64_t kAdaptiveGridMax = 64;

// ---- IEEE binary16 <-> float32, round to nearest even (no dependency on compiler _Float16) ----

float half_bits_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0) {
    // zero or subnormal: mantissa * 2^-24, exact in float32
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  uint32_t out;
  if (exponent == 31) {
    out = sign | 0x7f800000u | (mantissa << 13);  // inf or NaN (payload kept)
  } else {
    out = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &out, sizeof value);
  return value;
}

uint16_t float_to_half_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // inf stays inf, NaN stays a (quiet) NaN
    return sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u);
  }
  if (magnitude >= 0x477ff000u) {  // >= 65520: past the largest half (65504) by half an ulp
    return sign | 0x7c00u;
  }
  if (magnitude < 0x38800000u) {  // below 2^-14: a half subnormal (or zero)
    float absolute;
    std::memcpy(&absolute, &magnitude, sizeof absolute);
    // scaling by 2^24 is exact; nearbyint rounds to nearest even; 0x400 becomes the smallest normal
    return sign | static_cast<uint16_t>(std::nearbyint(absolute * 16777216.0f));
  }
  const uint32_t exponent = (magnitude >> 23) - 127 + 15;
  const uint32_t mantissa = magnitude & 0x7fffffu;
  uint32_t half = (exponent << 10) | (mantissa >> 13);
  const uint32_t dropped = mantissa & 0x1fffu;
  if (dropped > 0x1000u || (dropped == 0x1000u && (half & 1u))) {
    half += 1;  // a carry into the exponent is the correct rounding
  }
  return sign | static_cast<uint16_t>(half);
}

// ---- validation ----

bool is_power_of_two(float scale) {
  int exponent = 0;
  return std::isfinite(scale) && scale > 0.0f && std::frexp(scale, &exponent) == 0.5f;
}

int validate_scales(const float* spatial_scales, int32_t num_levels) {
  for (int32_t level = 0; level < num_levels; ++level) {
    if (!is_power_of_two(spatial_scales[level])) return MASKRT_CPU_BAD_SCALES;
    // consecutive FPN levels: the level rule indexes feature input k - k_min
    if (level > 0 && spatial_scales[level] != spatial_scales[level - 1] * 0.5f) return MASKRT_CPU_BAD_SCALES;
  }
  return MASKRT_CPU_OK;
}

// ---- the op, float32 ----

// One axis of the sampling grid of one RoI: for each (bin, sample) the two neighbouring cells and
// the weight of the upper one. The bilinear rule is separable, so x and y are precomputed apart
// and shared by all channels.
struct AxisSamples {
  std::vector<int64_t> low, high;
  std::vector<float> upper_weight;  // l = coordinate - low; the low cell gets 1 - l
  std::vector<char> inside;         // 0: the sample lies outside [-1, size] and counts as 0
};

// bins bins of bin_size starting at start, grid samples per bin, on a map side of size cells.
void sample_axis(float start, float bin_size, int32_t bins, int64_t grid, int64_t size, AxisSamples& axis) {
  const size_t count = static_cast<size_t>(bins) * static_cast<size_t>(grid);
  axis.low.assign(count, 0);
  axis.high.assign(count, 0);
  axis.upper_weight.assign(count, 0.0f);
  axis.inside.assign(count, 0);
  const float size_f = static_cast<float>(size);
  for (int32_t bin = 0; bin < bins; ++bin) {
    for (int64_t sample = 0; sample < grid; ++sample) {
      const size_t slot = static_cast<size_t>(bin) * static_cast<size_t>(grid) + static_cast<size_t>(sample);
      // torchvision's order of operations: start + bin*size + (i + 0.5)*size/grid
      float coordinate = start + static_cast<float>(bin) * bin_size +
                         (static_cast<float>(sample) + 0.5f) * bin_size / static_cast<float>(grid);
      // written as a negated range test so that NaN counts as outside
      if (!(coordinate >= -1.0f && coordinate <= size_f)) continue;
      if (coordinate <= 0.0f) coordinate = 0.0f;
      int64_t low = static_cast<int64_t>(coordinate);
      int64_t high;
      if (low >= size - 1) {
        low = high = size - 1;
        coordinate = static_cast<float>(low);
      } else {
        high = low + 1;
      }
      axis.low[slot] = low;
      axis.high[slot] = high;
      axis.upper_weight[slot] = coordinate - static_cast<float>(low);
      axis.inside[slot] = 1;
    }
  }
}

// Samples per bin side: fixed, or adaptive min(ceil(roi_size / bins), kAdaptiveGridMax). A NaN or
// negative size gives 0 samples (torchvision would give a bin of 0 too: no sample runs).
int64_t grid_size(int32_t sampling_ratio, float roi_size, int32_t bins) {
  if (sampling_ratio > 0) return sampling_ratio;
  const float adaptive = std::ceil(roi_size / static_cast<float>(bins));
  if (!(adaptive >= 0.0f)) return 0;
  if (adaptive > static_cast<float>(kAdaptiveGridMax)) return kAdaptiveGridMax;
  return static_cast<int64_t>(adaptive);
}

struct Problem {
  const float* rois;
  const float* features[kMaxLevels];
  int64_t heights[kMaxLevels];
  int64_t widths[kMaxLevels];
  const float* spatial_scales;
  int32_t num_levels;
  int64_t batch, num_rois, channels;
  int32_t output_height, output_width, sampling_ratio, aligned, mode, canonical_level;
  float canonical_scale;
};

void pool_one_roi(const Problem& p, int64_t image, int64_t roi, AxisSamples& ys, AxisSamples& xs, float* out) {
  const float* box = p.rois + (image * p.num_rois + roi) * 4;
  // Contract: a RoI with a NaN or infinite coordinate gives 0 everywhere (its adaptive grid
  // would otherwise be unbounded).
  if (!(std::isfinite(box[0]) && std::isfinite(box[1]) && std::isfinite(box[2]) && std::isfinite(box[3]))) {
    std::fill(out, out + p.channels * p.output_height * p.output_width, 0.0f);
    return;
  }
  const int32_t level = maskrt_cpu_roi_level(box[0], box[1], box[2], box[3], p.spatial_scales, p.num_levels,
                                             p.canonical_scale, p.canonical_level);
  const float scale = p.spatial_scales[level];
  const int64_t height = p.heights[level];
  const int64_t width = p.widths[level];
  const float offset = p.aligned ? 0.5f : 0.0f;

  const float start_x = box[0] * scale - offset;
  const float start_y = box[1] * scale - offset;
  float roi_width = (box[2] * scale - offset) - start_x;
  float roi_height = (box[3] * scale - offset) - start_y;
  if (!p.aligned) {  // legacy mode: a RoI is at least one feature cell
    roi_width = std::fmax(roi_width, 1.0f);
    roi_height = std::fmax(roi_height, 1.0f);
  }
  const float bin_height = roi_height / static_cast<float>(p.output_height);
  const float bin_width = roi_width / static_cast<float>(p.output_width);
  const int64_t grid_h = grid_size(p.sampling_ratio, roi_height, p.output_height);
  const int64_t grid_w = grid_size(p.sampling_ratio, roi_width, p.output_width);
  const int64_t samples = grid_h * grid_w;
  const float count = static_cast<float>(samples > 1 ? samples : 1);

  sample_axis(start_y, bin_height, p.output_height, grid_h, height, ys);
  sample_axis(start_x, bin_width, p.output_width, grid_w, width, xs);

  const int64_t plane = height * width;
  const float* level_map = p.features[level] + image * p.channels * plane;
  for (int64_t channel = 0; channel < p.channels; ++channel) {
    const float* map = level_map + channel * plane;
    float* out_channel = out + channel * static_cast<int64_t>(p.output_height) * p.output_width;
    for (int32_t bin_y = 0; bin_y < p.output_height; ++bin_y) {
      for (int32_t bin_x = 0; bin_x < p.output_width; ++bin_x) {
        float sum = 0.0f;
        float maximum = -std::numeric_limits<float>::infinity();
        for (int64_t iy = 0; iy < grid_h; ++iy) {
          const size_t sy = static_cast<size_t>(bin_y * grid_h + iy);
          const float ly = ys.upper_weight[sy];
          const float hy = 1.0f - ly;
          const float* row_low = map + ys.low[sy] * width;
          const float* row_high = map + ys.high[sy] * width;
          for (int64_t ix = 0; ix < grid_w; ++ix) {
            const size_t sx = static_cast<size_t>(bin_x * grid_w + ix);
            float value = 0.0f;
            if (ys.inside[sy] && xs.inside[sx]) {
              const float lx = xs.upper_weight[sx];
              const float hx = 1.0f - lx;
              const int64_t xl = xs.low[sx];
              const int64_t xh = xs.high[sx];
              value = (hy * hx) * row_low[xl] + (hy * lx) * row_low[xh] + (ly * hx) * row_high[xl] +
                      (ly * lx) * row_high[xh];
            }
            sum += value;
            if (value > maximum) maximum = value;
          }
        }
        float result;
        if (p.mode == 0) {
          result = sum / count;
        } else {
          result = samples > 0 ? maximum : 0.0f;  // a bin with no samples is 0
        }
        out_channel[bin_y * p.output_width + bin_x] = result;
      }
    }
  }
}

void run_float32(const Problem& p, float* output) {
  AxisSamples ys, xs;  // reused across RoIs: no allocation per RoI once grown
  const int64_t roi_stride = p.channels * static_cast<int64_t>(p.output_height) * p.output_width;
  for (int64_t image = 0; image < p.batch; ++image) {
    for (int64_t roi = 0; roi < p.num_rois; ++roi) {
      pool_one_roi(p, image, roi, ys, xs, output + (image * p.num_rois + roi) * roi_stride);
    }
  }
}

std::vector<float> widen(const void* data, int64_t count) {
  std::vector<float> out(static_cast<size_t>(count));
  const uint16_t* bits = static_cast<const uint16_t*>(data);
  for (int64_t i = 0; i < count; ++i) out[static_cast<size_t>(i)] = half_bits_to_float(bits[i]);
  return out;
}

}  // namespace

extern "C" const char* maskrt_cpu_error_string(int code) {
  switch (code) {
    case MASKRT_CPU_OK: return "ok";
    case MASKRT_CPU_NULL_POINTER: return "a required pointer is NULL";
    case MASKRT_CPU_BAD_SHAPE: return "bad shape: B, R, C must be >= 0, every map H, W >= 1, levels 1..5";
    case MASKRT_CPU_BAD_OUTPUT_SIZE: return "output_height and output_width must be >= 1";
    case MASKRT_CPU_BAD_SCALES:
      return "spatial_scales must be positive powers of two, each half the previous (finest first)";
    case MASKRT_CPU_BAD_ATTRIBUTE: return "aligned and mode must be 0 or 1, canonical_scale > 0";
    case MASKRT_CPU_BAD_DTYPE: return "dtype must be 0 (float32) or 1 (float16)";
    case MASKRT_CPU_OUT_OF_MEMORY: return "out of memory";
    case MASKRT_CPU_BAD_LEVEL_ORDER:
      return "feature maps must be finest first, each half the previous one in H and W (rounded either way), "
             "as spatial_scales say";
    default: return "unknown error code";
  }
}

extern "C" int32_t maskrt_cpu_roi_level(float x1, float y1, float x2, float y2, const float* spatial_scales,
                                        int32_t num_levels, float canonical_scale, int32_t canonical_level) {
  // torchvision's area (x2-x1)*(y2-y1): inverted on both axes is positive; <= 0 or NaN -> 0 (-> k_min)
  const float signed_area = (x2 - x1) * (y2 - y1);
  const float area = signed_area > 0.0f ? signed_area : 0.0f;
  // torchvision LevelMapper in float32: floor(k0 + log2(sqrt(area) / s0) + eps); area 0 -> -inf
  const float k = std::floor(static_cast<float>(canonical_level) + std::log2(std::sqrt(area) / canonical_scale) +
                             1e-6f);
  const long k_min = std::lround(-std::log2(static_cast<double>(spatial_scales[0])));
  const long k_max = std::lround(-std::log2(static_cast<double>(spatial_scales[num_levels - 1])));
  long clamped;
  if (!(k >= static_cast<float>(k_min))) {  // also -inf and NaN
    clamped = k_min;
  } else if (k > static_cast<float>(k_max)) {
    clamped = k_max;
  } else {
    clamped = static_cast<long>(k);
  }
  return static_cast<int32_t>(clamped - k_min);
}

extern "C" int maskrt_multilevel_roi_align_cpu(const void* rois, const void* const* features, const int64_t* heights,
                                               const int64_t* widths, int32_t num_levels, int64_t batch,
                                               int64_t num_rois, int64_t channels, const float* spatial_scales,
                                               int32_t output_height, int32_t output_width, int32_t sampling_ratio,
                                               int32_t aligned, float canonical_scale, int32_t canonical_level,
                                               int32_t mode, int32_t dtype, void* output) {
  if (features == nullptr || heights == nullptr || widths == nullptr || spatial_scales == nullptr) {
    return MASKRT_CPU_NULL_POINTER;
  }
  if (num_levels < 1 || num_levels > kMaxLevels || batch < 0 || num_rois < 0 || channels < 0) {
    return MASKRT_CPU_BAD_SHAPE;
  }
  for (int32_t level = 0; level < num_levels; ++level) {
    if (heights[level] < 1 || widths[level] < 1) return MASKRT_CPU_BAD_SHAPE;
  }
  // Level order: each map half the previous one (rounded either way), finest first, as the scales say.
  for (int32_t level = 1; level < num_levels; ++level) {
    if (std::llabs(2 * heights[level] - heights[level - 1]) > 1 || std::llabs(2 * widths[level] - widths[level - 1]) > 1) {
      return MASKRT_CPU_BAD_LEVEL_ORDER;
    }
  }
  if (output_height < 1 || output_width < 1) return MASKRT_CPU_BAD_OUTPUT_SIZE;
  if (const int status = validate_scales(spatial_scales, num_levels); status != MASKRT_CPU_OK) return status;
  if ((aligned != 0 && aligned != 1) || (mode != 0 && mode != 1) || !(canonical_scale > 0.0f)) {
    return MASKRT_CPU_BAD_ATTRIBUTE;
  }
  if (dtype != MASKRT_CPU_FLOAT32 && dtype != MASKRT_CPU_FLOAT16) return MASKRT_CPU_BAD_DTYPE;
  const int64_t output_count = batch * num_rois * channels * output_height * output_width;
  if (output_count == 0) return MASKRT_CPU_OK;  // nothing to read: R = 0, B = 0 or C = 0
  if (rois == nullptr || output == nullptr) return MASKRT_CPU_NULL_POINTER;
  for (int32_t level = 0; level < num_levels; ++level) {
    if (features[level] == nullptr) return MASKRT_CPU_NULL_POINTER;
  }

  Problem problem{};
  problem.spatial_scales = spatial_scales;
  problem.num_levels = num_levels;
  problem.batch = batch;
  problem.num_rois = num_rois;
  problem.channels = channels;
  problem.output_height = output_height;
  problem.output_width = output_width;
  problem.sampling_ratio = sampling_ratio;
  problem.aligned = aligned;
  problem.mode = mode;
  problem.canonical_scale = canonical_scale;
  problem.canonical_level = canonical_level;
  for (int32_t level = 0; level < num_levels; ++level) {
    problem.heights[level] = heights[level];
    problem.widths[level] = widths[level];
  }

  try {
    if (dtype == MASKRT_CPU_FLOAT32) {
      problem.rois = static_cast<const float*>(rois);
      for (int32_t level = 0; level < num_levels; ++level) {
        problem.features[level] = static_cast<const float*>(features[level]);
      }
      run_float32(problem, static_cast<float*>(output));
      return MASKRT_CPU_OK;
    }
    // float16: widen every input once, pool in float32, narrow the result
    const std::vector<float> rois32 = widen(rois, batch * num_rois * 4);
    std::vector<std::vector<float>> features32(static_cast<size_t>(num_levels));
    for (int32_t level = 0; level < num_levels; ++level) {
      features32[static_cast<size_t>(level)] = widen(features[level], batch * channels * heights[level] * widths[level]);
      problem.features[level] = features32[static_cast<size_t>(level)].data();
    }
    problem.rois = rois32.data();
    std::vector<float> output32(static_cast<size_t>(output_count));
    run_float32(problem, output32.data());
    uint16_t* out_bits = static_cast<uint16_t*>(output);
    for (int64_t i = 0; i < output_count; ++i) out_bits[i] = float_to_half_bits(output32[static_cast<size_t>(i)]);
    return MASKRT_CPU_OK;
  } catch (const std::bad_alloc&) {
    return MASKRT_CPU_OUT_OF_MEMORY;
  }
}
