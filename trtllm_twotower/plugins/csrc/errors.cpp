// Text for the C ABI's return codes.
#include <cuda_runtime.h>

#include "twotower_kernels.h"

extern "C" const char* twotower_error_string(int code) {
    switch (code) {
        case 0: return "success";
        case TWOTOWER_ERR_BAD_DIMS: return "bad dimensions (a size <= 0, or heads not divisible by kv heads / groups)";
        case TWOTOWER_ERR_UNSUPPORTED: return "sizes outside what the kernels support (see twotower_kernels.h)";
        case TWOTOWER_ERR_BAD_DTYPE: return "dtype must be 0 (fp32) or 1 (bf16)";
        case TWOTOWER_ERR_NULL: return "a required pointer is NULL";
        default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown twotower error";
    }
}
