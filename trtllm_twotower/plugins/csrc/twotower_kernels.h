// C ABI of the custom kernels (torch-free, TensorRT-free). Callers: the ctypes loader
// (plugins/kernels.py), the IPluginV3 wrappers (plugins.cpp) and the GPU tests.
// Semantics: plugins/reference.py (block_attention_ref, seeded_mamba_scan_ref, moe_experts_ref).
//
// Shape alphabet: B batch, L new tokens, S cache capacity, H query heads, K kv heads, P head dim,
// C conv channels (= H_m*P_m + 2*G*N), W conv width, G groups, N state size, n tokens, k experts per
// token, E experts, I expert width.
// All tensors are contiguous, row-major. dtype: 0 = fp32, 1 = bf16 (the "T" tensors below).
// Return value: 0 on success, a negative TWOTOWER_ERR_* for bad arguments (nothing launched),
// or a positive cudaError_t from the launch.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TWOTOWER_ERR_BAD_DIMS -1      // a size is <= 0 or inconsistent (e.g. H % K != 0)
#define TWOTOWER_ERR_UNSUPPORTED -2   // a size outside what the kernels were written for
#define TWOTOWER_ERR_BAD_DTYPE -3     // dtype not 0 (fp32) or 1 (bf16)
#define TWOTOWER_ERR_NULL -4          // a required pointer is NULL

// Human-readable text for a return code (negative: ours; positive: cudaGetErrorString).
const char* twotower_error_string(int code);

// ---- block attention ---------------------------------------------------------------------------
// Queries of an L-token chunk attend to cache[0:cache_lens[b]] plus the chunk's own K/V.
// causal: chunk query l sees chunk keys 0..l (context tower); else all L (denoiser).
// write_cache: also copies k, v into k_cache/v_cache[b, cache_lens[b] : cache_lens[b] + L].
// GQA: query head h reads kv head h / (H / K). Scale 1/sqrt(P); scores and softmax in fp32.
//   q          [B, L, H, P]  T      read
//   k, v       [B, L, K, P]  T      read
//   k_cache    [B, S, K, P]  T      read (rows < cache_lens[b]); written iff write_cache
//   v_cache    [B, S, K, P]  T      same
//   cache_lens [B]           int32  read, DEVICE memory; each + L must be <= S
//   out        [B, L, H, P]  T      written
//   workspace  float[twotower_block_attention_workspace_floats(...)]   scratch (split-K partials)
// max_cache_len: a host-known upper bound of cache_lens (sizes the key split); <= S.
// num_splits: key-range splits (>= 1), e.g. twotower_block_attention_num_splits(...).
int twotower_block_attention(const void* q, const void* k, const void* v, void* k_cache, void* v_cache,
                             const int32_t* cache_lens, void* out, float* workspace, int B, int L, int H, int K,
                             int P, int S, int max_cache_len, int num_splits, int dtype, int causal, int write_cache,
                             cudaStream_t stream);
size_t twotower_block_attention_workspace_floats(int B, int L, int H, int P, int num_splits);
// Enough (row tile, kv head, batch, split) blocks to fill num_sms SMs twice, at least 256 keys a split.
int twotower_block_attention_num_splits(int B, int L, int H, int K, int max_cache_len, int num_sms);

// ---- seeded Mamba2 scan ------------------------------------------------------------------------
// Depthwise causal conv (W taps) over [conv_state[:, :, 1:] ‖ xbc] + SiLU (rounded to T), then
// S = exp(dt*A) S + dt x ⊗ B;  y = S·C + D x  with dt = softplus(dt_raw + dt_bias), A = -exp(A_log),
// fp32 state; head h reads group h / (H / G). x, B, C are the conv output split [H*P | G*N | G*N].
//   xbc            [B, L, C]      T      read (raw, pre-conv)
//   dt             [B, L, H]      T      read (raw)
//   conv_weight    [C, W]         T      read; [:, W-1] multiplies the current column
//   conv_bias      [C]            T      read
//   dt_bias, A_log, D  [H]        fp32   read
//   conv_state_in  [B, C, W]      T      read (last W raw columns before the chunk, most recent last)
//   ssm_state_in   [B, H, P, N]   fp32   read
//   y              [B, L, H*P]    T      written (before the gated norm)
//   conv_state_out [B, C, W]      T      written iff not NULL: last W raw columns of conv_state_in ‖ xbc
//   ssm_state_out  [B, H, P, N]   fp32   written iff not NULL; may alias ssm_state_in
//   ssm_states_out [B, L, H, P, N] fp32  written iff not NULL: the state after each of the L tokens
//   workspace      bytes[twotower_seeded_mamba_scan_workspace_bytes(...)]   scratch (conv output)
// Limits: P*N a multiple of the block size chosen inside (P*N >= 32), N / (elements per thread) a
// power of two <= 32; the real model (P 64, N 128) and the tests' sizes qualify.
int twotower_seeded_mamba_scan(const void* xbc, const void* dt, const void* conv_weight, const void* conv_bias,
                               const float* dt_bias, const float* A_log, const float* D, const void* conv_state_in,
                               const float* ssm_state_in, void* y, void* conv_state_out, float* ssm_state_out,
                               float* ssm_states_out, void* workspace, int B, int L, int C, int W, int H, int P, int G,
                               int N, int dtype, cudaStream_t stream);
size_t twotower_seeded_mamba_scan_workspace_bytes(int B, int L, int C, int dtype);

// ---- routed relu^2 experts ------------------------------------------------------------------------
// For each token r and slot j (expert e = expert_ids[r, j]):
//   a = bf16(bf16(relu(bf16(x_r . up_e^T)))^2);  y = bf16(a . down_e^T)
//   out_r = bf16( sum over its slots in ascending expert id of f32(y) * expert_weights[r, j] )
// (spec §3 MoE; in fp32 nothing is rounded). Shared expert and router are not part of it.
//   x              [n, H]      T      read
//   expert_ids     [n, k]      int32  read; each in [0, E), a token's k ids distinct
//   expert_weights [n, k]      fp32   read
//   up             [E, I, H]   T      read
//   down           [E, H, I]   T      read
//   out            [n, H]      T      written
//   workspace      bytes[twotower_moe_experts_workspace_bytes(...)]   scratch (grouping, activations)
// Limits: E <= 1024, k <= 16.
int twotower_moe_experts(const void* x, const int32_t* expert_ids, const float* expert_weights, const void* up,
                         const void* down, void* out, void* workspace, int n, int k, int E, int H, int I, int dtype,
                         cudaStream_t stream);
size_t twotower_moe_experts_workspace_bytes(int n, int k, int E, int H, int I, int dtype);

#ifdef __cplusplus
}
#endif
