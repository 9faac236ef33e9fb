"""Vocab-parallel cross entropy, checked against the single-process loss.

Run on CPU with the gloo backend:

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Every rank builds the same random hidden states, classifier and targets (same seed), keeps its
contiguous slice of the classifier's rows (the slices may differ in size), and computes

1. ``vocab_parallel_linear_cross_entropy(hidden, classifier_shard, target)``: chunked over tokens,
   never holding the logits of all tokens;
2. ``vocab_parallel_cross_entropy(hidden @ classifier_shard.T, target)``: from logit shards;
3. the reference ``F.cross_entropy(F.linear(hidden, classifier), target)`` on the full classifier.

Rank 0 prints the three losses and the largest gradient difference over all ranks (w.r.t. the
hidden states, the classifier shards and the logit shards). The exit status is 1 if they differ
by more than 1e-9 (float64).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

from crossent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy


def run(tokens: int = 96, hidden_size: int = 32, vocab: int = 1001, seed: int = 0) -> float:
    """Compare the vocab-parallel losses with the single-process one; return the max difference.

    Needs an initialized process group; every rank must call it with the same arguments.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    options = dict(label_smoothing=0.1, ignore_index=-100, z_loss=1e-3)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=gen, dtype=torch.float64)
    classifier = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 0.3
    target = torch.randint(vocab, (tokens,), generator=gen)
    target[::7] = -100  # some padding tokens

    # This rank's rows: torch.tensor_split gives uneven, contiguous slices in rank order.
    sizes = [len(part) for part in torch.tensor_split(torch.arange(vocab), world)]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]

    # 1. Fused linear + cross entropy, classifier sharded by vocabulary rows.
    hidden_1 = hidden.clone().requires_grad_()
    shard_1 = classifier[lo:hi].clone().requires_grad_()
    loss_1 = vocab_parallel_linear_cross_entropy(hidden_1, shard_1, target, **options)
    loss_1.backward()

    # 2. Cross entropy on logit shards.
    logits_shard = (hidden @ classifier[lo:hi].T).requires_grad_()
    loss_2 = vocab_parallel_cross_entropy(logits_shard, target, **options)
    loss_2.backward()

    # 3. Reference: the full classifier on one process (z-loss added by hand).
    hidden_ref = hidden.clone().requires_grad_()
    classifier_ref = classifier.clone().requires_grad_()
    logits = F.linear(hidden_ref, classifier_ref)
    logits.retain_grad()
    kept = target != -100
    ce = F.cross_entropy(logits, target, label_smoothing=0.1, ignore_index=-100)
    z_term = options["z_loss"] * logits.logsumexp(dim=1)[kept].square().sum() / kept.sum()
    loss_ref = ce + z_term
    loss_ref.backward()

    def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([(a - b).detach().abs().flatten(), a.new_zeros(1)]).max()  # 0 if empty

    diffs = torch.stack(
        [
            max_abs_diff(loss_1, loss_ref),
            max_abs_diff(loss_2, loss_ref),
            max_abs_diff(hidden_1.grad, hidden_ref.grad),
            max_abs_diff(shard_1.grad, classifier_ref.grad[lo:hi]),
            max_abs_diff(logits_shard.grad, logits.grad[:, lo:hi]),
        ]
    )
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"world size {world}, N={tokens}, D={hidden_size}, V={vocab} (shard sizes {sizes})")
        print(f"vocab_parallel_linear_cross_entropy: {loss_1.item():.12f}")
        print(f"vocab_parallel_cross_entropy:        {loss_2.item():.12f}")
        print(f"single-process reference:            {loss_ref.item():.12f}")
        print(f"max |loss difference|: {diffs[:2].max().item():.3e}")
        print(f"max |grad difference|: {diffs[2:].max().item():.3e}")
    return float(diffs.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=1001)
    args = parser.parse_args()
    dist.init_process_group("gloo")  # rank, world size and rendezvous from torchrun's env
    try:
        worst = run(args.tokens, args.hidden_size, args.vocab)
    finally:
        dist.destroy_process_group()
    raise SystemExit(0 if worst <= 1e-9 else 1)


if __name__ == "__main__":
    main()
