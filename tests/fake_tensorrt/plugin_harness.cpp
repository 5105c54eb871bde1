// A stand-in for the parts of TensorRT that drive a plugin (the registry, the shape-expression
// builder, build- and run-time calls), so tests can run plugins.cpp without TensorRT: compiled
// against TensorRT's headers only. harness_run() does what TensorRT's ONNX parser and builder do
// with one node, then what the runtime does with the deserialised plugin:
//   creator lookup (name, version, namespace) -> createPlugin(kBUILD) with the node's attributes
//   (INT -> kINT32, FLOAT -> kFLOAT32, as onnx-tensorrt's loadFields) -> getNbOutputs,
//   getOutputDataTypes, getOutputShapes (constant dims) -> supportsFormatCombination at every
//   position -> configurePlugin -> getWorkspaceSize -> getFieldsToSerialize -> createPlugin(kRUNTIME)
//   from those fields -> attachToContext -> onShapeChange -> enqueue.
#include <NvInferRuntime.h>

#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // the registry interface names deprecated types

#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

class ConstantDim : public IDimensionExpr {
public:
    explicit ConstantDim(int64_t value) {
        mExpr.value = value;
        mImpl = &mExpr;
    }

private:
    struct Expr : apiv::VDimensionExpr {
        int64_t value = 0;
        bool isConstant() const override { return true; }
        int64_t getConstantValue() const override { return value; }
        bool isSizeTensor() const override { return false; }
    };
    Expr mExpr{};
};

// Every expression is a constant: the harness runs one concrete shape at a time.
class ConstantBuilder : public IExprBuilder {
public:
    ConstantBuilder() { mImpl = &mBuilder; }
    IDimensionExpr const* make(int64_t value) { return mBuilder.constant(value); }

private:
    struct Builder : apiv::VExprBuilder {
        std::vector<std::unique_ptr<ConstantDim>> dims;
        IDimensionExpr const* constant(int64_t value) override {
            dims.push_back(std::make_unique<ConstantDim>(value));
            return dims.back().get();
        }
        IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override {
            const int64_t x = a.getConstantValue(), y = b.getConstantValue();
            switch (op) {
                case DimensionOperation::kSUM: return constant(x + y);
                case DimensionOperation::kPROD: return constant(x * y);
                case DimensionOperation::kMAX: return constant(x > y ? x : y);
                case DimensionOperation::kMIN: return constant(x < y ? x : y);
                case DimensionOperation::kSUB: return constant(x - y);
                case DimensionOperation::kFLOOR_DIV: return constant(x / y);
                case DimensionOperation::kCEIL_DIV: return constant((x + y - 1) / y);
                default: return nullptr;
            }
        }
        IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
            return nullptr;
        }
    };
    Builder mBuilder;
};

class Registry : public IPluginRegistry {
public:
    std::vector<IPluginCreatorInterface*> creators;
    std::vector<std::string> namespaces;

    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override {
        creators.push_back(&creator);
        namespaces.emplace_back(ns ? ns : "");
        return true;
    }
    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override {
        *n = static_cast<int32_t>(creators.size());
        return creators.data();
    }
    IPluginCreatorInterface* getCreator(AsciiChar const* const name, AsciiChar const* const version,
                                        AsciiChar const* const ns) noexcept override {
        for (size_t i = 0; i < creators.size(); ++i) {
            auto* v3 = dynamic_cast<IPluginCreatorV3One*>(creators[i]);
            if (v3 && std::strcmp(v3->getPluginName(), name) == 0 && std::strcmp(v3->getPluginVersion(), version) == 0 &&
                namespaces[i] == ns)
                return creators[i];
        }
        return nullptr;
    }
    // the rest of the interface: unused by plugins.cpp
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override { return false; }
    IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override {
        *n = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override {
        return nullptr;
    }
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    bool deregisterCreator(IPluginCreatorInterface const&) noexcept override { return false; }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
    int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override {
        return getAllCreators(n);
    }
};

Registry& registry() {
    static Registry r;
    return r;
}

Dims dims_of(int ndim, int64_t const* dims) {
    Dims d{};
    d.nbDims = ndim;
    for (int i = 0; i < ndim; ++i) d.d[i] = dims[i];
    return d;
}

}  // namespace

extern "C" IPluginRegistry* getPluginRegistry() noexcept { return &registry(); }

extern "C" int harness_num_creators() { return static_cast<int>(registry().creators.size()); }

extern "C" const char* harness_creator(int i, const char** ns) {
    *ns = registry().namespaces[i].c_str();
    return dynamic_cast<IPluginCreatorV3One*>(registry().creators[i])->getPluginName();
}

