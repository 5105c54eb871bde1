"""The two training objectives, written on the project's own network code (``network.towers``).

1. Context tower: a causal LM, next-token cross-entropy (``causal_lm_loss``).
2. Denoiser: block mask diffusion (spec §10, R4): the context tower frozen; per 16-token block
   t ~ U(0, 1], each position masked with probability t (at least one); cross-entropy on the
   masked positions (same-position targets, no 1/t weight). The denoiser of block n reads exactly
   what it reads at inference (spec §5.3, §5.4): the context's K/V of positions < 16n, its SSM
   state after position 16n - 1 and its last raw xBC columns (block 0: the zero state), and is
   conditioned on t = the masked fraction through adaLN-single (``diffusion_loss``).

Every block of every sequence is one row of one denoiser batch: ``block_snapshots`` runs the
context tower over the sequences block by block, exactly as the runtime extends it after each
committed block, and stacks the state before each block into a ``TowerState`` with one row per
(sequence, block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checkpoint import DENOISER, TWOTOWER, assemble_tower_weights
from ..config import MAMBA, MOE, TwoTowerConfig
from ..demo import init_tensor
from ..network import towers
from ..network.ops import TorchOps
from ..plugins import reference


class TrainingOps(TorchOps):
    """TorchOps for training: the scan always in the chunked SSD form (a few einsums per block
    instead of one autograd node per token; the same function, ``tests/test_scan_forms.py``), and a
    count, per MoE call, of the tokens each expert received (for the correction-bias update):
    ``loads`` holds one [E] count per MoE layer call, in call order. The torch forms on every device:
    the Triton kernels' custom ops have no backward."""

    def __init__(self, dtype: torch.dtype, device):
        super().__init__(dtype, device, kernels=False)
        self.loads: list[torch.Tensor] = []

    def mamba_scan(self, xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state, n_groups, head_dim,
                   per_position: bool = False):
        if per_position:
            return super().mamba_scan(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state,
                                      n_groups, head_dim, per_position=True)
        self._op("mamba_scan")
        return reference.seeded_mamba_scan_chunked(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state,
                                                   ssm_state, n_groups, head_dim, chunk_size=min(xbc.shape[1], 16))

    def moe_route(self, x, router, correction_bias, top_k, normalize, scale):
        idx, w = super().moe_route(x, router, correction_bias, top_k, normalize, scale)
        self.loads.append(torch.bincount(idx.reshape(-1), minlength=router.shape[0]).float())
        return idx, w


# ---- weights ------------------------------------------------------------------------------------

def init_tower(cfg: TwoTowerConfig, tower: str, gen: torch.Generator, device) -> dict:
    """A fresh fp32 weights tree at the real layers' scales (``demo.init_tensor``)."""
    return assemble_tower_weights(cfg, tower, TWOTOWER, lambda spec: init_tensor(spec.key, spec.shape, gen),
                                  torch.float32, device)


def denoiser_from_context(cfg: TwoTowerConfig, ctx: dict, gen: torch.Generator, device) -> dict:
    """The denoiser initialised as a copy of the context tower with neutral time conditioning:
    t_block zero (so the modulation is 0) and every layer's table (shift 0, scale 0, gate 1). At
    t = anything it then equals the context tower run bidirectionally over the block."""
    den = init_tower(cfg, DENOISER, gen, device)
    den["embeddings"] = ctx["embeddings"].detach().clone()
    den["norm_f"] = ctx["norm_f"].detach().clone()
    den["lm_head"] = ctx["lm_head"].detach().clone()
    den["layers"] = [{k: v.detach().clone() for k, v in layer.items()} for layer in ctx["layers"]]
    den["t_block"].zero_()
    den["t_block_bias"].zero_()
    den["scale_shift"].zero_()
    den["scale_shift"][:, 2] = 1.0
    return den


def parameters(weights: dict) -> list[torch.Tensor]:
    """Every tensor of a weights tree, in a fixed order."""
    out = []
    for key in sorted(k for k in weights if k != "layers"):
        out.append(weights[key])
    for layer in weights["layers"]:
        out += [layer[k] for k in sorted(layer)]
    return out


