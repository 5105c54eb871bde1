// Seeded Mamba2 scan (reference: plugins/reference.py seeded_mamba_scan_ref).
// 1. conv: one thread per channel walks the L new columns with a register window seeded from the
//    last W-1 raw columns of conv_state; SiLU in fp32, one rounding to T (into the workspace); the
//    new conv state is the last W raw columns of conv_state ‖ xbc.
// 2. scan: one block per (head, row) keeps the head's [P, N] fp32 state in registers (each thread a
//    slice of N for one p), walks the L tokens in order, reduces y over N with warp shuffles; when
//    asked, it also stores the state after every token (speculative mode rolls back to them).
#include <math.h>

#include "common.cuh"

namespace twotower {
namespace {

constexpr int kMaxConvWidth = 8;
constexpr int kMaxStatePerThread = 32;
constexpr int kConvThreads = 128;

template <typename T>
__global__ void conv_kernel(const T* __restrict__ xbc, const T* __restrict__ weight, const T* __restrict__ bias,
                            const T* conv_state_in, T* __restrict__ conv_out, T* conv_state_out, int L, int C, int W) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.y;
    if (c >= C) return;
    const size_t state = (static_cast<size_t>(b) * C + c) * W;
    float window[kMaxConvWidth];  // the W-1 raw columns before the current one
    float w[kMaxConvWidth];
    for (int j = 0; j < W; ++j) w[j] = to_float(weight[static_cast<size_t>(c) * W + j]);
    for (int j = 0; j + 1 < W; ++j) window[j] = to_float(conv_state_in[state + 1 + j]);
    const float bias_c = to_float(bias[c]);
    for (int t = 0; t < L; ++t) {
        const float x = to_float(xbc[(static_cast<size_t>(b) * L + t) * C + c]);
        float acc = bias_c + w[W - 1] * x;
        for (int j = 0; j + 1 < W; ++j) acc += w[j] * window[j];
        store(conv_out + (static_cast<size_t>(b) * L + t) * C + c, acc / (1.f + expf(-acc)));  // SiLU
        for (int j = 0; j + 2 < W; ++j) window[j] = window[j + 1];
        if (W > 1) window[W - 2] = x;
    }
    if (conv_state_out != nullptr) {  // columns L..L+W-1 of [conv_state (W) ‖ xbc (L)]; safe in place
        for (int j = 0; j < W; ++j) {
            const int col = L + j;
            conv_state_out[state + j] =
                col < W ? conv_state_in[state + col] : xbc[(static_cast<size_t>(b) * L + (col - W)) * C + c];
        }
    }
}

// grid (H, B); block P * N / PER_THREAD threads; dynamic shared memory 2 * N floats (B and C of one
// token). PER_THREAD is compile-time so that the state slice stays in registers.
template <typename T, int PER_THREAD>
__global__ void scan_kernel(const T* __restrict__ conv_out, const T* __restrict__ dt, const float* __restrict__ dt_bias,
                            const float* __restrict__ A_log, const float* __restrict__ D, const float* ssm_state_in,
                            T* __restrict__ y, float* ssm_state_out, float* __restrict__ ssm_states_out, int L, int C,
                            int H, int P, int G, int N) {
    extern __shared__ float bc[];  // [0, N): B of the head's group; [N, 2N): C
    const int h = blockIdx.x, b = blockIdx.y;
    const int g = h / (H / G);
    const int threads_per_p = N / PER_THREAD;
    const int p = threadIdx.x / threads_per_p;
    const int n0 = (threadIdx.x % threads_per_p) * PER_THREAD;
    const size_t state = ((static_cast<size_t>(b) * H + h) * P + p) * N + n0;

    float s[PER_THREAD];
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) s[i] = ssm_state_in[state + i];
    const float A = -expf(A_log[h]);
    const float Dh = D[h];
    const float bias = dt_bias[h];
    const int x_width = H * P;

    for (int t = 0; t < L; ++t) {
        const size_t token = (static_cast<size_t>(b) * L + t) * C;
        __syncthreads();
        for (int i = threadIdx.x; i < 2 * N; i += blockDim.x)
            bc[i] = to_float(conv_out[token + x_width + (i < N ? g * N + i : G * N + g * N + (i - N))]);
        __syncthreads();
        const float raw = to_float(dt[(static_cast<size_t>(b) * L + t) * H + h]) + bias;
        const float step = raw > 20.f ? raw : log1pf(expf(raw));  // softplus, as torch (threshold 20)
        const float x = to_float(conv_out[token + h * P + p]);
        const float decay = expf(step * A);
        const float input = step * x;
        float partial = 0.f;
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            s[i] = decay * s[i] + input * bc[n0 + i];
            partial += s[i] * bc[N + n0 + i];
        }
        for (int offset = threads_per_p / 2; offset > 0; offset /= 2)
            partial += __shfl_xor_sync(0xffffffffu, partial, offset, threads_per_p);
        if (n0 == 0) store(y + (static_cast<size_t>(b) * L + t) * x_width + h * P + p, partial + Dh * x);
        if (ssm_states_out != nullptr) {  // [B, L, H, P, N]: the state after token t
            float* dst = ssm_states_out + ((static_cast<size_t>(b) * L + t) * H + h) * P * N + static_cast<size_t>(p) * N + n0;
#pragma unroll
            for (int i = 0; i < PER_THREAD; ++i) dst[i] = s[i];
        }
    }
    if (ssm_state_out != nullptr)  // each block reads its own state before writing it: in place is safe
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) ssm_state_out[state + i] = s[i];
}

