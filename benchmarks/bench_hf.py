"""A transformers training step, patched by crossent vs unpatched: peak memory and step time.

A small randomly initialised Llama (2 layers, hidden 256, untied head) with a Llama-3-sized
vocabulary (128256) on one sequence of 2048 tokens, float32 on CPU: one training step is
``model(input_ids, labels=labels).loss.backward()``. Unpatched, transformers builds the 2048 ×
128256 logits (1 GiB in float32), their log-softmax and their gradient;
``crossent.integrations.transformers.apply(model)`` computes the same loss from the hidden
states in chunks.

Memory: each variant runs in a fresh subprocess; peak extra = the RSS high-water mark during
the first full step (``VmHWM``, reset just before it) minus the resident set size before it
(model, inputs and libraries loaded; gradients, which both variants must produce, count).
Time: the median of the later steps, the variants' subprocesses alternated round by round so
that the noise of a shared machine hits both alike.

Usage::

    python benchmarks/bench_hf.py                  # vocab 128256, sequence 2048
    python benchmarks/bench_hf.py --quick          # small shapes, seconds
    python benchmarks/bench_hf.py --markdown out.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

from _harness import machine, peak_extra_bytes

FULL = {"vocab": 128256, "seq": 2048, "hidden": 256, "layers": 2, "steps": 2, "rounds": 2}
QUICK = {"vocab": 8000, "seq": 256, "hidden": 64, "layers": 2, "steps": 2, "rounds": 1}
VARIANTS = ("transformers", "transformers + crossent")


def worker(variant: str, shape: dict[str, int]) -> dict[str, object]:
    """In a fresh process: the peak extra memory of the first step, then the later steps' times."""
    import torch
    import transformers

    from crossent.integrations import transformers as crossent_hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=4 * shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=shape["seq"],
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config).train()
    if variant == "transformers + crossent":
        crossent_hf.apply(model)
    input_ids = torch.randint(0, shape["vocab"], (1, shape["seq"]))

    def step(ids: torch.Tensor) -> float:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item()

    step(input_ids[:, :16])  # warm the libraries on a short sequence
    model.zero_grad(set_to_none=True)
    losses = []
    extra = peak_extra_bytes(lambda: losses.append(step(input_ids)))
    loss = losses[0]
    times = []
    for _ in range(shape["steps"]):
        start = time.perf_counter()
        step(input_ids)
        times.append(time.perf_counter() - start)
    return {"extra_mib": extra / 2**20, "times": times, "loss": loss}


def run_worker(variant: str, shape: dict[str, int]) -> dict[str, object]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([variant, shape])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, seconds")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, shape = json.loads(args.worker)
        print(json.dumps(worker(variant, shape)))
        return

    import torch
    import transformers

    shape = QUICK if args.quick else FULL
    results: dict[str, dict[str, list]] = {
        v: {"extra": [], "times": [], "loss": []} for v in VARIANTS
    }
    for round_ in range(shape["rounds"]):
        for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
            out = run_worker(variant, shape)
            results[variant]["extra"].append(out["extra_mib"])
            results[variant]["times"].extend(out["times"])
            results[variant]["loss"].append(out["loss"])
            print(f"  {variant}: {out}", file=sys.stderr)

    logits_mib = shape["seq"] * shape["vocab"] * 4 / 2**20
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [
        f"Llama, {shape['layers']} layers, hidden {shape['hidden']}, vocabulary {shape['vocab']}, "
        f"1 × {shape['seq']} tokens, float32, one training step (forward + backward); "
        f"the logits alone are {logits_mib:.0f} MiB. {machine()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {date}.",
        "",
        "| variant | peak extra memory (MiB) | step time (s) | loss |",
        "| --- | ---: | ---: | ---: |",
    ]
    for variant in VARIANTS:
        r = results[variant]
        lines.append(
            f"| {variant} | {min(r['extra']):.0f} | {statistics.median(r['times']):.2f} | "
            f"{r['loss'][0]:.6f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
