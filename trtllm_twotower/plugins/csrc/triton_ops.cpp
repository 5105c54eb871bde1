// The ops of twotower_ops.h: each launches the AOT-compiled Triton kernels exactly as its Python
// launcher does (same kernels, grids, constexprs and arguments; tests/test_triton_aot.py compares
// them launch by launch). Read each beside its launcher: norms.rms_norm, norms.gated_residual,
// norms.gated_rms_norm, moe.relu2, moe.moe_route, moe.moe_experts, attention.block_attention,
// mamba.seeded_mamba_scan. Differences, both forced by the plugin setting: attention bounds the
// cache lengths by the cache capacity minus the chunk (the Python caller knows a tighter bound),
// and the experts sort more than ALIGN_MAX_PAIRS (token, expert) pairs in token chunks of at most
// that many pairs (Python sorts them with torch ops; every token's sum is the same either way).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "triton_constants.h"
#include "triton_launch.h"
#include "triton_variants.h"
#include "twotower_ops.h"

namespace twotower {
namespace {

thread_local std::string last_error;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_power_of_2(int64_t n) {  // triton.next_power_of_2
    int64_t p = 1;
    while (p < n) p <<= 1;
    return n <= 0 ? 0 : p;
}

size_t aligned(size_t bytes) { return (bytes + 255) & ~size_t(255); }

void require(bool ok, int code, std::string const& message) {
    if (!ok) throw Failure(code, message);
}

// The op's tensors and attributes, checked as they are read.
struct Args {
    char const* op;
    TwoTowerTensor const* in;
    int num_in;
    TwoTowerTensor const* out;
    int num_out;
    double const* attrs;
    int num_attrs;

    TwoTowerTensor const& input(int i, int ndim = -1) const {
        require(i < num_in, TWOTOWER_ERR_BAD_DIMS, std::string(op) + ": input " + std::to_string(i) + " missing");
        return checked(in[i], "input", i, ndim);
    }
    TwoTowerTensor const& output(int i, int ndim = -1) const {
        require(i < num_out, TWOTOWER_ERR_BAD_DIMS, std::string(op) + ": output " + std::to_string(i) + " missing");
        return checked(out[i], "output", i, ndim);
    }
    double attr(int i) const {
        require(i < num_attrs, TWOTOWER_ERR_BAD_DIMS, std::string(op) + ": attribute " + std::to_string(i) + " missing");
        return attrs[i];
    }
    int64_t int_attr(int i) const { return static_cast<int64_t>(std::llround(attr(i))); }

