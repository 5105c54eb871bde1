"""Dry run of the real model on fake CUDA tensors: every step the runtime issues, no GPU needed.

``FakeTensorMode`` makes ``device="cuda"`` tensors on a CPU-only torch: they carry shapes, dtypes
and devices but no memory, so both towers at full size (52 layers, 128 experts, 131k vocab) take
each step through the same executor (``TorchExecutor``), sampler and op code a GPU run takes, with
the Triton kernels as their custom ops' fake implementations. Host-side tensors (the state's
lengths, settings) stay real, as on a GPU run. Per step it records:
- kernel launches: every aten op that launches work on the device (views and allocations
  excluded), each custom op counted as the kernels it launches (``custom_ops.launches``), and
  host-to-device uploads; the total, per layer, and per layer kind (measured as the difference
  between a pattern of two layers of that kind and one);
- host reads: any value read back from the device inside a step (``.item()``, ``.tolist()``,
  a copy to the CPU, an op whose output size depends on data) fails that step;
- bytes: weights per tower, state per row.
A step is one executor call plus the sampler work the lanes run with it before their one read
per step (the block-completion flags, or an AR step's tokens): ``denoiser_step`` = the denoiser
forward + ``commit_step``; ``ar_step`` = a 1-token extend + the token choice; ``extend`` = the
context tower over a committed 16-token block; ``speculative_verify`` = the traced extend over a
drafted block + the acceptance rule's device work + the rollback.

    python bench/dry_run.py --json bench/results/dry_run.json [--config bench/real_config.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_towers import git_commit  # noqa: E402
from trtllm_twotower.checkpoint import TWOTOWER, assemble_tower_weights  # noqa: E402
from trtllm_twotower.config import ATTENTION, MAMBA, MLP, MOE, load_config  # noqa: E402
from trtllm_twotower.engine_io import state_bytes_per_row  # noqa: E402
from trtllm_twotower.network import towers  # noqa: E402
from trtllm_twotower.plugins import custom_ops  # noqa: E402
from trtllm_twotower.runtime import sampler  # noqa: E402
from trtllm_twotower.runtime.executor import TorchExecutor  # noqa: E402

DEVICE = torch.device("cuda:0")
LAUNCH_BUDGET_PER_LAYER = 12
# allocations and host-side bookkeeping: no device work
NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
             "lift_fresh", "detach", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "set_"}
# ops whose output size depends on the data: a read back on CUDA
DATA_DEPENDENT = {"nonzero", "unique", "_unique2", "unique_consecutive", "unique_dim", "masked_select", "bincount",
                  "_local_scalar_dense", "argwhere"}


READ_BACKS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy"}  # tensor methods


class AtenIndexing(TorchFunctionMode):
    """``tensor[index]``, ``tensor[index] = value``, ``copy_`` and the read-backs (``item``,
    ``tolist``, ``int()``, ``cpu()``, ...) through aten ops.

    A CPU-only torch cannot run its C++ indexing on fake CUDA tensors (it takes a CUDA device guard,
    which such a build lacks; so do ``copy_`` and the read-backs), but every aten op they would call
    runs on them; this mode does the same with those ops (a read-back becomes the
    ``_local_scalar_dense`` that ``DryRun`` reports): ints select, slices slice, None unsqueezes, ``...`` expands, and
    tensors index as advanced indices (``aten.index`` / ``aten.index_put_``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            view, tensors = _basic_index(args[0], args[1])
            return torch.ops.aten.index.Tensor(view, tensors) if tensors else view
        if func is torch.Tensor.__setitem__:
            view, tensors = _basic_index(args[0], args[1])
            value = args[2]
            if tensors:
                value = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=view.dtype)
                torch.ops.aten.index_put_(view, tensors, value.to(view.device))
            elif isinstance(value, torch.Tensor):
                torch.ops.aten.copy_.default(view, value)
            else:
                view.fill_(value)
            return None
        if func is torch.Tensor.copy_:
            return torch.ops.aten.copy_.default(*args, **(kwargs or {}))
        if getattr(func, "__name__", None) in READ_BACKS and isinstance(args[0], FakeTensor):  # the read itself, for ``DryRun`` to catch
            return torch.ops.aten._local_scalar_dense.default(args[0])
        if func is torch.Tensor.cpu and isinstance(args[0], FakeTensor):
            return torch.ops.aten._to_copy.default(args[0], device=torch.device("cpu"))
        return func(*args, **(kwargs or {}))


