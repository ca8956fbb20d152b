// maskrt_plugin_check: exercises libmaskrt_plugins.so through TensorRT's own interfaces, the
// way TensorRT does (dlopen, setLoggerFinder, getCreators), without a TensorRT library.
//
// Built plainly (CMake's maskrt_plugin_check, no GPU needed): creator identity and fields,
// creation in both phases, refused fields, the serialisation round trip, the build-phase
// queries, and enqueue's shape checks (paths that launch nothing).
//
// Built with -DMASKRT_PLUGIN_CHECK_GPU (bench/gpu_check.py: this file + the CPU twin
// plugins/cpu/MultilevelRoIAlignCpu.cpp, linked with cudart only) it then drives the plugin the
// way an engine build and an execution context do, on the GPU: the creator with the fields as
// TensorRT's ONNX parser passes them (INT -> INT32, FLOAT/FLOATS -> FLOAT32, STRING -> CHAR),
// getOutputDataTypes / getOutputShapes / supportsFormatCombination / configurePlugin /
// getWorkspaceSize, getFieldsToSerialize -> createPlugin(kRUNTIME) -> attachToContext ->
// onShapeChange -> enqueue on a CUDA stream with device buffers (fp32 and fp16), compared with
// the CPU twin; clone and serialise -> recreate -> enqueue again must give identical bits.
//
// Prints "PASS name" / "FAIL name: why" per check (GPU checks add "max_rel=..."); exit status =
// failures.
//
//   maskrt_plugin_check build/plugins/libmaskrt_plugins.so
//   maskrt_plugin_check_gpu build/plugins/libmaskrt_plugins.so [--small] [--fp32-tol 1e-5] [--fp16-tol 1e-2]
//   (--no-device: every step but the launches, for machines without a GPU)
#include <NvInferRuntime.h>

#include <dlfcn.h>

#ifdef MASKRT_PLUGIN_CHECK_GPU
#include "MultilevelRoIAlignCpu.h"

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <random>
#endif

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;

void check(bool condition, char const* name, std::string const& why = "")
{
    if (condition)
    {
        std::printf("PASS %s\n", name);
    }
    else
    {
        std::printf("FAIL %s: %s\n", name, why.c_str());
        ++gFailures;
    }
}

class RecordingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            lastMessage = msg;
        }
    }
    std::string lastMessage;
};

class Finder : public ILoggerFinder
{
public:
    explicit Finder(ILogger* logger)
        : mLogger(logger)
    {
    }
    ILogger* findLogger() override
    {
        return mLogger;
    }

private:
    ILogger* mLogger;
};

//! A field list kept alive with its data.
struct Fields
{
    std::vector<int32_t> ints;       // reserved up front: fields point into it
    std::vector<float> floats;
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};

    Fields()
    {
        ints.reserve(32);
        floats.reserve(32);
    }
    void addInt(char const* name, int32_t value, PluginFieldType type = PluginFieldType::kINT32)
    {
        ints.push_back(value);
        fields.emplace_back(name, &ints.back(), type, 1);
    }
    void addFloats(char const* name, std::vector<float> const& values)
    {
        float const* start = floats.data() + floats.size();
        floats.insert(floats.end(), values.begin(), values.end());
        fields.emplace_back(name, start, PluginFieldType::kFLOAT32, static_cast<int32_t>(values.size()));
    }
    PluginFieldCollection const* get()
    {
        collection.nbFields = static_cast<int32_t>(fields.size());
        collection.fields = fields.data();
        return &collection;
    }
};

//! The serialised fields as "name:type:length:bytes-hex" strings, for comparisons.
std::vector<std::string> describe(PluginFieldCollection const* fc)
{
    std::vector<std::string> lines;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        size_t const elementSize = field.type == PluginFieldType::kINT32 || field.type == PluginFieldType::kFLOAT32 ? 4 : 0;
        std::string line = std::string(field.name) + ":" + std::to_string(static_cast<int32_t>(field.type)) + ":"
            + std::to_string(field.length) + ":";
        auto const* bytes = static_cast<unsigned char const*>(field.data);
        for (size_t b = 0; bytes != nullptr && b < elementSize * static_cast<size_t>(field.length); ++b)
        {
            char hex[3];
            std::snprintf(hex, sizeof(hex), "%02x", bytes[b]);
            line += hex;
        }
        lines.push_back(line);
    }
    return lines;
}

DynamicPluginTensorDesc tensor(std::vector<int64_t> const& dims, DataType type, TensorFormat format = TensorFormat::kLINEAR)
{
    DynamicPluginTensorDesc desc{};
    desc.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        desc.desc.dims.d[i] = dims[i];
    }
    desc.desc.type = type;
    desc.desc.format = format;
    desc.min = desc.opt = desc.max = desc.desc.dims;
    return desc;
}


#ifdef MASKRT_PLUGIN_CHECK_GPU
// ---- GPU checks (built with -DMASKRT_PLUGIN_CHECK_GPU; needs a CUDA device) -----------------

//! A dimension expression holding a constant: what TensorRT's IExprBuilder gives for known sizes.
class ConstantExprImpl : public apiv::VDimensionExpr
{
public:
    explicit ConstantExprImpl(int64_t value)
        : mValue(value)
    {
    }
    bool isConstant() const override
    {
        return true;
    }
    int64_t getConstantValue() const override
    {
        return mValue;
    }
    bool isSizeTensor() const override
    {
        return false;
    }

private:
    int64_t mValue;
};

class ConstantExpr : public IDimensionExpr
{
public:
    explicit ConstantExpr(int64_t value)
        : mImplementation(value)
    {
        mImpl = &mImplementation;
    }

private:
    ConstantExprImpl mImplementation;
};