    TwoTowerTensor const& checked(TwoTowerTensor const& t, char const* kind, int i, int ndim) const {
        const std::string name = std::string(op) + " " + kind + " " + std::to_string(i);
        require(t.ndim >= 0 && t.ndim <= 8, TWOTOWER_ERR_BAD_DIMS, name + ": ndim " + std::to_string(t.ndim));
        require(ndim < 0 || t.ndim == ndim, TWOTOWER_ERR_BAD_DIMS,
                name + ": " + std::to_string(t.ndim) + " dims, expected " + std::to_string(ndim));
        dtype_bytes(t.dtype);  // refuses a dtype code outside TwoTowerDType
        for (int d = 0; d < t.ndim; ++d) require(t.dims[d] >= 0, TWOTOWER_ERR_BAD_DIMS, name + ": a negative dim");
        if (numel(t) > 0) require(t.data != 0, TWOTOWER_ERR_NULL, name + ": NULL data");
        return t;
    }
    static int64_t numel(TwoTowerTensor const& t) {
        int64_t n = 1;
        for (int d = 0; d < t.ndim; ++d) n *= t.dims[d];
        return n;
    }
};

int64_t last_dim(TwoTowerTensor const& t) { return t.ndim ? t.dims[t.ndim - 1] : 1; }

CUdeviceptr offset(TwoTowerTensor const& t, int64_t elements) {
    return t.data + static_cast<CUdeviceptr>(elements * dtype_bytes(t.dtype));
}

// ---- norms.py ------------------------------------------------------------------------------------
void rms_norm(Args const& a, bool modulated, CUstream stream) {
    TwoTowerTensor const& x = a.input(0);
    TwoTowerTensor const& weight = a.input(1, 1);
    TwoTowerTensor const& y = a.output(0);
    const int64_t D = last_dim(x), rows = D ? Args::numel(x) / D : 0;
    if (rows == 0) return;
    CUdeviceptr table = weight.data, m = weight.data;
    int table_dtype = weight.dtype, m_dtype = weight.dtype;
    int64_t mode = 0, rows_per_batch = 1;
    if (modulated) {
        require(x.ndim == 3, TWOTOWER_ERR_BAD_DIMS, "ModulatedRmsNorm: x must be [B, L, D]");
        table = a.input(2, 2).data, table_dtype = a.input(2).dtype;
        m = a.input(3, 2).data, m_dtype = a.input(3).dtype;
        mode = a.int_attr(1) ? 1 : 2;
        rows_per_batch = x.dims[1];
    }
    TritonLaunch("norms._rms_norm_kernel")
        .ptr(x.data, x.dtype).ptr(weight.data, weight.dtype).ptr(table, table_dtype).ptr(m, m_dtype).ptr(y.data, y.dtype)
        .integer(D).integer(rows_per_batch).f32(a.attr(0))
        .constant("MODULATE", mode).constant("BLOCK_D", next_power_of_2(D))
        .run(rows, 1, 1, stream);
}

void gated_residual(Args const& a, CUstream stream) {
    TwoTowerTensor const& x = a.input(0, 3);
    TwoTowerTensor const& h = a.input(1, 3);
    TwoTowerTensor const& table = a.input(2, 2);
    TwoTowerTensor const& m = a.input(3, 2);
    TwoTowerTensor const& out = a.output(0);
    const int64_t B = x.dims[0], L = x.dims[1], D = x.dims[2];
    if (B * L == 0) return;
    const int64_t block = std::min<int64_t>(next_power_of_2(D), 1024);
    TritonLaunch("norms._gated_residual_kernel")
        .ptr(x.data, x.dtype).ptr(h.data, h.dtype).ptr(table.data, table.dtype).ptr(m.data, m.dtype)
        .ptr(out.data, out.dtype).integer(D).integer(L).constant("BLOCK_D", block)
        .run(B * L, cdiv(D, block), 1, stream);
}

void gated_rms_norm(Args const& a, CUstream stream) {
    TwoTowerTensor const& y = a.input(0);
    TwoTowerTensor const& z = a.input(1);
    TwoTowerTensor const& weight = a.input(2, 1);
    TwoTowerTensor const& out = a.output(0);
    const int64_t D = last_dim(y), rows = D ? Args::numel(y) / D : 0, n_groups = a.int_attr(0);
    require(n_groups > 0 && D % n_groups == 0, TWOTOWER_ERR_BAD_DIMS, "GatedRmsNorm: n_groups must divide the width");
    if (rows == 0) return;
    const int64_t group_size = D / n_groups;
    TritonLaunch("norms._gated_rms_norm_kernel")
        .ptr(y.data, y.dtype).ptr(z.data, z.dtype).ptr(weight.data, weight.dtype).ptr(out.data, out.dtype)
        .integer(D).integer(group_size).integer(D).integer(D).f32(a.attr(1))
        .constant("BLOCK", next_power_of_2(group_size))
        .run(rows, n_groups, 1, stream);
}

// ---- moe.py ----------------------------------------------------------------------------------------
void relu2(Args const& a, CUstream stream) {
    TwoTowerTensor const& x = a.input(0);
    TwoTowerTensor const& out = a.output(0);
    const int64_t n = Args::numel(x);
    if (n == 0) return;
    TritonLaunch("moe._relu2_kernel").ptr(x.data, x.dtype).ptr(out.data, out.dtype).integer(n)
        .constant("BLOCK", 1024).run(cdiv(n, 1024), 1, 1, stream);
}

void moe_route(Args const& a, CUstream stream) {
    TwoTowerTensor const& x = a.input(0);
    TwoTowerTensor const& router = a.input(1, 2);
    TwoTowerTensor const& bias = a.input(2, 1);
    TwoTowerTensor const& ids = a.output(0, 2);
    TwoTowerTensor const& weights = a.output(1, 2);
    const int64_t D = last_dim(x), n = D ? Args::numel(x) / D : 0, E = router.dims[0], top_k = a.int_attr(0);
    require(top_k > 0 && top_k <= E, TWOTOWER_ERR_BAD_DIMS, "MoeRoute: top_k must be in [1, experts]");
    if (n == 0) return;
    const int64_t block_e = next_power_of_2(E);
    TritonLaunch("moe._route_kernel")
        .ptr(x.data, x.dtype).ptr(router.data, router.dtype).ptr(bias.data, bias.dtype).ptr(ids.data, ids.dtype)
        .ptr(weights.data, weights.dtype).integer(D).integer(E).f32(a.attr(2))
        .constant("TOP_K", top_k).constant("NORMALIZE", a.int_attr(1) != 0).constant("BLOCK_E", block_e)
        .constant("BLOCK_D", std::max<int64_t>(16, std::min<int64_t>(64, 4096 / block_e)))
        .constant("BLOCK_K", next_power_of_2(top_k))
        .run(n, 1, 1, stream);
}

// Scratch of one chunk of ``tokens`` tokens: the sort, the activations, the fp32 contributions.
struct ExpertScratch {
    size_t sorted, block_expert, starts, act, contrib, bytes;
    ExpertScratch(int64_t tokens, int64_t k, int64_t E, int64_t D, int64_t I, int64_t act_bytes) {
        const int64_t T = tokens * k, NB = cdiv(T, TWOTOWER_MOE_BLOCK_M) + E, rows = NB * TWOTOWER_MOE_BLOCK_M;
        sorted = 0;
        block_expert = sorted + aligned(rows * 4);
        starts = block_expert + aligned(NB * 4);
        act = starts + aligned(2 * E * 4);
        contrib = act + aligned(rows * I * act_bytes);
        bytes = contrib + aligned(T * D * 4);
    }
};

int64_t expert_chunk_tokens(int64_t k) { return TWOTOWER_MOE_ALIGN_MAX_PAIRS / k; }

void moe_experts(Args const& a, CUdeviceptr workspace, size_t workspace_bytes, CUstream stream) {
    TwoTowerTensor const& x = a.input(0);
    TwoTowerTensor const& ids = a.input(1, 2);
    TwoTowerTensor const& weights = a.input(2, 2);
    TwoTowerTensor const& up = a.input(3, 3);
    TwoTowerTensor const& down = a.input(4, 3);
    const bool has_shared = a.num_in > 5 && Args::numel(a.input(5)) > 0;
    TwoTowerTensor const& out = a.output(0);
    const int64_t D = last_dim(x), n = D ? Args::numel(x) / D : 0, k = ids.dims[1];
    const int64_t E = up.dims[0], I = up.dims[1];
    require(ids.dims[0] == n && weights.dims[0] == n && weights.dims[1] == k && up.dims[2] == D &&
                down.dims[0] == E && down.dims[1] == D && down.dims[2] == I && k > 0 && k <= E,
            TWOTOWER_ERR_BAD_DIMS, "MoeExperts: x [n, D], ids and weights [n, k], up [E, I, D], down [E, D, I]");
    TwoTowerTensor const& shared = has_shared ? a.input(5) : x;
    const char* precision = x.dtype == TWOTOWER_FP32 ? "ieee" : "tf32";
    const int64_t block_d = std::min<int64_t>(next_power_of_2(D), 1024);
    for (int64_t t0 = 0; t0 < n; t0 += expert_chunk_tokens(k)) {
        const int64_t tokens = std::min(n - t0, expert_chunk_tokens(k)), T = tokens * k;
        const int64_t NB = cdiv(T, TWOTOWER_MOE_BLOCK_M) + E;
        ExpertScratch s(tokens, k, E, D, I, dtype_bytes(x.dtype));
        require(s.bytes <= workspace_bytes, TWOTOWER_ERR_WORKSPACE, "MoeExperts: workspace too small");
        const CUdeviceptr sorted = workspace + s.sorted, block_expert = workspace + s.block_expert;
        const CUdeviceptr act = workspace + s.act, contrib = workspace + s.contrib;
        const CUdeviceptr chunk_x = offset(x, t0 * D), chunk_ids = offset(ids, t0 * k);
        TritonLaunch("moe._align_kernel")
            .ptr(chunk_ids, ids.dtype).ptr(sorted, TWOTOWER_I32).ptr(block_expert, TWOTOWER_I32)
            .ptr(workspace + s.starts, TWOTOWER_I32).integer(T).integer(E).integer(NB)
            .constant("BLOCK_T", next_power_of_2(T)).constant("BLOCK_E", next_power_of_2(E + 1))
            .constant("BLOCK_M", TWOTOWER_MOE_BLOCK_M).warps(8)
            .run(1, 1, 1, stream);
        TritonLaunch("moe._up_kernel")
            .ptr(chunk_x, x.dtype).ptr(up.data, up.dtype).ptr(sorted, TWOTOWER_I32).ptr(block_expert, TWOTOWER_I32)
            .ptr(act, x.dtype).integer(D).integer(I).integer(k)
            .constant("BLOCK_M", TWOTOWER_MOE_BLOCK_M).constant("BLOCK_N", 64).constant("BLOCK_K", 64)
            .constant("PRECISION", precision)
            .run(NB, cdiv(I, 64), 1, stream);
        TritonLaunch("moe._down_kernel")
            .ptr(act, x.dtype).ptr(down.data, down.dtype).ptr(sorted, TWOTOWER_I32).ptr(block_expert, TWOTOWER_I32)
            .ptr(offset(weights, t0 * k), weights.dtype).ptr(contrib, TWOTOWER_FP32).integer(D).integer(I)
            .constant("BLOCK_M", TWOTOWER_MOE_BLOCK_M).constant("BLOCK_N", 64).constant("BLOCK_K", 64)
            .constant("PRECISION", precision)
            .run(NB, cdiv(D, 64), 1, stream);
        TritonLaunch("moe._combine_kernel")
            .ptr(contrib, TWOTOWER_FP32).ptr(chunk_ids, ids.dtype)
            .ptr(has_shared ? offset(shared, t0 * D) : chunk_x, shared.dtype).ptr(offset(out, t0 * D), out.dtype)
            .integer(D)
            .constant("TOP_K", k).constant("HAS_SHARED", has_shared).constant("BLOCK_D", block_d)
            .constant("BLOCK_K", next_power_of_2(k))
            .run(tokens, cdiv(D, block_d), 1, stream);
    }
}

size_t moe_experts_workspace(Args const& a) {
    TwoTowerTensor const& x = a.input(0);
    TwoTowerTensor const& ids = a.input(1, 2);
    TwoTowerTensor const& up = a.input(3, 3);
    const int64_t D = last_dim(x), n = D ? Args::numel(x) / D : 0, k = std::max<int64_t>(ids.dims[1], 1);
    return ExpertScratch(std::min(n, expert_chunk_tokens(k)), k, up.dims[0], D, up.dims[1], dtype_bytes(x.dtype)).bytes;
}

// ---- attention.py --------------------------------------------------------------------------------
int64_t attention_num_splits(int64_t batch, int64_t kv_heads, int64_t rows, int64_t max_len) {
    const int64_t base = batch * kv_heads * cdiv(rows, TWOTOWER_ATTENTION_BLOCK_M);
    if (base == 0 || max_len < 2 * TWOTOWER_ATTENTION_MIN_SPLIT_KEYS) return 1;
    return std::max<int64_t>(1, std::min({cdiv(TWOTOWER_ATTENTION_SPLIT_TARGET_PROGRAMS, base),
                                          max_len / TWOTOWER_ATTENTION_MIN_SPLIT_KEYS,
                                          int64_t(TWOTOWER_ATTENTION_MAX_SPLITS)}));
}

// Splitting happens only while batch x kv heads x query blocks < SPLIT_TARGET_PROGRAMS, so the
// partials never exceed BLOCK_M x 2 x SPLIT_TARGET_PROGRAMS rows, whatever the shapes.
size_t attention_workspace(int64_t head_dim) {
    const int64_t block_p = std::max<int64_t>(16, next_power_of_2(head_dim));
    const int64_t rows = TWOTOWER_ATTENTION_BLOCK_M * 2 * TWOTOWER_ATTENTION_SPLIT_TARGET_PROGRAMS;
    return aligned(rows * block_p * 4) + aligned(rows * 2 * 4);
}

void block_attention(Args const& a, CUdeviceptr workspace, size_t workspace_bytes, CUstream stream) {
    TwoTowerTensor const& q = a.input(0, 4);
    TwoTowerTensor const& k = a.input(1, 4);
    TwoTowerTensor const& v = a.input(2, 4);
    TwoTowerTensor const& k_cache = a.input(3, 4);
    TwoTowerTensor const& v_cache = a.input(4, 4);
    TwoTowerTensor const& lens = a.input(5, 1);
    TwoTowerTensor const& out = a.output(0, 4);
    const int64_t H = a.int_attr(0), KV = a.int_attr(1), P = a.int_attr(2), causal = a.int_attr(3) != 0;
    const int64_t B = q.dims[0], L = q.dims[1], S = k_cache.dims[1];
    require(H > 0 && KV > 0 && H % KV == 0 && q.dims[2] == H && q.dims[3] == P && k.dims[2] == KV && k.dims[3] == P &&
                k.dims[1] == L && v.dims[1] == L && k_cache.dims[2] == KV && k_cache.dims[3] == P &&
                v_cache.dims[1] == S && lens.dims[0] == B && S >= L,
            TWOTOWER_ERR_BAD_DIMS, "BlockAttention: q [B, L, H, P], k/v [B, L, KV, P], caches [B, S >= L, KV, P], "
                                   "cache_lens [B] with the node's num_heads, num_kv_heads, head_dim");
    if (B * L == 0) return;
    const int64_t G = H / KV, rows = L * G, max_len = S - L;
    const int64_t splits = attention_num_splits(B, KV, rows, max_len);
    const int64_t split_len = cdiv(cdiv(std::max<int64_t>(max_len, 1), splits), TWOTOWER_ATTENTION_BLOCK_N) *
                              TWOTOWER_ATTENTION_BLOCK_N;
    const int64_t block_p = std::max<int64_t>(16, next_power_of_2(P));
    CUdeviceptr part_acc = out.data, part_stats = out.data;
    int part_dtype = out.dtype;
    if (splits > 1) {
        const int64_t part_rows = B * KV * splits * rows;
        part_acc = workspace;
        part_stats = workspace + aligned(part_rows * block_p * 4);
        part_dtype = TWOTOWER_FP32;
        require(aligned(part_rows * block_p * 4) + aligned(part_rows * 2 * 4) <= workspace_bytes,
                TWOTOWER_ERR_WORKSPACE, "BlockAttention: workspace too small");
    }
    const double qk_scale = 1.0 / std::sqrt(static_cast<double>(P)) * 1.4426950408889634;
    TritonLaunch("attention._block_attention_kernel")
        .ptr(q.data, q.dtype).ptr(k.data, k.dtype).ptr(v.data, v.dtype).ptr(k_cache.data, k_cache.dtype)
        .ptr(v_cache.data, v_cache.dtype).ptr(lens.data, lens.dtype).ptr(out.data, out.dtype)
        .ptr(part_acc, part_dtype).ptr(part_stats, part_dtype)
        .integer(L).integer(KV).integer(splits).integer(split_len).f32(qk_scale)
        .integer(L * H * P).integer(H * P).integer(P).integer(L * KV * P).integer(KV * P).integer(P)
        .integer(S * KV * P).integer(KV * P).integer(P).integer(L * H * P).integer(H * P).integer(P)
        .constant("G", G).constant("P", P).constant("BLOCK_P", block_p).constant("SPLIT", splits > 1)
        .constant("CAUSAL", causal).constant("WRITE_CACHE", int64_t(0))
        .constant("PRECISION", q.dtype == TWOTOWER_FP32 ? "ieee" : "tf32")
        .constant("BLOCK_M", TWOTOWER_ATTENTION_BLOCK_M).constant("BLOCK_N", TWOTOWER_ATTENTION_BLOCK_N)
        .run(B * KV, cdiv(rows, TWOTOWER_ATTENTION_BLOCK_M), splits, stream);
    if (splits > 1)
        TritonLaunch("attention._combine_kernel")
            .ptr(part_acc, TWOTOWER_FP32).ptr(part_stats, TWOTOWER_FP32).ptr(out.data, out.dtype)
            .integer(L).integer(KV).integer(splits).integer(L * H * P).integer(H * P).integer(P)
            .constant("G", G).constant("P", P).constant("BLOCK_P", block_p)
            .constant("BLOCK_M", TWOTOWER_ATTENTION_BLOCK_M)
            .run(B * KV, cdiv(rows, TWOTOWER_ATTENTION_BLOCK_M), 1, stream);
}

// ---- mamba.py ------------------------------------------------------------------------------------
void seeded_mamba_scan(Args const& a, CUstream stream) {
    TwoTowerTensor const& xbc = a.input(0, 3);
    TwoTowerTensor const& dt = a.input(1, 3);
    TwoTowerTensor const& conv_weight = a.input(2, 2);
    TwoTowerTensor const& conv_bias = a.input(3, 1);
    TwoTowerTensor const& dt_bias = a.input(4, 1);
    TwoTowerTensor const& A_log = a.input(5, 1);
    TwoTowerTensor const& D = a.input(6, 1);
    TwoTowerTensor const& conv_state = a.input(7, 3);
    TwoTowerTensor const& ssm_state = a.input(8, 4);
    const int64_t G = a.int_attr(0), P = a.int_attr(1), return_steps = a.int_attr(2) != 0;
    const int64_t B = xbc.dims[0], L = xbc.dims[1], C = xbc.dims[2], H = dt.dims[2], W = conv_weight.dims[1];
    require(G > 0 && P > 0 && H > 0 && C > H * P && (C - H * P) % (2 * G) == 0 && H % G == 0 && dt.dims[0] == B &&
                dt.dims[1] == L && conv_weight.dims[0] == C && conv_state.dims[1] == C && conv_state.dims[2] == W &&
                ssm_state.dims[1] == H && ssm_state.dims[2] == P,
            TWOTOWER_ERR_BAD_DIMS, "SeededMambaScan: xbc [B, L, C = H*P + 2*G*N], dt [B, L, H], conv_weight [C, W], "
                                   "conv_state [B, C, W], ssm_state [B, H, P, N]");
    const int64_t N = (C - H * P) / (2 * G);
    if (B == 0) return;
    TwoTowerTensor const& y = a.output(0, 3);
    TwoTowerTensor const& new_conv = a.output(1, 3);
    TwoTowerTensor const& new_ssm = a.output(2, 4);
    TwoTowerTensor const& conv_steps = a.output(3);
    TwoTowerTensor const& ssm_steps = a.output(4);
    TritonLaunch("mamba._seeded_mamba_scan_kernel")
        .ptr(xbc.data, xbc.dtype).ptr(dt.data, dt.dtype).ptr(conv_weight.data, conv_weight.dtype)
        .ptr(conv_bias.data, conv_bias.dtype).ptr(dt_bias.data, dt_bias.dtype).ptr(A_log.data, A_log.dtype)
        .ptr(D.data, D.dtype).ptr(conv_state.data, conv_state.dtype).ptr(ssm_state.data, ssm_state.dtype)
        .ptr(y.data, y.dtype).ptr(new_conv.data, new_conv.dtype).ptr(new_ssm.data, new_ssm.dtype)
        .ptr(conv_steps.data, conv_steps.dtype).ptr(ssm_steps.data, ssm_steps.dtype)
        .integer(L).integer(C).integer(L * C).integer(C).integer(L * H).integer(H)
        .constant("H", H).constant("P", P).constant("N", N).constant("G", G).constant("W", W)
        .constant("BLOCK_P", TWOTOWER_MAMBA_BLOCK_P).constant("BLOCK_N", next_power_of_2(N))
        .constant("RETURN_STEPS", return_steps)
        .run(B, H, cdiv(P, TWOTOWER_MAMBA_BLOCK_P), stream);
}

void dispatch(std::string const& op, Args const& a, CUdeviceptr workspace, size_t workspace_bytes, CUstream stream) {
    if (op == "RmsNorm") rms_norm(a, false, stream);
    else if (op == "ModulatedRmsNorm") rms_norm(a, true, stream);
    else if (op == "GatedResidual") gated_residual(a, stream);
    else if (op == "GatedRmsNorm") gated_rms_norm(a, stream);
    else if (op == "Relu2") relu2(a, stream);
    else if (op == "MoeRoute") moe_route(a, stream);
    else if (op == "MoeExperts") moe_experts(a, workspace, workspace_bytes, stream);
    else if (op == "BlockAttention") block_attention(a, workspace, workspace_bytes, stream);
    else if (op == "SeededMambaScan") seeded_mamba_scan(a, stream);
    else throw Failure(TWOTOWER_ERR_UNKNOWN_OP, "unknown op " + op);
}

template <typename F>
int guarded(F&& body) {
    try {
        body();
        return 0;
    } catch (Failure const& failure) {
        last_error = failure.what();
        return failure.code;
    } catch (std::exception const& error) {
        last_error = error.what();
        return TWOTOWER_ERR_UNSUPPORTED;
    }
}

}  // namespace
}  // namespace twotower