def _basic_index(tensor, index):
    """(the view after ints, slices, None and ..., the advanced indices for ``aten.index`` or [])."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        at = next(k for k, i in enumerate(items) if i is Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at:at + 1] = [slice(None)] * (tensor.dim() - used)
    view, dim, advanced = tensor, 0, {}
    for item in items:
        if item is None:
            view = view.unsqueeze(dim)
            dim += 1
        elif isinstance(item, int) or (isinstance(item, torch.Tensor) and item.dim() == 0
                                       and not isinstance(item, FakeTensor) and item.dtype != torch.bool):
            view = view.select(dim, int(item))
        elif isinstance(item, slice):
            start, stop, step = item.start, item.stop, item.step or 1
            view = torch.ops.aten.slice.Tensor(view, dim, start, stop, step)
            dim += 1
        else:  # a tensor (or list) index: one dim, gathered at the end
            advanced[dim] = item if isinstance(item, torch.Tensor) else torch.tensor(item)
            dim += 1
    if not advanced:
        return view, []
    return view, [advanced.get(d) for d in range(max(advanced) + 1)]


class HostReadError(RuntimeError):
    """A step read a value back from the device."""


class DryRun(TorchDispatchMode):
    """Above a ``FakeTensorMode``: host-only ops run for real (the runtime's lengths and settings
    stay real tensors), device ops go on to the fake mode and are counted."""

    def __init__(self, fake_mode: FakeTensorMode):
        super().__init__()
        self.fake_mode = fake_mode
        self.launches: collections.Counter = collections.Counter()
        self.uploads = 0
        self.host_reads: list[str] = []
        self._reads_allowed = False

    def reset(self) -> None:
        self.launches.clear()
        self.uploads = 0
        self.host_reads = []

    @contextlib.contextmanager
    def reads_allowed(self):
        """Record reads without failing: the first read ends the block (its value is unknown)."""
        self._reads_allowed = True
        try:
            yield
        except HostReadError:
            pass
        finally:
            self._reads_allowed = False

    @property
    def total(self) -> int:
        return sum(self.launches.values()) + self.uploads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fake = [t for t in tensors if isinstance(t, FakeTensor)]
        name = func.overloadpacket.__name__
        target = kwargs.get("device")
        if not fake and (target is None or torch.device(target).type == "cpu"):
            if name in ("pin_memory", "_pin_memory", "is_pinned"):  # a host allocation detail: keep the tensor
                return True if name == "is_pinned" else args[0]
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        real = [t for t in tensors if not isinstance(t, FakeTensor)]
        if real:  # host tensors entering device work: as fake tensors (the fake mode would run them for real)
            swap = {id(t): self.fake_mode.from_tensor(t) for t in real}
            args, kwargs = tree_map(lambda a: swap.get(id(a), a) if isinstance(a, torch.Tensor) else a, (args, kwargs))
        if fake and (name in DATA_DEPENDENT or (name in ("_to_copy", "copy_") and _to_host(func, args, kwargs))):
            self.host_reads.append(name)
            raise HostReadError(f"host read inside a step: aten.{name}")
        if func.namespace == "prim":  # metadata (a tensor's device): no device work
            pass
        elif func.namespace == "twotower":
            self.launches[f"twotower.{name}"] += custom_ops.launches(name, args)
        elif name in ("_to_copy", "copy_") and real:
            self.uploads += 1  # a host tensor copied to the device
        elif not func.is_view and name not in NO_LAUNCH:
            self.launches[f"aten.{name}"] += 1
        return func(*args, **kwargs)


def _to_host(func, args, kwargs) -> bool:
    """A copy whose destination is the CPU (from a device tensor)."""
    if func.overloadpacket.__name__ == "copy_":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"


@dataclasses.dataclass
class Step:
    kind: str
    batch: int
    context: int
    tokens: int  # new tokens per row
    launches: int
    launches_per_layer: float
    uploads: int
    host_reads: int
    by_op: dict
    error: str | None = None


def fake_weights(cfg, tower: str, dtype) -> dict:
    return assemble_tower_weights(cfg, tower, TWOTOWER, lambda spec: torch.empty(spec.shape, device=DEVICE), dtype,
                                  DEVICE)


def tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


def state_at(cfg, batch: int, context: int, capacity: int, dtype) -> towers.TowerState:
    """A context state of ``batch`` rows holding ``context`` tokens each (contents unknown: fake)."""
    state = towers.empty_state(cfg, batch, capacity, dtype, DEVICE)
    return dataclasses.replace(state, lengths=torch.full((batch,), context, dtype=torch.long))


class Runner:
    """The steps of one config, each counted by ``DryRun``. ``executor``: by default the real
    executor over fake weights (inside a ``FakeTensorMode``); a GPU test passes one with real ones."""

    def __init__(self, cfg, dtype=torch.bfloat16, executor: TorchExecutor | None = None):
        self.cfg, self.dtype = cfg, dtype
        if executor is None:
            executor = TorchExecutor(cfg, fake_weights(cfg, "context", dtype), fake_weights(cfg, "denoiser", dtype),
                                     dtype, DEVICE, DEVICE, graphs="off")
        self.executor = executor
        self.weight_bytes = {"context": tensor_bytes(executor.ctx_weights),
                             "denoiser": tensor_bytes(executor.den_weights)}

    def steps(self, batch: int, context: int, block: int = 16) -> dict:
        """kind -> (setup, step, new tokens per row): ``setup()`` makes the step's inputs (a state of
        ``batch`` rows holding ``context`` tokens; not counted), ``step(inputs)`` is the step."""
        cfg, ex, dtype = self.cfg, self.executor, self.dtype
        capacity = context + 2 * block
        mask_id = cfg.mask_token_id
        greedy = [0.0] * batch

        def ids(length: int, value: int = 0):
            return torch.full((batch, length), value, dtype=torch.long, device=DEVICE)

        def state():
            return state_at(cfg, batch, context, capacity, dtype)

        def ar_step(s):
            logits, _ = ex.extend(s, ids(1), logits=True, in_place=True)
            sampler.sample_next(logits[:, -1], greedy, [0] * batch, [1.0] * batch, [None] * batch)

        def extend(s):
            ex.extend(s, ids(block), logits=False, in_place=True)

        def denoiser_step(s):
            x = ids(block, mask_id)
            masked = torch.ones((batch, block), dtype=torch.bool, device=DEVICE)
            logits = ex.denoise(s, x, masked.sum(-1).float() / block)
            sampler.commit_step(x, logits, mask_id, torch.zeros(batch, dtype=torch.long, device=DEVICE), [4] * batch,
                                [0.8] * batch, greedy, [None] * batch, return_probs=True, masked=masked)

        def speculative_verify(s):
            # the traced extend over the drafted block and the rollback to the accepted prefix; the
            # acceptance rule between them reads its verdict at the block boundary (``verify_reads``)
            logits, traced = ex.extend(s, ids(block), logits=True, trace=True)
            ex.rollback(traced, torch.full((batch,), block // 2, dtype=torch.long))

        return {"ar_step": (state, ar_step, 1), "extend": (state, extend, block),
                "denoiser_step": (state, denoiser_step, block), "speculative_verify": (state, speculative_verify, block)}

    def verify_reads(self, mode: "DryRun", batch: int, block: int = 16) -> list[str]:
        """The reads of the speculative acceptance rule (``sampler.verify_draft``) at the block
        boundary, with the device work before them: the lane's one read per drafted block."""
        draft = torch.zeros((batch, block), dtype=torch.long, device=DEVICE)
        logits = torch.empty((batch, block, self.cfg.vocab_size), device=DEVICE)
        mode.reset()
        with mode.reads_allowed():
            sampler.verify_draft(draft, torch.zeros_like(draft), None, logits, [0.0] * batch, [0] * batch,
                                 [1.0] * batch, [None] * batch)
        return mode.host_reads

    def prefill(self, length: int):
        """(setup, step, tokens) of a prefill of one ``length``-token prompt (its state allocated inside)."""
        return (lambda: None), (lambda _: self.executor.prefill([[5] * length], length + 32)), length