def trainable(weights: dict) -> list[torch.Tensor]:
    """The tensors gradients reach. The MoE correction biases only select experts (no gradient);
    ``update_correction_biases`` moves them."""
    skip = {id(layer["router_bias"]) for layer in weights["layers"] if "router_bias" in layer}
    return [p for p in parameters(weights) if id(p) not in skip]


@torch.no_grad()
def update_correction_biases(cfg: TwoTowerConfig, weights: dict, loads: list[torch.Tensor], rate: float) -> None:
    """Auxiliary-loss-free load balancing (the scheme NemotronH's MoE trains with): each MoE
    layer's correction bias rises for under-loaded experts and falls for over-loaded ones."""
    layers = cfg.layers_of(MOE)
    for n, load in enumerate(loads):
        bias = weights["layers"][layers[n % len(layers)]]["router_bias"]
        bias += rate * torch.sign(load.mean() - load).to(bias.device)


# ---- objectives ---------------------------------------------------------------------------------

def causal_lm_loss(ops, cfg: TwoTowerConfig, ctx: dict, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of the context tower over ids [B, T]."""
    state = towers.empty_state(cfg, ids.shape[0], ids.shape[1], ops.dtype, ids.device)
    logits, _ = towers.context_forward(ops, cfg, ctx, state, ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def block_snapshots(ops, cfg: TwoTowerConfig, ctx: dict, ids: torch.Tensor, block_len: int) -> towers.TowerState:
    """The context state before each block, one row per (sequence, block), rows ordered
    sequence-major. ids [B, n * block_len] -> a TowerState of B * n rows, capacity n * block_len."""
    B, T = ids.shape
    n = T // block_len
    state = towers.empty_state(cfg, B, T, ops.dtype, ids.device)
    conv, ssm = [], []
    for j in range(n):
        conv.append(state.conv)
        ssm.append(state.ssm)
        _, state = towers.context_forward(ops, cfg, ctx, state, ids[:, j * block_len : (j + 1) * block_len],
                                          logits=False)
    rows = lambda per_block, i: torch.stack([s[i] for s in per_block], dim=1).flatten(0, 1)  # noqa: E731 [B*n, ...]
    return towers.TowerState(
        lengths=(torch.arange(n) * block_len).repeat(B),
        keys={i: k.repeat_interleave(n, dim=0) for i, k in state.keys.items()},  # rows see only < 16 j
        values={i: v.repeat_interleave(n, dim=0) for i, v in state.values.items()},
        conv={i: rows(conv, i) for i in cfg.layers_of(MAMBA)},
        ssm={i: rows(ssm, i) for i in cfg.layers_of(MAMBA)},
    )


def mask_blocks(blocks: torch.Tensor, mask_id: int, gen: torch.Generator):
    """blocks [R, L] clean ids -> (noisy ids, masked [R, L] bool, t [R] = masked fraction).
    t ~ U(0, 1] per block, each position masked with probability t, at least one per block."""
    R, L = blocks.shape
    t = 1.0 - torch.rand(R, generator=gen)  # (0, 1]
    masked = torch.rand(R, L, generator=gen) < t[:, None]
    forced = torch.randint(0, L, (R,), generator=gen)
    masked[torch.arange(R), forced] |= ~masked.any(-1)
    masked = masked.to(blocks.device)
    return torch.where(masked, torch.full_like(blocks, mask_id), blocks), masked, masked.float().mean(-1)


def diffusion_loss(ops, cfg: TwoTowerConfig, den: dict, snapshots: towers.TowerState, blocks: torch.Tensor,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked cross-entropy (nats, mean over masked positions) of one denoiser step per block.
    blocks [R, L] clean ids, one row per snapshot row. Returns (loss, per-position loss [R, L]
    (0 where unmasked), masked [R, L])."""
    noisy, masked, t = mask_blocks(blocks, cfg.mask_token_id, gen)
    logits = towers.denoise(ops, cfg, den, snapshots, noisy, t)  # [R, L, V]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks.reshape(-1), reduction="none")
    nll = nll.view(blocks.shape) * masked
    return nll.sum() / masked.sum(), nll.detach(), masked
