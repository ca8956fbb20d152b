// roi_align_cpu.cpp: the native CPU forward of maskrt's RoIAlign (model/ops/roi_align.py), and the
// backward of its average mode (the gradient every training step takes).
//
// torchvision's RoIAlign semantics (roi_align_kernel.cpp; restated in plugins/README.md, "The
// MultilevelRoIAlign contract"): per RoI, per output bin, the average (mode 0) or maximum (mode 1)
// of grid_h x grid_w bilinear samples; legacy or aligned (half-pixel) coordinates; a fixed or an
// adaptive sampling grid. The pure-PyTorch path of roi_align computes the same numbers and stays
// the fallback where no compiler is present; tests hold both to the same float64 reference.
//
// Why it is faster than torchvision's kernel on the same input:
// - feature maps in channels-last layout (stride_c == 1) are read as contiguous C-vectors: each
//   bilinear tap is one vectorised multiply-add over the channels instead of C scalar loads from C
//   planes (the sample plan is computed once per RoI, as torchvision's pre_calc);
// - RoIs are shared among threads (dynamic blocks of a few RoIs; every RoI is computed by one
//   thread in a fixed order, so the result does not depend on the thread count).
// - any other layout (NCHW): the window of cells a RoI reads is copied into a channels-last scratch
//   first, so only the cells the RoIs touch are transposed, not the whole map.
//
// The backward (average mode) spreads each bin's gradient, times each tap's bilinear weight / the
// bin's sample count, onto the 4 corners of its taps in a channels-last gradient buffer: the same
// sample plan as the forward, one vectorised multiply-add over the channels per corner. Threads
// split the work by image and by block of channels, so no two threads write one cell and every
// cell sums its terms in one fixed order (RoI, bin, tap, corner): the result does not depend on
// the thread count.
//
// Plain C++17 with C entry points; no torch headers, called through ctypes.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <thread>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// One build runs everywhere; the loader picks the widest vector unit the CPU has.
#define MASKRT_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MASKRT_VECTOR_CLONES
#endif

