// IPluginV3 plugins of the nine TwoTower nodes (namespace "twotower", version "1"): one plugin
// class serves them all, driven by the node table generated from onnx_nodes.py (plugin_nodes.h:
// names, tensors, fields), and each enqueue is one twotower_launch() of the AOT-compiled Triton
// kernels (triton_ops.cpp). The same plugins serve the TensorRT-LLM engines (plugins/trt_layers.py
// adds three of them to a network) and the engines TensorRT's ONNX parser builds from the exported
// graphs (it finds a creator by op type, plugin_version, plugin_namespace and passes the node's
// attributes as fields: INT -> kINT32, FLOAT -> kFLOAT32).
//
// The creators register themselves under the namespace "twotower" when the library is loaded
// (dlopen / ctypes.CDLL / polygraphy --plugins / trtexec --staticPlugins); the library exports no
// getCreators, so IPluginRegistry::loadLibrary and trtexec --dynamicPlugins are not supported
// (they would register the creators a second time).
#include <NvInferRuntime.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "plugin_nodes.h"
#include "twotower_ops.h"

using namespace nvinfer1;

namespace twotower {
namespace {

int dtype_code(DataType t) {
    switch (t) {
        case DataType::kFLOAT: return TWOTOWER_FP32;
        case DataType::kBF16: return TWOTOWER_BF16;
        case DataType::kHALF: return TWOTOWER_FP16;
        case DataType::kINT32: return TWOTOWER_I32;
        case DataType::kINT64: return TWOTOWER_I64;
        default: return -1;
    }
}

// A field's value as a double (the ONNX parser passes INT attributes as kINT32, FLOAT as kFLOAT32;
// serialised plugins carry kFLOAT64); false when absent or not numeric.
bool read_field(PluginFieldCollection const* fc, char const* name, double& value) {
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        if (f.name == nullptr || std::strcmp(f.name, name) != 0 || f.length != 1 || f.data == nullptr) continue;
        switch (f.type) {
            case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(f.data); return true;
            case PluginFieldType::kINT64: value = static_cast<double>(*static_cast<int64_t const*>(f.data)); return true;
            case PluginFieldType::kFLOAT32: value = *static_cast<float const*>(f.data); return true;
            case PluginFieldType::kFLOAT64: value = *static_cast<double const*>(f.data); return true;
            default: return false;
        }
    }
    return false;
}

TwoTowerTensor tensor_of(PluginTensorDesc const& desc, void const* data) {
    TwoTowerTensor t{};
    t.data = reinterpret_cast<CUdeviceptr>(data);
    t.dtype = dtype_code(desc.type);
    t.ndim = desc.dims.nbDims;
    for (int32_t d = 0; d < desc.dims.nbDims && d < 8; ++d) t.dims[d] = desc.dims.d[d];
    return t;
}

class TwoTowerPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuildV2, public IPluginV3OneRuntime {
public:
    TwoTowerPlugin(TwoTowerNode const& node, std::vector<double> attributes)
        : mNode(node), mAttributes(std::move(attributes)) {
        for (int i = 0; i < mNode.num_fields; ++i)
            mFields.emplace_back(mNode.fields[i], &mAttributes[i], PluginFieldType::kFLOAT64, 1);
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }
    TwoTowerPlugin(TwoTowerPlugin const& other) : TwoTowerPlugin(other.mNode, other.mAttributes) {
        mNbInputs = other.mNbInputs;
    }

