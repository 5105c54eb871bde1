#include "triton_launch.h"

#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>

#include <cstring>

#include "triton_variants.h"
#include "twotower_ops.h"

namespace twotower {

namespace {

struct DType {
    char const* name;
    int64_t bytes;
};

// Indexed by TwoTowerDType.
constexpr DType kDTypes[] = {{"fp32", 4}, {"bf16", 2}, {"fp16", 2}, {"i32", 4}, {"i64", 8}};

DType const& dtype_of(int dtype) {
    if (dtype < 0 || dtype >= static_cast<int>(sizeof kDTypes / sizeof kDTypes[0]))
        throw Failure(TWOTOWER_ERR_BAD_DTYPE, "dtype code " + std::to_string(dtype) + " is not a TwoTowerDType");
    return kDTypes[dtype];
}

}  // namespace

char const* dtype_name(int dtype) { return dtype_of(dtype).name; }

int64_t dtype_bytes(int dtype) { return dtype_of(dtype).bytes; }

TritonLaunch& TritonLaunch::ptr(CUdeviceptr p, int dtype) {
    mTypes.push_back(std::string("*") + dtype_name(dtype));
    mSlots.push_back(static_cast<uint64_t>(p));
    return *this;
}

TritonLaunch& TritonLaunch::integer(int64_t value) {
    const bool narrow = value >= INT32_MIN && value <= INT32_MAX;
    mTypes.push_back(narrow ? "i32" : "i64");
    uint64_t slot = 0;
    if (narrow) {
        const int32_t v = static_cast<int32_t>(value);
        std::memcpy(&slot, &v, sizeof v);
    } else {
        std::memcpy(&slot, &value, sizeof value);
    }
    mSlots.push_back(slot);
    return *this;
}

TritonLaunch& TritonLaunch::f32(double value) {
    mTypes.push_back("fp32");
    const float v = static_cast<float>(value);
    uint64_t slot = 0;
    std::memcpy(&slot, &v, sizeof v);
    mSlots.push_back(slot);
    return *this;
}

TritonLaunch& TritonLaunch::constant(char const* name, int64_t value) {
    mConstants.push_back(std::string(name) + "=" + std::to_string(value));
    return *this;
}

TritonLaunch& TritonLaunch::constant(char const* name, char const* value) {
    mConstants.push_back(std::string(name) + "=" + value);
    return *this;
}

TritonLaunch& TritonLaunch::warps(int num_warps) {
    mWarps = num_warps;
    return *this;
}

std::string TritonLaunch::key() const {
    std::string key = mKernel + "(";
    for (size_t i = 0; i < mTypes.size(); ++i) key += (i ? "," : "") + mTypes[i];
    key += ")[";
    for (size_t i = 0; i < mConstants.size(); ++i) key += (i ? "," : "") + mConstants[i];
    return key + "]w" + std::to_string(mWarps);
}

namespace {

// The rows of a key, in table order (the one compiled with divisibility promises first).
std::vector<int> const& variant_rows(std::string const& key) {
    static const std::unordered_map<std::string, std::vector<int>> rows = [] {
        std::unordered_map<std::string, std::vector<int>> m;
        for (int i = 0; i < twotower_num_variants; ++i) m[twotower_variants[i].key].push_back(i);
        return m;
    }();
    auto found = rows.find(key);
    if (found == rows.end())
        throw Failure(TWOTOWER_ERR_UNSUPPORTED, "no compiled kernel variant " + key +
                                                    " (rebuild the plugin library with aot.py for this model config "
                                                    "and dtype)");
    return found->second;
}

// The first row whose promises these arguments keep: each promised slot (an address, or an
// integer's low bits) a multiple of 16.
int variant_index(std::string const& key, std::vector<uint64_t> const& slots) {
    for (int row : variant_rows(key)) {
        TwoTowerVariant const& v = twotower_variants[row];
        bool kept = true;
        for (int i = 0; i < v.num_divisible && kept; ++i)
            kept = v.divisible[i] < static_cast<int>(slots.size()) && (slots[v.divisible[i]] & 15u) == 0;
        if (kept) return row;
    }
    throw Failure(TWOTOWER_ERR_UNSUPPORTED, key + ": no compiled row without divisibility promises");
}

void check(CUresult result, char const* what, std::string const& key) {
    if (result != CUDA_SUCCESS) {
        char const* text = nullptr;
        cuGetErrorString(result, &text);
        throw Failure(static_cast<int>(result), std::string(what) + " failed for " + key + ": " +
                                                    (text ? text : "unknown CUDA error"));
    }
}

// The variant's function in the current context: its module is loaded on the context's first use
// (a process serving two GPUs has one context per device) and kept for the process's life.
CUfunction function_for(int variant, std::string const& key) {
    CUcontext context = nullptr;
    check(cuCtxGetCurrent(&context), "cuCtxGetCurrent", key);
    if (context == nullptr) throw Failure(static_cast<int>(CUDA_ERROR_INVALID_CONTEXT), "no current CUDA context for " + key);
    static std::mutex mutex;
    static std::map<std::pair<CUcontext, int>, CUfunction> loaded;
    std::lock_guard<std::mutex> lock(mutex);
    auto found = loaded.find({context, variant});
    if (found != loaded.end()) return found->second;
    TwoTowerVariant const& v = twotower_variants[variant];
    CUmodule module = nullptr;
    CUfunction function = nullptr;
    check(cuModuleLoadData(&module, v.cubin), "cuModuleLoadData", key);
    check(cuModuleGetFunction(&function, module, v.function), "cuModuleGetFunction", key);
    if (v.shared_bytes > 49152) {  // above the default: opt in, as Triton's loader does
        CUdevice device = 0;
        int optin = 0;
        check(cuCtxGetDevice(&device), "cuCtxGetDevice", key);
        check(cuDeviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device),
              "cuDeviceGetAttribute", key);
        if (static_cast<int>(v.shared_bytes) > optin)
            throw Failure(TWOTOWER_ERR_UNSUPPORTED, key + " needs " + std::to_string(v.shared_bytes) +
                                                        " bytes of shared memory; the device offers " + std::to_string(optin));
        check(cuFuncSetAttribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, static_cast<int>(v.shared_bytes)),
              "cuFuncSetAttribute", key);
    }
    loaded.emplace(std::make_pair(context, variant), function);
    return function;
}

}  // namespace

void TritonLaunch::run(int64_t grid_x, int64_t grid_y, int64_t grid_z, CUstream stream) const {
    const std::string k = key();
    const int variant = variant_index(k, mSlots);
    if (grid_x <= 0 || grid_y <= 0 || grid_z <= 0) return;
    if (grid_x > INT32_MAX || grid_y > 65535 || grid_z > 65535)
        throw Failure(TWOTOWER_ERR_UNSUPPORTED, k + ": grid too large");
    TwoTowerVariant const& v = twotower_variants[variant];  // its warps are the key's
    CUfunction function = function_for(variant, k);
    // Triton's kernel ABI: the runtime arguments in order, then the global and profile scratch
    // pointers (unused by these kernels: aot.py refuses kernels that need them). The trailing NULL
    // is not read by the driver.
    std::vector<uint64_t> slots(mSlots);
    slots.push_back(0);
    slots.push_back(0);
    std::vector<void*> params;
    for (uint64_t& slot : slots) params.push_back(&slot);
    params.push_back(nullptr);
    check(cuLaunchKernel(function, static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y),
                         static_cast<unsigned>(grid_z), 32 * v.num_warps, 1, 1, v.shared_bytes, stream, params.data(),
                         nullptr),
          "cuLaunchKernel", k);
}

}  // namespace twotower
