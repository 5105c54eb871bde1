// IPluginV3 wrappers of the kernels, namespace "twotower", version "1":
//   TwoTowerBlockAttention   fields num_heads, num_kv_heads, head_dim, causal
//     inputs  q [B,L,H,P], k [B,L,K,P], v [B,L,K,P], k_cache [B,S,K,P], v_cache [B,S,K,P], cache_lens [B] int32
//     output  out [B,L,H,P]. Read-only: the block's new K/V are ordinary engine outputs (the k/v
//     projections) that the runtime writes into its cache (no aliased plugin I/O, which needs a
//     TensorRT preview feature TensorRT-LLM's builder never enables).
//   TwoTowerSeededMambaScan  fields n_groups, head_dim, write_state
//     inputs  xbc [B,L,C], dt [B,L,H], conv_weight [C,W], conv_bias [C], dt_bias [H] f32, A_log [H] f32,
//             D [H] f32, conv_state [B,C,W], ssm_state [B,H,P,N] f32
//     outputs y [B,L,H*P]; with write_state also conv_state [B,C,W] and ssm_state [B,H,P,N] f32
//   TwoTowerMoeExperts       no fields
//     inputs  x [B,L,D], expert_ids [B*L,k] int32, expert_weights [B*L,k] f32, up [E,I,D], down [E,D,I]
//     output  out [B,L,D]
// T (the activation dtype) is fp32 or bf16. The creators register themselves under the namespace
// "twotower" when the library is loaded (dlopen / ctypes.CDLL / polygraphy --plugins / trtexec
// --staticPlugins); the library exports no getCreators, so IPluginRegistry::loadLibrary and trtexec
// --dynamicPlugins are not supported (they would register the creators a second time).
#include <NvInferRuntime.h>

#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "twotower_kernels.h"

using namespace nvinfer1;

namespace twotower {
namespace {

constexpr char const* kNamespace = "twotower";
constexpr char const* kVersion = "1";
constexpr int kMaxSplits = 64;

int dtype_code(DataType t) { return t == DataType::kFLOAT ? 0 : t == DataType::kBF16 ? 1 : -1; }

// An INT32 field by name; false when absent or of another type.
bool read_int(PluginFieldCollection const* fc, char const* name, int32_t& value) {
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        if (std::strcmp(f.name, name) == 0 && f.type == PluginFieldType::kINT32 && f.length == 1) {
            value = *static_cast<int32_t const*>(f.data);
            return true;
        }
    }
    return false;
}

// The plugin's own fields, serialised through getFieldsToSerialize (V3 has no byte buffer).
class Fields {
public:
    Fields(std::vector<std::string> names, std::vector<int32_t> values) : mNames(std::move(names)), mValues(std::move(values)) {
        for (size_t i = 0; i < mNames.size(); ++i)
            mFields.emplace_back(mNames[i].c_str(), &mValues[i], PluginFieldType::kINT32, 1);
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }
    Fields(Fields const& other) : Fields(other.mNames, other.mValues) {}
    PluginFieldCollection const* collection() const { return &mCollection; }

private:
    std::vector<std::string> mNames;
    std::vector<int32_t> mValues;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

// Capability plumbing shared by both plugins.
template <typename Derived>
class PluginBase : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuildV2, public IPluginV3OneRuntime {
public:
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
            return new Derived(*static_cast<Derived const*>(this));
        } catch (...) {
            return nullptr;
        }
    }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*, int32_t) noexcept override {
        return 0;
    }
    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override { return 0; }
    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
};

// A plugin with NB_INPUTS inputs and one output of the first input's shape and dtype.
template <typename Derived, int32_t NB_INPUTS>
class LikeFirstInput : public PluginBase<Derived> {
public:
    int32_t getNbOutputs() const noexcept override { return 1; }
    int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in, int32_t nbInputs) const noexcept override {
        if (nbInputs != NB_INPUTS || nbOutputs != 1) return -1;
        out[0] = in[0];
        return 0;
    }
    int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out,
                            int32_t nbOutputs, IExprBuilder&) noexcept override {
        if (nbInputs != NB_INPUTS || nbOutputs != 1) return -1;
        out[0] = in[0];
        return 0;
    }
};

// ---- block attention ---------------------------------------------------------------------------
class BlockAttentionPlugin : public LikeFirstInput<BlockAttentionPlugin, 6> {  // out = q's shape
public:
    BlockAttentionPlugin(int32_t H, int32_t K, int32_t P, int32_t causal)
        : mH(H), mK(K), mP(P), mCausal(causal), mFields({"num_heads", "num_kv_heads", "head_dim", "causal"}, {H, K, P, causal}) {}

