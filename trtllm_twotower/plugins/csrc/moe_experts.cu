// Routed relu^2 experts (reference: network/ops.py moe_experts_ref, the spec's MoE loop).
// TensorRT-LLM 1.2's MoE plugin cannot run non-gated relu^2 experts (its Python activation map has
// no relu2), so the engines use this kernel instead of a slow per-expert graph.
// 1. route: one block counts the (token, slot) pairs of every expert and lays them out grouped by
//    expert (pair order inside a group does not matter: every pair is computed on its own).
// 2. up, down: per (expert, tile of output rows) block, the expert's rows are streamed through
//    shared memory once per chunk of its pairs; fp32 accumulation (CUDA cores: a correct first
//    version, to be measured against torch's grouped GEMM on a GPU); up rounds, applies relu, squares
//    and rounds again (relu^2, each op rounded as the spec), down rounds once.
// 3. combine: per token, the k expert outputs times their routing weights summed in fp32 in
//    ascending expert order (multiply, then add: no FMA contraction), one rounding.
#include "common.cuh"

namespace twotower {
namespace {

constexpr int kRouteThreads = 1024;
constexpr int kMaxExperts = 1024;
constexpr int kMaxTopK = 16;
constexpr int kRows = 64;     // output rows per block
constexpr int kPairs = 16;    // pairs per inner chunk
constexpr int kChunk = 64;    // reduction elements per shared-memory stage
constexpr int kGemmThreads = 256;  // each thread: 4 (row, pair) outputs of the 64 x 16 tile

__device__ __forceinline__ int clamp_expert(int32_t id, int E) { return id < 0 ? 0 : (id >= E ? E - 1 : id); }

__global__ void route_kernel(const int32_t* __restrict__ expert_ids, int pairs, int E, int32_t* __restrict__ offsets,
                             int32_t* __restrict__ order, int32_t* __restrict__ position) {
    __shared__ int32_t counts[kMaxExperts];
    __shared__ int32_t cursor[kMaxExperts];
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    // ids are clamped into [0, E): the router never produces others, but TensorRT times a plugin's
    // tactics on uninitialised buffers, and an id out of range would write outside shared memory
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicAdd(&counts[clamp_expert(expert_ids[p], E)], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        for (int e = 0; e < E; ++e) {
            offsets[e] = total;
            cursor[e] = total;
            total += counts[e];
        }
        offsets[E] = total;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int slot = atomicAdd(&cursor[clamp_expert(expert_ids[p], E)], 1);
        order[slot] = p;
        position[p] = slot;
    }
}

// out[slot, rows] = epilogue(W_e[rows, :] . in[row_of(slot), :]) for the pairs of expert e.
// UP: in = x (row = token = pair / k), epilogue relu^2; else in = a (row = slot), epilogue identity.
template <typename T, bool UP>
__global__ void __launch_bounds__(kGemmThreads) expert_gemm_kernel(
    const T* __restrict__ in, const T* __restrict__ weight, const int32_t* __restrict__ offsets,
    const int32_t* __restrict__ order, T* __restrict__ out, int k, int rows_out, int reduce) {
    __shared__ float w_tile[kRows][kChunk + 1];
    __shared__ float in_tile[kPairs][kChunk + 1];
    const int e = blockIdx.y;
    const int row0 = blockIdx.x * kRows;
    const int first = offsets[e], count = offsets[e + 1] - first;
    if (count == 0 || row0 >= rows_out) return;
    const T* W = weight + static_cast<size_t>(e) * rows_out * reduce;
    const int r_local = threadIdx.x % kRows;           // this thread's output row in the tile
    const int p_group = threadIdx.x / kRows;           // 0..3: pairs p_group, p_group + 4, ...
    for (int chunk = 0; chunk < count; chunk += kPairs) {
        const int n_pairs = min(kPairs, count - chunk);
        float acc[kPairs / 4] = {0.f, 0.f, 0.f, 0.f};
        for (int c0 = 0; c0 < reduce; c0 += kChunk) {
            const int width = min(kChunk, reduce - c0);
            __syncthreads();
            for (int idx = threadIdx.x; idx < kRows * kChunk; idx += kGemmThreads) {
                const int r = idx / kChunk, c = idx % kChunk;
                w_tile[r][c] = (row0 + r < rows_out && c < width) ? to_float(W[static_cast<size_t>(row0 + r) * reduce + c0 + c]) : 0.f;
            }
            for (int idx = threadIdx.x; idx < kPairs * kChunk; idx += kGemmThreads) {
                const int j = idx / kChunk, c = idx % kChunk;
                float value = 0.f;
                if (j < n_pairs && c < width) {
                    const int slot = first + chunk + j;
                    const size_t src = UP ? static_cast<size_t>(order[slot] / k) : static_cast<size_t>(slot);
                    value = to_float(in[src * reduce + c0 + c]);
                }
                in_tile[j][c] = value;
            }
            __syncthreads();
#pragma unroll
            for (int i = 0; i < kPairs / 4; ++i) {
                const int j = p_group + 4 * i;
                float sum = acc[i];
                for (int c = 0; c < width; ++c) sum = fmaf(w_tile[r_local][c], in_tile[j][c], sum);
                acc[i] = sum;
            }
        }
        if (row0 + r_local < rows_out) {
#pragma unroll
            for (int i = 0; i < kPairs / 4; ++i) {
                const int j = p_group + 4 * i;
                if (j >= n_pairs) continue;
                T* dst = out + static_cast<size_t>(first + chunk + j) * rows_out + row0 + r_local;
                if (UP) {
                    const float h = fmaxf(round_as(acc[i], dst), 0.f);  // bf16(x . up); relu of it is exact
                    store(dst, __fmul_rn(h, h));                         // bf16(h * h)
                } else {
                    store(dst, acc[i]);
                }
            }
        }
    }
}

template <typename T>
__global__ void combine_kernel(const T* __restrict__ y, const int32_t* __restrict__ expert_ids,
                               const float* __restrict__ expert_weights, const int32_t* __restrict__ position, T* __restrict__ out,
                               int k, int H) {
    const int token = blockIdx.x;
    int ids[kMaxTopK], slots[kMaxTopK];
    float weights[kMaxTopK];
    for (int j = 0; j < k; ++j) {  // this token's slots in ascending expert id (insertion sort, k <= 16)
        int id = expert_ids[token * k + j], slot = position[token * k + j];
        float w = expert_weights[token * k + j];
        int i = j;
        while (i > 0 && ids[i - 1] > id) {
            ids[i] = ids[i - 1], slots[i] = slots[i - 1], weights[i] = weights[i - 1];
            --i;
        }
        ids[i] = id, slots[i] = slot, weights[i] = w;
    }
    for (int d = threadIdx.x; d < H; d += blockDim.x) {
        float acc = __fmul_rn(to_float(y[static_cast<size_t>(slots[0]) * H + d]), weights[0]);
        for (int j = 1; j < k; ++j)
            acc = __fadd_rn(acc, __fmul_rn(to_float(y[static_cast<size_t>(slots[j]) * H + d]), weights[j]));
        store(out + static_cast<size_t>(token) * H + d, acc);
    }
}

size_t align(size_t bytes) { return (bytes + 255) / 256 * 256; }

struct Workspace {
    int32_t* offsets;   // [E + 1]
    int32_t* order;     // [n * k] pair index of each grouped slot
    int32_t* position;  // [n * k] grouped slot of each pair
    void* a;            // [n * k, I] relu^2 activations
    void* y;            // [n * k, H] expert outputs
};

Workspace carve(void* base, int n, int k, int E, int H, int I, size_t elem) {
    char* p = static_cast<char*>(base);
    const size_t pairs = static_cast<size_t>(n) * k;
    Workspace w;
    w.offsets = reinterpret_cast<int32_t*>(p);
    p += align((E + 1) * sizeof(int32_t));
    w.order = reinterpret_cast<int32_t*>(p);
    p += align(pairs * sizeof(int32_t));
    w.position = reinterpret_cast<int32_t*>(p);
    p += align(pairs * sizeof(int32_t));
    w.a = p;
    p += align(pairs * I * elem);
    w.y = p;
    return w;
}

template <typename T>
void launch(const void* x, const int32_t* expert_ids, const float* expert_weights, const void* up, const void* down,
            void* out, void* workspace, int n, int k, int E, int H, int I, cudaStream_t stream) {
    Workspace w = carve(workspace, n, k, E, H, I, sizeof(T));
    route_kernel<<<1, kRouteThreads, 0, stream>>>(expert_ids, n * k, E, w.offsets, w.order, w.position);
    expert_gemm_kernel<T, true><<<dim3((I + kRows - 1) / kRows, E), kGemmThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(up), w.offsets, w.order, static_cast<T*>(w.a), k, I, H);
    expert_gemm_kernel<T, false><<<dim3((H + kRows - 1) / kRows, E), kGemmThreads, 0, stream>>>(
        static_cast<const T*>(w.a), static_cast<const T*>(down), w.offsets, w.order, static_cast<T*>(w.y), k, H, I);
    combine_kernel<T><<<n, 256, 0, stream>>>(static_cast<const T*>(w.y), expert_ids, expert_weights, w.position,
                                            static_cast<T*>(out), k, H);
}

}  // namespace
}  // namespace twotower

