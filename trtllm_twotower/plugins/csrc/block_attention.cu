// Block attention: L new queries over cache[0:len] ‖ the chunk's own K/V (reference:
// plugins/reference.py block_attention_ref). Split-K ("flash-decoding"): each block takes the query
// rows (q head in the kv group x chunk position) of one kv head and a range of keys, streams the keys
// through shared memory once for all its rows, keeps an online softmax per row in fp32, and writes a
// partial (o, max, sum); a combine kernel merges the splits. Two threads per row, interleaved dims.
#include <math.h>

#include "common.cuh"

namespace twotower {
namespace {

constexpr int kThreads = 128;          // 2 threads per query row
constexpr int kRowsPerBlock = kThreads / 2;
constexpr int kKeyTile = 32;
constexpr int kMaxHeadDim = 128;

// grid: x = row tile over (G * L) rows, y = b * K + kv head, z = key split. HALF = P / 2 is a
// compile-time constant so that the per-row q and accumulator stay in registers.
template <typename T, int HALF>
__global__ void __launch_bounds__(kThreads) attention_partial_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ k_cache,
    const T* __restrict__ v_cache, const int32_t* __restrict__ cache_lens, float* __restrict__ part_o,
    float* __restrict__ part_ml, int B, int L, int H, int K, int S, int keys_per_split, int causal, float scale) {
    constexpr int P = 2 * HALF;
    __shared__ float k_tile[kKeyTile][kMaxHeadDim];
    __shared__ float v_tile[kKeyTile][kMaxHeadDim];

    const int G = H / K;
    const int b = blockIdx.y / K;
    const int kvh = blockIdx.y % K;
    const int split = blockIdx.z;
    const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 2;
    const int half = threadIdx.x & 1;
    const bool row_ok = row < G * L;
    const int g = row_ok ? row / L : 0;
    const int l = row_ok ? row % L : 0;
    const int h = kvh * G + g;

    const int len = cache_lens[b];
    const int key_begin = split * keys_per_split;
    const int key_end = min(len + L, key_begin + keys_per_split);
    const int row_end = causal ? min(key_end, len + l + 1) : key_end;  // keys [key_begin, row_end) are visible

    float qr[HALF];
    float acc[HALF];
#pragma unroll
    for (int d = 0; d < HALF; ++d) {  // this thread's dims: 2d + half (interleaved: no bank conflicts)
        qr[d] = row_ok ? to_float(q[((static_cast<size_t>(b) * L + l) * H + h) * P + 2 * d + half]) * scale : 0.f;
        acc[d] = 0.f;
    }
    float running_max = -INFINITY;
    float running_sum = 0.f;

    for (int tile = key_begin; tile < key_end; tile += kKeyTile) {
        const int tile_keys = min(kKeyTile, key_end - tile);
        __syncthreads();
        for (int idx = threadIdx.x; idx < tile_keys * P; idx += kThreads) {
            const int j = idx / P, d = idx % P, key = tile + j;
            size_t off;
            const T* ks;
            const T* vs;
            if (key < len) {  // from the cache
                off = ((static_cast<size_t>(b) * S + key) * K + kvh) * P + d;
                ks = k_cache;
                vs = v_cache;
            } else {  // from the chunk's own K/V
                off = ((static_cast<size_t>(b) * L + (key - len)) * K + kvh) * P + d;
                ks = k;
                vs = v;
            }
            k_tile[j][d] = to_float(ks[off]);
            v_tile[j][d] = to_float(vs[off]);
        }
        __syncthreads();
        for (int j = 0; j < tile_keys; ++j) {  // block-uniform trip count: the shuffle below is safe
            float s = 0.f;
#pragma unroll
            for (int d = 0; d < HALF; ++d) s += qr[d] * k_tile[j][2 * d + half];
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            if (!row_ok || tile + j >= row_end) continue;
            const float new_max = fmaxf(running_max, s);
            const float alpha = expf(running_max - new_max);
            const float p = expf(s - new_max);
            running_sum = running_sum * alpha + p;
#pragma unroll
            for (int d = 0; d < HALF; ++d) acc[d] = acc[d] * alpha + p * v_tile[j][2 * d + half];
            running_max = new_max;
        }
    }
    if (!row_ok) return;
    const size_t part = ((static_cast<size_t>(split) * B + b) * H + h) * L + l;
#pragma unroll
    for (int d = 0; d < HALF; ++d) part_o[part * P + 2 * d + half] = acc[d];
    if (half == 0) {
        part_ml[2 * part] = running_max;
        part_ml[2 * part + 1] = running_sum;
    }
}

// grid: B * H * L blocks of P threads; merges the splits of one output row
template <typename T>
__global__ void attention_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                         T* __restrict__ out, int B, int L, int H, int P, int num_splits) {
    const int row = blockIdx.x;  // (b * H + h) * L + l
    const int d = threadIdx.x;
    const int b = row / (H * L), h = (row / L) % H, l = row % L;
    const size_t rows = static_cast<size_t>(B) * H * L;
    float m = -INFINITY;
    for (int s = 0; s < num_splits; ++s) m = fmaxf(m, part_ml[2 * (s * rows + row)]);
    float num = 0.f, den = 0.f;
    for (int s = 0; s < num_splits; ++s) {
        const float w = expf(part_ml[2 * (s * rows + row)] - m);  // exp(-inf) = 0 for empty splits
        den += w * part_ml[2 * (s * rows + row) + 1];
        num += w * part_o[(s * rows + row) * P + d];
    }
    store(out + ((static_cast<size_t>(b) * L + l) * H + h) * P + d, num / den);
}