namespace {

constexpr int32_t kMaxLevels = 5;

// One feature map (an FPN level): [N, C, H, W] with any strides, in elements.
struct Level {
  const float* data;
  int64_t height, width;
  int64_t stride_n, stride_c, stride_h, stride_w;
  float spatial_scale;
};

struct Problem {
  Level levels[kMaxLevels];
  int32_t num_levels;
  int64_t batch, channels;
  const float* rois;           // [K, 5]: batch index, x1, y1, x2, y2 (input pixels)
  const int32_t* roi_levels;   // [K] level of each RoI, or null: all at level 0
  int64_t num_rois;
  int32_t pooled_height, pooled_width, sampling_ratio, aligned, mode;
  float* output;  // [K, C, pooled_height, pooled_width]
};

// One bilinear sample inside the map: the offsets of its 4 corners (relative to the image's
// base) and their weights, torchvision's products hy*hx, hy*lx, ly*hx, ly*lx.
struct Tap {
  int64_t offset[4];
  float weight[4];
};

struct AxisSample {
  int64_t low, high;
  float low_weight, high_weight;
  bool inside;
};

// Per-thread scratch, grown once and reused across RoIs.
struct Scratch {
  std::vector<Tap> taps;            // every bin's taps, bin after bin
  std::vector<int32_t> bin_start;   // [bins + 1] first tap of each bin
  std::vector<int32_t> bin_outside; // [bins] samples of the bin that lie outside the map (value 0)
  std::vector<float> accumulator;   // [bins, C] (channels-last path)
  std::vector<AxisSample> ys, xs;   // the y samples of every bin row, the x samples of every bin column
  std::vector<float> window;        // [rows, columns, C]: a channels-last copy of the cells a RoI reads
};


// torchvision's bilinear_interpolate along one axis (the 2-D test is the product of the two).
AxisSample axis_sample(float coordinate, int64_t size) {
  AxisSample s{0, 0, 0.0f, 0.0f, false};
  // a negated range test: NaN counts as outside
  if (!(coordinate >= -1.0f && coordinate <= static_cast<float>(size))) return s;
  if (coordinate <= 0.0f) coordinate = 0.0f;
  int64_t low = static_cast<int64_t>(coordinate);
  int64_t high;
  if (low >= size - 1) {
    low = high = size - 1;
    coordinate = static_cast<float>(low);
  } else {
    high = low + 1;
  }
  const float upper = coordinate - static_cast<float>(low);
  s.low = low;
  s.high = high;
  s.low_weight = 1.0f - upper;
  s.high_weight = upper;
  s.inside = true;
  return s;
}

// The MultilevelRoIAlign contract's cap on adaptive samples per bin side (plugins/README.md;
// ADAPTIVE_GRID_MAX in roi_align.py, the same in every implementation).
constexpr int64_t kAdaptiveGridMax = 64;

// Samples per bin side: fixed, or adaptive ceil(roi_size / bins) up to the cap (0 for an empty
// or inverted RoI).
int64_t grid_size(int32_t sampling_ratio, float roi_size, int32_t bins) {
  if (sampling_ratio > 0) return sampling_ratio;
  const float adaptive = std::ceil(roi_size / static_cast<float>(bins));
  if (!(adaptive >= 0.0f)) return 0;
  return std::min(static_cast<int64_t>(std::min(adaptive, 1.0e6f)), kAdaptiveGridMax);
}

// Fills scratch.ys / scratch.xs with the RoI's samples along each axis; returns the samples per bin
// (grid_h * grid_w), or -1 for a RoI whose output is all zeros (a non-finite coordinate).
int64_t plan_axes(const Problem& p, const Level& map, const float* roi, Scratch& scratch) {
  const int32_t ph = p.pooled_height, pw = p.pooled_width;
  for (int i = 1; i < 5; ++i) {
    if (!std::isfinite(roi[i])) return -1;
  }
  const float offset = p.aligned ? 0.5f : 0.0f;
  const float start_x = roi[1] * map.spatial_scale - offset;
  const float start_y = roi[2] * map.spatial_scale - offset;
  float roi_width = roi[3] * map.spatial_scale - offset - start_x;
  float roi_height = roi[4] * map.spatial_scale - offset - start_y;
  if (!p.aligned) {  // legacy mode: a RoI is at least one feature cell
    roi_width = std::max(roi_width, 1.0f);
    roi_height = std::max(roi_height, 1.0f);
  }
  const float bin_height = roi_height / static_cast<float>(ph);
  const float bin_width = roi_width / static_cast<float>(pw);
  const int64_t grid_h = grid_size(p.sampling_ratio, roi_height, ph);
  const int64_t grid_w = grid_size(p.sampling_ratio, roi_width, pw);

  // Separable: the y samples of every bin row and the x samples of every bin column.
  std::vector<AxisSample>& ys = scratch.ys;
  std::vector<AxisSample>& xs = scratch.xs;
  ys.resize(static_cast<size_t>(ph * grid_h));
  xs.resize(static_cast<size_t>(pw * grid_w));
  for (int32_t bin = 0; bin < ph; ++bin) {
    for (int64_t i = 0; i < grid_h; ++i) {
      // torchvision's order of operations: start + bin*size + (i + 0.5)*size/grid
      const float y = start_y + static_cast<float>(bin) * bin_height +
                      (static_cast<float>(i) + 0.5f) * bin_height / static_cast<float>(grid_h);
      ys[static_cast<size_t>(bin * grid_h + i)] = axis_sample(y, map.height);
    }
  }
  for (int32_t bin = 0; bin < pw; ++bin) {
    for (int64_t i = 0; i < grid_w; ++i) {
      const float x = start_x + static_cast<float>(bin) * bin_width +
                      (static_cast<float>(i) + 0.5f) * bin_width / static_cast<float>(grid_w);
      xs[static_cast<size_t>(bin * grid_w + i)] = axis_sample(x, map.width);
    }
  }

  return grid_h * grid_w;
}

// The rows [y0, y1] and columns [x0, x1] of the map that the RoI's samples read (y1 < y0 when no
// sample lies inside the map).
void sample_window(const Scratch& scratch, int64_t& y0, int64_t& y1, int64_t& x0, int64_t& x1) {
  y0 = x0 = std::numeric_limits<int64_t>::max();
  y1 = x1 = -1;
  for (const AxisSample& y : scratch.ys) {
    if (y.inside) {
      y0 = std::min(y0, y.low);
      y1 = std::max(y1, y.high);
    }
  }
  for (const AxisSample& x : scratch.xs) {
    if (x.inside) {
      x0 = std::min(x0, x.low);
      x1 = std::max(x1, x.high);
    }
  }
}

// Fills scratch's taps from its axis samples: corner offsets row * stride_h + column * stride_w,
// rows and columns counted from (y0, x0).
void plan_taps(const Problem& p, int64_t grid_h, int64_t grid_w, int64_t stride_h, int64_t stride_w, int64_t y0,
               int64_t x0, Scratch& scratch) {
  const int32_t ph = p.pooled_height, pw = p.pooled_width;
  const std::vector<AxisSample>& ys = scratch.ys;
  const std::vector<AxisSample>& xs = scratch.xs;
  const int64_t bins = static_cast<int64_t>(ph) * pw;
  scratch.taps.clear();
  scratch.bin_start.assign(static_cast<size_t>(bins + 1), 0);
  scratch.bin_outside.assign(static_cast<size_t>(bins), 0);
  for (int32_t by = 0; by < ph; ++by) {
    for (int32_t bx = 0; bx < pw; ++bx) {
      const int64_t bin = static_cast<int64_t>(by) * pw + bx;
      scratch.bin_start[static_cast<size_t>(bin)] = static_cast<int32_t>(scratch.taps.size());
      for (int64_t iy = 0; iy < grid_h; ++iy) {
        const AxisSample& y = ys[static_cast<size_t>(by * grid_h + iy)];
        for (int64_t ix = 0; ix < grid_w; ++ix) {
          const AxisSample& x = xs[static_cast<size_t>(bx * grid_w + ix)];
          if (!(y.inside && x.inside)) {
            ++scratch.bin_outside[static_cast<size_t>(bin)];
            continue;
          }
          Tap tap;
          const int64_t row_low = (y.low - y0) * stride_h, row_high = (y.high - y0) * stride_h;
          const int64_t col_low = (x.low - x0) * stride_w, col_high = (x.high - x0) * stride_w;
          tap.offset[0] = row_low + col_low;
          tap.offset[1] = row_low + col_high;
          tap.offset[2] = row_high + col_low;
          tap.offset[3] = row_high + col_high;
          tap.weight[0] = y.low_weight * x.low_weight;
          tap.weight[1] = y.low_weight * x.high_weight;
          tap.weight[2] = y.high_weight * x.low_weight;
          tap.weight[3] = y.high_weight * x.high_weight;
          scratch.taps.push_back(tap);
        }
      }
    }
  }
  scratch.bin_start[static_cast<size_t>(bins)] = static_cast<int32_t>(scratch.taps.size());
}

// Channels-last: one bin = a weighted sum (or max) of C-vectors, vectorised over the channels.
MASKRT_VECTOR_CLONES
void pool_channels_last(const Problem& p, const float* image, int64_t samples, Scratch& scratch, float* out) {
  const int64_t channels = p.channels;
  const int64_t bins = static_cast<int64_t>(p.pooled_height) * p.pooled_width;
  scratch.accumulator.resize(static_cast<size_t>(bins * channels));
  const float count = static_cast<float>(samples > 1 ? samples : 1);
  for (int64_t bin = 0; bin < bins; ++bin) {
    float* __restrict acc = scratch.accumulator.data() + bin * channels;
    const int32_t first = scratch.bin_start[static_cast<size_t>(bin)];
    const int32_t last = scratch.bin_start[static_cast<size_t>(bin + 1)];
    if (p.mode == 0) {
      for (int64_t c = 0; c < channels; ++c) acc[c] = 0.0f;
      for (int32_t t = first; t < last; ++t) {
        const Tap& tap = scratch.taps[static_cast<size_t>(t)];
        const float* __restrict v1 = image + tap.offset[0];
        const float* __restrict v2 = image + tap.offset[1];
        const float* __restrict v3 = image + tap.offset[2];
        const float* __restrict v4 = image + tap.offset[3];
        const float w1 = tap.weight[0], w2 = tap.weight[1], w3 = tap.weight[2], w4 = tap.weight[3];
        for (int64_t c = 0; c < channels; ++c) acc[c] += w1 * v1[c] + w2 * v2[c] + w3 * v3[c] + w4 * v4[c];
      }
      for (int64_t c = 0; c < channels; ++c) acc[c] /= count;
    } else {
      // A sample outside the map is 0 and takes part in the max; a bin without samples is 0.
      const bool has_zero = scratch.bin_outside[static_cast<size_t>(bin)] > 0 || samples <= 0;
      const float init = has_zero ? 0.0f : -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < channels; ++c) acc[c] = init;
      for (int32_t t = first; t < last; ++t) {
        const Tap& tap = scratch.taps[static_cast<size_t>(t)];
        const float* __restrict v1 = image + tap.offset[0];
        const float* __restrict v2 = image + tap.offset[1];
        const float* __restrict v3 = image + tap.offset[2];
        const float* __restrict v4 = image + tap.offset[3];
        const float w1 = tap.weight[0], w2 = tap.weight[1], w3 = tap.weight[2], w4 = tap.weight[3];
        for (int64_t c = 0; c < channels; ++c) {
          const float value = w1 * v1[c] + w2 * v2[c] + w3 * v3[c] + w4 * v4[c];
          acc[c] = value > acc[c] ? value : acc[c];
        }
      }
    }
  }
  // [bins, C] -> the output's [C, bins]
  const float* acc = scratch.accumulator.data();
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t bin = 0; bin < bins; ++bin) out[c * bins + bin] = acc[bin * channels + c];
  }
}

