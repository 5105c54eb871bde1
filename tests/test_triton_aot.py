"""The TensorRT plugins' kernels are the Triton kernels, compiled ahead of time (``plugins/aot.py``)
and launched by ``csrc/triton_ops.cpp`` exactly as the Python launchers launch them.

Without a GPU: the AOT sources of the demo model's config are generated for sm_90 (both dtypes),
compiled with the plugin library's C++ into a shared library, and linked against a stand-in CUDA
driver (``tests/fake_cuda/fake_cuda.c``) that records every launch. For random shapes of every
op, the library's launches must equal the Python launcher's recorded launches: the same compiled
variant (kernel, argument types, constexprs, warps), grid, block, scalar arguments bit for bit,
and pointer arguments with the same role (which input or output, at which byte offset, or scratch).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from trtllm_twotower.config import load_config  # noqa: E402
from trtllm_twotower.plugins import attention, mamba, moe, norms  # noqa: E402
from trtllm_twotower.plugins.aot import variant_key  # noqa: E402
from trtllm_twotower.plugins.compile import recording  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "trtllm_twotower" / "plugins" / "csrc"
DEMO = ROOT / "trtllm_twotower" / "demo_model"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int32: 3, torch.int64: 4}
REGION = 1 << 36  # each fake tensor address lies in its own 64 GiB region (16 per kind)
INPUTS, OUTPUTS, WORKSPACE = 1 << 40, 2 << 40, 3 << 40


class TensorArg(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("dtype", ctypes.c_int), ("ndim", ctypes.c_int),
                ("dims", ctypes.c_int64 * 8)]


class FakeLaunch(ctypes.Structure):
    _fields_ = [("function", ctypes.c_int), ("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared", ctypes.c_uint), ("stream", ctypes.c_uint64), ("num_params", ctypes.c_int),
                ("params", ctypes.c_uint64 * 64)]


def _build(command) -> None:
    built = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-4000:]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """``python -m trtllm_twotower.plugins.aot`` for the demo model's config (sm_90, both dtypes)."""
    if shutil.which("g++") is None or shutil.which("gcc") is None or not (CUDA_INCLUDE / "cuda.h").is_file():
        pytest.skip(f"g++/gcc or the CUDA headers ({CUDA_INCLUDE}/cuda.h) missing: cannot build the plugin kernels")
    out = tmp_path_factory.mktemp("aot") / "generated"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "trtllm_twotower.plugins.aot", "--config", str(DEMO), "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _build(["gcc", "-O0", "-c", "-fPIC", f"-I{CSRC}", f"-I{CUDA_INCLUDE}", out / "triton_variants.c", "-o",
            out / "variants.o"])
    return out


def build_ops(generated: Path, name: str, link: list) -> Path:
    """libtwotower_ops (triton_launch.cpp, triton_ops.cpp, the variants) linked with ``link``."""
    library = generated.parent / name
    _build(["g++", "-O1", "-shared", "-fPIC", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}",
            f"-I{generated}", f"-I{CUDA_INCLUDE}", CSRC / "triton_launch.cpp", CSRC / "triton_ops.cpp",
            generated / "variants.o", "-o", library, *link])
    return library


