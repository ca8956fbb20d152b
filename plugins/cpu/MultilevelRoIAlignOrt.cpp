// MultilevelRoIAlignOrt.cpp: libmaskrt_ort_ops.so, ONNX Runtime's custom-op library for
// maskrt::MultilevelRoIAlign, computed by the CPU twin (MultilevelRoIAlignCpu.cpp).
//
// Written against ONNX Runtime's plain C API (onnxruntime_c_api.h only, not the C++ wrapper):
// the OrtCustomOp struct and the OrtApi function table are append-only, so a library compiled
// with headers of ONNX Runtime >= 1.12 loads in any newer runtime. The op library links nothing
// of ONNX Runtime: the runtime hands over its API table in RegisterCustomOps.
//
// Node: inputs rois [B,R,4] and 1..5 feature maps (declared as 1 required + 4 optional inputs,
// which works with every API version; variadic inputs need API 14), float32 or float16
// (one registered op per type, same name); attributes as plugins/multilevel_roi_align.json.
// Build: python -c "import maskrt.plugins.ort as o; o.build_native_library()" with ORT_INCLUDE_DIR.
#include <onnxruntime_c_api.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "MultilevelRoIAlignCpu.h"

namespace {

constexpr size_t kMaxFeatureInputs = 5;
constexpr const char* kDomain = "maskrt";
constexpr const char* kOpName = "MultilevelRoIAlign";

// The attributes of one node, read once when ONNX Runtime creates the kernel.
struct Kernel {
  const OrtApi* api;
  int64_t output_height = 7, output_width = 7, sampling_ratio = 2, aligned = 0, canonical_level = 4, mode = 0;
  float canonical_scale = 224.0f;
  std::vector<float> spatial_scales{0.25f, 0.125f, 0.0625f, 0.03125f};
};

// Turns an OrtStatus into an exception (ONNX Runtime reports exceptions from KernelCompute as a
// failed Run) and frees it.
void check(const OrtApi* api, OrtStatus* status) {
  if (status == nullptr) return;
  std::string message = api->GetErrorMessage(status);
  api->ReleaseStatus(status);
  throw std::runtime_error("maskrt::MultilevelRoIAlign: " + message);
}

// An optional int attribute: the contract default stays when the node does not carry it.
void read_int(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t& value) {
  if (OrtStatus* status = api->KernelInfoGetAttribute_int64(info, name, &value)) api->ReleaseStatus(status);
}

void read_float(const OrtApi* api, const OrtKernelInfo* info, const char* name, float& value) {
  if (OrtStatus* status = api->KernelInfoGetAttribute_float(info, name, &value)) api->ReleaseStatus(status);
}

void read_floats(const OrtApi* api, const OrtKernelInfo* info, const char* name, std::vector<float>& values) {
  size_t size = 0;
  if (OrtStatus* status = api->KernelInfoGetAttributeArray_float(info, name, nullptr, &size)) {
    api->ReleaseStatus(status);  // absent: keep the default
    return;
  }
  values.assign(size, 0.0f);
  check(api, api->KernelInfoGetAttributeArray_float(info, name, values.data(), &size));
}

struct TensorView {
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
  const void* data;
};

TensorView view_input(const OrtApi* api, OrtKernelContext* context, size_t index) {
  const OrtValue* value = nullptr;
  check(api, api->KernelContext_GetInput(context, index, &value));
  TensorView view{ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, {}, nullptr};
  if (value == nullptr) return view;  // an absent optional input
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api, api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = api->GetTensorElementType(info, &view.type);
  if (status == nullptr) status = api->GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    view.shape.resize(rank);
    status = api->GetDimensions(info, view.shape.data(), rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  check(api, status);
  void* data = nullptr;
  check(api, api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  view.data = data;
  return view;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? "," : "") + std::to_string(shape[i]);
  return text + "]";
}

void compute(const Kernel& kernel, OrtKernelContext* context) {
  const OrtApi* api = kernel.api;
  size_t input_count = 0;
  check(api, api->KernelContext_GetInputCount(context, &input_count));
  const TensorView rois = view_input(api, context, 0);
  if (rois.shape.size() != 3 || rois.shape[2] != 4) {
    throw std::runtime_error("maskrt::MultilevelRoIAlign: rois must be [B,R,4], got " + shape_text(rois.shape));
  }
  std::vector<TensorView> features;
  for (size_t index = 1; index < input_count; ++index) {
    TensorView feature = view_input(api, context, index);
    if (feature.data != nullptr) features.push_back(feature);
  }
  if (features.size() != kernel.spatial_scales.size()) {
    throw std::runtime_error("maskrt::MultilevelRoIAlign: " + std::to_string(features.size()) +
                             " feature inputs but " + std::to_string(kernel.spatial_scales.size()) +
                             " spatial_scales");
  }
  const int64_t batch = rois.shape[0], num_rois = rois.shape[1];
  std::vector<const void*> pointers;
  std::vector<int64_t> heights, widths;
  for (const TensorView& feature : features) {
    if (feature.type != rois.type) throw std::runtime_error("maskrt::MultilevelRoIAlign: inputs differ in dtype");
    if (feature.shape.size() != 4 || feature.shape[0] != batch || feature.shape[1] != features[0].shape[1]) {
      throw std::runtime_error("maskrt::MultilevelRoIAlign: feature map " + shape_text(feature.shape) +
                               " must be [B,C,H,W] with B, C as rois and the first map");
    }
    pointers.push_back(feature.data);
    heights.push_back(feature.shape[2]);
    widths.push_back(feature.shape[3]);
  }
  int32_t dtype;
  if (rois.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    dtype = MASKRT_CPU_FLOAT32;
  } else if (rois.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
    dtype = MASKRT_CPU_FLOAT16;
  } else {
    throw std::runtime_error("maskrt::MultilevelRoIAlign: inputs must be float32 or float16");
  }
  const int64_t channels = features[0].shape[1];
  const int64_t output_shape[5] = {batch, num_rois, channels, kernel.output_height, kernel.output_width};
  OrtValue* output = nullptr;
  check(api, api->KernelContext_GetOutput(context, 0, output_shape, 5, &output));
  void* output_data = nullptr;
  check(api, api->GetTensorMutableData(output, &output_data));
  const int status = maskrt_multilevel_roi_align_cpu(
      rois.data, pointers.data(), heights.data(), widths.data(), static_cast<int32_t>(features.size()), batch,
      num_rois, channels, kernel.spatial_scales.data(), static_cast<int32_t>(kernel.output_height),
      static_cast<int32_t>(kernel.output_width), static_cast<int32_t>(kernel.sampling_ratio),
      static_cast<int32_t>(kernel.aligned), kernel.canonical_scale, static_cast<int32_t>(kernel.canonical_level),
      static_cast<int32_t>(kernel.mode), dtype, output_data);
  if (status != MASKRT_CPU_OK) {
    throw std::runtime_error(std::string("maskrt::MultilevelRoIAlign: ") + maskrt_cpu_error_string(status));
  }
}

// ---- the OrtCustomOp callbacks ----

void* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info) {
  Kernel* kernel = new Kernel();
  kernel->api = api;
  read_int(api, info, "output_height", kernel->output_height);
  read_int(api, info, "output_width", kernel->output_width);
  read_int(api, info, "sampling_ratio", kernel->sampling_ratio);
  read_int(api, info, "aligned", kernel->aligned);
  read_int(api, info, "canonical_level", kernel->canonical_level);
  read_int(api, info, "mode", kernel->mode);
  read_float(api, info, "canonical_scale", kernel->canonical_scale);
  read_floats(api, info, "spatial_scales", kernel->spatial_scales);
  return kernel;
}

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return kOpName; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return nullptr; }  // the CPU provider