    // ---- IPluginV3 / core
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
        switch (type) {
            case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
            case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
            case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    IPluginV3* clone() noexcept override {
        try {
            return new TwoTowerPlugin(*this);
        } catch (...) {
            return nullptr;
        }
    }
    char const* getPluginName() const noexcept override { return mNode.name; }
    char const* getPluginVersion() const noexcept override { return TWOTOWER_PLUGIN_VERSION; }
    char const* getPluginNamespace() const noexcept override { return TWOTOWER_PLUGIN_NAMESPACE; }

    // ---- build
    int32_t getNbOutputs() const noexcept override { return static_cast<int32_t>(std::strlen(mNode.outputs)); }

    int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in, int32_t nbInputs) const noexcept override {
        if (!inputCountOk(nbInputs) || nbOutputs != getNbOutputs()) return -1;
        for (int32_t i = 0; i < nbOutputs; ++i) out[i] = typeFor(mNode.outputs[i], in[0]);
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out,
                            int32_t nbOutputs, IExprBuilder& builder) noexcept override {
        if (!inputCountOk(nbInputs) || nbOutputs != getNbOutputs()) return -1;
        const std::string op = mNode.op;
        if (op == "MoeRoute") {  // ids, weights [n, top_k], n = every dim of x but the last
            IDimensionExpr const* n = builder.constant(1);
            for (int32_t d = 0; d + 1 < in[0].nbDims; ++d) n = builder.operation(DimensionOperation::kPROD, *n, *in[0].d[d]);
            for (int32_t i = 0; i < 2; ++i) {
                out[i].nbDims = 2;
                out[i].d[0] = n;
                out[i].d[1] = builder.constant(static_cast<int64_t>(mAttributes[0]));
            }
            return 0;
        }
        if (op == "SeededMambaScan") return scanShapes(in, out, builder);
        out[0] = in[0];  // every other node: one output shaped as its first input
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbInputs,
                                   int32_t) noexcept override {
        if (io[pos].desc.format != TensorFormat::kLINEAR) return false;
        DataType const type = io[pos].desc.type;
        if (pos == 0) return type == DataType::kFLOAT || type == DataType::kBF16;
        char const code = pos < nbInputs ? mNode.inputs[pos] : mNode.outputs[pos - nbInputs];
        return type == typeFor(code, io[0].desc.type);
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*,
                            int32_t) noexcept override {
        return inputCountOk(nbInputs) ? 0 : -1;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        std::vector<TwoTowerTensor> tensors(nbInputs);
        for (int32_t i = 0; i < nbInputs; ++i) {
            tensors[i] = tensor_of(in[i].desc, nullptr);
            for (int32_t d = 0; d < in[i].max.nbDims && d < 8; ++d) tensors[i].dims[d] = in[i].max.d[d];
        }
        return twotower_workspace_bytes(mNode.op, tensors.data(), nbInputs, mAttributes.data(),
                                        static_cast<int>(mAttributes.size()));
    }

    // ---- runtime
    int32_t onShapeChange(PluginTensorDesc const*, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept override {
        return inputCountOk(nbInputs) ? 0 : -1;
    }

    int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const* outDesc, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        TwoTowerTensor in[16], out[8];
        const int nbIn = mNbInputs, nbOut = getNbOutputs();
        for (int i = 0; i < nbIn; ++i) in[i] = tensor_of(inDesc[i], inputs[i]);
        for (int i = 0; i < nbOut; ++i) out[i] = tensor_of(outDesc[i], outputs[i]);
        // what these shapes need: TensorRT reserved at least that (getWorkspaceSize, for the largest)
        const size_t bytes = twotower_workspace_bytes(mNode.op, in, nbIn, mAttributes.data(),
                                                      static_cast<int>(mAttributes.size()));
        return twotower_launch(mNode.op, in, nbIn, out, nbOut, mAttributes.data(), static_cast<int>(mAttributes.size()),
                               reinterpret_cast<CUdeviceptr>(workspace), bytes, stream);
    }

    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mCollection; }

private:
    bool inputCountOk(int32_t nbInputs) const {
        const int32_t all = static_cast<int32_t>(std::strlen(mNode.inputs));
        if (nbInputs > all || nbInputs < all - mNode.optional_inputs) return false;
        mNbInputs = nbInputs;
        return true;
    }