//! Folds every operation on constants (the shapes here are all known); a non-constant is null.
class ConstantExprBuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        mExprs.emplace_back(new ConstantExpr(value));
        return mExprs.back().get();
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& first, IDimensionExpr const& second) override
    {
        if (!first.isConstant() || !second.isConstant())
        {
            return nullptr;
        }
        int64_t const a = first.getConstantValue();
        int64_t const b = second.getConstantValue();
        switch (op)
        {
        case DimensionOperation::kSUM: return constant(a + b);
        case DimensionOperation::kPROD: return constant(a * b);
        case DimensionOperation::kMAX: return constant(std::max(a, b));
        case DimensionOperation::kMIN: return constant(std::min(a, b));
        case DimensionOperation::kSUB: return constant(a - b);
        case DimensionOperation::kEQUAL: return constant(a == b ? 1 : 0);
        case DimensionOperation::kLESS: return constant(a < b ? 1 : 0);
        case DimensionOperation::kFLOOR_DIV: return b == 0 ? nullptr : constant(a / b - ((a % b != 0 && ((a < 0) != (b < 0))) ? 1 : 0));
        case DimensionOperation::kCEIL_DIV: return b == 0 ? nullptr : constant(a / b + ((a % b != 0 && ((a < 0) == (b < 0))) ? 1 : 0));
        }
        return nullptr;
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }

private:
    std::vector<std::unique_ptr<ConstantExpr>> mExprs;
};

class ConstantExprBuilder : public IExprBuilder
{
public:
    ConstantExprBuilder()
    {
        mImpl = &mImplementation;
    }

private:
    ConstantExprBuilderImpl mImplementation;
};

//! What an execution context hands attachToContext (this plugin needs neither member).
class NullResourceContext : public IPluginResourceContext
{
public:
    IGpuAllocator* getGpuAllocator() const noexcept override
    {
        return nullptr;
    }
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return nullptr;
    }
};

std::string cudaProblem(cudaError_t status)
{
    return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
}

//! Device memory freed on scope exit.
struct DeviceBuffer
{
    void* pointer{nullptr};
    size_t bytes{0};
    explicit DeviceBuffer(size_t size)
        : bytes(size)
    {
        if (cudaMalloc(&pointer, std::max<size_t>(size, 1)) != cudaSuccess)
        {
            pointer = nullptr;
        }
    }
    ~DeviceBuffer()
    {
        if (pointer != nullptr)
        {
            cudaFree(pointer);
        }
    }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
};

//! One enqueue configuration: attributes, shapes, element type, and the RoI kinds to draw.
struct GpuCase
{
    char const* name;
    DataType type;
    int32_t batch;
    int32_t rois;
    int32_t channels;
    int32_t inputHeight;
    int32_t inputWidth;
    int32_t outputHeight;
    int32_t outputWidth;
    int32_t samplingRatio;
    int32_t aligned;
    int32_t mode;
    std::vector<float> spatialScales;
    float canonicalScale;
    int32_t canonicalLevel;
    bool specialRois; //!< zero-size, inverted, out-of-image, huge and tiny RoIs first
};

//! The fields TensorRT's ONNX parser builds from the node's attributes: INT -> kINT32,
//! FLOAT / FLOATS -> kFLOAT32, STRING -> kCHAR (plugin_namespace, plugin_version).
struct ParserFields
{
    int32_t ints[6]{};
    std::vector<float> scales;
    float canonicalScale{};
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};

    explicit ParserFields(GpuCase const& c)
        : scales(c.spatialScales)
        , canonicalScale(c.canonicalScale)
    {
        ints[0] = c.outputHeight;
        ints[1] = c.outputWidth;
        ints[2] = c.samplingRatio;
        ints[3] = c.aligned;
        ints[4] = c.canonicalLevel;
        ints[5] = c.mode;
        fields.emplace_back("output_height", &ints[0], PluginFieldType::kINT32, 1);
        fields.emplace_back("output_width", &ints[1], PluginFieldType::kINT32, 1);
        fields.emplace_back("sampling_ratio", &ints[2], PluginFieldType::kINT32, 1);
        fields.emplace_back("aligned", &ints[3], PluginFieldType::kINT32, 1);
        fields.emplace_back("spatial_scales", scales.data(), PluginFieldType::kFLOAT32, static_cast<int32_t>(scales.size()));
        fields.emplace_back("canonical_scale", &canonicalScale, PluginFieldType::kFLOAT32, 1);
        fields.emplace_back("canonical_level", &ints[4], PluginFieldType::kINT32, 1);
        fields.emplace_back("mode", &ints[5], PluginFieldType::kINT32, 1);
        fields.emplace_back("plugin_namespace", "maskrt", PluginFieldType::kCHAR, 6);
        fields.emplace_back("plugin_version", "1", PluginFieldType::kCHAR, 1);
        collection.nbFields = static_cast<int32_t>(fields.size());
        collection.fields = fields.data();
    }
};

//! A deep copy of serialised fields, as an engine file holds them after the plugin is gone.
struct StoredFields
{
    std::vector<std::string> names;
    std::vector<std::vector<unsigned char>> bytes;
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};

    explicit StoredFields(PluginFieldCollection const* fc)
    {
        int32_t const count = fc == nullptr ? 0 : fc->nbFields;
        names.reserve(count);
        bytes.reserve(count);
        for (int32_t i = 0; i < count; ++i)
        {
            PluginField const& field = fc->fields[i];
            size_t elementSize = 0;
            switch (field.type)
            {
            case PluginFieldType::kINT32:
            case PluginFieldType::kFLOAT32: elementSize = 4; break;
            case PluginFieldType::kINT64:
            case PluginFieldType::kFLOAT64: elementSize = 8; break;
            case PluginFieldType::kCHAR:
            case PluginFieldType::kINT8: elementSize = 1; break;
            default: elementSize = 0; break;
            }
            names.emplace_back(field.name);
            auto const* data = static_cast<unsigned char const*>(field.data);
            bytes.emplace_back(data, data + elementSize * static_cast<size_t>(std::max(field.length, 0)));
        }
        for (int32_t i = 0; i < count; ++i)
        {
            fields.emplace_back(names[i].c_str(), bytes[i].data(), fc->fields[i].type, fc->fields[i].length);
        }
        collection.nbFields = count;
        collection.fields = fields.data();
    }
};

