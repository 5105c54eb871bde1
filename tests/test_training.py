"""Training of the demo model: its corpus, its forwards (the network code the runtime runs), a
smoke run of the script in CI and deterministic resumption."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import load_towers
from trtllm_twotower.demo import write_tokenizer
from trtllm_twotower.network import towers
from trtllm_twotower.network.ops import TorchOps
from trtllm_twotower.runtime import TwoTowerRuntime
from trtllm_twotower.training import corpus as corpus_lib
from trtllm_twotower.training import objectives as obj

ROOT = Path(__file__).resolve().parents[1]


def test_byte_ids_come_from_the_tokenizer_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    table = corpus_lib.byte_to_id_table(tokenizer)
    assert sorted(table.tolist()) == list(range(4, 260))  # a permutation of the byte ids, not byte + 4
    text = "Return a new list — «quoted» </s> \t\x00 end"
    ids = table[torch.tensor(list(text.encode("utf-8")))].tolist()
    assert tokenizer.decode(ids) == text


def test_shipped_corpus_split_is_stable():
    docs = corpus_lib.read_corpus(ROOT / "trtllm_twotower" / "demo_model" / "corpus.txt.xz")
    held = [d for d in docs if corpus_lib.is_held_out(d)]
    assert len(docs) > 5000 and 0.03 < len(held) / len(docs) < 0.07
    assert all(corpus_lib.DOC_SEPARATOR not in d for d in docs)


def test_causal_lm_loss_is_the_context_towers_next_token_loss(demo_dir):
    cfg, ctx, _ = load_towers(demo_dir)
    ops = TorchOps(torch.float32, "cpu")
    ids = torch.randint(4, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    logits, _ = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 2, 32, torch.float32, "cpu"), ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    assert torch.allclose(obj.causal_lm_loss(obj.TrainingOps(torch.float32, "cpu"), cfg, ctx, ids), expected,
                          rtol=1e-5, atol=1e-6)


def test_block_snapshots_are_the_inference_context_of_each_block(demo_dir):
    """Row (sequence b, block n) of the training batch sees exactly what the runtime's denoiser sees
    for that block: the context after prefilling the sequence's first 16 n tokens."""
    cfg, ctx, den = load_towers(demo_dir)
    ops = obj.TrainingOps(torch.float32, "cpu")
    L, n_blocks = 4, 3
    ids = torch.randint(4, cfg.vocab_size, (2, L * n_blocks), generator=torch.Generator().manual_seed(2))
    snapshots = obj.block_snapshots(ops, cfg, ctx, ids, L)
    blocks = ids.view(-1, L).clone()
    blocks[:, 1] = cfg.mask_token_id
    t = torch.full((blocks.shape[0],), 0.25)
    train_logits = towers.denoise(ops, cfg, den, snapshots, blocks, t)
    infer = TorchOps(torch.float32, "cpu")
    for b in range(2):
        for n in range(n_blocks):
            state = towers.empty_state(cfg, 1, L * n_blocks, torch.float32, "cpu")
            if n:
                _, state = towers.context_forward(infer, cfg, ctx, state, ids[b : b + 1, : L * n])
            row = b * n_blocks + n
            logits = towers.denoise(infer, cfg, den, state, blocks[row : row + 1], t[:1])
            assert torch.allclose(train_logits[row], logits[0], rtol=1e-4, atol=1e-4), (b, n)


def test_masking_follows_the_objective():
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(4, 260, (4000, 16), generator=gen)
    noisy, masked, t = obj.mask_blocks(blocks, 3, gen)
    assert masked.any(-1).all()  # at least one masked position per block
    assert torch.equal(noisy == 3, masked) and torch.equal(noisy[~masked], blocks[~masked])
    assert torch.equal(t, masked.float().mean(-1))  # t is the masked fraction, as at inference
    assert 0.45 < t.mean() < 0.55  # t ~ U(0, 1]


def _train(out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trtllm_twotower.training", "--out", str(out), "--no-progress", "--batch", "2",
           "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--save-every", "1", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def _digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model-00001-of-00001.safetensors").read_bytes()).hexdigest()


def test_training_script_smoke_resume_and_export(tmp_path):
    straight = _train(tmp_path / "a", "--context-steps", "3", "--denoiser-steps", "2")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _train(tmp_path / "b", "--context-steps", "2", "--denoiser-steps", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _train(tmp_path / "b", "--context-steps", "3", "--denoiser-steps", "2")
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-3000:]
    assert _digest(tmp_path / "a" / "model") == _digest(tmp_path / "b" / "model")  # seeded and resumable
    record = (tmp_path / "a" / "model" / "TRAINING.md").read_text()
    assert "PSF-2.0" in record and "context 3, denoiser 2" in record
    rt = TwoTowerRuntime.from_checkpoint(tmp_path / "a" / "model", dtype="float32")
    assert len(rt.generate("def", max_new_tokens=4, eos_token_id=None).output_ids[0]) == 4
    refused = _train(tmp_path / "b", "--context-steps", "5")
    assert refused.returncode == 2 and "only --denoiser-steps can grow" in refused.stderr