// Elements of the state each thread owns (a power of two <= 32): the block is at most 256 threads,
// the threads of one p are a power of two within a warp, and the block is whole warps.
int state_per_thread(int P, int N) {
    for (int per_thread = 1; per_thread <= kMaxStatePerThread; per_thread *= 2) {
        const int threads_per_p = N / per_thread;
        const bool ok = N % per_thread == 0 && threads_per_p <= 32 && (threads_per_p & (threads_per_p - 1)) == 0 &&
                        (P * threads_per_p) % 32 == 0 && P * threads_per_p <= 256;
        if (ok) return per_thread;
    }
    return -1;
}

template <typename T, int PER_THREAD>
void launch_scan_kernel(const T* conv_out, const void* dt, const float* dt_bias, const float* A_log, const float* D,
                        const float* ssm_state_in, void* y, float* ssm_state_out, float* ssm_states_out, int B, int L,
                        int C, int H, int P, int G, int N, cudaStream_t stream) {
    scan_kernel<T, PER_THREAD><<<dim3(H, B), P * N / PER_THREAD, 2 * N * sizeof(float), stream>>>(
        conv_out, static_cast<const T*>(dt), dt_bias, A_log, D, ssm_state_in, static_cast<T*>(y), ssm_state_out,
        ssm_states_out, L, C, H, P, G, N);
}

template <typename T>
void launch_scan(const void* xbc, const void* dt, const void* conv_weight, const void* conv_bias, const float* dt_bias,
                 const float* A_log, const float* D, const void* conv_state_in, const float* ssm_state_in, void* y,
                 void* conv_state_out, float* ssm_state_out, float* ssm_states_out, void* workspace, int B, int L,
                 int C, int W, int H, int P, int G, int N, int per_thread, cudaStream_t stream) {
    T* conv_out = static_cast<T*>(workspace);
    conv_kernel<T><<<dim3((C + kConvThreads - 1) / kConvThreads, B), kConvThreads, 0, stream>>>(
        static_cast<const T*>(xbc), static_cast<const T*>(conv_weight), static_cast<const T*>(conv_bias),
        static_cast<const T*>(conv_state_in), conv_out, static_cast<T*>(conv_state_out), L, C, W);
    switch (per_thread) {  // the state slice size at compile time
        case 1: launch_scan_kernel<T, 1>(conv_out, dt, dt_bias, A_log, D, ssm_state_in, y, ssm_state_out, ssm_states_out, B, L, C, H, P, G, N, stream); break;
        case 2: launch_scan_kernel<T, 2>(conv_out, dt, dt_bias, A_log, D, ssm_state_in, y, ssm_state_out, ssm_states_out, B, L, C, H, P, G, N, stream); break;
        case 4: launch_scan_kernel<T, 4>(conv_out, dt, dt_bias, A_log, D, ssm_state_in, y, ssm_state_out, ssm_states_out, B, L, C, H, P, G, N, stream); break;
        case 8: launch_scan_kernel<T, 8>(conv_out, dt, dt_bias, A_log, D, ssm_state_in, y, ssm_state_out, ssm_states_out, B, L, C, H, P, G, N, stream); break;
        case 16: launch_scan_kernel<T, 16>(conv_out, dt, dt_bias, A_log, D, ssm_state_in, y, ssm_state_out, ssm_states_out, B, L, C, H, P, G, N, stream); break;
        default: launch_scan_kernel<T, 32>(conv_out, dt, dt_bias, A_log, D, ssm_state_in, y, ssm_state_out, ssm_states_out, B, L, C, H, P, G, N, stream);
    }
}

}  // namespace
}  // namespace twotower

extern "C" size_t twotower_seeded_mamba_scan_workspace_bytes(int B, int L, int C, int dtype) {
    return static_cast<size_t>(B) * L * C * (dtype == 0 ? 4 : 2);
}

extern "C" int twotower_seeded_mamba_scan(const void* xbc, const void* dt, const void* conv_weight,
                                          const void* conv_bias, const float* dt_bias, const float* A_log,
                                          const float* D, const void* conv_state_in, const float* ssm_state_in,
                                          void* y, void* conv_state_out, float* ssm_state_out, float* ssm_states_out,
                                          void* workspace, int B, int L, int C, int W, int H, int P, int G, int N,
                                          int dtype, cudaStream_t stream) {
    using namespace twotower;
    if (!xbc || !dt || !conv_weight || !conv_bias || !dt_bias || !A_log || !D || !conv_state_in || !ssm_state_in ||
        !y || (!workspace && L > 0))
        return TWOTOWER_ERR_NULL;
    if (B <= 0 || L < 0 || C <= 0 || W <= 0 || H <= 0 || P <= 0 || G <= 0 || N <= 0 || H % G ||
        C != H * P + 2 * G * N)
        return TWOTOWER_ERR_BAD_DIMS;
    const int per_thread = state_per_thread(P, N);
    if (W > kMaxConvWidth || per_thread < 0) return TWOTOWER_ERR_UNSUPPORTED;
    TWOTOWER_DISPATCH_DTYPE(dtype, T, launch_scan<T>(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state_in,
                                                     ssm_state_in, y, conv_state_out, ssm_state_out, ssm_states_out,
                                                     workspace, B, L, C, W, H, P, G, N, per_thread, stream));
    return launch_status();
}