uint16_t toHalfBits(float value)
{
    __half_raw const raw = __float2half(value);
    return raw.x;
}

float fromHalfBits(uint16_t bits)
{
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
}

//! Host copies of one case's tensors in the case's element type (float or half bits).
struct HostTensors
{
    std::vector<std::vector<unsigned char>> inputs; //!< rois, then one per level
    std::vector<PluginTensorDesc> descs;            //!< inputs then the output
    std::vector<int64_t> heights;
    std::vector<int64_t> widths;
    size_t outputElements{0};
};

std::vector<unsigned char> encode(std::vector<float> const& values, DataType type)
{
    size_t const elementSize = type == DataType::kHALF ? 2 : 4;
    std::vector<unsigned char> out(values.size() * elementSize);
    for (size_t i = 0; i < values.size(); ++i)
    {
        if (type == DataType::kHALF)
        {
            uint16_t const bits = toHalfBits(values[i]);
            std::memcpy(out.data() + 2 * i, &bits, 2);
        }
        else
        {
            std::memcpy(out.data() + 4 * i, &values[i], 4);
        }
    }
    return out;
}

std::vector<float> decode(std::vector<unsigned char> const& bytes, DataType type)
{
    size_t const elementSize = type == DataType::kHALF ? 2 : 4;
    std::vector<float> out(bytes.size() / elementSize);
    for (size_t i = 0; i < out.size(); ++i)
    {
        if (type == DataType::kHALF)
        {
            uint16_t bits;
            std::memcpy(&bits, bytes.data() + 2 * i, 2);
            out[i] = fromHalfBits(bits);
        }
        else
        {
            std::memcpy(&out[i], bytes.data() + 4 * i, 4);
        }
    }
    return out;
}

PluginTensorDesc plainDesc(std::vector<int64_t> const& dims, DataType type)
{
    PluginTensorDesc desc{};
    desc.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        desc.dims.d[i] = dims[i];
    }
    desc.type = type;
    desc.format = TensorFormat::kLINEAR;
    desc.scale = 1.F;
    return desc;
}

HostTensors makeInputs(GpuCase const& c, uint32_t seed)
{
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.F, 1.F);
    std::uniform_real_distribution<float> unit(0.F, 1.F);
    HostTensors host;
    float const height = static_cast<float>(c.inputHeight);
    float const width = static_cast<float>(c.inputWidth);
    std::vector<float> rois;
    rois.reserve(static_cast<size_t>(c.batch) * c.rois * 4);
    for (int32_t b = 0; b < c.batch; ++b)
    {
        std::vector<std::array<float, 4>> special;
        if (c.specialRois)
        {
            special = {
                {10.F, 12.F, 10.F, 40.F},                              // zero width
                {5.F, 30.F, 60.F, 30.F},                               // zero height
                {17.F, 17.F, 17.F, 17.F},                              // a point
                {80.F, 60.F, 20.F, 10.F},                              // inverted
                {-60.F, -40.F, 30.F, 25.F},                            // partly outside, top left
                {width - 30.F, height - 20.F, width + 90.F, height + 70.F}, // partly outside, bottom right
                {width + 20.F, 10.F, width + 200.F, 150.F},            // wholly outside
                {-300.F, -300.F, width + 300.F, height + 300.F},      // larger than the image
                {3.2F, 4.7F, 3.9F, 5.1F},                              // under a pixel
                {0.F, 0.F, width, height},                             // the whole image
            };
        }
        for (int32_t r = 0; r < c.rois; ++r)
        {
            if (r < static_cast<int32_t>(special.size()))
            {
                rois.insert(rois.end(), special[r].begin(), special[r].end());
                continue;
            }
            float const cx = unit(rng) * width;
            float const cy = unit(rng) * height;
            float const w = std::exp(std::log(4.F) + unit(rng) * (std::log(width) - std::log(4.F)));
            float const h = std::exp(std::log(4.F) + unit(rng) * (std::log(height) - std::log(4.F)));
            rois.push_back(std::max(cx - w / 2, 0.F));
            rois.push_back(std::max(cy - h / 2, 0.F));
            rois.push_back(std::min(cx + w / 2, width));
            rois.push_back(std::min(cy + h / 2, height));
        }
    }
    host.inputs.push_back(encode(rois, c.type));
    host.descs.push_back(plainDesc({c.batch, c.rois, 4}, c.type));
    for (float scale : c.spatialScales)
    {
        int64_t const h = static_cast<int64_t>(std::lround(height * scale));
        int64_t const w = static_cast<int64_t>(std::lround(width * scale));
        std::vector<float> map(static_cast<size_t>(c.batch) * c.channels * h * w);
        for (float& value : map)
        {
            value = normal(rng);
        }
        host.inputs.push_back(encode(map, c.type));
        host.descs.push_back(plainDesc({c.batch, c.channels, h, w}, c.type));
        host.heights.push_back(h);
        host.widths.push_back(w);
    }
    host.descs.push_back(plainDesc({c.batch, c.rois, c.channels, c.outputHeight, c.outputWidth}, c.type));
    host.outputElements = static_cast<size_t>(c.batch) * c.rois * c.channels * c.outputHeight * c.outputWidth;
    return host;
}

