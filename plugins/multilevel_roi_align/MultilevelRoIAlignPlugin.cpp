// MultilevelRoIAlign TensorRT plugin: see MultilevelRoIAlignPlugin.h and plugins/README.md.
//
// Rules kept throughout: every noexcept entry point catches all exceptions and reports an error
// code or nullptr; nothing here calls a CUDA API except enqueue (which launches the kernel on
// the given stream), so creating the plugin in either phase works without a GPU.
#include "MultilevelRoIAlignPlugin.h"

#include <NvInferVersion.h>

#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>

using namespace nvinfer1;

namespace
{

// ---- which TensorRT this library serves ------------------------------------------------------
// TensorRT 11 made ILoggerFinder and ILogger derive from IVersionedInterface, which moved
// findLogger() and ILogger::log in their vtables: a library built with one major's headers
// must not call the logger of a process running the other major (10.x headers in an 11 process:
// messages lost; 11.x headers in a 10 process: a crash on the first logged message). So one
// build serves one major, recorded here, and a process of another major is refused.
constexpr int32_t kBuiltForTensorRTMajor = NV_TENSORRT_MAJOR;
#define MASKRT_STRINGIFY_VALUE(x) #x
#define MASKRT_STRINGIFY(x) MASKRT_STRINGIFY_VALUE(x)
// The same record as bytes in the file, so that tools read it without loading the library.
__attribute__((used)) char const kBuildRecord[] = "maskrt_plugin_tensorrt_major=" MASKRT_STRINGIFY(NV_TENSORRT_MAJOR);

using MajorVersionFunction = int32_t (*)();

//! Finds getInferLibMajorVersion in a TensorRT library already loaded by the process (libnvinfer,
//! libnvinfer_lean or libnvinfer_dispatch; Python loads them RTLD_LOCAL, so look them up by name).
int findLoadedTensorRTLibrary(dl_phdr_info* info, size_t /*size*/, void* result)
{
    char const* path = info->dlpi_name;
    if (path == nullptr || *path == '\0')
    {
        return 0;
    }
    std::string const name = std::string(path).substr(std::string(path).find_last_of('/') + 1);
    bool const isRuntime = name.rfind("libnvinfer.so", 0) == 0 || name.rfind("libnvinfer_lean.so", 0) == 0
        || name.rfind("libnvinfer_dispatch.so", 0) == 0;
    if (!isRuntime)
    {
        return 0;
    }
    void* handle = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
    if (handle == nullptr)
    {
        return 0;
    }
    auto function = reinterpret_cast<MajorVersionFunction>(dlsym(handle, "getInferLibMajorVersion"));
    if (function != nullptr)
    {
        *static_cast<int32_t*>(result) = function();
    }
    dlclose(handle);
    return function != nullptr ? 1 : 0;
}

//! The TensorRT major version of the process that loaded this library; -1 when no TensorRT
//! library is loaded (a harness that drives the interfaces itself: trusted).
int32_t hostTensorRTMajor() noexcept
{
    auto global = reinterpret_cast<MajorVersionFunction>(dlsym(RTLD_DEFAULT, "getInferLibMajorVersion"));
    if (global != nullptr)
    {
        return global();
    }
    int32_t major = -1;
    dl_iterate_phdr(findLoadedTensorRTLibrary, &major);
    return major;
}

//! Whether this process runs the TensorRT major this library was built for. Says why not, on
//! stderr (the process's logger is the very interface that cannot be called), once.
bool hostMatchesBuild() noexcept
{
    static int32_t const hostMajor = hostTensorRTMajor();
    if (hostMajor < 0 || hostMajor == kBuiltForTensorRTMajor)
    {
        return true;
    }
    static bool const reported = [] {
        std::fprintf(stderr,
            "maskrt::MultilevelRoIAlign: this libmaskrt_plugins.so was built against TensorRT %d headers but the "
            "process runs TensorRT %d (the logger interfaces differ between majors): not registering the plugin. "
            "Rebuild it with `maskrt plugin build --tensorrt-include <TensorRT %d include/>`.\n",
            kBuiltForTensorRTMajor, hostMajor, hostMajor);
        return true;
    }();
    (void) reported;
    return false;
}

// ---- logging through the logger TensorRT hands us ----------------------------------------
std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder{nullptr};

void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        std::lock_guard<std::mutex> lock(gLoggerMutex);
        ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
        std::string const line = std::string("maskrt::MultilevelRoIAlign: ") + message;
        if (logger != nullptr)
        {
            logger->log(severity, line.c_str());
        }
        else if (severity <= ILogger::Severity::kWARNING)
        {
            // No TensorRT logger yet (library used before setLoggerFinder): still say it.
            std::fprintf(stderr, "%s\n", line.c_str());
        }
    }
    catch (...)
    {
    }
}

