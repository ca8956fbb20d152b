// maskrt_plugin_check: exercises libmaskrt_plugins.so through TensorRT's own interfaces, the
// way TensorRT does (dlopen, setLoggerFinder, getCreators), on a machine without a GPU or a
// TensorRT library: creator identity and fields, creation in both phases, refused fields,
// the serialisation round trip, the build-phase queries, and enqueue's shape checks (paths
// that launch nothing). Prints "PASS name" / "FAIL name: why" per check; exit status = failures.
//
//   maskrt_plugin_check build/plugins/libmaskrt_plugins.so
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
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

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s libmaskrt_plugins.so\n", argv[0]);
        return 100;
    }
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
    std::printf("%d failures\n", gFailures);
    return gFailures;
}