//! The CPU twin's output for the case (same element type as the GPU's), as floats.
bool cpuReference(GpuCase const& c, HostTensors const& host, std::vector<float>& expected, std::string& why)
{
    size_t const elementSize = c.type == DataType::kHALF ? 2 : 4;
    std::vector<unsigned char> output(host.outputElements * elementSize);
    std::vector<void const*> features;
    for (size_t level = 1; level < host.inputs.size(); ++level)
    {
        features.push_back(host.inputs[level].data());
    }
    int const status = maskrt_multilevel_roi_align_cpu(host.inputs[0].data(), features.data(), host.heights.data(),
        host.widths.data(), static_cast<int32_t>(c.spatialScales.size()), c.batch, c.rois, c.channels,
        c.spatialScales.data(), c.outputHeight, c.outputWidth, c.samplingRatio, c.aligned, c.canonicalScale,
        c.canonicalLevel, c.mode, c.type == DataType::kHALF ? MASKRT_CPU_FLOAT16 : MASKRT_CPU_FLOAT32,
        output.data());
    if (status != MASKRT_CPU_OK)
    {
        why = std::string("CPU twin refused the case: ") + maskrt_cpu_error_string(status);
        return false;
    }
    expected = decode(output, c.type);
    return true;
}

//! Copies inputs to the device, runs onShapeChange + enqueue on `stream`, copies the output back.
bool enqueueOnDevice(IPluginV3* plugin, HostTensors const& host, cudaStream_t stream,
    std::vector<unsigned char>& output, std::string& why)
{
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    if (runtime == nullptr)
    {
        why = "no runtime capability";
        return false;
    }
    int32_t const nbInputs = static_cast<int32_t>(host.inputs.size());
    if (runtime->onShapeChange(host.descs.data(), nbInputs, &host.descs.back(), 1) != 0)
    {
        why = "onShapeChange refused the shapes";
        return false;
    }
    std::vector<std::unique_ptr<DeviceBuffer>> buffers;
    std::vector<void const*> inputs;
    for (auto const& bytes : host.inputs)
    {
        buffers.emplace_back(new DeviceBuffer(bytes.size()));
        if (buffers.back()->pointer == nullptr)
        {
            why = "cudaMalloc failed";
            return false;
        }
        cudaError_t const copied = bytes.empty()
            ? cudaSuccess
            : cudaMemcpyAsync(buffers.back()->pointer, bytes.data(), bytes.size(), cudaMemcpyHostToDevice, stream);
        if (copied != cudaSuccess)
        {
            why = cudaProblem(copied);
            return false;
        }
        inputs.push_back(buffers.back()->pointer);
    }
    DeviceBuffer out(output.size());
    // NaN-filled (0xff bytes) so that an element the kernel never writes cannot pass.
    if (out.pointer == nullptr || cudaMemsetAsync(out.pointer, 0xff, std::max<size_t>(output.size(), 1), stream) != cudaSuccess)
    {
        why = "output allocation failed";
        return false;
    }
    void* outputs[1] = {out.pointer};
    if (runtime->enqueue(host.descs.data(), &host.descs.back(), inputs.data(), outputs, nullptr, stream) != 0)
    {
        why = "enqueue returned non-zero";
        return false;
    }
    cudaError_t status = output.empty()
        ? cudaSuccess
        : cudaMemcpyAsync(output.data(), out.pointer, output.size(), cudaMemcpyDeviceToHost, stream);
    if (status == cudaSuccess)
    {
        status = cudaStreamSynchronize(stream);
    }
    if (status == cudaSuccess)
    {
        status = cudaGetLastError();
    }
    if (status != cudaSuccess)
    {
        why = cudaProblem(status);
        return false;
    }
    return true;
}

//! What an execution context does with a deserialised plugin: its runtime capability's attachToContext.
IPluginV3* attach(IPluginV3* plugin, NullResourceContext& context)
{
    auto* runtime = plugin == nullptr
        ? nullptr
        : static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    return runtime == nullptr ? nullptr : runtime->attachToContext(&context);
}

std::string formatDouble(double value)
{
    char text[32];
    std::snprintf(text, sizeof(text), "%.3g", value);
    return text;
}