void logError(std::string const& message) noexcept
{
    logMessage(ILogger::Severity::kERROR, message);
}

void logException(char const* where, std::exception const& error) noexcept
{
    logError(std::string(where) + ": " + error.what());
}

// ---- the fields: one table, used for getFieldNames, createPlugin and serialisation --------
constexpr char const* kOutputHeight = "output_height";
constexpr char const* kOutputWidth = "output_width";
constexpr char const* kSamplingRatio = "sampling_ratio";
constexpr char const* kAligned = "aligned";
constexpr char const* kSpatialScales = "spatial_scales";
constexpr char const* kCanonicalScale = "canonical_scale";
constexpr char const* kCanonicalLevel = "canonical_level";
constexpr char const* kMode = "mode";
// The ONNX node carries these for the parser's plugin lookup; they are not attributes of the op.
constexpr char const* kOnnxPluginNamespace = "plugin_namespace";
constexpr char const* kOnnxPluginVersion = "plugin_version";

//! Reads one integer from a field (INT32, or INT64 within int32 range). Throws on a bad field.
int32_t readInt(PluginField const& field)
{
    if (field.data == nullptr || field.length != 1)
    {
        throw std::invalid_argument(std::string("field '") + field.name + "' must hold exactly one integer");
    }
    if (field.type == PluginFieldType::kINT32)
    {
        return *static_cast<int32_t const*>(field.data);
    }
    if (field.type == PluginFieldType::kINT64)
    {
        int64_t const value = *static_cast<int64_t const*>(field.data);
        if (value < INT32_MIN || value > INT32_MAX)
        {
            throw std::invalid_argument(std::string("field '") + field.name + "' is out of int32 range");
        }
        return static_cast<int32_t>(value);
    }
    throw std::invalid_argument(std::string("field '") + field.name + "' must be INT32");
}

//! Reads a list of floats (FLOAT32, or FLOAT64) from a field. Throws on a bad field.
std::vector<float> readFloats(PluginField const& field)
{
    if (field.data == nullptr || field.length < 1)
    {
        throw std::invalid_argument(std::string("field '") + field.name + "' is empty");
    }
    std::vector<float> values(static_cast<size_t>(field.length));
    for (int32_t i = 0; i < field.length; ++i)
    {
        if (field.type == PluginFieldType::kFLOAT32)
        {
            values[i] = static_cast<float const*>(field.data)[i];
        }
        else if (field.type == PluginFieldType::kFLOAT64)
        {
            values[i] = static_cast<float>(static_cast<double const*>(field.data)[i]);
        }
        else
        {
            throw std::invalid_argument(std::string("field '") + field.name + "' must be FLOAT32");
        }
    }
    return values;
}

float readFloat(PluginField const& field)
{
    std::vector<float> const values = readFloats(field);
    if (values.size() != 1)
    {
        throw std::invalid_argument(std::string("field '") + field.name + "' must hold exactly one float");
    }
    return values[0];
}