// One OrtCustomOp per element type: ONNX Runtime groups ops of one name into one schema whose type
// constraint is the union (an "any type" op would need an output type-inference callback, which
// only newer API versions offer).
struct TypedOp {
  OrtCustomOp op;  // first member: ONNX Runtime's OrtCustomOp* points at the TypedOp
  ONNXTensorElementDataType type;
};

ONNXTensorElementDataType ORT_API_CALL op_type(const OrtCustomOp* op, size_t) {
  return reinterpret_cast<const TypedOp*>(op)->type;
}
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 1 + kMaxFeatureInputs; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }

OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp*, size_t index) {
  return index <= 1 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;  // rois and at least one map
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}

void ORT_API_CALL kernel_compute(void* kernel, OrtKernelContext* context) {
  compute(*static_cast<Kernel*>(kernel), context);
}
void ORT_API_CALL kernel_destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

TypedOp make_op(ONNXTensorElementDataType type) {
  TypedOp typed;
  std::memset(&typed, 0, sizeof typed);
  OrtCustomOp& op = typed.op;
  op.version = ORT_API_VERSION;  // the layout of this header: newer runtimes read only these fields
  op.CreateKernel = create_kernel;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = op_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = op_type;
  op.GetOutputTypeCount = output_count;
  op.KernelCompute = kernel_compute;
  op.KernelDestroy = kernel_destroy;
  op.GetInputCharacteristic = input_characteristic;
  op.GetOutputCharacteristic = output_characteristic;
  typed.type = type;
  return typed;
}

// Live as long as the process: sessions keep pointers to the ops.
const TypedOp kFloatOp = make_op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
const TypedOp kHalfOp = make_op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);

}  // namespace

// ONNX Runtime's entry point of a custom-op library (SessionOptions.register_custom_ops_library).
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // cannot even report: the runtime is older than the headers
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = api->CreateCustomOpDomain(kDomain, &domain)) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &kFloatOp.op)) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &kHalfOp.op)) return status;
  // The domain must outlive every session that uses it; one per registration is a few bytes.
  return api->AddCustomOpDomain(options, domain);
}