    static DataType typeFor(char code, DataType activation) {
        switch (code) {
            case 'F': return DataType::kFLOAT;
            case 'I': return DataType::kINT32;
            case 'L': return DataType::kINT64;
            default: return activation;
        }
    }

    // y [B, L, H * P]; new conv and SSM states shaped as the inputs; with return_steps the states
    // after every prefix, [B, L + 1, C, W] and [B, L + 1, H, P, N], else empty [0].
    int32_t scanShapes(DimsExprs const* in, DimsExprs* out, IExprBuilder& builder) const {
        DimsExprs const& xbc = in[0];
        out[0].nbDims = 3;
        out[0].d[0] = xbc.d[0];
        out[0].d[1] = xbc.d[1];
        out[0].d[2] = builder.operation(DimensionOperation::kPROD, *in[1].d[2],
                                        *builder.constant(static_cast<int64_t>(mAttributes[1])));
        out[1] = in[7];
        out[2] = in[8];
        const bool steps = mAttributes[2] != 0;
        for (int32_t i = 3; i < 5; ++i) {
            DimsExprs const& state = in[i == 3 ? 7 : 8];
            if (!steps) {
                out[i].nbDims = 1;
                out[i].d[0] = builder.constant(0);
                continue;
            }
            out[i].nbDims = state.nbDims + 1;
            out[i].d[0] = xbc.d[0];
            out[i].d[1] = builder.operation(DimensionOperation::kSUM, *xbc.d[1], *builder.constant(1));
            for (int32_t d = 1; d < state.nbDims; ++d) out[i].d[d + 1] = state.d[d];
        }
        return 0;
    }

    TwoTowerNode const& mNode;
    std::vector<double> mAttributes;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
    mutable int32_t mNbInputs = 0;
};

class TwoTowerCreator : public IPluginCreatorV3One {
public:
    explicit TwoTowerCreator(TwoTowerNode const& node) : mNode(node) {
        for (int i = 0; i < mNode.num_fields; ++i)
            mFieldNames.emplace_back(mNode.fields[i], nullptr, PluginFieldType::kFLOAT64, 1);
        mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mCollection.fields = mFieldNames.data();
    }
    char const* getPluginName() const noexcept override { return mNode.name; }
    char const* getPluginVersion() const noexcept override { return TWOTOWER_PLUGIN_VERSION; }
    char const* getPluginNamespace() const noexcept override { return TWOTOWER_PLUGIN_NAMESPACE; }
    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }

    // Every field is required; a plugin is refused (nullptr) when one is missing.
    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
        try {
            std::vector<double> values(mNode.num_fields);
            for (int i = 0; i < mNode.num_fields; ++i)
                if (!read_field(fc, mNode.fields[i], values[i])) return nullptr;
            return new TwoTowerPlugin(mNode, std::move(values));
        } catch (...) {
            return nullptr;
        }
    }

private:
    TwoTowerNode const& mNode;
    std::vector<PluginField> mFieldNames;
    PluginFieldCollection mCollection{};
};

// Registers every creator under the plugins' namespace, once, when the library is loaded (what
// REGISTER_TENSORRT_PLUGIN does, but with the namespace the plugins report instead of "").
bool register_creators() {
    static std::vector<std::unique_ptr<TwoTowerCreator>> creators = [] {
        std::vector<std::unique_ptr<TwoTowerCreator>> all;
        for (int i = 0; i < twotower_num_nodes; ++i) all.push_back(std::make_unique<TwoTowerCreator>(twotower_nodes[i]));
        return all;
    }();
    IPluginRegistry* registry = getPluginRegistry();
    bool ok = registry != nullptr;
    for (auto& creator : creators) ok = ok && registry->registerCreator(*creator, TWOTOWER_PLUGIN_NAMESPACE);
    return ok;
}

const bool kRegistered = register_creators();

}  // namespace
}  // namespace twotower

// For callers that load the library and want to know that its creators are in the registry.
extern "C" int twotower_plugins_registered() { return twotower::kRegistered ? 1 : 0; }