    char const* getPluginName() const noexcept override { return "TwoTowerBlockAttention"; }
    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
        TensorFormat format = io[pos].desc.format;
        DataType type = io[pos].desc.type;
        if (format != TensorFormat::kLINEAR) return false;
        if (pos == 5) return type == DataType::kINT32;  // cache_lens
        if (pos == 0) return type == DataType::kFLOAT || type == DataType::kBF16;
        return type == io[0].desc.type;  // every other tensor in q's dtype
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        const int B = static_cast<int>(in[0].max.d[0]), L = static_cast<int>(in[0].max.d[1]);
        return workspace_floats(B, L) * sizeof(float);
    }
    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        const int B = static_cast<int>(in[0].dims.d[0]), L = static_cast<int>(in[0].dims.d[1]);
        const int S = static_cast<int>(in[3].dims.d[1]);
        int device = 0, sms = 1;
        cudaGetDevice(&device);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
        // lengths live on the device: S - L bounds them (the runtime keeps room for the block it
        // appends); splits capped by the reserved workspace
        int splits = twotower_block_attention_num_splits(B, L, mH, mK, S - L, sms);
        while (splits > 1 && twotower_block_attention_workspace_floats(B, L, mH, mP, splits) > workspace_floats(B, L)) --splits;
        return twotower_block_attention(inputs[0], inputs[1], inputs[2], const_cast<void*>(inputs[3]),
                                        const_cast<void*>(inputs[4]), static_cast<int32_t const*>(inputs[5]), outputs[0],
                                        static_cast<float*>(workspace), B, L, mH, mK, mP, S, S - L, splits,
                                        dtype_code(in[0].type), mCausal, /*write_cache=*/0, stream);
    }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return mFields.collection(); }

private:
    // one split for big chunks, up to kMaxSplits for block-sized ones
    size_t workspace_floats(int B, int L) const {
        const size_t one = twotower_block_attention_workspace_floats(B, L, mH, mP, 1);
        const size_t blocks = twotower_block_attention_workspace_floats(B, L < 16 ? L : 16, mH, mP, kMaxSplits);
        return one > blocks ? one : blocks;
    }
    int32_t mH, mK, mP, mCausal;
    Fields mFields;
};

// ---- seeded Mamba2 scan ------------------------------------------------------------------------
class SeededMambaScanPlugin : public PluginBase<SeededMambaScanPlugin> {
public:
    SeededMambaScanPlugin(int32_t G, int32_t P, int32_t write_state)
        : mG(G), mP(P), mWrite(write_state), mFields({"n_groups", "head_dim", "write_state"}, {G, P, write_state}) {}

    char const* getPluginName() const noexcept override { return "TwoTowerSeededMambaScan"; }
    int32_t getNbOutputs() const noexcept override { return mWrite ? 3 : 1; }

    int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in, int32_t nbInputs) const noexcept override {
        if (nbInputs != 9 || nbOutputs != getNbOutputs()) return -1;
        out[0] = in[0];
        if (mWrite) {
            out[1] = in[7];
            out[2] = DataType::kFLOAT;
        }
        return 0;
    }
    int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out,
                            int32_t nbOutputs, IExprBuilder& builder) noexcept override {
        if (nbInputs != 9 || nbOutputs != getNbOutputs()) return -1;
        out[0].nbDims = 3;  // y [B, L, H * P]
        out[0].d[0] = in[0].d[0];
        out[0].d[1] = in[0].d[1];
        out[0].d[2] = builder.operation(DimensionOperation::kPROD, *in[1].d[2], *builder.constant(mP));
        if (mWrite) {
            out[1] = in[7];
            out[2] = in[8];
        }
        return 0;
    }
    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbInputs,
                                   int32_t) noexcept override {
        DataType type = io[pos].desc.type;
        if (io[pos].desc.format != TensorFormat::kLINEAR) return false;
        const bool fp32_slot = (pos >= 4 && pos <= 6) || pos == 8 || (mWrite && pos == nbInputs + 2);
        if (fp32_slot) return type == DataType::kFLOAT;  // dt_bias, A_log, D and the SSM states
        if (pos == 0) return type == DataType::kFLOAT || type == DataType::kBF16;
        return type == io[0].desc.type;
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        return twotower_seeded_mamba_scan_workspace_bytes(static_cast<int>(in[0].max.d[0]), static_cast<int>(in[0].max.d[1]),
                                                          static_cast<int>(in[0].max.d[2]), dtype_code(in[0].desc.type));
    }
    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        const int B = static_cast<int>(in[0].dims.d[0]), L = static_cast<int>(in[0].dims.d[1]);
        const int C = static_cast<int>(in[0].dims.d[2]), H = static_cast<int>(in[1].dims.d[2]);
        const int W = static_cast<int>(in[7].dims.d[2]), N = static_cast<int>(in[8].dims.d[3]);
        return twotower_seeded_mamba_scan(inputs[0], inputs[1], inputs[2], inputs[3], static_cast<float const*>(inputs[4]),
                                          static_cast<float const*>(inputs[5]), static_cast<float const*>(inputs[6]),
                                          inputs[7], static_cast<float const*>(inputs[8]), outputs[0],
                                          mWrite ? outputs[1] : nullptr, mWrite ? static_cast<float*>(outputs[2]) : nullptr,
                                          nullptr, workspace, B, L, C, W, H, mP, mG, N, dtype_code(in[0].type), stream);
    }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return mFields.collection(); }

private:
    int32_t mG, mP, mWrite;
    Fields mFields;
};

