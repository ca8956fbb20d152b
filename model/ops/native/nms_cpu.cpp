// nms_cpu.cpp: the native CPU greedy NMS of maskrt (model/ops/nms.py), by groups.
//
// torchvision's NMS semantics (restated in nms.py): boxes are visited by decreasing score; a
// visited, unsuppressed box is kept and suppresses every later box of its group whose IoU with it
// is strictly greater than the threshold. The IoU is computed in float32 with the same operations
// in the same order as nms.py's vectorised PyTorch path (torch.minimum / torch.maximum propagate
// NaN, so a NaN box never suppresses and is never suppressed), so both paths keep the same boxes;
// the PyTorch path stays the fallback where no compiler is present.
//
// Why it is faster than the PyTorch path: that one builds the IoU matrix of every pair of a group
// (N^2 / groups) and then walks it; here only the pairs a kept box tests are computed (N * kept),
// and the walk stops once `max_keep` boxes are kept (nms_padded keeps at most that many).
//
// Plain C++17 with a C entry point; no torch headers, called through ctypes.
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <unordered_map>
#include <vector>

namespace {

// torch.minimum / torch.maximum: NaN if either operand is NaN.
inline float nan_min(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  return a < b ? a : b;
}

inline float nan_max(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  return a > b ? a : b;
}

// clamp_(min=0): NaN stays NaN.
inline float clamp_low_zero(float v) { return v < 0.0f ? 0.0f : v; }

// nms.py's _overlap_matrix for one pair: IoU > threshold.
inline bool overlaps(const float* a, float area_a, const float* b, float area_b, float threshold) {
  const float inter_w = clamp_low_zero(nan_min(a[2], b[2]) - nan_max(a[0], b[0]));
  const float inter_h = clamp_low_zero(nan_min(a[3], b[3]) - nan_max(a[1], b[1]));
  const float inter = inter_w * inter_h;
  const float sum = area_a + area_b;
  const float union_area = sum - inter;
  const float iou = inter / union_area;
  return iou > threshold;  // NaN compares false
}

}  // namespace

// boxes [N, 4] xyxy float32, already sorted by decreasing score; groups [N] int64 (null: one
// group); keep [N] uint8 output: 1 where the box is kept. At most max_keep boxes are kept (the
// first ones in score order; max_keep < 0: no limit). Returns the number kept, -1 for a bad
// argument, -2 when out of memory.
extern "C" int64_t maskrt_nms_sorted_cpu(const float* boxes, const int64_t* groups, int64_t num_boxes,
                                         float iou_threshold, int64_t max_keep, uint8_t* keep) {
  if (num_boxes < 0 || (num_boxes > 0 && (boxes == nullptr || keep == nullptr))) return -1;
  if (num_boxes == 0 || max_keep == 0) {
    for (int64_t i = 0; i < num_boxes; ++i) keep[i] = 0;
    return 0;
  }
  try {
    std::vector<float> areas(static_cast<size_t>(num_boxes));
    for (int64_t i = 0; i < num_boxes; ++i) {
      const float* b = boxes + 4 * i;
      areas[static_cast<size_t>(i)] = (b[2] - b[0]) * (b[3] - b[1]);
    }
    // Each box's group as a dense id, and the members of every group in score order: a kept box
    // only tests the later members of its own group.
    std::vector<int64_t> group_of(static_cast<size_t>(num_boxes), 0);
    std::vector<std::vector<int64_t>> members;
    if (groups == nullptr) {
      members.emplace_back();
      members[0].reserve(static_cast<size_t>(num_boxes));
      for (int64_t i = 0; i < num_boxes; ++i) members[0].push_back(i);
    } else {
      std::unordered_map<int64_t, int64_t> dense;
      for (int64_t i = 0; i < num_boxes; ++i) {
        auto found = dense.emplace(groups[i], static_cast<int64_t>(members.size()));
        if (found.second) members.emplace_back();
        const int64_t id = found.first->second;
        group_of[static_cast<size_t>(i)] = id;
        members[static_cast<size_t>(id)].push_back(i);
      }
    }
    std::vector<int64_t> rank(static_cast<size_t>(num_boxes));  // position of each box in its group's list
    for (const std::vector<int64_t>& list : members) {
      for (size_t r = 0; r < list.size(); ++r) rank[static_cast<size_t>(list[r])] = static_cast<int64_t>(r);
    }
    std::vector<uint8_t> suppressed(static_cast<size_t>(num_boxes), 0);
    int64_t kept = 0;
    for (int64_t i = 0; i < num_boxes; ++i) {
      keep[i] = 0;
    }
    for (int64_t i = 0; i < num_boxes; ++i) {
      if (suppressed[static_cast<size_t>(i)]) continue;
      keep[i] = 1;
      if (++kept == max_keep) break;
      const float* box = boxes + 4 * i;
      const float area = areas[static_cast<size_t>(i)];
      const std::vector<int64_t>& list = members[static_cast<size_t>(group_of[static_cast<size_t>(i)])];
      for (size_t r = static_cast<size_t>(rank[static_cast<size_t>(i)]) + 1; r < list.size(); ++r) {
        const int64_t j = list[r];
        if (suppressed[static_cast<size_t>(j)]) continue;
        if (overlaps(box, area, boxes + 4 * j, areas[static_cast<size_t>(j)], iou_threshold)) {
          suppressed[static_cast<size_t>(j)] = 1;
        }
      }
    }
    return kept;
  } catch (const std::bad_alloc&) {
    return -2;
  }
}