def count(mode: DryRun, setup, step) -> tuple[int, collections.Counter, int, str | None]:
    inputs = setup()
    mode.reset()
    error = None
    try:
        step(inputs)
    except HostReadError as e:
        error = str(e)
    return mode.total, collections.Counter(mode.launches), mode.uploads, error


def per_kind_launches(cfg, kinds: str, mode: DryRun, batch: int = 1, context: int = 1024) -> dict:
    """Launches of one layer of each kind in each step: a 2-layer pattern minus a 1-layer one
    (norm, mixer and residual of that layer; the embedding, final norm and head cancel out)."""
    out = {}
    for kind in kinds:
        totals = []
        for pattern in (kind, kind * 2):
            runner = Runner(dataclasses.replace(cfg, layer_pattern=pattern))
            totals.append({name: count(mode, setup, step)[0]
                           for name, (setup, step, _) in runner.steps(batch, context).items()})
        out[kind] = {name: totals[1][name] - totals[0][name] for name in totals[0]}
    return out


def dry_run(cfg, batches=(1, 16, 64), contexts=(1024, 8192), prefills=(1024, 8192), log=print) -> dict:
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode = DryRun(fake_mode)
    layers = cfg.num_layers
    results = []
    with fake_mode, mode, AtenIndexing():
        runner = Runner(cfg)
        cases = [("prefill", 1, 0, *runner.prefill(length)) for length in prefills]
        cases += [(kind, batch, context, *case) for batch in batches for context in contexts
                  for kind, case in runner.steps(batch, context).items()]
        for kind, batch, context, setup, step, tokens in cases:
            total, by_op, uploads, error = count(mode, setup, step)
            results.append(Step(kind, batch, context, tokens, total, round(total / layers, 2), uploads,
                                len(mode.host_reads), dict(by_op), error))
            log(f"{kind:18s} batch {batch:3d} context {context:5d} tokens {tokens:5d}: {total} launches "
                f"({total / layers:.1f} per layer){' ' + error if error else ''}")
        verify_reads = runner.verify_reads(mode, batches[0])
        kinds = "".join(k for k in (MAMBA, ATTENTION, MOE, MLP) if k in cfg.layer_pattern)
        by_kind = per_kind_launches(cfg, kinds, mode)
    return {
        "config": {"layers": layers, "pattern": cfg.layer_pattern, "hidden_size": cfg.hidden_size,
                   "experts": cfg.n_routed_experts, "top_k": cfg.num_experts_per_tok, "vocab": cfg.vocab_size},
        "launch_budget_per_layer": LAUNCH_BUDGET_PER_LAYER,
        "weight_bytes": runner.weight_bytes,
        "state_bytes_per_row": {str(c): state_bytes_per_row(cfg, c) for c in contexts},
        "launches_per_layer_by_kind": by_kind,
        "speculative_block_boundary_reads": verify_reads,
        "steps": [dataclasses.asdict(s) for s in results],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "bench" / "real_config.json"))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--contexts", default="1024,8192")
    parser.add_argument("--prefills", default="1024,8192")
    args = parser.parse_args(argv)
    ints = lambda text: tuple(int(v) for v in text.split(",") if v)  # noqa: E731
    start = time.perf_counter()
    cfg = load_config(args.config)
    out = dry_run(cfg, ints(args.batches), ints(args.contexts), ints(args.prefills))
    out.update(commit=git_commit(), date=datetime.date.today().isoformat(), torch=torch.__version__,
               seconds=round(time.perf_counter() - start, 1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    failed = [s for s in out["steps"] if s["error"]]
    over = [s for s in out["steps"] if s["kind"] != "prefill" and s["batch"] == 1
            and s["launches_per_layer"] > LAUNCH_BUDGET_PER_LAYER]
    print(f"{len(out['steps'])} steps, {len(failed)} with host reads, {len(over)} over "
          f"{LAUNCH_BUDGET_PER_LAYER} launches per layer at batch 1 ({out['seconds']} s)")
    return 1 if failed or over else 0


if __name__ == "__main__":
    sys.exit(main())