void pool_roi(const Problem& p, int64_t k, Scratch& scratch) {
  const float* roi = p.rois + k * 5;
  const int64_t roi_size = p.channels * static_cast<int64_t>(p.pooled_height) * p.pooled_width;
  float* out = p.output + k * roi_size;
  const int32_t level = p.roi_levels ? p.roi_levels[k] : 0;
  // A RoI without a level (the level rule of a NaN box) or with a non-finite coordinate is 0.
  const int64_t samples = level >= 0 && level < p.num_levels ? plan_axes(p, p.levels[level], roi, scratch) : -1;
  if (samples < 0) {
    std::fill(out, out + roi_size, 0.0f);
    return;
  }
  const Level& map = p.levels[level];
  const int64_t grid_h = static_cast<int64_t>(scratch.ys.size()) / p.pooled_height;
  const int64_t grid_w = static_cast<int64_t>(scratch.xs.size()) / p.pooled_width;
  const float* image = map.data + static_cast<int64_t>(roi[0]) * map.stride_n;
  if (map.stride_c == 1) {
    plan_taps(p, grid_h, grid_w, map.stride_h, map.stride_w, 0, 0, scratch);
    pool_channels_last(p, image, samples, scratch, out);
    return;
  }
  // Any other layout: copy the window of cells the RoI reads into a channels-last scratch (the
  // caller passes NCHW maps where the RoIs read less than the whole map; a copy of the whole map
  // would cost more), then pool it as a channels-last map.
  int64_t y0, y1, x0, x1;
  sample_window(scratch, y0, y1, x0, x1);
  if (y1 < y0 || x1 < x0) {  // no sample inside the map: every tap is outside
    y0 = y1 = x0 = x1 = 0;
  }
  const int64_t rows = y1 - y0 + 1, columns = x1 - x0 + 1, channels = p.channels;
  scratch.window.resize(static_cast<size_t>(rows * columns * channels));
  float* window = scratch.window.data();
  for (int64_t c = 0; c < channels; ++c) {
    const float* plane = image + c * map.stride_c;
    for (int64_t y = 0; y < rows; ++y) {
      const float* source = plane + (y0 + y) * map.stride_h + x0 * map.stride_w;
      float* target = window + y * columns * channels + c;
      for (int64_t x = 0; x < columns; ++x) target[x * channels] = source[x * map.stride_w];
    }
  }
  plan_taps(p, grid_h, grid_w, columns * channels, channels, y0, x0, scratch);
  pool_channels_last(p, window, samples, scratch, out);
}