def bind(lib, generated: Path):
    lib.rows = json.loads((generated / "manifest.json").read_text())["variants"]  # the table, in order
    lib.twotower_launch.argtypes = [ctypes.c_char_p, ctypes.POINTER(TensorArg), ctypes.c_int,
                                    ctypes.POINTER(TensorArg), ctypes.c_int, ctypes.POINTER(ctypes.c_double),
                                    ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    lib.twotower_workspace_bytes.argtypes = [ctypes.c_char_p, ctypes.POINTER(TensorArg), ctypes.c_int,
                                             ctypes.POINTER(ctypes.c_double), ctypes.c_int]
    lib.twotower_workspace_bytes.restype = ctypes.c_size_t
    lib.twotower_last_error.restype = ctypes.c_char_p
    lib.twotower_variant_key.restype = ctypes.c_char_p
    lib.twotower_variant_cubin.restype = ctypes.c_void_p
    return lib


@pytest.fixture(scope="module")
def library(generated):
    """(plugin kernel library, fake driver): the library linked against the recording driver, and
    bound to it first (RTLD_DEEPBIND), whatever libcuda the process has loaded."""
    fake = generated.parent / "libfakecuda.so"
    _build(["gcc", "-O1", "-shared", "-fPIC", f"-I{CUDA_INCLUDE}", "-Wl,-soname,libfakecuda.so",
            ROOT / "tests" / "fake_cuda" / "fake_cuda.c", "-o", fake])
    ops = build_ops(generated, "libtwotower_ops_fake.so", [f"-L{fake.parent}", "-lfakecuda",
                                                           f"-Wl,-rpath,{fake.parent}"])
    driver = ctypes.CDLL(str(fake))
    driver.fake_launch.restype = ctypes.POINTER(FakeLaunch)
    driver.fake_function_image.restype = ctypes.c_void_p
    return bind(ctypes.CDLL(str(ops), mode=os.RTLD_DEEPBIND), generated), driver


def _args(tensors, base: int):
    array = (TensorArg * max(len(tensors), 1))()
    for i, t in enumerate(tensors):
        array[i].data = 0 if t.numel() == 0 else base + i * REGION
        array[i].dtype = DTYPE_CODES[t.dtype]
        array[i].ndim = t.dim()
        for d, size in enumerate(t.shape):
            array[i].dims[d] = size
    return array


def launch_library(library, op: str, inputs, outputs, attributes, workspace_bytes: int | None = None,
                   stream: int = 0x51):
    """(return code, [(variant key, grid, block, params)]) of one ``twotower_launch``."""
    lib, driver = library
    ins, outs = _args(inputs, INPUTS), _args(outputs, OUTPUTS)
    attrs = (ctypes.c_double * max(len(attributes), 1))(*attributes)
    if workspace_bytes is None:
        workspace_bytes = lib.twotower_workspace_bytes(op.encode(), ins, len(inputs), attrs, len(attributes))
    driver.fake_reset()
    code = lib.twotower_launch(op.encode(), ins, len(inputs), outs, len(outputs), attrs, len(attributes), WORKSPACE,
                               workspace_bytes, stream)
    return code, recorded_launches(lib, driver, stream)


def recorded_launches(lib, driver, stream: int = 0x51) -> list:
    """[(variant key, grid, block, params)] of what the fake driver recorded; each launch checked to
    run the first row of its key whose divisibility promises its arguments keep."""
    rows = {lib.twotower_variant_cubin(i): i for i in range(lib.twotower_variant_count())}
    launches = []
    for i in range(driver.fake_num_launches()):
        record = driver.fake_launch(i).contents
        assert record.stream == stream
        row = rows[driver.fake_function_image(record.function)]
        key, params = lib.rows[row]["key"], list(record.params[:record.num_params])
        kept = [j for j, r in enumerate(lib.rows) if r["key"] == key and all(params[a] % 16 == 0 for a in r["divisible"])]
        assert row == kept[0], (key, row, kept)
        launches.append((key, tuple(record.grid), tuple(record.block), params))
    return launches


def _role(address: int, sizes: dict) -> tuple:
    """(kind, index, byte offset) of a fake address; kind "in", "out", "scratch" or "empty"."""
    if address == 0:
        return ("empty",)
    for kind, base in (("in", INPUTS), ("out", OUTPUTS)):
        if base <= address < base + REGION * 16:
            return (kind, (address - base) // REGION, (address - base) % REGION)
    assert address >= WORKSPACE and address - WORKSPACE < sizes["workspace"], hex(address)
    return ("scratch",)


def _python_role(t: torch.Tensor, inputs, outputs) -> tuple:
    if t.numel() == 0:
        return ("empty",)
    for kind, tensors in (("in", inputs), ("out", outputs)):
        for i, u in enumerate(tensors):
            start = u.data_ptr()
            if u.numel() and start <= t.data_ptr() < start + u.numel() * u.element_size():
                return (kind, i, t.data_ptr() - start)
    return ("scratch",)


def expected_launches(launcher, inputs, outputs_of, *extra):
    """Run a Python launcher with the kernels recorded: ([(key, grid, block, params)], outputs)."""
    with recording() as calls:
        result = launcher(*inputs, *extra)
    outputs = outputs_of(result)
    expected = []
    for call in calls:
        types = dict(call.launch.signature)
        params = []
        for name, value in call.args:
            if isinstance(value, torch.Tensor):
                params.append(_python_role(value, inputs, outputs))
            elif types[name] == "fp32":
                params.append(np.float32(value).view(np.uint32).item())
            else:
                params.append(value)
        expected.append((variant_key(call.launch), call.grid, (call.launch.num_warps * 32, 1, 1), params))
    return expected, outputs


def check_launches(got, expected):
    """The recorded launches of the library = the Python launcher's, one by one."""
    assert len(got) == len(expected), ([k for k, *_ in got], [k for k, *_ in expected])
    sizes = {"workspace": 1 << 40}
    for (key, grid, block, params), (want_key, want_grid, want_block, want_params) in zip(got, expected):
        assert key == want_key
        assert grid == want_grid and block == want_block, key
        types = [t for t in key[key.index("(") + 1:key.index(")")].split(",")]
        decoded = []
        for t, raw in zip(types, params):
            if t.startswith("*"):
                decoded.append(_role(raw, sizes))
            elif t == "i32":
                decoded.append(np.uint32(raw & 0xFFFFFFFF).view(np.int32).item())
            elif t == "fp32":
                decoded.append(raw & 0xFFFFFFFF)
            else:
                decoded.append(np.uint64(raw).view(np.int64).item())
        assert len(params) == len(types) + 2 and params[-2:] == [0, 0], key  # + Triton's two scratch pointers
        assert decoded == want_params, key


def _outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


def compare(library, op, launcher, inputs, attributes, outputs_of=_outputs, extra=()):
    expected, outputs = expected_launches(launcher, inputs, outputs_of, *extra)
    code, got = launch_library(library, op, inputs, outputs, attributes)
    assert code == 0, library[0].twotower_last_error().decode()
    check_launches(got, expected)
    return got


CFG = load_config(DEMO / "config.json")
DTYPES = [torch.float32, torch.bfloat16]


def rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_launch_as_the_python_launchers(library, dtype):
    gen = torch.Generator().manual_seed(1)
    D = CFG.hidden_size
    for _ in range(3):
        B, L = (int(v) for v in torch.randint(1, 9, (2,), generator=gen))
        x, w = rand(gen, B, L, D, dtype=dtype), rand(gen, D, dtype=dtype)
        table, m = rand(gen, 3, D, dtype=dtype), rand(gen, B, 3 * D, dtype=dtype)
        compare(library, "RmsNorm", lambda x, w: norms.rms_norm(x, w, 1e-5), [x, w], [1e-5])
        for first in (0, 1):
            compare(library, "ModulatedRmsNorm", lambda x, w, t, m: norms.rms_norm(x, w, 1e-5, t, m, bool(first)),
                    [x, w, table, m], [1e-5, first])
        compare(library, "GatedResidual", norms.gated_residual, [x, rand(gen, B, L, D, dtype=dtype), table, m], [])
        width = CFG.d_inner
        compare(library, "GatedRmsNorm", lambda y, z, w: norms.gated_rms_norm(y, z, w, CFG.n_groups, 1e-5),
                [rand(gen, B, L, width, dtype=dtype), rand(gen, B, L, width, dtype=dtype), rand(gen, width, dtype=dtype)],
                [CFG.n_groups, 1e-5])
        compare(library, "Relu2", moe.relu2, [rand(gen, B * L, CFG.moe_shared_expert_intermediate_size, dtype=dtype)],
                [])


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_and_experts_launch_as_the_python_launchers(library, dtype):
    gen = torch.Generator().manual_seed(2)
    D, E, I, k = CFG.hidden_size, CFG.n_routed_experts, CFG.moe_intermediate_size, CFG.num_experts_per_tok
    for n in (1, 5, 37, 700):
        x = rand(gen, n, D, dtype=dtype)
        compare(library, "MoeRoute", lambda x, r, b: moe.moe_route(x, r, b, k, True, 2.5),
                [x, rand(gen, E, D, dtype=dtype), rand(gen, E)], [k, 1, 2.5])
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(n)])
        experts = [x, ids, torch.rand(n, k, generator=gen), rand(gen, E, I, D, dtype=dtype), rand(gen, E, D, I, dtype=dtype)]
        compare(library, "MoeExperts", lambda *a: moe.moe_experts(*a, None), experts, [])
        compare(library, "MoeExperts", moe.moe_experts, [*experts, rand(gen, n, D, dtype=dtype)], [])