maskrt::MultilevelRoIAlignAttributes parseFields(PluginFieldCollection const* fc)
{
    maskrt::MultilevelRoIAlignAttributes attributes;
    if (fc == nullptr)
    {
        return attributes; // all defaults
    }
    if (fc->nbFields < 0 || (fc->nbFields > 0 && fc->fields == nullptr))
    {
        throw std::invalid_argument("malformed PluginFieldCollection");
    }
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        if (field.name == nullptr)
        {
            throw std::invalid_argument("a field has no name");
        }
        std::string const name(field.name);
        if (name == kOutputHeight)
        {
            attributes.outputHeight = readInt(field);
        }
        else if (name == kOutputWidth)
        {
            attributes.outputWidth = readInt(field);
        }
        else if (name == kSamplingRatio)
        {
            attributes.samplingRatio = readInt(field);
        }
        else if (name == kAligned)
        {
            attributes.aligned = readInt(field);
        }
        else if (name == kSpatialScales)
        {
            attributes.spatialScales = readFloats(field);
        }
        else if (name == kCanonicalScale)
        {
            attributes.canonicalScale = readFloat(field);
        }
        else if (name == kCanonicalLevel)
        {
            attributes.canonicalLevel = readInt(field);
        }
        else if (name == kMode)
        {
            attributes.mode = readInt(field);
        }
        else if (name != kOnnxPluginNamespace && name != kOnnxPluginVersion)
        {
            // A misspelt attribute would otherwise silently fall back to its default.
            throw std::invalid_argument("unknown field '" + name + "'");
        }
    }
    return attributes;
}

char const* dataTypeName(DataType type)
{
    switch (type)
    {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    default: return "unsupported";
    }
}

} // namespace

namespace maskrt
{

// ---- attributes ----------------------------------------------------------------------------

MultilevelRoIAlignParams MultilevelRoIAlignAttributes::toParams() const
{
    MultilevelRoIAlignParams params;
    params.outputHeight = outputHeight;
    params.outputWidth = outputWidth;
    params.samplingRatio = samplingRatio;
    params.aligned = aligned;
    params.mode = mode;
    params.canonicalScale = canonicalScale;
    params.canonicalLevel = canonicalLevel;
    params.numLevels = static_cast<int32_t>(spatialScales.size());
    int32_t const count = std::min<int32_t>(params.numLevels, kMaxFeatureLevels);
    for (int32_t level = 0; level < count; ++level)
    {
        params.spatialScales[level] = spatialScales[level];
    }
    params.firstLevel = !spatialScales.empty() && spatialScales[0] > 0.F
        ? static_cast<int32_t>(std::lround(-std::log2(spatialScales[0])))
        : 0;
    return params;
}

char const* MultilevelRoIAlignAttributes::validate() const
{
    if (spatialScales.empty() || spatialScales.size() > static_cast<size_t>(kMaxFeatureLevels))
    {
        return "spatial_scales must list 1..5 scales (one per feature input)";
    }
    return validateMultilevelRoIAlignParams(toParams());
}

// ---- plugin ----------------------------------------------------------------------------------

MultilevelRoIAlignPlugin::MultilevelRoIAlignPlugin(MultilevelRoIAlignAttributes attributes)
    : mAttributes(std::move(attributes))
{
}

IPluginCapability* MultilevelRoIAlignPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    try
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
    }
    catch (std::exception const& error)
    {
        logException("getCapabilityInterface", error);
    }
    catch (...)
    {
        logError(std::string("getCapabilityInterface: unknown exception"));
    }
    return nullptr;
}

IPluginV3* MultilevelRoIAlignPlugin::clone() noexcept
{
    try
    {
        return new MultilevelRoIAlignPlugin(mAttributes);
    }
    catch (std::exception const& error)
    {
        logException("clone", error);
    }
    catch (...)
    {
        logError(std::string("clone: unknown exception"));
    }
    return nullptr;
}

char const* MultilevelRoIAlignPlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MultilevelRoIAlignPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MultilevelRoIAlignPlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t MultilevelRoIAlignPlugin::numLevels() const noexcept
{
    return static_cast<int32_t>(mAttributes.spatialScales.size());
}

int32_t MultilevelRoIAlignPlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t MultilevelRoIAlignPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    try
    {
        if (nbOutputs != 1 || nbInputs != 1 + numLevels())
        {
            logError("expects 1 + " + std::to_string(numLevels()) + " inputs (rois and one feature map per "
                "spatial scale) and 1 output, got " + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
            return -1;
        }
        outputTypes[0] = inputTypes[0];
        return 0;
    }
    catch (std::exception const& error)
    {
        logException("getOutputDataTypes", error);
    }
    catch (...)
    {
        logError(std::string("getOutputDataTypes: unknown exception"));
    }
    return -1;
}