// Returns 0 and fills the outputs' types, dims and the workspace size, or a negative step code:
// -1 no creator, -2 creation refused, -3 output types, -4 output shapes, -5 a format refused
// (*bad_position says where), -6 configure, -7 serialised fields refused, -8 onShapeChange;
// any other value is enqueue's own.
extern "C" int harness_run(const char* name, int num_fields, const char** field_names, const int* field_is_float,
                           const double* values, int num_in, const int* in_types, const int* in_ndims,
                           const int64_t* in_dims, const unsigned long long* in_ptrs, int* num_out, int* out_types,
                           int* out_ndims, int64_t* out_dims, const unsigned long long* out_ptrs,
                           unsigned long long workspace, unsigned long long* workspace_bytes, int* bad_position) {
    auto* creator = dynamic_cast<IPluginCreatorV3One*>(registry().getCreator(name, "1", "twotower"));
    if (creator == nullptr) return -1;
    std::vector<int32_t> ints(num_fields);
    std::vector<float> floats(num_fields);
    std::vector<PluginField> fields;
    for (int i = 0; i < num_fields; ++i) {
        if (field_is_float[i]) {
            floats[i] = static_cast<float>(values[i]);
            fields.emplace_back(field_names[i], &floats[i], PluginFieldType::kFLOAT32, 1);
        } else {
            ints[i] = static_cast<int32_t>(values[i]);
            fields.emplace_back(field_names[i], &ints[i], PluginFieldType::kINT32, 1);
        }
    }
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin(name, &fc, TensorRTPhase::kBUILD));
    if (!plugin) return -2;
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* fields_out = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    const int32_t nb_out = build->getNbOutputs();
    *num_out = nb_out;
    std::vector<DataType> in_t(num_in), out_t(nb_out);
    for (int i = 0; i < num_in; ++i) in_t[i] = static_cast<DataType>(in_types[i]);
    if (build->getOutputDataTypes(out_t.data(), nb_out, in_t.data(), num_in) != 0) return -3;
    ConstantBuilder exprs;
    std::vector<DimsExprs> in_e(num_in), out_e(nb_out);
    for (int i = 0; i < num_in; ++i) {
        in_e[i].nbDims = in_ndims[i];
        for (int d = 0; d < in_ndims[i]; ++d) in_e[i].d[d] = exprs.make(in_dims[i * 8 + d]);
    }
    if (build->getOutputShapes(in_e.data(), num_in, nullptr, 0, out_e.data(), nb_out, exprs) != 0) return -4;
    std::vector<DynamicPluginTensorDesc> io(num_in + nb_out);
    for (int i = 0; i < num_in + nb_out; ++i) {
        PluginTensorDesc& desc = io[i].desc;
        if (i < num_in) {
            desc.dims = dims_of(in_ndims[i], in_dims + i * 8);
            desc.type = in_t[i];
        } else {
            const int o = i - num_in;
            desc.dims.nbDims = out_e[o].nbDims;
            for (int d = 0; d < out_e[o].nbDims; ++d) desc.dims.d[d] = out_e[o].d[d]->getConstantValue();
            desc.type = out_t[o];
            out_types[o] = static_cast<int>(out_t[o]);
            out_ndims[o] = desc.dims.nbDims;
            for (int d = 0; d < desc.dims.nbDims; ++d) out_dims[o * 8 + d] = desc.dims.d[d];
        }
        desc.format = TensorFormat::kLINEAR;
        io[i].min = io[i].opt = io[i].max = desc.dims;
    }
    for (int pos = 0; pos < num_in + nb_out; ++pos)
        if (!build->supportsFormatCombination(pos, io.data(), num_in, nb_out)) {
            *bad_position = pos;
            return -5;
        }
    if (build->configurePlugin(io.data(), num_in, io.data() + num_in, nb_out) != 0) return -6;
    *workspace_bytes = build->getWorkspaceSize(io.data(), num_in, io.data() + num_in, nb_out);
    // the engine keeps the fields; the runtime recreates the plugin from them
    PluginFieldCollection const* saved = fields_out->getFieldsToSerialize();
    std::unique_ptr<IPluginV3> restored(creator->createPlugin(name, saved, TensorRTPhase::kRUNTIME));
    if (!restored) return -7;
    std::unique_ptr<IPluginV3> attached(
        static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
            ->attachToContext(nullptr));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::vector<PluginTensorDesc> in_desc(num_in), out_desc(nb_out);
    std::vector<void const*> in_data(num_in);
    std::vector<void*> out_data(nb_out);
    for (int i = 0; i < num_in; ++i) {
        in_desc[i] = io[i].desc;
        in_data[i] = reinterpret_cast<void const*>(in_ptrs[i]);
    }
    for (int o = 0; o < nb_out; ++o) {
        out_desc[o] = io[num_in + o].desc;
        out_data[o] = reinterpret_cast<void*>(out_ptrs[o]);
    }
    if (runtime->onShapeChange(in_desc.data(), num_in, out_desc.data(), nb_out) != 0) return -8;
    return runtime->enqueue(in_desc.data(), out_desc.data(), in_data.data(), out_data.data(),
                            reinterpret_cast<void*>(workspace), reinterpret_cast<cudaStream_t>(0x51));
}