def test_experts_beyond_one_sort_run_in_token_chunks(library):
    """More (token, expert) pairs than the one-program sort holds: the library runs the four
    kernels per chunk of ALIGN_MAX_PAIRS // k tokens, each launched as the Python launcher launches
    that chunk (Python sorts such prefills with torch ops instead; each token's sum is the same)."""
    gen = torch.Generator().manual_seed(3)
    D, E, I, k = CFG.hidden_size, CFG.n_routed_experts, CFG.moe_intermediate_size, CFG.num_experts_per_tok
    chunk = moe.ALIGN_MAX_PAIRS // k
    n = 2 * chunk + 123
    x, shared = rand(gen, n, D, dtype=torch.bfloat16), rand(gen, n, D, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=gen)
    up, down = rand(gen, E, I, D, dtype=torch.bfloat16), rand(gen, E, D, I, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    code, got = launch_library(library, "MoeExperts", [x, ids, weights, up, down, shared], [out], [])
    assert code == 0, library[0].twotower_last_error().decode()
    assert len(got) == 4 * 3
    for c, t0 in enumerate(range(0, n, chunk)):
        part = slice(t0, min(n, t0 + chunk))
        with recording() as calls:
            moe.moe_experts(x[part], ids[part], weights[part], up, down, shared[part])
        assert [variant_key(call.launch) for call in calls] == [key for key, *_ in got[4 * c: 4 * c + 4]]
        assert [call.grid for call in calls] == [grid for _, grid, *_ in got[4 * c: 4 * c + 4]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_launches_as_the_python_launcher(library, dtype):
    """Causal and bidirectional, one split and several (long caches): the split count and
    lengths come from the cache capacity minus the chunk, the bound the plugin knows."""
    gen = torch.Generator().manual_seed(4)
    H, KV, P = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    for B, L, S in ((1, 1, 9), (3, 16, 40), (2, 16, 3000), (1, 1, 70000), (5, 7, 600)):
        for causal in (True, False):
            q = rand(gen, B, L, H, P, dtype=dtype)
            kv = [rand(gen, B, L, KV, P, dtype=dtype) for _ in range(2)]
            caches = [rand(gen, B, S, KV, P, dtype=dtype) for _ in range(2)]
            lens = torch.randint(0, S - L + 1, (B,), generator=gen, dtype=torch.int32)
            got = compare(library, "BlockAttention",
                          lambda *a: attention.block_attention(*a, S - L, causal, False),
                          [q, *kv, *caches, lens], [H, KV, P, int(causal)])
            assert len(got) == attention.launches(B, L, H, KV, S - L)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mamba_scan_launches_as_the_python_launcher(library, dtype):
    gen = torch.Generator().manual_seed(5)
    H, P, G, C, W = CFG.mamba_num_heads, CFG.mamba_head_dim, CFG.n_groups, CFG.conv_dim, CFG.conv_kernel
    N = CFG.ssm_state_size
    for B, L in ((1, 1), (3, 16), (2, 5)):
        for steps in (0, 1):
            inputs = [rand(gen, B, L, C, dtype=dtype), rand(gen, B, L, H, dtype=dtype), rand(gen, C, W, dtype=dtype),
                      rand(gen, C, dtype=dtype), rand(gen, H), rand(gen, H), rand(gen, H), rand(gen, B, C, W, dtype=dtype),
                      rand(gen, B, H, P, N)]
            compare(library, "SeededMambaScan", lambda *a: mamba.seeded_mamba_scan(*a, G, P, bool(steps)), inputs,
                    [G, P, steps])


def test_bad_launches_get_one_error_naming_the_problem(library):
    lib, driver = library
    gen = torch.Generator().manual_seed(6)
    D = CFG.hidden_size
    x16 = rand(gen, 2, 3, D, dtype=torch.float16)
    code, got = launch_library(library, "RmsNorm", [x16, rand(gen, D, dtype=torch.float16)], [torch.empty_like(x16)],
                               [1e-5])
    assert code == -2 and got == []  # fp16 was not compiled into the library
    message = lib.twotower_last_error().decode()
    assert "no compiled kernel variant norms._rms_norm_kernel(*fp16" in message and "aot.py" in message
    q = rand(gen, 1, 4, CFG.num_attention_heads, CFG.head_dim)
    cache = rand(gen, 1, 8, CFG.num_key_value_heads, CFG.head_dim)
    kv = rand(gen, 1, 4, CFG.num_key_value_heads, CFG.head_dim)
    inputs = [q, kv, kv, cache, cache, torch.zeros(1, dtype=torch.int32)]
    code, _ = launch_library(library, "BlockAttention", inputs, [torch.empty_like(q)],
                             [CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim + 1, 1])
    assert code == -1 and "num_heads, num_kv_heads, head_dim" in lib.twotower_last_error().decode()
    code, _ = launch_library(library, "Softmax", [q], [q], [])
    assert code == -5 and "unknown op Softmax" in lib.twotower_last_error().decode()
    big = rand(gen, 1, 4, CFG.num_attention_heads, CFG.head_dim)
    long_cache = rand(gen, 1, 4100, CFG.num_key_value_heads, CFG.head_dim)
    code, got = launch_library(library, "BlockAttention", [big, kv, kv, long_cache, long_cache, inputs[5]],
                               [torch.empty_like(big)], [CFG.num_attention_heads, CFG.num_key_value_heads,
                                                         CFG.head_dim, 1], workspace_bytes=64)
    assert code == -6 and got == []  # split attention needs its partials' scratch


def test_misaligned_arguments_take_the_row_compiled_without_divisibility_promises(library):
    """Aligned pointers and the config's widths run the row compiled with Triton's divisibility
    hints (vectorised loads); a pointer 2 bytes off 16 runs the row compiled without them."""
    lib, driver = library
    gen = torch.Generator().manual_seed(8)
    x = rand(gen, 3, CFG.hidden_size, dtype=torch.bfloat16)
    ins, outs = _args([x], INPUTS), _args([torch.empty_like(x)], OUTPUTS)
    rows = []
    for shift in (0, 2):
        ins[0].data = INPUTS + shift
        driver.fake_reset()
        assert lib.twotower_launch(b"Relu2", ins, 1, outs, 1, None, 0, WORKSPACE, 0, 0x51) == 0
        (key, _, _, params), = recorded_launches(lib, driver)
        assert params[0] == INPUTS + shift
        rows.append(next(r for r in lib.rows if r["key"] == key and all(params[a] % 16 == 0 for a in r["divisible"])))
    assert rows[0]["divisible"] == [0, 1, 2] and rows[1]["divisible"] == []  # x, out, n; then nothing


def test_each_cuda_context_loads_its_own_modules(library):
    """Two GPUs in one process: the second context loads the cubins again; launches after that
    load nothing more."""
    lib, driver = library
    gen = torch.Generator().manual_seed(7)
    x = rand(gen, 2, CFG.hidden_size)
    args = ("Relu2", [x], [torch.empty_like(x)], [])
    launch_library(library, *args)
    before = driver.fake_num_modules()
    launch_library(library, *args)
    assert driver.fake_num_modules() == before
    driver.fake_set_context(ctypes.c_size_t(0x2000))
    try:
        launch_library(library, *args)
        assert driver.fake_num_modules() == before + 1
    finally:
        driver.fake_set_context(ctypes.c_size_t(0x1000))


def test_cmake_builds_the_kernel_library_from_the_generated_sources(generated, tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    build = tmp_path / "build"
    _build(["cmake", "-S", ROOT / "trtllm_twotower" / "plugins", "-B", build, f"-DTWOTOWER_AOT_DIR={generated}",
            "-DTWOTOWER_BUILD_TRT_PLUGINS=OFF"])
    _build(["cmake", "--build", build, "-j2"])
    exported = subprocess.run(["nm", "-D", "--defined-only", str(build / "libtwotower_ops.so")], capture_output=True,
                              text=True, check=True).stdout
    for symbol in ("twotower_launch", "twotower_workspace_bytes", "twotower_error_string", "twotower_last_error",
                   "twotower_variant_count"):
        assert f" T {symbol}" in exported, symbol
    # without the generated kernels, configuring fails with one message saying how to make them
    missing = subprocess.run(["cmake", "-S", str(ROOT / "trtllm_twotower" / "plugins"), "-B", str(tmp_path / "b2"),
                              f"-DTWOTOWER_AOT_DIR={tmp_path / 'nowhere'}"], capture_output=True, text=True)
    assert missing.returncode != 0 and "python -m trtllm_twotower.plugins.aot" in missing.stderr


def _tensorrt_include() -> Path | None:
    for candidate in (os.environ.get("TENSORRT_INCLUDE_DIR"), "/usr/include/x86_64-linux-gnu", "/usr/include"):
        if candidate and (Path(candidate) / "NvInferRuntime.h").is_file():
            return Path(candidate)
    return None


def test_plugins_compile_against_the_tensorrt_headers(generated):
    """The IPluginV3 plugins (plugins.cpp) against TensorRT's headers, warnings as errors. TensorRT
    cannot be installed here: set TENSORRT_INCLUDE_DIR to the include/ of NVIDIA/TensorRT's
    release/10.13 branch (what TensorRT-LLM 1.2 pins) to run it."""
    include = _tensorrt_include()
    if include is None:
        pytest.skip("TensorRT headers not found (set TENSORRT_INCLUDE_DIR to TensorRT 10.13's include/)")
    _build(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-isystem", include,
            f"-I{CUDA_INCLUDE}", f"-I{CSRC}", f"-I{generated}", CSRC / "plugins.cpp"])


def test_plugin_table_is_the_onnx_node_table(generated):
    """Every ONNX node is a plugin of the library, with the node's attributes as its fields, and
    every op the library launches is one of them."""
    from trtllm_twotower.onnx_nodes import NODES

    header = (generated / "plugin_nodes.h").read_text()
    for node in NODES.values():
        fields = ", ".join(f'"{name}"' for name, _ in node.attributes) or "0"
        assert f'{{"{node.op_type}", "{node.op_type.removeprefix("TwoTower")}", ' in header
        assert f"{{{fields}}}}}" in header.split(node.op_type)[1].splitlines()[0]
    ops = {line.split('"')[1] for line in (CSRC / "triton_ops.cpp").read_text().splitlines()
           if "if (op == \"" in line}
    assert ops == {node.op_type.removeprefix("TwoTower") for node in NODES.values()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_aot_kernels_on_the_gpu_equal_the_jit_kernels(generated):
    """On a GPU: each op through the AOT library (the plugins' path) gives the Triton JIT kernels'
    (the torch path's) outputs bit for bit: the same kernels, compiled ahead of time."""
    ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    lib = bind(ctypes.CDLL(str(build_ops(generated, "libtwotower_ops_cuda.so", []))), generated)
    cuda = torch.device("cuda")
    gen = torch.Generator().manual_seed(11)
    D, H, KV, P = CFG.hidden_size, CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    E, I, k = CFG.n_routed_experts, CFG.moe_intermediate_size, CFG.num_experts_per_tok
    MH, MP, G, C, W = CFG.mamba_num_heads, CFG.mamba_head_dim, CFG.n_groups, CFG.conv_dim, CFG.conv_kernel
    f32 = torch.float32
    for dtype in DTYPES:
        def r(*shape, dtype=dtype):
            return rand(gen, *shape, dtype=dtype).to(cuda)

        B, L, S = 2, 16, 1100
        x = r(B, L, D)
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(B * L)]).to(cuda)
        lens = torch.tensor([700, 1084], dtype=torch.int32, device=cuda)
        cases = [
            ("RmsNorm", lambda a: norms.rms_norm(*a, 1e-5), [x, r(D)], [1e-5]),
            ("ModulatedRmsNorm", lambda a: norms.rms_norm(a[0], a[1], 1e-5, a[2], a[3], False),
             [x, r(D), r(3, D), r(B, 3 * D)], [1e-5, 0]),
            ("GatedResidual", lambda a: norms.gated_residual(*a), [x, r(B, L, D), r(3, D), r(B, 3 * D)], []),
            ("Relu2", lambda a: moe.relu2(*a), [x], []),
            ("MoeRoute", lambda a: moe.moe_route(*a, k, True, 2.5), [x.reshape(-1, D), r(E, D), r(E, dtype=torch.float32)],
             [k, 1, 2.5]),
            ("MoeExperts", lambda a: moe.moe_experts(*a),
             [x.reshape(-1, D), ids, torch.rand(B * L, k, generator=gen).to(cuda), r(E, I, D), r(E, D, I),
              r(B * L, D)], []),
            ("BlockAttention", lambda a: attention.block_attention(*a, S - L, True, False),
             [r(B, L, H, P), r(B, L, KV, P), r(B, L, KV, P), r(B, S, KV, P), r(B, S, KV, P), lens], [H, KV, P, 1]),
            ("SeededMambaScan", lambda a: mamba.seeded_mamba_scan(*a, G, MP, True),
             [r(B, L, C), r(B, L, MH), r(C, W), r(C), r(MH, dtype=f32), r(MH, dtype=f32), r(MH, dtype=f32), r(B, C, W),
              r(B, MH, MP, CFG.ssm_state_size, dtype=f32)], [G, MP, 1]),
        ]
        for op, jit, inputs, attributes in cases:
            want = jit(inputs)
            want = list(want) if isinstance(want, tuple) else [want]
            got = [torch.empty_like(w) for w in want]
            workspace_bytes = lib.twotower_workspace_bytes(op.encode(), _cuda_args(inputs), len(inputs),
                                                           (ctypes.c_double * 4)(*attributes), len(attributes))
            workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=cuda)
            code = lib.twotower_launch(op.encode(), _cuda_args(inputs), len(inputs), _cuda_args(got), len(got),
                                       (ctypes.c_double * 4)(*attributes), len(attributes), workspace.data_ptr(),
                                       workspace_bytes, torch.cuda.current_stream().cuda_stream)
            assert code == 0, lib.twotower_last_error().decode()
            torch.cuda.synchronize()
            for g, w in zip(got, want):
                assert torch.equal(g, w), (op, dtype)