//! One case end to end, as an engine build then an execution context would drive the plugin.
void runGpuCase(IPluginCreatorV3One* creator, RecordingLogger& logger, GpuCase const& c, cudaStream_t stream,
    double tolerance, uint32_t seed, bool onDevice)
{
    std::string const prefix = std::string("gpu_") + c.name + (c.type == DataType::kHALF ? "_fp16" : "_fp32");
    auto const name = [&](char const* what) { return prefix + "_" + what; };
    ParserFields parserFields(c);
    logger.lastMessage.clear();
    std::unique_ptr<IPluginV3> built(creator->createPlugin("pooler", &parserFields.collection, TensorRTPhase::kBUILD));
    check(built != nullptr, name("create_with_parser_fields").c_str(), logger.lastMessage);
    if (!built)
    {
        return;
    }
    auto* build = static_cast<IPluginV3OneBuild*>(built->getCapabilityInterface(PluginCapabilityType::kBUILD));
    HostTensors const host = makeInputs(c, seed);
    int32_t const nbInputs = static_cast<int32_t>(host.inputs.size());

    // Build phase.
    std::vector<DataType> inputTypes(nbInputs, c.type);
    DataType outputType = DataType::kINT8;
    check(build->getNbOutputs() == 1 && build->getOutputDataTypes(&outputType, 1, inputTypes.data(), nbInputs) == 0
            && outputType == c.type,
        name("output_type").c_str());
    {
        ConstantExprBuilder exprBuilder;
        std::vector<DimsExprs> inputShapes(nbInputs);
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            inputShapes[i].nbDims = host.descs[i].dims.nbDims;
            for (int32_t d = 0; d < inputShapes[i].nbDims; ++d)
            {
                inputShapes[i].d[d] = exprBuilder.constant(host.descs[i].dims.d[d]);
            }
        }
        DimsExprs outputShape{};
        int32_t const status
            = build->getOutputShapes(inputShapes.data(), nbInputs, nullptr, 0, &outputShape, 1, exprBuilder);
        Dims const& want = host.descs.back().dims;
        bool same = status == 0 && outputShape.nbDims == want.nbDims;
        for (int32_t d = 0; same && d < want.nbDims; ++d)
        {
            same = outputShape.d[d] != nullptr && outputShape.d[d]->isConstant()
                && outputShape.d[d]->getConstantValue() == want.d[d];
        }
        check(same, name("output_shape").c_str(), "getOutputShapes gave another shape");
    }
    std::vector<DynamicPluginTensorDesc> io(nbInputs + 1);
    for (int32_t i = 0; i <= nbInputs; ++i)
    {
        io[i].desc = host.descs[i];
        io[i].min = io[i].opt = io[i].max = host.descs[i].dims;
        // A dynamic profile: B and R from 1 (R from 0) up to the case's values.
        if (i == 0 || i == nbInputs)
        {
            io[i].desc.dims.d[0] = -1;
            io[i].desc.dims.d[1] = -1;
            io[i].min.d[0] = 1;
            io[i].min.d[1] = 0;
        }
        else
        {
            io[i].desc.dims.d[0] = -1;
            io[i].min.d[0] = 1;
        }
    }
    bool formatsOk = true;
    for (int32_t pos = 0; pos <= nbInputs; ++pos)
    {
        formatsOk = formatsOk && build->supportsFormatCombination(pos, io.data(), nbInputs, 1);
    }
    check(formatsOk, name("formats_supported").c_str());
    check(build->configurePlugin(io.data(), nbInputs, &io[nbInputs], 1) == 0, name("configure").c_str(),
        logger.lastMessage);
    size_t const workspace = build->getWorkspaceSize(io.data(), nbInputs, &io[nbInputs], 1);
    check(workspace == 0, name("workspace_size_0").c_str(), std::to_string(workspace) + " bytes");

    // Engine: the fields as serialised; execution context: created from them, attached.
    auto* builtRuntime = static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    StoredFields const stored(builtRuntime->getFieldsToSerialize());
    std::unique_ptr<IPluginV3> deserialised(creator->createPlugin("pooler", &stored.collection, TensorRTPhase::kRUNTIME));
    NullResourceContext context;
    std::unique_ptr<IPluginV3> attached(attach(deserialised.get(), context));
    check(attached != nullptr, name("runtime_create_and_attach").c_str(), logger.lastMessage);
    if (!attached)
    {
        return;
    }
    std::string why;
    std::vector<float> expected;
    if (!cpuReference(c, host, expected, why))
    {
        check(false, name("cpu_twin_reference").c_str(), why);
        return;
    }
    if (!onDevice)
    {
        return; // --no-device: everything but the launches
    }
    size_t const elementSize = c.type == DataType::kHALF ? 2 : 4;
    std::vector<unsigned char> first(host.outputElements * elementSize);
    bool const ran = enqueueOnDevice(attached.get(), host, stream, first, why);
    check(ran, name("enqueue").c_str(), why + (logger.lastMessage.empty() ? "" : " (" + logger.lastMessage + ")"));
    if (!ran)
    {
        return;
    }
    std::vector<float> const got = decode(first, c.type);
    double largest = 0.0;
    double worst = 0.0;
    bool finite = true;
    for (size_t i = 0; i < got.size(); ++i)
    {
        largest = std::max(largest, std::fabs(static_cast<double>(expected[i])));
        double const difference = std::fabs(static_cast<double>(got[i]) - expected[i]);
        finite = finite && std::isfinite(got[i]);
        worst = std::isfinite(difference) ? std::max(worst, difference) : INFINITY;
    }
    double const relative = largest > 0.0 ? worst / largest : worst;
    std::string const verdict = "max_rel=" + formatDouble(relative) + " tol=" + formatDouble(tolerance);
    check(finite && relative <= tolerance, (name("matches_cpu_twin") + " " + verdict).c_str(),
        finite ? verdict : "non-finite output");

    // clone() and serialise -> recreate -> attach -> enqueue: the same bits.
    std::unique_ptr<IPluginV3> cloned(attached->clone());
    std::vector<unsigned char> again(first.size());
    check(cloned != nullptr && enqueueOnDevice(cloned.get(), host, stream, again, why) && again == first,
        name("clone_enqueue_bit_identical").c_str(), why);
    auto* attachedRuntime
        = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    StoredFields const restoredFields(attachedRuntime->getFieldsToSerialize());
    std::unique_ptr<IPluginV3> recreated(
        creator->createPlugin("pooler", &restoredFields.collection, TensorRTPhase::kRUNTIME));
    std::unique_ptr<IPluginV3> recreatedAttached(attach(recreated.get(), context));
    std::fill(again.begin(), again.end(), 0);
    check(recreatedAttached != nullptr && enqueueOnDevice(recreatedAttached.get(), host, stream, again, why)
            && again == first,
        name("serialise_recreate_enqueue_bit_identical").c_str(), why);
}

std::vector<float> const kFpnScales = {0.25F, 0.125F, 0.0625F, 0.03125F};