// ---- routed relu^2 experts ------------------------------------------------------------------------
class MoeExpertsPlugin : public LikeFirstInput<MoeExpertsPlugin, 5> {  // out = x's shape
public:
    MoeExpertsPlugin() : mFields({}, {}) {}

    char const* getPluginName() const noexcept override { return "TwoTowerMoeExperts"; }
    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
        DataType type = io[pos].desc.type;
        if (io[pos].desc.format != TensorFormat::kLINEAR) return false;
        if (pos == 1) return type == DataType::kINT32;  // expert_ids
        if (pos == 2) return type == DataType::kFLOAT;  // expert_weights
        if (pos == 0) return type == DataType::kFLOAT || type == DataType::kBF16;
        return type == io[0].desc.type;  // up, down, out
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        const int n = static_cast<int>(in[1].max.d[0]), k = static_cast<int>(in[1].max.d[1]);
        const int E = static_cast<int>(in[3].max.d[0]), I = static_cast<int>(in[3].max.d[1]);
        const int D = static_cast<int>(in[3].max.d[2]);
        return twotower_moe_experts_workspace_bytes(n, k, E, D, I, dtype_code(in[0].desc.type));
    }
    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        const int n = static_cast<int>(in[1].dims.d[0]), k = static_cast<int>(in[1].dims.d[1]);
        const int E = static_cast<int>(in[3].dims.d[0]), I = static_cast<int>(in[3].dims.d[1]);
        const int D = static_cast<int>(in[3].dims.d[2]);
        return twotower_moe_experts(inputs[0], static_cast<int32_t const*>(inputs[1]), static_cast<float const*>(inputs[2]),
                                    inputs[3], inputs[4], outputs[0], workspace, n, k, E, D, I, dtype_code(in[0].type),
                                    stream);
    }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return mFields.collection(); }

private:
    Fields mFields;
};

// ---- creators ----------------------------------------------------------------------------------
template <typename Plugin>
class Creator : public IPluginCreatorV3One {
public:
    Creator(char const* name, std::vector<std::string> field_names) : mName(name), mFields(field_names, std::vector<int32_t>(field_names.size(), 0)), mFieldNames(std::move(field_names)) {}
    char const* getPluginName() const noexcept override { return mName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    PluginFieldCollection const* getFieldNames() noexcept override { return mFields.collection(); }
    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
        std::vector<int32_t> v(mFieldNames.size());
        for (size_t i = 0; i < mFieldNames.size(); ++i)
            if (!read_int(fc, mFieldNames[i].c_str(), v[i])) return nullptr;  // every field is required
        try {
            return make(v);
        } catch (...) {
            return nullptr;
        }
    }

private:
    IPluginV3* make(std::vector<int32_t> const& v);
    char const* mName;
    Fields mFields;
    std::vector<std::string> mFieldNames;
};

template <>
IPluginV3* Creator<BlockAttentionPlugin>::make(std::vector<int32_t> const& v) {
    const bool ok = v[0] > 0 && v[1] > 0 && v[0] % v[1] == 0 && (v[2] == 16 || v[2] == 32 || v[2] == 64 || v[2] == 128);
    return ok ? new BlockAttentionPlugin(v[0], v[1], v[2], v[3] != 0) : nullptr;
}

template <>
IPluginV3* Creator<MoeExpertsPlugin>::make(std::vector<int32_t> const&) {
    return new MoeExpertsPlugin();
}

template <>
IPluginV3* Creator<SeededMambaScanPlugin>::make(std::vector<int32_t> const& v) {
    return v[0] > 0 && v[1] > 0 ? new SeededMambaScanPlugin(v[0], v[1], v[2] != 0) : nullptr;
}

class BlockAttentionCreator : public Creator<BlockAttentionPlugin> {
public:
    BlockAttentionCreator() : Creator("TwoTowerBlockAttention", {"num_heads", "num_kv_heads", "head_dim", "causal"}) {}
};

class SeededMambaScanCreator : public Creator<SeededMambaScanPlugin> {
public:
    SeededMambaScanCreator() : Creator("TwoTowerSeededMambaScan", {"n_groups", "head_dim", "write_state"}) {}
};

class MoeExpertsCreator : public Creator<MoeExpertsPlugin> {
public:
    MoeExpertsCreator() : Creator("TwoTowerMoeExperts", {}) {}
};

// Registers every creator under kNamespace, once, when the library is loaded (what
// REGISTER_TENSORRT_PLUGIN does, but with the namespace the plugins report instead of "").
bool register_creators() {
    static BlockAttentionCreator attention;
    static SeededMambaScanCreator scan;
    static MoeExpertsCreator experts;
    IPluginRegistry* registry = getPluginRegistry();
    bool ok = registry != nullptr;
    for (IPluginCreatorInterface* creator : std::initializer_list<IPluginCreatorInterface*>{&attention, &scan, &experts})
        ok = ok && registry->registerCreator(*creator, kNamespace);
    return ok;
}

const bool kRegistered = register_creators();

}  // namespace
}  // namespace twotower

// For callers that load the library and want to know that its creators are in the registry.
extern "C" int twotower_plugins_registered() { return twotower::kRegistered ? 1 : 0; }
