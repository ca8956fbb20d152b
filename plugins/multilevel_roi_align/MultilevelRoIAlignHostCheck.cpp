// maskrt_host_check: a minimal TensorRT host of the major whose headers it is built with, to test
// a plugin library built with the same or the other major's headers. It exports
// getInferLibMajorVersion (as libnvinfer does), hands the library a logger finder and logger of its
// own headers' layout, and asks the creator for a plugin with a bad field so that the plugin logs.
// Prints one line:
//   LOGGED <message>   the plugin's error reached this host's (first) logger
//   REFUSED            getCreators registered nothing (the library refuses this host's major)
//   SILENT             the plugin created nothing but its message never reached the logger
// and exits 0 for these; 1 when the library cannot be opened.
//
//   maskrt_host_check build/plugins/libmaskrt_plugins.so
#include <NvInferRuntime.h>
#include <NvInferVersion.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <string>

using namespace nvinfer1;

extern "C" __attribute__((visibility("default"))) int32_t getInferLibMajorVersion() noexcept
{
    return NV_TENSORRT_MAJOR;
}

namespace
{

class RecordingLogger : public ILogger
{
public:
    void log(Severity /*severity*/, AsciiChar const* msg) noexcept override
    {
        lastMessage = msg;
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

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s libmaskrt_plugins.so\n", argv[0]);
        return 1;
    }
    void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr)
    {
        std::fprintf(stderr, "cannot open %s: %s\n", argv[1], dlerror());
        return 1;
    }
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(library, "setLoggerFinder"));
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
    if (setLoggerFinder == nullptr || getCreators == nullptr)
    {
        std::fprintf(stderr, "%s lacks setLoggerFinder or getCreators\n", argv[1]);
        return 1;
    }
    RecordingLogger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);
    // TensorRT calls setLoggerFinder once per library that loads the plugin: a later null or
    // another finder must not take the first one's place.
    setLoggerFinder(nullptr);
    RecordingLogger otherLogger;
    Finder otherFinder(&otherLogger);
    setLoggerFinder(&otherFinder);
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    if (creators == nullptr || count == 0)
    {
        std::printf("REFUSED\n");
        return 0;
    }
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    int32_t const badMode = 3;
    PluginField field("mode", &badMode, PluginFieldType::kINT32, 1);
    PluginFieldCollection fields{};
    fields.nbFields = 1;
    fields.fields = &field;
    IPluginV3* plugin = creator->createPlugin("bad", &fields, TensorRTPhase::kBUILD);
    if (plugin != nullptr)
    {
        std::printf("CREATED\n");
        return 1;
    }
    if (logger.lastMessage.empty())
    {
        std::printf("SILENT\n");
    }
    else
    {
        std::printf("LOGGED %s\n", logger.lastMessage.c_str());
    }
    return 0;
}
