// Launching the Triton kernels compiled ahead of time (triton_variants.c): find the variant by
// the key the Python launcher's launch would have (aot.variant_key), load its cubin once per CUDA
// context, pass the arguments as Triton's own launcher does. Internal to the plugin library.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace twotower {

// An error with a TWOTOWER_ERR_* code (or a positive CUresult) and a message naming the problem.
struct Failure : std::runtime_error {
    Failure(int code, std::string const& message) : std::runtime_error(message), code(code) {}
    int code;
};

char const* dtype_name(int dtype);   // "fp32", "bf16", ... (Triton's names); both throw on a bad code
int64_t dtype_bytes(int dtype);      // bytes of one element

// One kernel launch, built argument by argument in the kernel's order (constexprs included, as
// the Python launcher passes them).
class TritonLaunch {
public:
    explicit TritonLaunch(char const* kernel) : mKernel(kernel) {}
    TritonLaunch& ptr(CUdeviceptr p, int dtype);            // "*bf16", ...
    TritonLaunch& integer(int64_t value);                    // "i32", or "i64" outside int32 (as Triton types it)
    TritonLaunch& f32(double value);                         // "fp32"
    TritonLaunch& constant(char const* name, int64_t value);
    TritonLaunch& constant(char const* name, char const* value);
    TritonLaunch& warps(int num_warps);
    std::string key() const;
    void run(int64_t grid_x, int64_t grid_y, int64_t grid_z, CUstream stream) const;

private:
    std::string mKernel;
    std::vector<std::string> mTypes, mConstants;
    std::vector<uint64_t> mSlots;  // one 8-byte slot per runtime argument
    int mWarps = 4;
};

}  // namespace twotower