def _cuda_args(tensors):
    array = _args(tensors, 0)
    for i, t in enumerate(tensors):
        array[i].data = t.data_ptr()
    return array


def test_the_plugin_library_refuses_another_models_config(generated, all_kinds_dir):
    """Its kernels are compiled per config: engines of another model are refused before any build,
    with one error saying how to rebuild."""
    from trtllm_twotower.plugins.plugin_library import PluginLibraryError, check_config

    manifest = check_config(CFG, "bfloat16", path=generated / "manifest.json")
    assert manifest["arch"] == 90 and len({v["key"] for v in manifest["variants"]}) > 20
    with pytest.raises(PluginLibraryError, match="compiled for another model config .*plugins/build.sh CONFIG"):
        check_config(load_config(all_kinds_dir), path=generated / "manifest.json")
    with pytest.raises(PluginLibraryError, match="no float16 kernels"):
        check_config(CFG, "float16", path=generated / "manifest.json")
    with pytest.raises(PluginLibraryError, match="not found: build the plugin library"):
        check_config(CFG, path=generated / "nowhere.json")


# ---- the plugins under a TensorRT stand-in ----------------------------------------------------------
TRT_TYPES = {torch.float32: 0, torch.float16: 1, torch.int32: 3, torch.bfloat16: 7, torch.int64: 8}


