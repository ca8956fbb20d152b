// MultilevelRoIAlign TensorRT plugin: IPluginV3 (OneCore / OneBuild / OneRuntime) and its
// IPluginCreatorV3One. Name "MultilevelRoIAlign", version "1", namespace "maskrt".
// The contract: plugins/README.md. Written to the API TensorRT 10.3 (JetPack 6) and 11 share.
#pragma once

#include "MultilevelRoIAlignKernel.h"

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace maskrt
{

constexpr char const* kPluginName = "MultilevelRoIAlign";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "maskrt";

//! The op's attributes, as created from and serialised to PluginFields of the same names.
struct MultilevelRoIAlignAttributes
{
    int32_t outputHeight{7};
    int32_t outputWidth{7};
    int32_t samplingRatio{2};
    int32_t aligned{0};
    std::vector<float> spatialScales{0.25F, 0.125F, 0.0625F, 0.03125F};
    float canonicalScale{224.F};
    int32_t canonicalLevel{4};
    int32_t mode{0};

    //! The kernel parameters these attributes fix (shape-dependent members left 0).
    MultilevelRoIAlignParams toParams() const;
    //! nullptr when valid, else a one-line description of the problem.
    char const* validate() const;
};

class MultilevelRoIAlignPlugin final : public nvinfer1::IPluginV3,
                                       public nvinfer1::IPluginV3OneCore,
                                       public nvinfer1::IPluginV3OneBuild,
                                       public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit MultilevelRoIAlignPlugin(MultilevelRoIAlignAttributes attributes);
    ~MultilevelRoIAlignPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    int32_t numLevels() const noexcept;
    //! Kernel parameters for the given input shapes; false (and a log line) when they do not fit.
    bool paramsForShapes(nvinfer1::PluginTensorDesc const* inputDesc, int32_t nbInputs,
        MultilevelRoIAlignParams& params) const noexcept;

    MultilevelRoIAlignAttributes mAttributes;
    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class MultilevelRoIAlignPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    MultilevelRoIAlignPluginCreator();
    ~MultilevelRoIAlignPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    //! Returns nullptr (and logs why) when a field is unknown, of the wrong type or length, or out of range.
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace maskrt

// The two entry points TensorRT's registry looks up in a plugin library (IPluginRegistry::
// loadLibrary, trtexec --dynamicPlugins). Without setLoggerFinder the lean runtime's
// load_library silently refuses the library.
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators);
// The TensorRT major whose headers the library was built against; it serves processes of that
// major only (getCreators registers nothing elsewhere). Read by maskrt's Python side via ctypes.
extern "C" __attribute__((visibility("default"))) int32_t maskrt_plugin_tensorrt_major();