// grid-stride copy of the chunk's K/V into the cache rows [len, len + L)
template <typename T>
__global__ void write_cache_kernel(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
                                   T* __restrict__ v_cache, const int32_t* __restrict__ cache_lens, int B, int L,
                                   int K, int P, int S) {
    const size_t total = static_cast<size_t>(B) * L * K * P;
    for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const size_t kp = i % (static_cast<size_t>(K) * P);
        const int l = (i / (static_cast<size_t>(K) * P)) % L;
        const int b = i / (static_cast<size_t>(L) * K * P);
        const size_t dst = (static_cast<size_t>(b) * S + cache_lens[b] + l) * K * P + kp;
        k_cache[dst] = k[i];
        v_cache[dst] = v[i];
    }
}

template <typename T>
void launch_attention(const void* q, const void* k, const void* v, void* k_cache, void* v_cache,
                      const int32_t* cache_lens, void* out, float* part_o, float* part_ml, int B, int L, int H, int K,
                      int P, int S, int num_splits, int keys_per_split, int causal, int write_cache,
                      cudaStream_t stream) {
    const auto* qt = static_cast<const T*>(q);
    const auto* kt = static_cast<const T*>(k);
    const auto* vt = static_cast<const T*>(v);
    const auto* kc = static_cast<const T*>(k_cache);
    const auto* vc = static_cast<const T*>(v_cache);
    const dim3 grid((H / K * L + kRowsPerBlock - 1) / kRowsPerBlock, B * K, num_splits);
    const float scale = 1.f / sqrtf(static_cast<float>(P));
    switch (P) {  // HALF = P / 2 at compile time
        case 16:
            attention_partial_kernel<T, 8><<<grid, kThreads, 0, stream>>>(qt, kt, vt, kc, vc, cache_lens, part_o,
                                                                          part_ml, B, L, H, K, S, keys_per_split,
                                                                          causal, scale);
            break;
        case 32:
            attention_partial_kernel<T, 16><<<grid, kThreads, 0, stream>>>(qt, kt, vt, kc, vc, cache_lens, part_o,
                                                                           part_ml, B, L, H, K, S, keys_per_split,
                                                                           causal, scale);
            break;
        case 64:
            attention_partial_kernel<T, 32><<<grid, kThreads, 0, stream>>>(qt, kt, vt, kc, vc, cache_lens, part_o,
                                                                           part_ml, B, L, H, K, S, keys_per_split,
                                                                           causal, scale);
            break;
        default:
            attention_partial_kernel<T, 64><<<grid, kThreads, 0, stream>>>(qt, kt, vt, kc, vc, cache_lens, part_o,
                                                                           part_ml, B, L, H, K, S, keys_per_split,
                                                                           causal, scale);
    }
    attention_combine_kernel<T><<<B * H * L, P, 0, stream>>>(part_o, part_ml, static_cast<T*>(out), B, L, H, P,
                                                             num_splits);
    if (write_cache) {  // the partial kernel read the chunk's rows from k/v, never from these cache rows
        const size_t total = static_cast<size_t>(B) * L * K * P;
        const int blocks = static_cast<int>((total + 255) / 256 < 65535 ? (total + 255) / 256 : 65535);
        write_cache_kernel<T><<<blocks, 256, 0, stream>>>(kt, vt, static_cast<T*>(k_cache), static_cast<T*>(v_cache),
                                                          cache_lens, B, L, K, P, S);
    }
}

}  // namespace
}  // namespace twotower

extern "C" size_t twotower_block_attention_workspace_floats(int B, int L, int H, int P, int num_splits) {
    return static_cast<size_t>(num_splits) * B * H * L * (P + 2);
}

extern "C" int twotower_block_attention_num_splits(int B, int L, int H, int K, int max_cache_len, int num_sms) {
    if (B <= 0 || L <= 0 || K <= 0 || H % K) return 1;
    const int row_tiles = (H / K * L + twotower::kRowsPerBlock - 1) / twotower::kRowsPerBlock;
    const int blocks = row_tiles * B * K;
    const int wanted = (2 * num_sms + blocks - 1) / blocks;
    const int by_length = (max_cache_len + L + 255) / 256;  // at least 256 keys per split
    return wanted < by_length ? (wanted > 0 ? wanted : 1) : (by_length > 0 ? by_length : 1);
}

extern "C" int twotower_block_attention(const void* q, const void* k, const void* v, void* k_cache, void* v_cache,
                                        const int32_t* cache_lens, void* out, float* workspace, int B, int L, int H,
                                        int K, int P, int S, int max_cache_len, int num_splits, int dtype, int causal,
                                        int write_cache, cudaStream_t stream) {
    using namespace twotower;
    if (!q || !k || !v || !k_cache || !v_cache || !cache_lens || !out || !workspace) return TWOTOWER_ERR_NULL;
    if (B <= 0 || L <= 0 || H <= 0 || K <= 0 || P <= 0 || S <= 0 || num_splits <= 0 || H % K ||
        max_cache_len < 0 || max_cache_len + L > S)
        return TWOTOWER_ERR_BAD_DIMS;
    if (P != 16 && P != 32 && P != 64 && P != 128) return TWOTOWER_ERR_UNSUPPORTED;
    int keys_per_split = (max_cache_len + L + num_splits - 1) / num_splits;
    keys_per_split = (keys_per_split + kKeyTile - 1) / kKeyTile * kKeyTile;
    float* part_o = workspace;
    float* part_ml = workspace + static_cast<size_t>(num_splits) * B * H * L * P;
    TWOTOWER_DISPATCH_DTYPE(dtype, T, launch_attention<T>(q, k, v, k_cache, v_cache, cache_lens, out, part_o, part_ml,
                                                           B, L, H, K, P, S, num_splits, keys_per_split, causal,
                                                           write_cache, stream));
    return launch_status();
}