int32_t MultilevelRoIAlignPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    try
    {
        if (nbOutputs != 1 || nbInputs != 1 + numLevels())
        {
            logError("expects " + std::to_string(1 + numLevels()) + " inputs, got " + std::to_string(nbInputs));
            return -1;
        }
        if (inputs[0].nbDims != 3)
        {
            logError("input 0 (rois) must be [B, R, 4], got rank " + std::to_string(inputs[0].nbDims));
            return -1;
        }
        for (int32_t i = 1; i < nbInputs; ++i)
        {
            if (inputs[i].nbDims != 4)
            {
                logError("input " + std::to_string(i) + " (features) must be [B, C, H, W], got rank "
                    + std::to_string(inputs[i].nbDims));
                return -1;
            }
        }
        // [B, R, C, output_height, output_width]: B and R follow the rois (dynamic), C the features.
        outputs[0].nbDims = 5;
        outputs[0].d[0] = inputs[0].d[0];
        outputs[0].d[1] = inputs[0].d[1];
        outputs[0].d[2] = inputs[1].d[1];
        outputs[0].d[3] = exprBuilder.constant(mAttributes.outputHeight);
        outputs[0].d[4] = exprBuilder.constant(mAttributes.outputWidth);
        return 0;
    }
    catch (std::exception const& error)
    {
        logException("getOutputShapes", error);
    }
    catch (...)
    {
        logError(std::string("getOutputShapes: unknown exception"));
    }
    return -1;
}

bool MultilevelRoIAlignPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    try
    {
        if (pos < 0 || pos >= nbInputs + nbOutputs)
        {
            return false;
        }
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        if (pos == 0)
        {
            return desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
        }
        // Every tensor has the type of the rois.
        return desc.type == inOut[0].desc.type;
    }
    catch (std::exception const& error)
    {
        logException("supportsFormatCombination", error);
    }
    catch (...)
    {
        logError(std::string("supportsFormatCombination: unknown exception"));
    }
    return false;
}

int32_t MultilevelRoIAlignPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    try
    {
        if (nbOutputs != 1 || nbInputs != 1 + numLevels())
        {
            logError("expects " + std::to_string(1 + numLevels()) + " inputs, got " + std::to_string(nbInputs));
            return -1;
        }
        Dims const& rois = in[0].desc.dims;
        if (rois.nbDims != 3 || (rois.d[2] != -1 && rois.d[2] != 4))
        {
            logError("input 0 (rois) must be [B, R, 4]");
            return -1;
        }
        Dims const& first = in[1].desc.dims;
        for (int32_t i = 1; i < nbInputs; ++i)
        {
            Dims const& features = in[i].desc.dims;
            if (features.nbDims != 4)
            {
                logError("input " + std::to_string(i) + " (features) must be [B, C, H, W]");
                return -1;
            }
            // -1 is a dimension still unknown at build time: checked again in onShapeChange.
            bool const batchMismatch = features.d[0] != -1 && rois.d[0] != -1 && features.d[0] != rois.d[0];
            bool const channelMismatch = features.d[1] != -1 && first.d[1] != -1 && features.d[1] != first.d[1];
            if (batchMismatch || channelMismatch)
            {
                logError("feature input " + std::to_string(i) + " must share B with the rois and C with input 1");
                return -1;
            }
            // Level order, where both sizes are known at build time (else checked in onShapeChange).
            Dims const& previous = in[i - 1].desc.dims;
            for (int32_t axis = 2; i > 1 && axis < 4; ++axis)
            {
                if (features.d[axis] != -1 && previous.d[axis] != -1
                    && std::abs(2 * features.d[axis] - previous.d[axis]) > 1)
                {
                    logError("feature maps must be finest first, each half the previous one in H and W (rounded "
                             "either way), as spatial_scales say: input " + std::to_string(i) + " is not");
                    return -1;
                }
            }
        }
        return 0;
    }
    catch (std::exception const& error)
    {
        logException("configurePlugin", error);
    }
    catch (...)
    {
        logError(std::string("configurePlugin: unknown exception"));
    }
    return -1;
}

size_t MultilevelRoIAlignPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

