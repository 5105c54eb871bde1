"""Triton python-backend model: Nemotron-Labs-TwoTower, both towers and the sampler loop.

Decoupled. Requests are validated one by one (a bad request gets one error response; the others
are unaffected), queued, and run by one worker thread that batches the requests that arrived
together with equal settings (each row keeps its own seed, so batching never changes a result).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


# The runtime's names for the inputs that tensorrtllm_backend clients call otherwise.
_INPUT_NAMES = {"max_new_tokens": "max_tokens", "seed": "random_seed"}


class RequestError(ValueError):
    """A request the model cannot serve; the message names the input."""


class _AllCancelled(Exception):
    """Every client of a running batch has gone away."""


def _send(sender, response=None, flags: int = 0) -> None:
    """Send, never raising: a client that vanished must not take the worker thread down with it."""
    try:
        sender.send(response, flags=flags)
    except Exception as err:  # noqa: BLE001 - logged, the other requests go on
        pb_utils.Logger.log_warn(f"twotower: could not send a response ({err})")


class TritonPythonModel:
    """I/O contract (also in config.pbtxt):

    inputs  text_input STRING [1,1] (required); optional: max_tokens INT32, stream BOOL,
            temperature FP32, random_seed UINT64, mode STRING (diffusion | mock-ar | ar),
            block_size INT32, steps_per_block INT32, confidence_threshold FP32 — each [1,1];
            defaults come from the model's parameters.
    outputs text_output STRING [1,-1], nfe INT32 [1,1], tokens_per_step FP32 [1,1].
    stream=false: one response with the whole text and the stats, flagged final.
    stream=true: one response per committed block (per token in AR / mock-AR) carrying the text it
            adds, then one response with the stats (empty text) flagged final.
    Errors: one response carrying the error, flagged final.
    """

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException("twotower: config.pbtxt must set model_transaction_policy { decoupled: true }")
        params = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        root = Path(params.get("project_root") or Path(__file__).resolve().parents[3])
        if str(root) not in sys.path:  # the stub ignores the server's PYTHONPATH
            sys.path.insert(0, str(root))
        from trtllm_twotower.runtime import PreparedRequest, TwoTowerRuntime

        self._merge = PreparedRequest.merge
        self.runtime = TwoTowerRuntime.from_checkpoint(
            params.get("checkpoint_dir") or None, backend=params.get("backend") or "torch",
            dtype=params.get("dtype") or "bfloat16", context_device=params.get("context_device") or None,
            denoiser_device=params.get("denoiser_device") or None, engine_dir=params.get("engine_dir") or None)
        try:
            self.defaults = {
                "max_tokens": int(params.get("max_tokens", 64)), "mode": params.get("mode", "diffusion"),
                "block_size": int(params.get("block_size", 16)), "steps_per_block": int(params.get("steps_per_block", 16)),
                "confidence_threshold": float(params.get("confidence_threshold", 0.8)),
            }
            self.max_batch = int(params.get("max_batch", 8))
        except ValueError as err:
            raise pb_utils.TritonModelException(f"twotower: bad sampler default in config.pbtxt parameters: {err}")
        self.runtime.prepare("check", max_new_tokens=self.defaults["max_tokens"], mode=self.defaults["mode"],
                             block_size=self.defaults["block_size"], steps_per_block=self.defaults["steps_per_block"],
                             confidence_threshold=self.defaults["confidence_threshold"])
        self.jobs: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="twotower-worker", daemon=True)
        self.worker.start()

    # ---- requests -------------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                prepared, stream = self._parse(request)
            except ValueError as err:  # RequestError, or the runtime's own parameter check
                message = str(err)
                for runtime_name, input_name in _INPUT_NAMES.items():
                    if message.startswith(runtime_name + ":"):
                        message = input_name + message[len(runtime_name):]
                _send(sender, pb_utils.InferenceResponse(error=pb_utils.TritonError(f"twotower: {message}")), FINAL)
                continue
            self.jobs.put((prepared, stream, sender))
        return None

    def _input(self, request, name: str, kind):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        value = tensor.as_numpy()
        if value.size != 1:
            raise RequestError(f"{name}: expected one value, got shape {list(value.shape)}")
        value = value.reshape(-1)[0]
        if kind is str:
            return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
        return kind(value)

    def _parse(self, request):
        text = self._input(request, "text_input", str)
        if text is None:
            raise RequestError("text_input: required")
        d = self.defaults
        max_tokens = self._input(request, "max_tokens", int)
        seed = self._input(request, "random_seed", int)
        prepared = self.runtime.prepare(
            [text],
            max_new_tokens=d["max_tokens"] if max_tokens is None else max_tokens,
            mode=self._input(request, "mode", str) or d["mode"],
            block_size=self._or(self._input(request, "block_size", int), d["block_size"]),
            steps_per_block=self._or(self._input(request, "steps_per_block", int), d["steps_per_block"]),
            confidence_threshold=self._or(self._input(request, "confidence_threshold", float), d["confidence_threshold"]),
            temperature=self._or(self._input(request, "temperature", float), 0.0),
            seed=0 if seed is None else seed,
        )
        return prepared, bool(self._input(request, "stream", bool))

    @staticmethod
    def _or(value, default):
        return default if value is None else value

    # ---- the worker ---------------------------------------------------------------------------
    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < self.max_batch:  # take what arrived meanwhile
                try:
                    more = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.jobs.put(None)
                    break
                batch.append(more)
            groups: dict = {}
            for item in batch:
                groups.setdefault(item[0].batch_key, []).append(item)
            for group in groups.values():
                self._run(group)

    def _run(self, group):
        live = [True] * len(group)

        def on_block(event):
            prepared, stream, sender = group[event.row]
            if not live[event.row]:
                return
            if sender.is_cancelled():
                live[event.row] = False
                if not any(live):
                    raise _AllCancelled
                return
            if stream:
                _send(sender, pb_utils.InferenceResponse([_text(event.text)]))

        try:
            result = self.runtime.run(self._merge([g[0] for g in group]), on_block=on_block)
        except _AllCancelled:
            for _, _, sender in group:
                _send(sender, flags=FINAL)
            return
        except Exception as err:  # noqa: BLE001 - every client must hear about a failed batch
            for _, _, sender in group:
                _send(sender, pb_utils.InferenceResponse(error=pb_utils.TritonError(f"twotower: generation failed: {err}")),
                      FINAL)
            return
        for row, (_, stream, sender) in enumerate(group):
            if not live[row]:
                _send(sender, flags=FINAL)
                continue
            tokens = len(result.output_ids[row])
            nfe = result.nfe_per_row[row]
            outputs = [_text("" if stream else result.text[row]),
                       pb_utils.Tensor("nfe", np.array([[nfe]], dtype=np.int32)),
                       pb_utils.Tensor("tokens_per_step", np.array([[tokens / max(1, nfe)]], dtype=np.float32))]
            _send(sender, pb_utils.InferenceResponse(outputs), FINAL)

    def finalize(self):
        self.jobs.put(None)  # in-flight and queued requests finish first
        self.worker.join()


def _text(value: str):
    return pb_utils.Tensor("text_output", np.array([[value.encode("utf-8")]], dtype=np.object_))