using namespace twotower;

extern "C" int twotower_launch(const char* op, const TwoTowerTensor* inputs, int num_inputs,
                               const TwoTowerTensor* outputs, int num_outputs, const double* attributes,
                               int num_attributes, CUdeviceptr workspace, size_t workspace_bytes, CUstream stream) {
    return guarded([&] {
        require(op != nullptr && inputs != nullptr && outputs != nullptr, TWOTOWER_ERR_NULL, "NULL op or tensor list");
        Args args{op, inputs, num_inputs, outputs, num_outputs, attributes, attributes ? num_attributes : 0};
        dispatch(op, args, workspace, workspace_bytes, stream);
    });
}

extern "C" size_t twotower_workspace_bytes(const char* op, const TwoTowerTensor* inputs, int num_inputs,
                                           const double* attributes, int num_attributes) {
    size_t bytes = 0;
    const int code = guarded([&] {
        require(op != nullptr && inputs != nullptr, TWOTOWER_ERR_NULL, "NULL op or tensor list");
        Args args{op, inputs, num_inputs, nullptr, 0, attributes, attributes ? num_attributes : 0};
        if (std::strcmp(op, "MoeExperts") == 0) bytes = moe_experts_workspace(args);
        else if (std::strcmp(op, "BlockAttention") == 0) bytes = attention_workspace(args.int_attr(2));
    });
    return code == 0 ? bytes : 0;
}