@pytest.fixture(scope="module")
def plugin_harness(generated, library):
    """plugins.cpp + the kernels' C ABI + tests/fake_tensorrt/plugin_harness.cpp (TensorRT's
    registry, expression builder and build/run calls), over the recording driver."""
    include = _tensorrt_include()
    if include is None:
        pytest.skip("TensorRT headers not found (set TENSORRT_INCLUDE_DIR to TensorRT 10.13's include/)")
    fake = generated.parent / "libfakecuda.so"  # built by ``library``: the same driver object
    harness = generated.parent / "libplugin_harness.so"
    _build(["g++", "-O1", "-shared", "-fPIC", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-isystem", include,
            f"-I{CSRC}", f"-I{generated}", f"-I{CUDA_INCLUDE}", CSRC / "plugins.cpp", CSRC / "triton_launch.cpp",
            CSRC / "triton_ops.cpp", ROOT / "tests" / "fake_tensorrt" / "plugin_harness.cpp", generated / "variants.o",
            "-o", harness, f"-L{fake.parent}", "-lfakecuda", f"-Wl,-rpath,{fake.parent}"])
    lib = bind(ctypes.CDLL(str(harness), mode=os.RTLD_DEEPBIND), generated)
    lib.harness_creator.restype = ctypes.c_char_p
    return lib, library[1]


