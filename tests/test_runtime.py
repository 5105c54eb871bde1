"""The Python API and run_runtime.py on the demo checkpoints (CPU, float32 unless stated)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trtllm_twotower.hf_reference import transformers_context_model
from trtllm_twotower.config import load_config
from trtllm_twotower.demo import DEMO_CONFIG, demo_tensors, write_checkpoint
from trtllm_twotower.network import towers
from trtllm_twotower.runtime import TwoTowerRuntime
from trtllm_twotower.runtime.executor import StateMirror

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runtime(demo_dir):
    return TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32")


@pytest.fixture(scope="module")
def inert_dir(tmp_path_factory):
    """Denoiser = a copy of the context tower, lm_head = context_lm_head, shift 0 / scale 0 / gate 1."""
    cfg = load_config_from_raw(DEMO_CONFIG, tmp_path_factory)
    tensors = demo_tensors(cfg, seed=3)
    for k in list(tensors):
        if k.startswith("context_tower."):
            tensors["denoiser_tower." + k[len("context_tower."):]] = tensors[k].clone()
    tensors["lm_head.weight"] = tensors["context_lm_head.weight"].clone()
    tensors["t_block.1.weight"].zero_()
    tensors["t_block.1.bias"].zero_()
    for i in range(cfg.num_layers):
        table = torch.zeros(3, cfg.hidden_size, dtype=torch.bfloat16)
        table[2] = 1
        tensors[f"scale_shift_tables.{i}"] = table
    return write_checkpoint(tmp_path_factory.mktemp("inert") / "ckpt", DEMO_CONFIG, tensors)


def load_config_from_raw(raw, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(raw))
    return load_config(path)


def test_ar_greedy_equals_transformers_generate(demo_dir, runtime):
    prompt = [5, 99, 42, 17, 250, 8, 61]
    res = runtime.generate([prompt], max_new_tokens=10, mode="ar", eos_token_id=None)
    model = transformers_context_model(demo_dir, runtime.executor.ctx_weights)
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert res.output_ids[0] == expected


def test_mock_ar_equals_ar_with_inert_copied_denoiser(inert_dir):
    rt = TwoTowerRuntime.from_checkpoint(inert_dir, dtype="float32")
    prompts = [[7, 9, 130, 44, 21], [200, 6]]
    ar = rt.generate(prompts, max_new_tokens=12, mode="ar", eos_token_id=None)
    mock = rt.generate(prompts, max_new_tokens=12, mode="mock-ar", eos_token_id=None)
    assert mock.output_ids == ar.output_ids


def test_mock_ar_differs_from_ar_with_real_denoiser(runtime):
    prompts = [[7, 9, 130, 44, 21]]
    ar = runtime.generate(prompts, max_new_tokens=12, mode="ar", eos_token_id=None)
    mock = runtime.generate(prompts, max_new_tokens=12, mode="mock-ar", eos_token_id=None)
    assert mock.output_ids != ar.output_ids


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batched_equals_row_by_row(runtime, mode, temperature):
    prompts = ["Hi", "A longer prompt, of other length", [9, 8, 7, 6, 5, 4, 3 + 1]]
    kw = dict(max_new_tokens=21, mode=mode, temperature=temperature, block_size=8, steps_per_block=8,
              confidence_threshold=0.03, eos_token_id=None)
    batched = runtime.generate(prompts, seed=[5, 6, 7], **kw)
    for b, p in enumerate(prompts):
        single = runtime.generate([p], seed=5 + b, **kw)
        assert single.output_ids[0] == batched.output_ids[b]
        assert single.nfe_per_row[0] == batched.nfe_per_row[b]
    assert all(len(o) == 21 for o in batched.output_ids)  # not a multiple of the block size


def test_diffusion_step_budget_and_threshold_path(runtime):
    slow = runtime.generate(["abc"], max_new_tokens=32, block_size=16, steps_per_block=16, confidence_threshold=0.9,
                            eos_token_id=None)
    assert slow.nfe == 32  # tiny random models never reach 0.9: the floor commits one token per step
    fast = runtime.generate(["abc"], max_new_tokens=32, block_size=16, steps_per_block=16,
                            confidence_threshold=0.02, eos_token_id=None)
    assert fast.nfe < slow.nfe and fast.tokens_per_step > 1
    few = runtime.generate(["abc"], max_new_tokens=32, block_size=16, steps_per_block=4, confidence_threshold=0.9,
                           eos_token_id=None)
    assert few.nfe == 8  # at most T steps per block


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_streaming_concatenates_to_the_unstreamed_output(runtime, mode):
    prompts = ["stream me", "and me too"]
    kw = dict(max_new_tokens=24, mode=mode, block_size=8, temperature=0.5, seed=[1, 2], eos_token_id=None)
    plain = runtime.generate(prompts, **kw)
    events = []
    streamed = runtime.generate(prompts, on_block=events.append, **kw)
    assert streamed.output_ids == plain.output_ids
    for b in range(2):
        mine = [e for e in events if e.row == b]
        assert sum((e.token_ids for e in mine), []) == plain.output_ids[b]
        assert "".join(e.text for e in mine) == plain.text[b]
        assert mine[-1].finished and not any(e.finished for e in mine[:-1])
    if mode == "diffusion":
        assert len(events) == 2 * 3  # one event per committed block per row


def test_eos_stops_the_row_after_its_block(runtime):
    """With EOS = a token the model emits early, diffusion keeps the block up to EOS and stops that
    row; AR stops right after it."""
    free = runtime.generate(["eos test"], max_new_tokens=32, block_size=8, eos_token_id=None)
    eos = free.output_ids[0][5]
    assert eos != runtime.cfg.mask_token_id
    stopped = runtime.generate(["eos test"], max_new_tokens=32, block_size=8, eos_token_id=eos)
    first = free.output_ids[0].index(eos)
    assert stopped.output_ids[0] == free.output_ids[0][: first + 1]
    assert stopped.nfe <= 8 * (first // 8 + 1)


def test_state_mirror_copies_only_new_positions(demo_dir):
    cfg = load_config(demo_dir)
    state = towers.empty_state(cfg, 2, 16, torch.float32, "cpu")
    i = cfg.layers_of("*")[0]
    state.keys[i].normal_()
    state = towers.TowerState(torch.tensor([3, 5]), state.keys, state.values, state.conv, state.ssm)
    mirror = StateMirror(torch.device("cpu"))
    first = mirror.update(state)
    assert first.keys[i] is not state.keys[i] and torch.equal(first.keys[i], state.keys[i])
    first.keys[i][:, :3].fill_(7.0)  # poison what was already copied
    state.keys[i][:, 3:8].normal_()
    grown = towers.TowerState(torch.tensor([6, 8]), state.keys, state.values, state.conv, state.ssm)
    second = mirror.update(grown)
    assert (second.keys[i][0, :3] == 7).all()  # old positions were not copied again
    assert torch.equal(second.keys[i][0, 3:6], grown.keys[i][0, 3:6])
    assert torch.equal(second.keys[i][1, 5:8], grown.keys[i][1, 5:8])
    assert mirror.update(grown) is second


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[""]), "prompts[0]: empty prompt"),
    (dict(prompts=[[]]), "prompts[0]: empty prompt"),
    (dict(prompts=[[1, 999]]), "outside the vocabulary"),
    (dict(max_new_tokens=4090), "prompt + output too long"),
    (dict(block_size=0), "block_size: must be >= 1"),
    (dict(steps_per_block=0), "steps_per_block: must be >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens: must be >= 1"),
    (dict(confidence_threshold=1.5), "confidence_threshold: expected a number in [0.0, 1.0]"),
    (dict(confidence_threshold=-0.1), "confidence_threshold"),
    (dict(temperature=-1.0), "temperature"),
    (dict(mask_token_id=260), "mask_token_id: 260 is outside the vocabulary"),
    (dict(mask_token_id=2), "mask_token_id: equals eos_token_id"),
    (dict(mode="beam"), "mode: expected one of"),
    (dict(seed=[1, 2]), "seed: expected"),
    (dict(top_p=0.0), "top_p"),
])
def test_bad_parameters_fail_before_work(runtime, kwargs, message):
    args = dict(prompts=["hello"], max_new_tokens=8)
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        runtime.generate(args.pop("prompts"), **args)
    assert message in str(err.value)


def test_unknown_device_and_backend(demo_dir):
    with pytest.raises(ValueError, match="context_device: unknown device 'gpu7'"):
        TwoTowerRuntime.from_checkpoint(demo_dir, context_device="gpu7")
    with pytest.raises(ValueError, match="denoiser_device: 'cuda:1' is not available"):
        TwoTowerRuntime.from_checkpoint(demo_dir, denoiser_device="cuda:1")
    with pytest.raises(ValueError, match="backend"):
        TwoTowerRuntime.from_checkpoint(demo_dir, backend="onnx")


def test_bf16_runtime_generates(demo_dir):
    rt = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="bfloat16")
    res = rt.generate(["bf16"], max_new_tokens=16, eos_token_id=None)
    assert len(res.output_ids[0]) == 16 and res.nfe == 16


def test_run_runtime_json_matches_api(demo_dir, runtime):
    cmd = [sys.executable, str(ROOT / "run_runtime.py"), "--checkpoint", str(demo_dir), "--dtype", "float32",
           "--prompt", "cli", "--max-new-tokens", "20", "--block-size", "8", "--temperature", "0.5",
           "--seed", "3", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    expected = runtime.generate(["cli"], max_new_tokens=20, block_size=8, temperature=0.5, seed=3)
    assert payload["output_ids"] == expected.output_ids
    assert payload["text"] == expected.text and payload["nfe"] == expected.nfe
    assert {"tokens_per_step", "seconds"} <= set(payload)
    bad = subprocess.run([sys.executable, str(ROOT / "run_runtime.py"), "--checkpoint", str(demo_dir),
                          "--steps-per-block", "0"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "steps_per_block: must be >= 1" in bad.stderr


def test_checkpoint_without_tokenizer_runs_on_ids(tmp_path, runtime):
    """Ids in, ids out need no tokenizer (as TensorRT-LLM's tools and tensorrtllm_backend work)."""
    from trtllm_twotower.config import config_from_dict

    tensors = demo_tensors(config_from_dict(DEMO_CONFIG), seed=0)  # the demo_dir weights
    bare = write_checkpoint(tmp_path / "bare", DEMO_CONFIG, tensors, with_tokenizer=False)
    rt = TwoTowerRuntime.from_checkpoint(bare, dtype="float32")
    kw = dict(max_new_tokens=12, block_size=8, temperature=0.5, seed=4)
    res = rt.generate([[5, 6, 7, 8]], **kw)
    assert res.text is None and res.output_ids == runtime.generate([[5, 6, 7, 8]], **kw).output_ids
    events = []
    rt.generate([[5, 6, 7, 8]], on_block=events.append, **kw)
    assert events and all(e.text is None for e in events)
    with pytest.raises(ValueError, match=r"prompts\[0\]: text needs a tokenizer"):
        rt.generate(["text"], max_new_tokens=4)
    (bare / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer: the files in"):
        TwoTowerRuntime.from_checkpoint(bare, dtype="float32")