extern "C" const char* twotower_error_string(int code) {
    switch (code) {
        case 0: return "success";
        case TWOTOWER_ERR_BAD_DIMS: return "bad dimensions";
        case TWOTOWER_ERR_UNSUPPORTED: return "no compiled kernel variant serves these sizes or dtypes";
        case TWOTOWER_ERR_BAD_DTYPE: return "bad dtype code";
        case TWOTOWER_ERR_NULL: return "NULL pointer";
        case TWOTOWER_ERR_UNKNOWN_OP: return "unknown op";
        case TWOTOWER_ERR_WORKSPACE: return "workspace too small";
    }
    char const* text = nullptr;
    if (code > 0 && cuGetErrorString(static_cast<CUresult>(code), &text) == CUDA_SUCCESS && text) return text;
    return "unknown error";
}

extern "C" const char* twotower_last_error(void) { return last_error.c_str(); }

extern "C" int twotower_variant_count(void) { return twotower_num_variants; }

extern "C" const char* twotower_variant_key(int index) {
    return index >= 0 && index < twotower_num_variants ? twotower_variants[index].key : nullptr;
}

extern "C" const void* twotower_variant_cubin(int index) {
    return index >= 0 && index < twotower_num_variants ? twotower_variants[index].cubin : nullptr;
}
