// Device helpers shared by the kernels: fp32 <-> T loads/stores and the dtype switch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "twotower_kernels.h"

namespace twotower {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }  // one rounding

// v rounded to the precision of the tensor dst points into (fp32: unchanged), kept in fp32.
__device__ __forceinline__ float round_as(float v, const float*) { return v; }
__device__ __forceinline__ float round_as(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }

inline int launch_status() {
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? 0 : static_cast<int>(err);
}

}  // namespace twotower

// Runs BODY with T = float (dtype 0) or __nv_bfloat16 (dtype 1); returns TWOTOWER_ERR_BAD_DTYPE otherwise.
#define TWOTOWER_DISPATCH_DTYPE(dtype, T, ...)            \
    switch (dtype) {                                      \
        case 0: {                                         \
            using T = float;                              \
            __VA_ARGS__;                                  \
            break;                                        \
        }                                                 \
        case 1: {                                         \
            using T = __nv_bfloat16;                      \
            __VA_ARGS__;                                  \
            break;                                        \
        }                                                 \
        default:                                          \
            return TWOTOWER_ERR_BAD_DTYPE;                \
    }