//! The GPU cases: fp32 and fp16 each. `small` (for compute-sanitizer) keeps B, R and C small.
std::vector<GpuCase> gpuCases(bool small)
{
    std::vector<GpuCase> cases;
    for (DataType type : {DataType::kFLOAT, DataType::kHALF})
    {
        if (small)
        {
            cases.push_back({"small_special_rois", type, 2, 16, 4, 128, 160, 7, 7, 2, 0, 0, kFpnScales, 224.F, 4, true});
            cases.push_back({"small_aligned_adaptive_max", type, 2, 16, 4, 128, 160, 14, 14, 0, 1, 1, kFpnScales, 224.F, 4, true});
            continue;
        }
        // Mask R-CNN's box pooler at COCO size, R = 1000 (C kept small: the CPU twin is the reference).
        cases.push_back({"box_pooler_b1_r1000", type, 1, 1000, 8, 800, 1344, 7, 7, 2, 0, 0, kFpnScales, 224.F, 4, false});
        // Four images, every RoI kind, each mode.
        cases.push_back({"b4_special_legacy_sr2_avg", type, 4, 200, 16, 256, 384, 7, 7, 2, 0, 0, kFpnScales, 224.F, 4, true});
        cases.push_back({"b4_special_aligned_sr0_avg", type, 4, 200, 16, 256, 384, 7, 7, 0, 1, 0, kFpnScales, 224.F, 4, true});
        cases.push_back({"b2_special_legacy_sr0_max", type, 2, 100, 16, 256, 384, 14, 14, 0, 0, 1, kFpnScales, 224.F, 4, true});
        cases.push_back({"b2_special_aligned_sr2_max", type, 2, 100, 16, 256, 384, 14, 14, 2, 1, 1, kFpnScales, 224.F, 4, true});
        // Three levels, another level rule, a non-square output.
        cases.push_back({"b3_three_levels_12x6", type, 3, 64, 8, 256, 320, 12, 6, 2, 1, 0,
            {0.125F, 0.0625F, 0.03125F}, 112.F, 3, true});
    }
    return cases;
}

//! R = 0 with real device buffers: enqueue launches nothing and succeeds.
void runZeroRoisOnDevice(IPluginCreatorV3One* creator, cudaStream_t stream)
{
    GpuCase const c{"zero_rois", DataType::kFLOAT, 4, 0, 8, 256, 384, 7, 7, 2, 0, 0, kFpnScales, 224.F, 4, false};
    ParserFields parserFields(c);
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("pooler", &parserFields.collection, TensorRTPhase::kRUNTIME));
    HostTensors const host = makeInputs(c, 7);
    std::vector<unsigned char> output;
    std::string why;
    check(plugin != nullptr && enqueueOnDevice(plugin.get(), host, stream, output, why), "gpu_zero_rois_b4_enqueue",
        why);
}

void runGpuChecks(IPluginCreatorV3One* creator, RecordingLogger& logger, bool small, double fp32Tolerance,
    double fp16Tolerance, bool onDevice)
{
    if (!onDevice)
    {
        // The build phase, serialisation and attachToContext of every case, without a device.
        uint32_t seed = 1;
        for (GpuCase const& c : gpuCases(small))
        {
            runGpuCase(creator, logger, c, nullptr, 0.0, seed++, false);
        }
        return;
    }
    int deviceCount = 0;
    cudaError_t const status = cudaGetDeviceCount(&deviceCount);
    check(status == cudaSuccess && deviceCount > 0, "gpu_device_present",
        status == cudaSuccess ? "no CUDA device" : cudaProblem(status));
    if (status != cudaSuccess || deviceCount == 0)
    {
        return;
    }
    cudaDeviceProp props{};
    cudaGetDeviceProperties(&props, 0);
    std::printf("INFO device %s sm_%d%d\n", props.name, props.major, props.minor);
    cudaStream_t stream = nullptr;
    if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess)
    {
        check(false, "gpu_stream_create");
        return;
    }
    uint32_t seed = 1;
    for (GpuCase const& c : gpuCases(small))
    {
        runGpuCase(
            creator, logger, c, stream, c.type == DataType::kHALF ? fp16Tolerance : fp32Tolerance, seed++, true);
    }
    runZeroRoisOnDevice(creator, stream);
    cudaStreamDestroy(stream);
}
#endif // MASKRT_PLUGIN_CHECK_GPU

} // namespace

int main(int argc, char** argv)
{
    // Line-buffered: a crash (e.g. in a kernel launch) leaves every line printed before it.
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
#ifdef MASKRT_PLUGIN_CHECK_GPU
    bool small = false;
    bool onDevice = true;
    double fp32Tolerance = 1e-5;
    double fp16Tolerance = 1e-2;
    for (int i = 2; i < argc; ++i)
    {
        std::string const arg = argv[i];
        if (arg == "--small")
        {
            small = true;
        }
        else if (arg == "--no-device")
        {
            onDevice = false;
        }
        else if ((arg == "--fp32-tol" || arg == "--fp16-tol") && i + 1 < argc)
        {
            (arg == "--fp32-tol" ? fp32Tolerance : fp16Tolerance) = std::atof(argv[++i]);
        }
        else
        {
            std::fprintf(stderr, "unknown argument %s\n", arg.c_str());
            return 100;
        }
    }
    if (argc < 2)
    {
        std::fprintf(stderr, "usage: %s libmaskrt_plugins.so [--small] [--no-device] [--fp32-tol X] [--fp16-tol X]\n", argv[0]);
        return 100;
    }
#else
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s libmaskrt_plugins.so\n", argv[0]);
        return 100;
    }
