"""Fine-tune a small Hugging Face Llama with ``Trainer``, with and without crossent.

Everything is local: a randomly initialised Llama (vocabulary 32000, as Llama 2) learns
Python's own documentation text (the Zen of Python and a few module docstrings), tokenised as
UTF-8 bytes, on the CPU. Each run happens in a fresh subprocess, so that its peak memory is
its own; the two runs print the same losses, and the crossent one needs less memory because
``crossent.integrations.transformers.apply(model)`` never builds the (batch × sequence ×
32000) logits.

Usage::

    pip install "crossent[transformers]" accelerate    # or: pip install -r requirements-dev.txt
    python examples/hf_finetune.py                      # 12 steps each, a few minutes on 2 cores
    python examples/hf_finetune.py --steps 5 --seq 128  # quicker
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile


def corpus() -> str:
    """Text that ships with Python."""
    import argparse as a
    import collections
    import functools
    import json as j

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    zen = codecs.decode(this.s, "rot13")  # kept ROT13-encoded in the module
    return "\n\n".join([zen, *(m.__doc__ or "" for m in (a, collections, functools, j))])


def train(use_crossent: bool, steps: int, seq: int, batch: int) -> dict[str, object]:
    """One Trainer run in this process; returns its logged losses and peak memory."""
    import torch
    import transformers

    from crossent.integrations import transformers as crossent_hf

    data = torch.tensor(list(corpus().encode("utf-8")), dtype=torch.long) + 3  # 0-2: specials
    n = (len(data) - 1) // seq
    examples = [{"input_ids": data[i * seq : (i + 1) * seq]} for i in range(n)]
    for example in examples:
        example["labels"] = example["input_ids"].clone()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config)
    if use_crossent:
        crossent_hf.apply(model)  # the one line

    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=2,
        max_steps=steps,
        learning_rate=3e-3,
        logging_steps=max(1, steps // 6),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident memory (Linux): count the training only
    trainer.train()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    return {"losses": losses, "peak_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--run", choices=["transformers", "crossent"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # the subprocess
        result = train(args.run == "crossent", args.steps, args.seq, args.batch)
        print("RESULT " + json.dumps(result))
        return

    results = {}
    for run in ("transformers", "crossent"):
        print(f"--- Trainer, {'with' if run == 'crossent' else 'without'} crossent", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--run", run]
        cmd += ["--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch)]
        # stderr (the Trainer's progress bar) goes straight to the terminal.
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
        results[run] = json.loads(line[len("RESULT ") :])

    print("\nstep | loss, transformers | loss, transformers + crossent")
    for (step, plain), (_, fused) in zip(
        results["transformers"]["losses"], results["crossent"]["losses"], strict=True
    ):
        print(f"{step:4d} | {plain:18.4f} | {fused:.4f}")
    print(
        f"peak memory while training: transformers {results['transformers']['peak_mib']:.0f} "
        f"MiB, transformers + crossent {results['crossent']['peak_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