// The gradient of one RoI's bins, channels [c0, c1), spread onto `image`: the RoI's image in a
// channels-last gradient buffer [H, W, C]. grad_roi: the RoI's output gradient [C, bins].
MASKRT_VECTOR_CLONES
void spread_channels_last(const Problem& p, int64_t samples, const float* grad_roi, int64_t c0, int64_t c1,
                          float* image, Scratch& scratch) {
  const int64_t bins = static_cast<int64_t>(p.pooled_height) * p.pooled_width;
  const int64_t width = c1 - c0;
  scratch.accumulator.resize(static_cast<size_t>(bins * width));
  float* grad_bins = scratch.accumulator.data();  // [bins, width]: the vector each tap scales
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t bin = 0; bin < bins; ++bin) grad_bins[bin * width + (c - c0)] = grad_roi[c * bins + bin];
  }
  const float count = static_cast<float>(samples > 1 ? samples : 1);
  for (int64_t bin = 0; bin < bins; ++bin) {
    const float* __restrict g = grad_bins + bin * width;
    const int32_t first = scratch.bin_start[static_cast<size_t>(bin)];
    const int32_t last = scratch.bin_start[static_cast<size_t>(bin + 1)];
    for (int32_t t = first; t < last; ++t) {
      const Tap& tap = scratch.taps[static_cast<size_t>(t)];
      // One loop per corner: at the map's last row or column two corners are the same cell.
      for (int corner = 0; corner < 4; ++corner) {
        const float w = tap.weight[corner] / count;
        float* __restrict target = image + tap.offset[corner] + c0;
        for (int64_t c = 0; c < width; ++c) target[c] += w * g[c];
      }
    }
  }
}

