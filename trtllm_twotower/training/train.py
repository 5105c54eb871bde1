"""Train the small two-tower demo model: the context tower as a causal LM, then the denoiser by
block mask diffusion over the frozen context tower; export it in the official TwoTower layout.

    python -m trtllm_twotower.training --out runs/demo [--max-minutes 60] [--device cuda]

A run directory holds ``train_state.pt`` (everything needed to resume: weights, optimiser,
random generators, phase and step), ``log.jsonl`` (one line per logged step and evaluation) and
``model/`` (the exported checkpoint: config.json, safetensors, tokenizer, TRAINING.md,
training_record.json, corpus.txt.xz). Running the same command again resumes where the last run
stopped (also after a kill: the state is written atomically every ``--save-every`` steps).
Raising ``--context-steps`` / ``--denoiser-steps`` on a later run trains further.
Deterministic for a given seed, device and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..checkpoint import CONTEXT, DENOISER, tower_tensor_specs, tower_tensors, TWOTOWER
from ..config import TwoTowerConfig, config_from_dict
from ..demo import DEMO_CONFIG, write_checkpoint
from . import corpus as corpus_lib
from . import objectives as obj

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CORPUS = REPO_ROOT / "trtllm_twotower" / "demo_model" / "corpus.txt.xz"

# The shipped model: byte-level, 1.5 M parameters per tower (spec shapes scaled down; every layer
# kind the real pattern has, in its order M E M * E M * E).
TRAINED_CONFIG = {
    **DEMO_CONFIG,
    "hybrid_override_pattern": "MEM*EM*E",
    "num_hidden_layers": 8,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "mamba_num_heads": 8,
    "mamba_head_dim": 32,
    "ssm_state_size": 32,
    "n_groups": 2,
    "chunk_size": 16,  # block size = chunk size in training (spec §10)
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "moe_shared_expert_intermediate_size": 256,
}


@dataclass
class Settings:
    seed: int = 0
    batch: int = 16  # sequences per step
    seq_len: int = 256  # tokens per sequence (a multiple of block_len)
    block_len: int = 16
    context_steps: int = 3000
    denoiser_steps: int = 20000
    context_lr: float = 3e-3
    denoiser_lr: float = 1e-3
    warmup: int = 100
    decay_fraction: float = 0.2  # warmup, constant, then linear decay to 10 % over this last part
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_rate: float = 1e-3  # MoE correction-bias step
    eval_every: int = 250
    eval_batches: int = 8
    save_every: int = 50
    device: str = "cpu"
    threads: int = 1


@dataclass
class Progress:
    steps: dict = field(default_factory=lambda: {CONTEXT: 0, DENOISER: 0})  # done, per phase
    seconds: dict = field(default_factory=lambda: {CONTEXT: 0.0, DENOISER: 0.0})
    evals: dict = field(default_factory=lambda: {CONTEXT: None, DENOISER: None})

    def phase(self, s: "Settings") -> str:
        """context -> denoiser -> done; raising a phase's step count on a later run continues it."""
        if self.steps[CONTEXT] < s.context_steps:
            if self.steps[DENOISER]:
                raise ValueError(f"--context-steps {s.context_steps}: the denoiser has already trained on the "
                                 f"context tower of step {self.steps[CONTEXT]}; only --denoiser-steps can grow now")
            return CONTEXT
        return DENOISER if self.steps[DENOISER] < s.denoiser_steps else "done"


def learning_rate(s: Settings, phase: str, step: int) -> float:
    peak = s.context_lr if phase == CONTEXT else s.denoiser_lr
    total = s.context_steps if phase == CONTEXT else s.denoiser_steps
    if step < s.warmup:
        return peak * (step + 1) / s.warmup
    decay_start = total * (1 - s.decay_fraction)
    if step < decay_start:
        return peak
    return peak * (1 - 0.9 * min(1.0, (step - decay_start) / max(1.0, total - decay_start)))