extern "C" size_t twotower_moe_experts_workspace_bytes(int n, int k, int E, int H, int I, int dtype) {
    const size_t elem = dtype == 0 ? 4 : 2;
    const size_t pairs = static_cast<size_t>(n) * k;
    using twotower::align;
    return align((E + 1) * sizeof(int32_t)) + 2 * align(pairs * sizeof(int32_t)) + align(pairs * I * elem) +
           align(pairs * H * elem);
}

extern "C" int twotower_moe_experts(const void* x, const int32_t* expert_ids, const float* expert_weights,
                                    const void* up, const void* down, void* out, void* workspace, int n, int k, int E,
                                    int H, int I, int dtype, cudaStream_t stream) {
    using namespace twotower;
    if (!x || !expert_ids || !expert_weights || !up || !down || !out || !workspace) return TWOTOWER_ERR_NULL;
    if (n <= 0 || k <= 0 || E <= 0 || H <= 0 || I <= 0 || k > E) return TWOTOWER_ERR_BAD_DIMS;
    if (E > kMaxExperts || k > kMaxTopK) return TWOTOWER_ERR_UNSUPPORTED;
    TWOTOWER_DISPATCH_DTYPE(dtype, T, launch<T>(x, expert_ids, expert_weights, up, down, out, workspace, n, k, E, H, I,
                                                stream));
    return launch_status();
}