bool MultilevelRoIAlignPlugin::paramsForShapes(
    PluginTensorDesc const* inputDesc, int32_t nbInputs, MultilevelRoIAlignParams& params) const noexcept
{
    try
    {
        if (nbInputs != 1 + numLevels())
        {
            logError("expects " + std::to_string(1 + numLevels()) + " inputs, got " + std::to_string(nbInputs));
            return false;
        }
        params = mAttributes.toParams();
        Dims const& rois = inputDesc[0].dims;
        if (rois.nbDims != 3 || rois.d[2] != 4)
        {
            logError("input 0 (rois) must be [B, R, 4]");
            return false;
        }
        params.batchSize = static_cast<int32_t>(rois.d[0]);
        params.numRois = static_cast<int32_t>(rois.d[1]);
        params.channels = static_cast<int32_t>(inputDesc[1].dims.d[1]);
        for (int32_t level = 0; level < numLevels(); ++level)
        {
            Dims const& features = inputDesc[1 + level].dims;
            if (features.nbDims != 4 || features.d[0] != rois.d[0] || features.d[1] != params.channels)
            {
                logError("feature input " + std::to_string(1 + level) + " must be [B, C, H, W] with the rois' B "
                    "and input 1's C");
                return false;
            }
            if (inputDesc[1 + level].type != inputDesc[0].type)
            {
                logError("all inputs must have the same type");
                return false;
            }
            params.heights[level] = static_cast<int32_t>(features.d[2]);
            params.widths[level] = static_cast<int32_t>(features.d[3]);
        }
        char const* problem = validateMultilevelRoIAlignParams(params);
        if (problem != nullptr)
        {
            logError(problem);
            return false;
        }
        return true;
    }
    catch (std::exception const& error)
    {
        logException("paramsForShapes", error);
    }
    catch (...)
    {
        logError(std::string("paramsForShapes: unknown exception"));
    }
    return false;
}

int32_t MultilevelRoIAlignPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    try
    {
        MultilevelRoIAlignParams params;
        return nbOutputs == 1 && paramsForShapes(in, nbInputs, params) ? 0 : -1;
    }
    catch (std::exception const& error)
    {
        logException("onShapeChange", error);
    }
    catch (...)
    {
        logError(std::string("onShapeChange: unknown exception"));
    }
    return -1;
}

int32_t MultilevelRoIAlignPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    try
    {
        int32_t const nbInputs = 1 + numLevels();
        MultilevelRoIAlignParams params;
        if (!paramsForShapes(inputDesc, nbInputs, params))
        {
            return -1;
        }
        cudaError_t status = cudaErrorInvalidValue;
        DataType const type = inputDesc[0].type;
        if (type == DataType::kFLOAT)
        {
            float const* features[kMaxFeatureLevels]{};
            for (int32_t level = 0; level < numLevels(); ++level)
            {
                features[level] = static_cast<float const*>(inputs[1 + level]);
            }
            status = multilevelRoIAlignForward<float>(
                params, static_cast<float const*>(inputs[0]), features, static_cast<float*>(outputs[0]), stream);
        }
        else if (type == DataType::kHALF)
        {
            __half const* features[kMaxFeatureLevels]{};
            for (int32_t level = 0; level < numLevels(); ++level)
            {
                features[level] = static_cast<__half const*>(inputs[1 + level]);
            }
            status = multilevelRoIAlignForward<__half>(
                params, static_cast<__half const*>(inputs[0]), features, static_cast<__half*>(outputs[0]), stream);
        }
        else
        {
            logError(std::string("unsupported data type ") + dataTypeName(type));
            return -1;
        }
        if (status != cudaSuccess)
        {
            logError(std::string("kernel launch failed: ") + cudaGetErrorString(status));
            return -1;
        }
        return 0;
    }
    catch (std::exception const& error)
    {
        logException("enqueue", error);
    }
    catch (...)
    {
        logError(std::string("enqueue: unknown exception"));
    }
    return -1;
}

IPluginV3* MultilevelRoIAlignPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources
}