void spread_roi(const Problem& p, float* const* grads, const float* grad_output, int64_t k, int64_t c0, int64_t c1,
                Scratch& scratch) {
  const float* roi = p.rois + k * 5;
  const int32_t level = p.roi_levels ? p.roi_levels[k] : 0;
  // No level or a non-finite coordinate: the output was 0, the gradient is 0.
  const int64_t samples = level >= 0 && level < p.num_levels ? plan_axes(p, p.levels[level], roi, scratch) : -1;
  if (samples < 0) return;
  const Level& map = p.levels[level];
  const int64_t grid_h = static_cast<int64_t>(scratch.ys.size()) / p.pooled_height;
  const int64_t grid_w = static_cast<int64_t>(scratch.xs.size()) / p.pooled_width;
  plan_taps(p, grid_h, grid_w, map.stride_h, map.stride_w, 0, 0, scratch);
  const int64_t bins = static_cast<int64_t>(p.pooled_height) * p.pooled_width;
  float* image = grads[level] + static_cast<int64_t>(roi[0]) * map.stride_n;
  spread_channels_last(p, samples, grad_output + k * p.channels * bins, c0, c1, image, scratch);
}

// Fills p's shape fields and levels from the entry points' arrays; false for a bad argument.
bool read_levels(Problem& p, int32_t num_levels, const float* const* data, const int64_t* shapes,
                 const int64_t* strides, const float* spatial_scales) {
  p.num_levels = num_levels;
  p.batch = shapes[0];
  p.channels = shapes[1];
  for (int32_t l = 0; l < num_levels; ++l) {
    const int64_t* shape = shapes + 4 * l;
    const int64_t* stride = strides + 4 * l;
    if (shape[0] != p.batch || shape[1] != p.channels || shape[2] < 1 || shape[3] < 1) return false;
    p.levels[l] = Level{data[l], shape[2], shape[3], stride[0], stride[1], stride[2], stride[3], spatial_scales[l]};
  }
  return p.batch >= 0 && p.channels >= 0;
}

