"""Batch-invariant torch ops for tests that compare states bit for bit.

CPU BLAS rounds a matrix product differently for different numbers of rows, and vectorised exp /
log1p (SiLU, softplus) round differently from the scalar code that handles a tensor's tail, so the
same token gets 1-ulp different results in a 16-token extend and in a 3-token one.
``RowInvariantOps`` computes every such op one token (one query, one row) at a time with fixed
shapes, so a token's result never depends on how many others share the call; bit-for-bit
comparisons then test the logic (positions, lengths, state hand-over), not the arithmetic
libraries. Slow: for tiny models only.
"""

from __future__ import annotations

import math

import torch

from trtllm_twotower.network.ops import TorchOps
from trtllm_twotower.plugins import reference


def _rows(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.reshape(-1, x.shape[-1]))


class RowInvariantOps(TorchOps):
    def linear(self, x, weight, bias=None):
        self._op("linear")
        rows = [torch.mv(weight, r) + (0 if bias is None else bias) for r in _rows(x)]
        out = torch.stack(rows) if rows else x.new_zeros((0, weight.shape[0]))
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def logits(self, x, head):
        self._op("logits")
        return self.linear(x, head).float()

    def moe_route(self, x, router, correction_bias, top_k, normalize, scale):
        self._op("moe_route")
        ids, weights = [], []
        for r in _rows(x):
            scores = torch.sigmoid(torch.mv(router.double(), r.double()))  # [E], fp64 as the spec
            idx = torch.topk(scores + correction_bias.double(), top_k).indices
            w = scores[idx]
            if normalize:
                w = w / (w.sum() + 1e-20)
            ids.append(idx)
            weights.append((w * scale).float())
        return torch.stack(ids), torch.stack(weights)

    def moe_experts(self, x, idx, weights, up, down, shared=None):
        self._op("moe_experts")
        out = []
        for r, ids, ws in zip(_rows(x), idx, weights):
            acc = torch.zeros(x.shape[-1], dtype=torch.float32)
            for e, w in sorted(zip(ids.tolist(), ws)):  # ascending expert id, as the spec's loop
                a = torch.relu(torch.mv(up[e], r)).square()
                acc = acc + torch.mv(down[e], a).float() * w
            out.append(acc.to(x.dtype))
        routed = torch.stack(out).reshape(x.shape)
        return routed if shared is None else routed + shared

    def block_attention(self, q, k, v, k_cache, v_cache, cache_lens, causal, write_cache):
        self._op("block_attention")
        B, L, H, P = q.shape
        group = H // k.shape[2]
        out = torch.empty(B, L, H, P, dtype=torch.float32)
        for b in range(B):
            n = int(cache_lens[b])
            keys = torch.cat([k_cache[b, :n], k[b]]).float()  # [n + L, K, P]
            values = torch.cat([v_cache[b, :n], v[b]]).float()
            for j in range(L):
                seen = n + j + 1 if causal else n + L
                for h in range(H):
                    scores = torch.mv(keys[:seen, h // group], q[b, j, h].float()) / math.sqrt(P)
                    out[b, j, h] = torch.mv(values[:seen, h // group].t(), torch.softmax(scores, 0))
            if write_cache:
                k_cache[b, n : n + L] = k[b]
                v_cache[b, n : n + L] = v[b]
        return out.to(q.dtype)

    def gated_rms_norm(self, y, z, weight, n_groups, eps):
        rows = [super(RowInvariantOps, self).gated_rms_norm(a[None], b[None], weight, n_groups, eps)[0]
                for a, b in zip(_rows(y), _rows(z))]
        return torch.stack(rows).reshape(y.shape)

    def mamba_scan(self, xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state, n_groups,
                   head_dim, per_position=False):
        """The reference scan one token at a time (its states chained), one row at a time."""
        self._op("mamba_scan")
        ys, convs, ssms, steps = [], [], [], []
        for b in range(xbc.shape[0]):
            conv, ssm, row_y = conv_state[b : b + 1], ssm_state[b : b + 1], []
            row_steps = [ssm]
            for t in range(xbc.shape[1]):
                y, conv, ssm = reference.seeded_mamba_scan_ref(xbc[b : b + 1, t : t + 1], dt[b : b + 1, t : t + 1],
                                                               conv_weight, conv_bias, dt_bias, A_log, D, conv, ssm,
                                                               n_groups, head_dim)
                row_y.append(y)
                row_steps.append(ssm)
            ys.append(torch.cat(row_y, 1))
            convs.append(conv)
            ssms.append(ssm)
            steps.append(torch.stack(row_steps, 1))
        y, conv, ssm = torch.cat(ys), torch.cat(convs), torch.cat(ssms)
        if not per_position:
            return y, conv, ssm
        return y, conv, ssm, reference.conv_state_steps(conv_state, xbc), torch.cat(steps)