#endif
    void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr)
    {
        std::printf("FAIL dlopen: %s\n", dlerror());
        return 100;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(library, "setLoggerFinder"));
    check(getCreators != nullptr && setLoggerFinder != nullptr, "entry_points_exported");
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        return gFailures;
    }
    RecordingLogger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);

    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    check(count == 1 && creators != nullptr && creators[0] != nullptr, "one_creator");
    InterfaceInfo const info = creators[0]->getInterfaceInfo();
    check(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0, "creator_is_v3one", info.kind);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    check(std::strcmp(creator->getPluginName(), "MultilevelRoIAlign") == 0
            && std::strcmp(creator->getPluginVersion(), "1") == 0
            && std::strcmp(creator->getPluginNamespace(), "maskrt") == 0,
        "creator_identity");

    // A non-default attribute set: the round trip must carry each value.
    Fields custom;
    custom.addInt("output_height", 14);
    custom.addInt("output_width", 12);
    custom.addInt("sampling_ratio", 0);
    custom.addInt("aligned", 1);
    custom.addFloats("spatial_scales", {0.125F, 0.0625F, 0.03125F});
    custom.addFloats("canonical_scale", {112.F});
    custom.addInt("canonical_level", 3);
    custom.addInt("mode", 1);
    std::unique_ptr<IPluginV3> built(creator->createPlugin("pooler", custom.get(), TensorRTPhase::kBUILD));
    check(built != nullptr, "create_build_phase", logger.lastMessage);
    if (!built)
    {
        return gFailures;
    }
    auto* core = static_cast<IPluginV3OneCore*>(built->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(built->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core != nullptr && build != nullptr && runtime != nullptr, "capabilities");
    check(std::strcmp(core->getPluginName(), "MultilevelRoIAlign") == 0
            && std::strcmp(core->getPluginNamespace(), "maskrt") == 0,
        "plugin_identity");

    std::vector<std::string> const serialised = describe(runtime->getFieldsToSerialize());
    std::vector<std::string> const expected = describe(custom.get());
    check(serialised == expected, "serialised_fields_equal_creation_fields",
        serialised.empty() ? "none" : serialised[0]);

    // kRUNTIME: rebuilt from the serialised fields, as deserialisation does.
    PluginFieldCollection const* serialisedFc = runtime->getFieldsToSerialize();
    std::unique_ptr<IPluginV3> restored(creator->createPlugin("pooler", serialisedFc, TensorRTPhase::kRUNTIME));
    check(restored != nullptr, "create_runtime_phase_from_serialised", logger.lastMessage);
    if (restored)
    {
        auto* restoredRuntime
            = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        check(describe(restoredRuntime->getFieldsToSerialize()) == expected, "round_trip_preserves_fields");
    }
    std::unique_ptr<IPluginV3> cloned(built->clone());
    check(cloned != nullptr
            && describe(static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                            ->getFieldsToSerialize())
                == expected,
        "clone_preserves_fields");

    // Defaults when no field is given: 4 levels.
    std::unique_ptr<IPluginV3> defaults(creator->createPlugin("pooler", nullptr, TensorRTPhase::kBUILD));
    check(defaults != nullptr, "create_with_defaults");

    // Build-phase queries on the 3-level plugin: 1 + 3 inputs.
    DataType const halfInputs[4] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF};
    DataType outputType = DataType::kFLOAT;
    check(build->getNbOutputs() == 1, "one_output");
    check(build->getOutputDataTypes(&outputType, 1, halfInputs, 4) == 0 && outputType == DataType::kHALF,
        "output_type_follows_input");
    check(build->getOutputDataTypes(&outputType, 1, halfInputs, 3) != 0, "wrong_input_count_refused");

    auto const formatOk = [&](std::vector<DynamicPluginTensorDesc> const& io) {
        for (int32_t pos = 0; pos < static_cast<int32_t>(io.size()); ++pos)
        {
            if (!build->supportsFormatCombination(pos, io.data(), static_cast<int32_t>(io.size()) - 1, 1))
            {
                return false;
            }
        }
        return true;
    };
    for (DataType type : {DataType::kFLOAT, DataType::kHALF})
    {
        std::vector<DynamicPluginTensorDesc> io = {tensor({2, 5, 4}, type), tensor({2, 8, 16, 16}, type),
            tensor({2, 8, 8, 8}, type), tensor({2, 8, 4, 4}, type), tensor({2, 5, 8, 14, 12}, type)};
        check(formatOk(io), type == DataType::kFLOAT ? "fp32_linear_supported" : "fp16_linear_supported");
    }
    {
        std::vector<DynamicPluginTensorDesc> mixed = {tensor({2, 5, 4}, DataType::kFLOAT),
            tensor({2, 8, 16, 16}, DataType::kHALF), tensor({2, 8, 8, 8}, DataType::kFLOAT),
            tensor({2, 8, 4, 4}, DataType::kFLOAT), tensor({2, 5, 8, 14, 12}, DataType::kFLOAT)};
        check(!formatOk(mixed), "mixed_types_refused");
        std::vector<DynamicPluginTensorDesc> int8 = {tensor({2, 5, 4}, DataType::kINT8),
            tensor({2, 8, 16, 16}, DataType::kINT8), tensor({2, 8, 8, 8}, DataType::kINT8),
            tensor({2, 8, 4, 4}, DataType::kINT8), tensor({2, 5, 8, 14, 12}, DataType::kINT8)};
        check(!formatOk(int8), "int8_refused");
        std::vector<DynamicPluginTensorDesc> chw32 = {tensor({2, 5, 4}, DataType::kFLOAT),
            tensor({2, 8, 16, 16}, DataType::kFLOAT, TensorFormat::kCHW32), tensor({2, 8, 8, 8}, DataType::kFLOAT),
            tensor({2, 8, 4, 4}, DataType::kFLOAT), tensor({2, 5, 8, 14, 12}, DataType::kFLOAT)};
        check(!formatOk(chw32), "non_linear_format_refused");
    }

    // configurePlugin: dynamic B and R (-1) accepted; rois [B, R, 5] refused.
    {
        std::vector<DynamicPluginTensorDesc> in = {tensor({-1, -1, 4}, DataType::kFLOAT),
            tensor({-1, 8, 16, 16}, DataType::kFLOAT), tensor({-1, 8, 8, 8}, DataType::kFLOAT),
            tensor({-1, 8, 4, 4}, DataType::kFLOAT)};
        DynamicPluginTensorDesc out = tensor({-1, -1, 8, 14, 12}, DataType::kFLOAT);
        check(build->configurePlugin(in.data(), 4, &out, 1) == 0, "configure_dynamic_batch_and_rois");
        in[0] = tensor({-1, -1, 5}, DataType::kFLOAT);
        check(build->configurePlugin(in.data(), 4, &out, 1) != 0, "configure_rois_not_xyxy_refused");
        in[0] = tensor({2, -1, 4}, DataType::kFLOAT);
        in[2] = tensor({3, 8, 8, 8}, DataType::kFLOAT);
        check(build->configurePlugin(in.data(), 4, &out, 1) != 0, "configure_batch_mismatch_refused");
    }

    // onShapeChange / enqueue shape checks. An empty output (R = 0) launches nothing: enqueue
    // succeeds without touching CUDA, so it runs here too.
    {
        auto desc = [](std::vector<int64_t> const& dims) { return tensor(dims, DataType::kFLOAT).desc; };
        std::vector<PluginTensorDesc> in = {desc({2, 0, 4}), desc({2, 8, 16, 16}), desc({2, 8, 8, 8}), desc({2, 8, 4, 4})};
        PluginTensorDesc out = desc({2, 0, 8, 14, 12});
        check(runtime->onShapeChange(in.data(), 4, &out, 1) == 0, "shape_change_ok");
        void const* inputs[4] = {nullptr, nullptr, nullptr, nullptr};
        void* outputs[1] = {nullptr};
        check(runtime->enqueue(in.data(), &out, inputs, outputs, nullptr, nullptr) == 0, "enqueue_zero_rois_is_noop");
        in[3] = desc({2, 7, 4, 4});
        check(runtime->onShapeChange(in.data(), 4, &out, 1) != 0, "shape_change_channel_mismatch_refused");
        check(runtime->enqueue(in.data(), &out, inputs, outputs, nullptr, nullptr) != 0,
            "enqueue_channel_mismatch_refused");
        check(runtime->onShapeChange(in.data(), 3, &out, 1) != 0, "shape_change_wrong_input_count_refused");
    }

    // Refused fields: nullptr and a log line, never an abort.
    struct BadCase
    {
        char const* name;
        void (*fill)(Fields&);
    };
    BadCase const badCases[] = {
        {"bad_mode_3", [](Fields& f) { f.addInt("mode", 3); }},
        {"bad_output_height_0", [](Fields& f) { f.addInt("output_height", 0); }},
        {"bad_output_width_negative", [](Fields& f) { f.addInt("output_width", -7); }},
        {"bad_sampling_ratio_negative", [](Fields& f) { f.addInt("sampling_ratio", -1); }},
        {"bad_aligned_2", [](Fields& f) { f.addInt("aligned", 2); }},
        {"bad_spatial_scales_6_levels",
            [](Fields& f) { f.addFloats("spatial_scales", {0.5F, 0.25F, 0.125F, 0.0625F, 0.03125F, 0.015625F}); }},
        {"bad_spatial_scales_not_power_of_two", [](Fields& f) { f.addFloats("spatial_scales", {0.3F, 0.15F}); }},
        {"bad_spatial_scales_increasing", [](Fields& f) { f.addFloats("spatial_scales", {0.125F, 0.25F}); }},
        {"bad_spatial_scales_skipping_a_level", [](Fields& f) { f.addFloats("spatial_scales", {0.25F, 0.0625F}); }},
        {"bad_canonical_scale_0", [](Fields& f) { f.addFloats("canonical_scale", {0.F}); }},
        {"bad_unknown_field", [](Fields& f) { f.addInt("samplingratio", 2); }},
        {"bad_int_field_as_float", [](Fields& f) { f.addFloats("output_height", {7.F}); }},
        {"bad_int_field_length_2",
            [](Fields& f) {
                f.addInt("output_height", 7);
                f.fields.back().length = 2;
            }},
    };
    for (BadCase const& bad : badCases)
    {
        Fields fields;
        bad.fill(fields);
        logger.lastMessage.clear();
        std::unique_ptr<IPluginV3> plugin(creator->createPlugin("pooler", fields.get(), TensorRTPhase::kBUILD));
        check(plugin == nullptr && !logger.lastMessage.empty(), bad.name,
            plugin ? "accepted" : "refused without a log message");
        if (plugin == nullptr)
        {
            std::printf("  logged: %s\n", logger.lastMessage.c_str());
        }
    }
    // ONNX-parser bookkeeping attributes are accepted and ignored.
    {
        Fields fields;
        fields.addInt("plugin_version", 1);
        std::unique_ptr<IPluginV3> plugin(creator->createPlugin("pooler", fields.get(), TensorRTPhase::kBUILD));
        check(plugin != nullptr, "onnx_plugin_version_field_ignored");
    }
#ifdef MASKRT_PLUGIN_CHECK_GPU
    runGpuChecks(creator, logger, small, fp32Tolerance, fp16Tolerance, onDevice);
#endif
    std::printf("%d failures\n", gFailures);
    return gFailures;
}