def node_cases(dtype, gen):
    """(node, Python launcher, inputs, attributes in the node's order) for every ONNX node."""
    D, H, KV, P = CFG.hidden_size, CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    E, I, k = CFG.n_routed_experts, CFG.moe_intermediate_size, CFG.num_experts_per_tok
    MH, MP, G, C, W = CFG.mamba_num_heads, CFG.mamba_head_dim, CFG.n_groups, CFG.conv_dim, CFG.conv_kernel
    B, L, S, f32 = 2, 16, 1500, torch.float32
    n = B * L

    def r(*shape, dtype=dtype):
        return rand(gen, *shape, dtype=dtype)

    x = r(B, L, D)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(n)])
    scan_in = [r(B, L, C), r(B, L, MH), r(C, W), r(C), r(MH, dtype=f32), r(MH, dtype=f32), r(MH, dtype=f32),
               r(B, C, W), r(B, MH, MP, CFG.ssm_state_size, dtype=f32)]
    return [
        ("rms_norm", lambda *a: norms.rms_norm(*a, 1e-5), [x, r(D)], [1e-5]),
        ("modulated_rms_norm", lambda x, w, t, m: norms.rms_norm(x, w, 1e-5, t, m, True),
         [x, r(D), r(3, D), r(B, 3 * D)], [1e-5, 1]),
        ("gated_residual", norms.gated_residual, [x, r(B, L, D), r(3, D), r(B, 3 * D)], []),
        ("gated_rms_norm", lambda *a: norms.gated_rms_norm(*a, G, 1e-5),
         [r(B, L, CFG.d_inner), r(B, L, CFG.d_inner), r(CFG.d_inner)], [G, 1e-5]),
        ("relu2", moe.relu2, [r(n, CFG.moe_shared_expert_intermediate_size)], []),
        ("moe_route", lambda *a: moe.moe_route(*a, k, True, 2.5), [r(n, D), r(E, D), r(E, dtype=f32)], [k, 1, 2.5]),
        ("moe_experts", moe.moe_experts, [r(n, D), ids, torch.rand(n, k, generator=gen), r(E, I, D), r(E, D, I),
                                          r(n, D)], []),
        ("block_attention", lambda *a: attention.block_attention(*a, S - L, False, False),
         [r(B, L, H, P), r(B, L, KV, P), r(B, L, KV, P), r(B, S, KV, P), r(B, S, KV, P),
          torch.tensor([S - L, 3], dtype=torch.int32)], [H, KV, P, 0]),
        ("seeded_mamba_scan", lambda *a: mamba.seeded_mamba_scan(*a, G, MP, True), scan_in, [G, MP, 1]),
        ("seeded_mamba_scan", lambda *a: mamba.seeded_mamba_scan(*a, G, MP, False), scan_in, [G, MP, 0]),
    ]