// Fills p's RoI and pooling fields; false when a RoI's batch index is outside [0, N).
bool set_rois(Problem& p, const float* rois, const int32_t* roi_levels, int64_t num_rois, int32_t pooled_height,
              int32_t pooled_width, int32_t sampling_ratio, int32_t aligned, int32_t mode) {
  for (int64_t k = 0; k < num_rois; ++k) {
    const float index = rois[k * 5];
    if (!(index >= 0.0f && static_cast<int64_t>(index) < p.batch)) return false;
  }
  p.rois = rois;
  p.roi_levels = roi_levels;
  p.num_rois = num_rois;
  p.pooled_height = pooled_height;
  p.pooled_width = pooled_width;
  p.sampling_ratio = sampling_ratio;
  p.aligned = aligned;
  p.mode = mode;
  return true;
}

// Runs work() on up to `threads` threads (this one included); false if it ran out of memory.
template <typename Work>
bool run_threads(int64_t threads, Work work) {
  std::atomic<bool> failed{false};
  auto guarded = [&]() {
    try {
      work();
    } catch (const std::bad_alloc&) {
      failed = true;
    }
  };
  std::vector<std::thread> helpers;
  try {
    for (int64_t t = 1; t < threads; ++t) helpers.emplace_back(guarded);
  } catch (...) {
    // no more threads: the ones started (and this one) do the work
  }
  guarded();
  for (std::thread& helper : helpers) helper.join();
  return !failed;
}

}  // namespace

// inputs: num_levels maps; shapes [num_levels, 4] (N, C, H, W; one N and C for all), strides
// [num_levels, 4] in elements, spatial_scales [num_levels]; rois [K, 5]; roi_levels [K] the map
// each RoI pools from (null: map 0; a level outside [0, num_levels) gives 0); output [K, C, ph, pw].
// Returns 0, or 1 for a bad argument (shape, a RoI's batch index outside [0, N)), 2 when out of memory.
extern "C" int maskrt_roi_align_forward_cpu(int32_t num_levels, const float* const* inputs, const int64_t* shapes,
                                            const int64_t* strides, const float* spatial_scales, const float* rois,
                                            const int32_t* roi_levels, int64_t num_rois, int32_t pooled_height,
                                            int32_t pooled_width, int32_t sampling_ratio, int32_t aligned,
                                            int32_t mode, int32_t num_threads, float* output) {
  if (num_levels < 1 || num_levels > kMaxLevels || inputs == nullptr || shapes == nullptr || strides == nullptr ||
      spatial_scales == nullptr || num_rois < 0 || pooled_height < 1 || pooled_width < 1 || (mode != 0 && mode != 1)) {
    return 1;
  }
  Problem p{};
  if (!read_levels(p, num_levels, inputs, shapes, strides, spatial_scales)) return 1;
  if (num_rois == 0 || p.channels == 0) return 0;
  if (rois == nullptr || output == nullptr) return 1;
  for (int32_t l = 0; l < num_levels; ++l) {
    if (p.levels[l].data == nullptr) return 1;
  }
  if (!set_rois(p, rois, roi_levels, num_rois, pooled_height, pooled_width, sampling_ratio, aligned, mode)) return 1;
  p.output = output;

  // Dynamic blocks of RoIs: RoI sizes vary by orders of magnitude under adaptive sampling.
  constexpr int64_t kBlock = 4;
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    Scratch scratch;
    for (;;) {
      const int64_t start = next.fetch_add(kBlock);
      if (start >= num_rois) break;
      const int64_t stop = std::min(start + kBlock, num_rois);
      for (int64_t k = start; k < stop; ++k) pool_roi(p, k, scratch);
    }
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, (num_rois + kBlock - 1) / kBlock));
  return run_threads(threads, work) ? 0 : 2;
}