class Trainer:
    def __init__(self, out_dir: Path, settings: Settings, docs: list[str]):
        from transformers import AutoTokenizer

        from ..demo import write_tokenizer

        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.s = settings
        self.cfg: TwoTowerConfig = config_from_dict(TRAINED_CONFIG)
        self.docs = docs
        tok_dir = self.out / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            tok_dir.mkdir(exist_ok=True)
            write_tokenizer(tok_dir)
        self.data = corpus_lib.TokenStream.from_docs(docs, AutoTokenizer.from_pretrained(tok_dir),
                                                     self.cfg.eos_token_id)
        self.device = torch.device(settings.device)
        self.ops = obj.TrainingOps(torch.float32, self.device)
        self.progress = Progress()
        gen = torch.Generator().manual_seed(settings.seed)
        self.ctx = obj.init_tower(self.cfg, CONTEXT, gen, self.device)
        self.den = None
        self.batch_gen = torch.Generator().manual_seed(settings.seed + 1)
        self.mask_gen = torch.Generator().manual_seed(settings.seed + 2)
        self.optimizer = self._optimizer(self.ctx, CONTEXT)

    # ---- state ----------------------------------------------------------------------------------
    def _optimizer(self, weights: dict, phase: str) -> torch.optim.Optimizer:
        params = obj.trainable(weights)
        for p in params:
            p.requires_grad_(True)
        decay = [p for p in params if p.dim() >= 2]
        flat = [p for p in params if p.dim() < 2]
        lr = self.s.context_lr if phase == CONTEXT else self.s.denoiser_lr
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.s.weight_decay},
                                  {"params": flat, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    def save(self) -> None:
        """train_state.pt, atomically (a killed run resumes from the last save)."""
        state = {"settings": asdict(self.s), "progress": asdict(self.progress), "corpus_sha256": self.data.sha256,
                 "ctx": obj.parameters(self.ctx), "den": None if self.den is None else obj.parameters(self.den),
                 "optimizer": self.optimizer.state_dict(), "optimizer_of": CONTEXT if self.den is None else DENOISER,
                 "batch_gen": self.batch_gen.get_state(),
                 "mask_gen": self.mask_gen.get_state()}
        tmp = self.out / "train_state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / "train_state.pt")

    def load(self) -> bool:
        path = self.out / "train_state.pt"
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["corpus_sha256"] != self.data.sha256:
            raise ValueError(f"{path}: trained on another corpus (sha256 {state['corpus_sha256'][:12]}…)")
        self.progress = Progress(**state["progress"])
        _copy_into(obj.parameters(self.ctx), state["ctx"])
        if state["den"] is not None:
            self._start_denoiser()
            _copy_into(obj.parameters(self.den), state["den"])
        if state["optimizer_of"] == (DENOISER if self.den is not None else CONTEXT):
            self.optimizer.load_state_dict(state["optimizer"])
        self.batch_gen.set_state(state["batch_gen"])
        self.mask_gen.set_state(state["mask_gen"])
        return True

    # ---- training -------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _start_denoiser(self) -> None:
        """Freeze the context tower; the denoiser starts as its copy with neutral time conditioning."""
        for p in obj.parameters(self.ctx):
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(self.s.seed + 3)
        self.den = obj.denoiser_from_context(self.cfg, self.ctx, gen, self.device)
        self.optimizer = self._optimizer(self.den, DENOISER)

    def _step(self, phase: str) -> float:
        s = self.s
        weights = self.ctx if phase == CONTEXT else self.den
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(s, phase, self.progress.steps[phase])
        ids = self.data.batch("train", s.batch, s.seq_len + (phase == CONTEXT), self.batch_gen).to(self.device)
        self.ops.loads.clear()
        if phase == CONTEXT:
            loss = obj.causal_lm_loss(self.ops, self.cfg, self.ctx, ids)
        else:
            snapshots = obj.block_snapshots(self.ops, self.cfg, self.ctx, ids, s.block_len)
            self.ops.loads.clear()  # the frozen context tower's routing is not trained
            loss, _, _ = obj.diffusion_loss(self.ops, self.cfg, self.den, snapshots, ids.view(-1, s.block_len),
                                            self.mask_gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(obj.trainable(weights), s.grad_clip)
        self.optimizer.step()
        obj.update_correction_biases(self.cfg, weights, self.ops.loads, s.bias_rate)
        return loss.item()

    def run(self, max_minutes: float | None = None, show_progress: bool = True) -> None:
        torch.set_num_threads(self.s.threads)
        deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
        from tqdm import tqdm

        while (phase := self.progress.phase(self.s)) != "done":
            total = self.s.context_steps if phase == CONTEXT else self.s.denoiser_steps
            if phase == DENOISER and self.den is None:
                self._start_denoiser()
            bar = tqdm(total=total, initial=self.progress.steps[phase], desc=phase, disable=not show_progress,
                       unit="step")
            while (step := self.progress.steps[phase]) < total:
                if deadline is not None and time.monotonic() > deadline:
                    bar.close()
                    self.save()
                    return
                start = time.monotonic()
                loss = self._step(phase)
                self.progress.steps[phase] = step = step + 1
                self.progress.seconds[phase] += time.monotonic() - start
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                self._log({"phase": phase, "step": step, "loss": loss, "lr": learning_rate(self.s, phase, step - 1),
                           "seconds": round(self.progress.seconds[phase], 1)})
                if step % self.s.eval_every == 0 or step == total:
                    self.progress.evals[phase] = self.evaluate(phase)
                    self._log({"phase": phase, "step": step, "eval": self.progress.evals[phase]})
                if step % self.s.save_every == 0:
                    self.save()
            bar.close()
            self.save()

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, phase: str) -> dict:
        """Held-out losses on fixed crops (the same crops every time)."""
        gen = torch.Generator().manual_seed(1234)
        s = self.s
        if phase == CONTEXT:
            nats = [float(obj.causal_lm_loss(self.ops, self.cfg, self.ctx,
                                             self.data.batch("held_out", s.batch, s.seq_len + 1, gen).to(self.device)))
                    for _ in range(s.eval_batches)]
            return {"bits_per_byte": sum(nats) / len(nats) / math.log(2)}
        totals = torch.zeros(4)
        counts = torch.zeros(4)
        for _ in range(s.eval_batches):
            ids = self.data.batch("held_out", s.batch, s.seq_len, gen).to(self.device)
            snapshots = obj.block_snapshots(self.ops, self.cfg, self.ctx, ids, s.block_len)
            _, nll, masked = obj.diffusion_loss(self.ops, self.cfg, self.den, snapshots, ids.view(-1, s.block_len), gen)
            t = masked.float().mean(-1)
            bucket = torch.clamp((t * 4).ceil().long() - 1, 0, 3).cpu()  # t in (0,.25], (.25,.5], ...
            totals.index_add_(0, bucket, nll.sum(-1).cpu())
            counts.index_add_(0, bucket, masked.sum(-1).float().cpu())
        return {"masked_nats": float(totals.sum() / counts.sum()),
                "masked_nats_by_t": [round(float(a / max(b, 1)), 4) for a, b in zip(totals, counts)]}

    # ---- export ---------------------------------------------------------------------------------------
    def export(self, directory: Path) -> Path:
        """The official TwoTower layout (bf16; A_log, D and correction biases fp32), the tokenizer,
        the corpus and the written record."""
        den = self.den
        if den is None:  # context phase only: the denoiser is the neutral copy it would start from
            den = obj.denoiser_from_context(self.cfg, self.ctx, torch.Generator().manual_seed(self.s.seed + 3),
                                            self.device)
        tensors = {}
        for tower, weights in ((CONTEXT, self.ctx), (DENOISER, den)):
            fp32 = {spec.key for spec in tower_tensor_specs(self.cfg, TWOTOWER, tower) if spec.fp32}
            for key, value in tower_tensors(self.cfg, tower, weights).items():
                tensors[key] = value.float().cpu() if key in fp32 else value.to(torch.bfloat16).cpu()
        record = self.record(tensors)
        extra = {"training_record.json": json.dumps(record, indent=2).encode(),
                 "TRAINING.md": training_markdown(record).encode()}
        if SHIPPED_CORPUS.is_file() and corpus_lib.read_corpus(SHIPPED_CORPUS) == self.docs:
            extra["corpus.txt.xz"] = SHIPPED_CORPUS.read_bytes()
        else:
            tmp = self.out / "corpus.txt.xz"
            corpus_lib.write_corpus(self.docs, tmp)
            extra["corpus.txt.xz"] = tmp.read_bytes()
        return write_checkpoint(directory, TRAINED_CONFIG, tensors, num_shards=1, extra_files=extra)

    def record(self, tensors: dict) -> dict:
        per_tower = {t: sum(v.numel() for k, v in tensors.items()
                            if k.startswith(f"{t}_tower.") or k == ("context_lm_head.weight" if t == CONTEXT else "lm_head.weight"))
                     for t in (CONTEXT, DENOISER)}
        per_tower[DENOISER] += sum(v.numel() for k, v in tensors.items() if k.startswith(("t_", "scale_shift")))
        return {
            "corpus": {"source": "CPython standard library docstrings + pydoc_data topics", "licence": corpus_lib.LICENCE,
                       "sha256": self.data.sha256, "documents": self.data.documents,
                       "train_tokens": int(self.data.train.numel()), "held_out_tokens": int(self.data.held_out.numel()),
                       "built_with": f"CPython {platform.python_version()}"},
            "parameters": per_tower,
            "settings": asdict(self.s),
            "steps": dict(self.progress.steps),
            "seconds": {k: round(v, 1) for k, v in self.progress.seconds.items()},
            "held_out": self.progress.evals,
            "device": _device_name(self.device), "threads": self.s.threads, "torch": torch.__version__,
            "commit": _git_commit(), "exported": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }


def _copy_into(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, s in zip(targets, sources, strict=True):
            t.copy_(s)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def training_markdown(r: dict) -> str:
    ctx_eval = (r["held_out"].get(CONTEXT) or {}).get("bits_per_byte")
    den_eval = r["held_out"].get(DENOISER) or {}
    return "\n".join([
        "# The trained two-tower demo model",
        "",
        "A byte-level Nemotron-Labs-TwoTower in the official layout, trained by "
        "`python -m trtllm_twotower.training` (settings below). It exists to show what the model family "
        "does on a laptop-sized model; it is not a language model for any use.",
        "",
        f"- corpus: {r['corpus']['source']} ({r['corpus']['built_with']}), licence {r['corpus']['licence']}; "
        f"{r['corpus']['documents']} documents, {r['corpus']['train_tokens']} training bytes, "
        f"{r['corpus']['held_out_tokens']} held-out bytes; sha256 {r['corpus']['sha256']} (`corpus.txt.xz`)",
        f"- parameters: context tower {r['parameters'][CONTEXT]:,}, denoiser tower {r['parameters'][DENOISER]:,}",
        f"- steps: context {r['steps'][CONTEXT]}, denoiser {r['steps'][DENOISER]} "
        f"(batch {r['settings']['batch']} × {r['settings']['seq_len']} bytes)",
        f"- time: context {r['seconds'][CONTEXT] / 60:.1f} min, denoiser {r['seconds'][DENOISER] / 60:.1f} min on "
        f"{r['device']}, {r['threads']} thread(s), torch {r['torch']}",
        f"- held-out: context tower {_rounded(ctx_eval)} bits/byte; denoiser masked "
        f"cross-entropy {_rounded(den_eval.get('masked_nats'))} nats (by t quartile: "
        f"{den_eval.get('masked_nats_by_t')})",
        f"- commit: {r['commit']}; exported {r['exported']}",
        "",
    ])


def _rounded(value):
    return value if value is None else round(value, 3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (created; an existing one is resumed)")
    p.add_argument("--export", default=None, help="where to write the checkpoint (default: OUT/model)")
    p.add_argument("--corpus", default=None, help="a corpus.txt.xz (default: the shipped one, else built from "
                   "this interpreter's standard library)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (saving) after this long; run again to resume")
    p.add_argument("--no-progress", action="store_true")
    defaults = Settings()
    for name, value in asdict(defaults).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=None,
                       help=f"default {value} (a resumed run keeps its own unless given)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    stored = out / "train_state.pt"
    settings = Settings(**torch.load(stored, weights_only=False)["settings"]) if stored.is_file() else Settings()
    for name in asdict(settings):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if settings.seq_len % settings.block_len:
        print(f"error: --seq-len {settings.seq_len} is not a multiple of --block-len {settings.block_len}", file=sys.stderr)
        return 2
    if args.corpus:
        docs = corpus_lib.read_corpus(Path(args.corpus))
    elif SHIPPED_CORPUS.is_file():
        docs = corpus_lib.read_corpus(SHIPPED_CORPUS)
    else:
        docs = corpus_lib.build_corpus()
    trainer = Trainer(out, settings, docs)
    try:
        resumed = trainer.load()
        print(f"{'resuming' if resumed else 'starting'}: steps done {trainer.progress.steps}; "
              f"corpus {trainer.data.train.numel()} + {trainer.data.held_out.numel()} tokens", file=sys.stderr)
        trainer.run(args.max_minutes, show_progress=not args.no_progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = trainer.export(Path(args.export) if args.export else out / "model")
    print(f"exported {path} (steps {trainer.progress.steps})", file=sys.stderr)
    return 0
