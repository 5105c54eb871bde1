"""Malformed checkpoints, configs and command lines: one clear error naming the file and the
field, never a traceback, nothing left half-written. Every case listed in issue 14 is here."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trtllm_twotower.checkpoint import CheckpointError, CheckpointReader, SafetensorsFile, write_safetensors
from trtllm_twotower.config import ConfigError, load_config
from trtllm_twotower.demo import DEMO_CONFIG, demo_tensors, write_checkpoint, write_demo_checkpoint
from trtllm_twotower.config import config_from_dict
from trtllm_twotower.fsutil import remove_stale_temporaries

ROOT = Path(__file__).resolve().parents[1]


def run_cli(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


# ---- config.json ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"layer_norm_epsilon": None}, "layer_norm_epsilon: expected a finite number, got None"),
    ({"time_step_limit": [0.0]}, "time_step_limit: expected [min, max], got [0.0]"),
    ({"routed_scaling_factor": "abc"}, "routed_scaling_factor: expected a finite number, got 'abc'"),
    ({"norm_topk_prob": "false"}, "norm_topk_prob: expected true or false, got 'false'"),
    ({"hidden_size": 64.5}, "hidden_size: expected an integer"),
])
def test_bad_config_fields_are_named(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**DEMO_CONFIG, **change}))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert message in str(err.value) and str(tmp_path / "config.json") in str(err.value)


def test_non_utf8_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"hidden_size": 64, "x": "\xff\xfe"}')
    with pytest.raises(ConfigError, match=r"config.json: not UTF-8 \(invalid start byte at byte \d+\)"):
        load_config(tmp_path)


# ---- safetensors files and the index --------------------------------------------------------------------

def _shard(tmp_path: Path) -> tuple[dict, bytes]:
    path = tmp_path / "base.safetensors"
    gen = torch.Generator().manual_seed(0)
    write_safetensors(path, {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen).to(torch.bfloat16),
                             "c": torch.arange(6, dtype=torch.int32).reshape(2, 3), "z": torch.empty(0)},
                      {"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda h: [h], "safetensors header is a JSON list, not an object"),
    (lambda h: {**h, "a": {k: v for k, v in h["a"].items() if k != "data_offsets"}}, "tensor 'a': no data_offsets"),
    (lambda h: {**h, "a": {**h["a"], "shape": None}}, "tensor 'a': shape must be a list of non-negative integers"),
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [0, 40]}}, "hold 40 bytes; F32 [3, 4] needs 48"),
    (lambda h: {**h, "a": {**h["a"], "dtype": "F64"}}, "F64 [3, 4] needs 96"),
    (lambda h: {**h, "b": {**h["b"], "data_offsets": [40, 50]}}, "overlaps the tensor before it"),
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [-48, 0]}}, "data_offsets must be [begin, end] with 0 <= begin"),
    (lambda h: {**h, "a": {**h["a"], "dtype": "F8_E4M3"}}, "unsupported dtype 'F8_E4M3'"),
    (lambda h: {**h, "__metadata__": {"format": 1}}, "__metadata__ must be an object of strings"),
])
def test_malformed_safetensors_headers(tmp_path, edit, message):
    header, data = _shard(tmp_path)
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(_write(tmp_path / "bad.safetensors", edit(header), data))
    assert message in str(err.value) and "bad.safetensors" in str(err.value)


def test_index_weight_map_must_be_an_object(tmp_path, demo_dir):
    bad = tmp_path / "ckpt"
    shutil.copytree(demo_dir, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    for weight_map, message in ((list(index["weight_map"]), "weight_map must be an object"),
                                ({"x": "../../etc/passwd"}, "must name a shard file in the directory")):
        (bad / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=message):
            CheckpointReader(bad)


MUTATIONS = 400


def _mutate(header: dict, rng: random.Random):
    h = copy.deepcopy(header)
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    entry = h[name]
    op = rng.randrange(14)
    if op == 0:
        del entry[rng.choice(list(entry))]
    elif op == 1:
        entry["dtype"] = rng.choice(["F32", "BF16", "I64", "F64", "X", 3, None])
    elif op == 2:
        entry["shape"] = rng.choice([None, [-1], [2.0], [], [3, 4, 1], [100], "3", [True]])
    elif op == 3:
        b, e = entry["data_offsets"]
        entry["data_offsets"] = [b + rng.randint(-3, 3), e + rng.randint(-3, 3)]
    elif op == 4:
        entry["data_offsets"] = rng.choice([None, [1], [0, 1, 2], [-4, 0], ["0", 4], [4, 0], [0.0, 48]])
    elif op == 5:
        h[name] = rng.choice([[1, 2], 5, "x", None])
    elif op == 6:
        return rng.choice([[h], 5, "s", None])
    elif op == 7:
        h["__metadata__"] = rng.choice([{"a": 1}, [1], "x", {"a": "b"}])
    elif op == 8:
        entry["data_offsets"] = list(h[rng.choice(names)]["data_offsets"])
    elif op == 9:
        for k in names:
            h[k]["data_offsets"] = [x + 4 for x in h[k]["data_offsets"]]
    elif op == 10:
        entry["shape"] = list(reversed(entry["shape"]))
    elif op == 11:
        h[name + "2"] = copy.deepcopy(entry)
    elif op == 12:
        del h[name]
    else:
        entry["shape"] = entry["shape"] + [1]
    return h


def test_fuzzed_headers_get_one_clear_error_and_agree_with_the_safetensors_library(tmp_path):
    """Seeded mutations of a valid header: the reader raises CheckpointError (naming the file) or
    reads the file, never anything else, and accepts exactly what the safetensors library accepts."""
    from safetensors import safe_open

    header, data = _shard(tmp_path)
    rng = random.Random(1234)
    accepted = 0
    for i in range(MUTATIONS):
        path = _write(tmp_path / f"m{i}.safetensors", _mutate(header, rng), data)
        try:
            st = SafetensorsFile(path)
            [st.read(n) for n in st.entries]
            ours = True
        except CheckpointError as err:
            assert path.name in str(err)
            ours = False
        try:
            with safe_open(str(path), "pt") as f:
                [f.get_tensor(k) for k in f.keys()]
            theirs = True
        except Exception:  # noqa: BLE001 - the library's own error types vary
            theirs = False
        assert ours == theirs, (i, json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]]))
        accepted += ours
    assert 0.1 * MUTATIONS < accepted < 0.6 * MUTATIONS  # the mutations exercise both outcomes


def test_huge_pattern_error_is_capped(tmp_path, demo_dir):
    bad = tmp_path / "ckpt"
    shutil.copytree(demo_dir, bad)
    (bad / "config.json").write_text(json.dumps({**DEMO_CONFIG, "hybrid_override_pattern": "M" * 200_000,
                                                 "num_hidden_layers": 200_000}))
    from trtllm_twotower.runtime import TwoTowerRuntime

    with pytest.raises(CheckpointError) as err:
        TwoTowerRuntime.from_checkpoint(bad)
    assert len(str(err.value)) < 10_000 and "... and 1" in str(err.value)  # was a 167 MB line


# ---- the command lines ------------------------------------------------------------------------------------

def test_run_runtime_refuses_inf_temperature_and_bad_configs(tmp_path, demo_dir):
    line = one_error_line(run_cli("run_runtime.py", "--checkpoint", str(demo_dir), "--temperature", "inf"))
    assert "temperature: expected a finite number >= 0, got inf" in line
    bad = tmp_path / "ckpt"
    shutil.copytree(demo_dir, bad)
    (bad / "config.json").write_text(json.dumps({**DEMO_CONFIG, "layer_norm_epsilon": None}))
    line = one_error_line(run_cli("run_runtime.py", "--checkpoint", str(bad)))
    assert "layer_norm_epsilon" in line and str(bad / "config.json") in line


def test_prompt_ids_on_a_checkpoint_without_tokenizer(tmp_path):
    bare = write_checkpoint(tmp_path / "bare", DEMO_CONFIG, demo_tensors(config_from_dict(DEMO_CONFIG), seed=0),
                            with_tokenizer=False)
    proc = run_cli("run_runtime.py", "--checkpoint", str(bare), "--prompt-ids", "5,6,7", "--max-new-tokens", "8",
                   "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert payload["text"] is None and len(payload["output_ids"][0]) == 8
    line = one_error_line(run_cli("run_runtime.py", "--checkpoint", str(bare), "--prompt", "hello"))
    assert "has none; pass token ids" in line


def _bad_dtype_checkpoint(tmp_path, demo_dir) -> Path:
    bad = tmp_path / "ckpt"
    shutil.copytree(demo_dir, bad)
    shard = bad / "model-00001-of-00003.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "BF16")
    header[name]["dtype"] = "F32"
    blob = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    return bad


def test_build_engine_errors(tmp_path, demo_dir):
    bad = _bad_dtype_checkpoint(tmp_path, demo_dir)
    line = one_error_line(run_cli("build_engine.py", "--checkpoint", str(bad), "--output-dir", str(tmp_path / "o1"),
                                  "--no-progress"))
    assert "model-00001-of-00003.safetensors: tensor" in line and "needs" in line  # not "closed after 0 of 61"
    assert not (tmp_path / "o1").exists()
    blocker = tmp_path / "blocker"  # a file where a directory must go: unwritable even for root
    blocker.write_text("")
    line = one_error_line(run_cli("build_engine.py", "--checkpoint", str(demo_dir), "--output-dir",
                                  str(blocker / "out"), "--no-progress"))
    assert ("File exists" in line or "Not a directory" in line) and str(blocker) in line


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """Large enough (~170 MB) that a conversion is still running when the test signals it."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("big") / "ckpt", seed=0, hidden_size=1024,
                                 vocab_size=20000, max_position_embeddings=4096)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_interrupted_build_leaves_nothing(tmp_path, big_checkpoint, sig, code, word):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "build_engine.py"), "--checkpoint", str(big_checkpoint),
                             "--output-dir", str(out), "--no-progress"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the conversion finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and word in err and "Traceback" not in err, err[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_temporaries_of_killed_runs_are_removed(tmp_path, demo_dir):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-999999999-abc"  # no such process
    stale.mkdir()
    (stale / "rank0.safetensors").write_bytes(b"half")
    mine = tmp_path / f".out.tmp-{os.getpid()}-live"  # a running writer's: kept
    mine.mkdir()
    assert remove_stale_temporaries(out) == [stale]
    assert not stale.exists() and mine.exists()
    proc = run_cli("build_engine.py", "--checkpoint", str(demo_dir), "--output-dir", str(out), "--no-progress")
    assert proc.returncode == 0 and (out / "trtllm_checkpoint" / "context").is_dir()