PluginFieldCollection const* MultilevelRoIAlignPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        // Points into mAttributes, which lives as long as the plugin; rebuilt on each call.
        mFieldsToSerialize.clear();
        mFieldsToSerialize.emplace_back(kOutputHeight, &mAttributes.outputHeight, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back(kOutputWidth, &mAttributes.outputWidth, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back(kSamplingRatio, &mAttributes.samplingRatio, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back(kAligned, &mAttributes.aligned, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back(kSpatialScales, mAttributes.spatialScales.data(), PluginFieldType::kFLOAT32,
            static_cast<int32_t>(mAttributes.spatialScales.size()));
        mFieldsToSerialize.emplace_back(kCanonicalScale, &mAttributes.canonicalScale, PluginFieldType::kFLOAT32, 1);
        mFieldsToSerialize.emplace_back(kCanonicalLevel, &mAttributes.canonicalLevel, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back(kMode, &mAttributes.mode, PluginFieldType::kINT32, 1);
        mFieldCollection.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
        mFieldCollection.fields = mFieldsToSerialize.data();
        return &mFieldCollection;
    }
    catch (std::exception const& error)
    {
        logException("getFieldsToSerialize", error);
    }
    catch (...)
    {
        logError(std::string("getFieldsToSerialize: unknown exception"));
    }
    return nullptr;
}

// ---- creator ---------------------------------------------------------------------------------

MultilevelRoIAlignPluginCreator::MultilevelRoIAlignPluginCreator()
{
    mFieldNames.emplace_back(kOutputHeight, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(kOutputWidth, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(kSamplingRatio, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(kAligned, nullptr, PluginFieldType::kINT32, 1);
    // Length: the number of feature inputs, 1..5 (the default lists 4).
    mFieldNames.emplace_back(kSpatialScales, nullptr, PluginFieldType::kFLOAT32, 4);
    mFieldNames.emplace_back(kCanonicalScale, nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldNames.emplace_back(kCanonicalLevel, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(kMode, nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* MultilevelRoIAlignPluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MultilevelRoIAlignPluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MultilevelRoIAlignPluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

PluginFieldCollection const* MultilevelRoIAlignPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* MultilevelRoIAlignPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    try
    {
        // Both phases build the plugin from the same fields (kRUNTIME: those getFieldsToSerialize
        // wrote into the engine); neither touches the GPU.
        (void) phase;
        MultilevelRoIAlignAttributes attributes = parseFields(fc);
        char const* problem = attributes.validate();
        if (problem != nullptr)
        {
            logError(std::string("cannot create '") + (name != nullptr ? name : "") + "': " + problem);
            return nullptr;
        }
        return new MultilevelRoIAlignPlugin(std::move(attributes));
    }
    catch (std::exception const& error)
    {
        logError(std::string("cannot create '") + (name != nullptr ? name : "") + "': " + error.what());
    }
    catch (...)
    {
        logError("cannot create plugin: unknown error");
    }
    return nullptr;
}

} // namespace maskrt

// ---- library entry points ------------------------------------------------------------------------

//! TensorRT calls this once per TensorRT library that loads the plugin (builder, runtime): the
//! first non-null finder is kept. A process of another TensorRT major gets no finder stored.
extern "C" void setLoggerFinder(ILoggerFinder* finder)
{
    try
    {
        if (finder == nullptr || !hostMatchesBuild())
        {
            return;
        }
        std::lock_guard<std::mutex> lock(gLoggerMutex);
        if (gLoggerFinder == nullptr)
        {
            gLoggerFinder = finder;
        }
    }
    catch (...)
    {
    }
}

//! No creators for a process of another TensorRT major (see hostMatchesBuild).
extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = 0;
    try
    {
        if (!hostMatchesBuild())
        {
            return nullptr;
        }
        static maskrt::MultilevelRoIAlignPluginCreator creator;
        static IPluginCreatorInterface* const creators[] = {&creator};
        nbCreators = 1;
        return creators;
    }
    catch (std::exception const& error)
    {
        logException("getCreators", error);
    }
    catch (...)
    {
    }
    return nullptr;
}

//! The TensorRT major whose headers this library was built against (it serves only that major).
extern "C" int32_t maskrt_plugin_tensorrt_major()
{
    return kBuiltForTensorRTMajor;
}
