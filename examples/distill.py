"""Distil a tiny random Llama teacher into a smaller random Llama student on the CPU.

Both models are ``transformers.LlamaForCausalLM`` built from configs (no download): the
teacher has hidden size 256 and 4 layers, the student 128 and 2, sharing a 32000-token
vocabulary. Each step runs the teacher's backbone under ``no_grad``, the student's with
gradients, and takes the generalized JSD between the two output distributions — from the
final hidden states, with ``crossent.integrations.transformers.lm_head_distillation_loss``,
so neither model's (batch × sequence × 32000) logits exist.

For comparison the same steps run with the eager loss (both models' logits, ``log_softmax``,
the mixture and two ``kl_div``, as TRL's ``GKDTrainer.generalized_jsd_loss``). Each run happens
in a fresh subprocess so that its peak resident memory (``VmHWM``) is its own; the two print the
same losses.

Usage::

    pip install "crossent[transformers]"     # or: pip install -r requirements-dev.txt
    python examples/distill.py               # 5 steps each, batch 4 × 256 tokens
    python examples/distill.py --steps 2 --seq 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

VOCAB = 32000


def eager_jsd(student_logits, teacher_logits, labels, beta: float, temperature: float):
    """TRL's generalized JSD on full logits, 'batchmean' over the kept tokens."""
    import torch
    import torch.nn.functional as F

    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        kl_t = F.kl_div(mix, t, reduction="none", log_target=True)
        kl_s = F.kl_div(mix, s, reduction="none", log_target=True)
        jsd = beta * kl_t + (1 - beta) * kl_s
    mask = labels != -100
    return jsd[mask].sum() / mask.sum().clamp_min(1)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def train(use_crossent: bool, steps: int, seq: int, batch: int, beta: float, temperature: float):
    """One run in this process; returns the losses and the peak resident memory."""
    import torch
    import transformers

    from crossent.integrations.transformers import lm_head_distillation_loss

    def llama(hidden: int, layers: int, seed: int):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=max(seq, 128),
            tie_word_embeddings=False,
        )
        return transformers.LlamaForCausalLM(config)

    teacher = llama(256, 4, seed=0).eval()
    student = llama(128, 2, seed=1).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.lm_head.weight.mul_(10.0)  # a random Llama is nearly uniform: give it opinions
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    # One batch of random tokens, seen every step: the student learns to imitate the teacher
    # on it, so the loss goes down within a few steps (the point here is the memory).
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    labels = input_ids.clone()
    labels[:, : seq // 4] = -100  # a prompt without loss
    losses = []
    for _ in range(steps):
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids).last_hidden_state  # (B, T, 256)
        student_hidden = student.model(input_ids).last_hidden_state  # (B, T, 128)
        if use_crossent:
            loss = lm_head_distillation_loss(
                student_hidden, student.lm_head, teacher_hidden, teacher.lm_head, labels,
                beta=beta, temperature=temperature,
            )  # fmt: skip
        else:
            shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
            with torch.no_grad():
                teacher_logits = teacher.lm_head(teacher_hidden)  # (B, T, V)
            student_logits = student.lm_head(student_hidden)  # (B, T, V)
            loss = eager_jsd(student_logits, teacher_logits, shifted, beta, temperature)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "peak_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--worker", choices=("crossent", "eager"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = (args.steps, args.seq, args.batch, args.beta, args.temperature)
    if args.worker:
        print(json.dumps(train(args.worker == "crossent", *options)))
        return 0

    print(
        f"teacher: Llama d=256 × 4 layers, student: Llama d=128 × 2 layers, V={VOCAB}; batch "
        f"{args.batch} × {args.seq} tokens; generalized JSD β={args.beta}, T={args.temperature}"
    )
    results = {}
    for mode in ("crossent", "eager"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, *argv_of(args)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        losses = " ".join(f"{x:.4f}" for x in results[mode]["losses"])
        print(f"{mode:>8}: losses {losses}; peak resident memory {results[mode]['peak_mb']:.0f} MB")
    diff = max(
        abs(a - b)
        for a, b in zip(results["crossent"]["losses"], results["eager"]["losses"], strict=True)
    )
    print(f"largest loss difference: {diff:.2e}")
    return 0


def argv_of(args: argparse.Namespace) -> list[str]:
    return [
        f"--steps={args.steps}",
        f"--seq={args.seq}",
        f"--batch={args.batch}",
        f"--beta={args.beta}",
        f"--temperature={args.temperature}",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