def harness_run(harness, node, inputs, attributes, expected_outputs):
    lib, driver = harness
    nf, ni, no = len(node.attributes), len(inputs), len(expected_outputs)
    names = (ctypes.c_char_p * max(nf, 1))(*[name.encode() for name, _ in node.attributes])
    is_float = (ctypes.c_int * max(nf, 1))(*[kind == "float" for _, kind in node.attributes])
    values = (ctypes.c_double * max(nf, 1))(*attributes)
    in_types = (ctypes.c_int * ni)(*[TRT_TYPES[t.dtype] for t in inputs])
    in_ndims = (ctypes.c_int * ni)(*[t.dim() for t in inputs])
    in_dims = (ctypes.c_int64 * (8 * ni))()
    for i, t in enumerate(inputs):
        for d, size in enumerate(t.shape):
            in_dims[8 * i + d] = size
    in_ptrs = (ctypes.c_ulonglong * ni)(*[0 if t.numel() == 0 else INPUTS + i * REGION for i, t in enumerate(inputs)])
    out_ptrs = (ctypes.c_ulonglong * 8)(*[0 if t.numel() == 0 else OUTPUTS + j * REGION
                                         for j, t in enumerate(expected_outputs)])
    num_out, out_types, out_ndims, out_dims = ctypes.c_int(), (ctypes.c_int * 8)(), (ctypes.c_int * 8)(), (ctypes.c_int64 * 64)()
    workspace_bytes, bad = ctypes.c_ulonglong(), ctypes.c_int(-1)
    driver.fake_reset()
    code = lib.harness_run(node.op_type.encode(), nf, names, is_float, values, ni, in_types, in_ndims, in_dims, in_ptrs,
                           ctypes.byref(num_out), out_types, out_ndims, out_dims, out_ptrs, ctypes.c_ulonglong(WORKSPACE),
                           ctypes.byref(workspace_bytes), ctypes.byref(bad))
    assert code == 0, (node.op_type, code, bad.value, lib.twotower_last_error().decode())
    assert num_out.value == no, node.op_type
    shapes = [tuple(out_dims[8 * j: 8 * j + out_ndims[j]]) for j in range(no)]
    return [out_types[j] for j in range(no)], shapes, workspace_bytes.value, recorded_launches(lib, driver)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plugins_under_a_tensorrt_stand_in_launch_as_the_python_launchers(plugin_harness, dtype):
    """Each node as TensorRT drives its plugin (ONNX-parser fields, shapes through the expression
    builder, formats, workspace, serialised and recreated, enqueue): the output types and shapes
    are the torch ops', and the launches are the Python launcher's."""
    from trtllm_twotower.onnx_nodes import NODES

    lib = plugin_harness[0]
    ns = ctypes.c_char_p()
    registered = {(lib.harness_creator(i, ctypes.byref(ns)).decode(), ns.value.decode())
                  for i in range(lib.harness_num_creators())}
    assert registered == {(node.op_type, "twotower") for node in NODES.values()}
    gen = torch.Generator().manual_seed(21)
    for name, launcher, inputs, attributes in node_cases(dtype, gen):
        expected, outputs = expected_launches(launcher, inputs, _outputs)
        types, shapes, workspace, launches = harness_run(plugin_harness, NODES[name], inputs, attributes, outputs)
        assert types == [TRT_TYPES[t.dtype] for t in outputs], name
        assert shapes == [tuple(t.shape) if t.numel() else (0,) for t in outputs], name
        check_launches(launches, expected)
        if name == "block_attention":
            assert workspace > 0 and len(launches) == 2  # a long cache: split, with its partials in the workspace
