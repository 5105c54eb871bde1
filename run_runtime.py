#!/usr/bin/env python3
"""Generate with Nemotron-Labs-TwoTower: mask diffusion, speculative (the exact AR output from
drafted blocks), mock-AR or AR.

With no arguments: mask diffusion on the built-in demo model, printing the text as blocks commit.
``--json`` makes the last line of stdout one JSON object. A checkpoint without tokenizer files
takes ``--prompt-ids`` and prints token ids.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="HF checkpoint dir (TwoTower or Nano); default: the demo")
    p.add_argument("--backend", choices=["torch", "trt", "onnx"], default=None,
                   help="default: trt with --engine-dir, else torch; onnx runs the build_engine.py --onnx graphs "
                        "in --engine-dir under ONNX Runtime (CPU, --dtype float32)")
    p.add_argument("--engine-dir", default=None, help="built engines (build_engine.py output), or the exported ONNX "
                   "graphs with --backend onnx")
    p.add_argument("--mode", choices=["diffusion", "speculative", "mock-ar", "ar"], default="diffusion")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=None, help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", default=None, help="comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps-per-block", type=int, default=16)
    p.add_argument("--confidence-threshold", type=float, default=0.8)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-token-id", type=int, default=None, help="default: the checkpoint's (3)")
    p.add_argument("--eos-token-id", type=int, default=-1, help="default: the checkpoint's; -2 disables EOS stops")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--context-device", default=None, help="default: cuda:0, or cpu without a GPU")
    p.add_argument("--denoiser-device", default=None, help="default: cuda:1 with two GPUs, else the context device")
    p.add_argument("--prefix-cache-bytes", type=int, default=None,
                   help="bytes of prompt-prefix context states kept for reuse (default: what the running rows leave "
                   "of the memory budget; 0: off)")
    p.add_argument("--stream", action="store_true", help="print each committed block as it arrives (default when "
                   "neither --json nor --no-stream is given)")
    p.add_argument("--no-stream", action="store_true", help="print only the final text")
    p.add_argument("--json", action="store_true", help="last line of stdout: one JSON object with the results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from trtllm_twotower.runtime import TwoTowerRuntime

    if args.prompt_ids:
        try:
            prompts = [[int(t) for t in s.split(",") if t.strip()] for s in args.prompt_ids]
        except ValueError:
            print(f"error: --prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}", file=sys.stderr)
            return 2
    else:
        prompts = args.prompt or ["Return a new list of"]
    stream = args.stream or not (args.json or args.no_stream)
    try:
        runtime = TwoTowerRuntime.from_checkpoint(
            args.checkpoint, backend=args.backend or ("trt" if args.engine_dir else "torch"), dtype=args.dtype,
            context_device=args.context_device, denoiser_device=args.denoiser_device, engine_dir=args.engine_dir,
            prefix_cache_bytes=args.prefix_cache_bytes)

        echo = [len(prompts) == 1 and isinstance(prompts[0], str)]  # one text prompt: print it, then its continuation

        def on_block(event) -> None:
            if echo[0] and event.text is not None:
                print(prompts[0], end="")
                echo[0] = False
            prefix = f"[{event.row}] " if len(prompts) > 1 else ""
            piece = event.text if event.text is not None else " ".join(map(str, event.token_ids)) + " "
            print(f"{prefix}{piece}", end="" if len(prompts) == 1 else "\n", flush=True)

        result = runtime.generate(
            prompts, max_new_tokens=args.max_new_tokens, mode=args.mode, block_size=args.block_size,
            steps_per_block=args.steps_per_block, confidence_threshold=args.confidence_threshold,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            eos_token_id=None if args.eos_token_id == -2 else args.eos_token_id,
            mask_token_id=args.mask_token_id, on_block=on_block if stream else None)
    except ValueError as err:  # bad arguments, config or checkpoint: one clear line
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if stream:
        print()
    elif not args.json:
        for text, ids in zip(result.text or [None] * len(prompts), result.output_ids):
            print(text if text is not None else " ".join(map(str, ids)))
    print(f"mode={args.mode} nfe={result.nfe} tokens/step={result.tokens_per_step:.2f} "
          f"forwards/token={result.stats['forwards_per_token']:.2f} seconds={result.seconds:.3f}", file=sys.stderr)
    if args.json:
        print(json.dumps({"output_ids": result.output_ids, "text": result.text, "nfe": result.nfe,
                          "nfe_per_row": result.nfe_per_row, "tokens_per_step": result.tokens_per_step,
                          "seconds": result.seconds, "mode": args.mode, "stats": result.stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