// The gradient of the average-mode forward above with respect to its maps. grads: num_levels
// buffers, each a map's gradient in channels-last order [N, H_l, W_l, C], zero-filled by the
// caller and added to here; shapes [num_levels, 4] (N, C, H, W of each map), spatial_scales,
// rois, roi_levels, the pooling arguments and the thread count as in the forward; grad_output
// [K, C, ph, pw] contiguous. Returns 0, 1 for a bad argument, 2 when out of memory.
extern "C" int maskrt_roi_align_backward_cpu(int32_t num_levels, float* const* grads, const int64_t* shapes,
                                             const float* spatial_scales, const float* rois,
                                             const int32_t* roi_levels, int64_t num_rois, int32_t pooled_height,
                                             int32_t pooled_width, int32_t sampling_ratio, int32_t aligned,
                                             int32_t num_threads, const float* grad_output) {
  if (num_levels < 1 || num_levels > kMaxLevels || grads == nullptr || shapes == nullptr ||
      spatial_scales == nullptr || num_rois < 0 || pooled_height < 1 || pooled_width < 1) {
    return 1;
  }
  // The gradient buffers' channels-last strides, in elements.
  int64_t strides[4 * kMaxLevels];
  for (int32_t l = 0; l < num_levels; ++l) {
    const int64_t channels = shapes[4 * l + 1], height = shapes[4 * l + 2], width = shapes[4 * l + 3];
    strides[4 * l] = height * width * channels;
    strides[4 * l + 1] = 1;
    strides[4 * l + 2] = width * channels;
    strides[4 * l + 3] = channels;
  }
  Problem p{};
  if (!read_levels(p, num_levels, grads, shapes, strides, spatial_scales)) return 1;
  if (num_rois == 0 || p.channels == 0) return 0;
  if (rois == nullptr || grad_output == nullptr) return 1;
  for (int32_t l = 0; l < num_levels; ++l) {
    if (grads[l] == nullptr) return 1;
  }
  if (!set_rois(p, rois, roi_levels, num_rois, pooled_height, pooled_width, sampling_ratio, aligned, 0)) return 1;

  // Work units: (image, block of channels). Images write disjoint buffers and blocks disjoint
  // channels; blocks only where there are more threads than images, at least 16 channels each.
  const int64_t threads = std::max<int32_t>(1, num_threads);
  const int64_t most_blocks = std::max<int64_t>(1, p.channels / 16);
  const int64_t blocks = std::min(most_blocks, std::max<int64_t>(1, (threads + p.batch - 1) / std::max<int64_t>(1, p.batch)));
  const int64_t block_width = (p.channels + blocks - 1) / blocks;
  const int64_t units = p.batch * blocks;
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    Scratch scratch;
    for (;;) {
      const int64_t unit = next.fetch_add(1);
      if (unit >= units) break;
      const int64_t image = unit / blocks;
      const int64_t c0 = (unit % blocks) * block_width;
      const int64_t c1 = std::min(p.channels, c0 + block_width);
      if (c0 >= c1) continue;
      for (int64_t k = 0; k < num_rois; ++k) {
        if (static_cast<int64_t>(rois[k * 5]) == image) spread_roi(p, grads, grad_output, k, c0, c1, scratch);
      }
    }
  };
  return run_threads(std::min(threads, units), work) ? 0 : 2;
}
