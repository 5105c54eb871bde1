// C ABI of the kernels the TensorRT plugins launch: the Triton kernels of plugins/*.py compiled
// ahead of time (plugins/aot.py), launched as the Python launchers launch them (plugins/csrc/
// triton_ops.cpp mirrors norms.py, moe.py, attention.py and mamba.py; tests/test_triton_aot.py
// checks every launch against the Python launcher's). No torch, no TensorRT, only the CUDA driver.
//
// One entry point: twotower_launch(op, inputs, outputs, attributes, workspace, stream), where op is
// an ONNX node name of onnx_nodes.py without "TwoTower" (e.g. "BlockAttention"), the tensors come
// with their dtype and dims (contiguous, row-major) and the attributes in the node's order:
//   RmsNorm            x, weight                         -> y                 eps
//   ModulatedRmsNorm   x, weight, table, m               -> y                 eps, modulate_first
//   GatedResidual      x, h, table, m                    -> y
//   GatedRmsNorm       y, z, weight                      -> out               n_groups, eps
//   Relu2              x                                 -> y
//   MoeRoute           x, router, correction_bias        -> expert_ids (i64), expert_weights (f32)
//                                                                            top_k, normalize, scale
//   MoeExperts         x, expert_ids, expert_weights, up, down[, shared] -> out
//   BlockAttention     q, k, v, k_cache, v_cache, cache_lens -> out           num_heads, num_kv_heads,
//                                                                            head_dim, causal
//   SeededMambaScan    xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state
//                      -> y, conv_state_out, ssm_state_out, conv_steps, ssm_steps
//                                                                            n_groups, head_dim, return_steps
// Semantics: plugins/reference.py. Return 0, or a TWOTOWER_ERR_* (nothing launched), or a positive
// CUresult from the driver; twotower_error_string() says which, and twotower_last_error() names the
// problem (the missing variant's key, the bad dimension).
#pragma once

#include <cuda.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TWOTOWER_ERR_BAD_DIMS -1      // a size is <= 0 or inconsistent with the others
#define TWOTOWER_ERR_UNSUPPORTED -2   // a size or dtype no compiled variant serves (rebuild with aot.py)
#define TWOTOWER_ERR_BAD_DTYPE -3     // a dtype code outside TwoTowerDType
#define TWOTOWER_ERR_NULL -4          // a required pointer is NULL
#define TWOTOWER_ERR_UNKNOWN_OP -5    // op names no node
#define TWOTOWER_ERR_WORKSPACE -6     // the workspace is smaller than twotower_workspace_bytes

typedef enum { TWOTOWER_FP32 = 0, TWOTOWER_BF16 = 1, TWOTOWER_FP16 = 2, TWOTOWER_I32 = 3, TWOTOWER_I64 = 4 } TwoTowerDType;

typedef struct {
    CUdeviceptr data;
    int dtype;  // TwoTowerDType
    int ndim;   // <= 8
    int64_t dims[8];
} TwoTowerTensor;

int twotower_launch(const char* op, const TwoTowerTensor* inputs, int num_inputs, const TwoTowerTensor* outputs,
                    int num_outputs, const double* attributes, int num_attributes, CUdeviceptr workspace,
                    size_t workspace_bytes, CUstream stream);
// Scratch one launch needs at most for inputs no larger than these (the dims are upper bounds).
size_t twotower_workspace_bytes(const char* op, const TwoTowerTensor* inputs, int num_inputs,
                                const double* attributes, int num_attributes);
const char* twotower_error_string(int code);
const char* twotower_last_error(void);  // this thread's last error, with the names in it

// The compiled variants (for tests and tools).
int twotower_variant_count(void);
const char* twotower_variant_key(int index);
const void* twotower_variant_cubin(int index);

#ifdef __cplusplus
}
#endif
