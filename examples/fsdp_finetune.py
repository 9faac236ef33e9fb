"""Train a tiny Hugging Face Llama patched with crossent under FSDP2 (``fully_shard``).

Run on CPU with the gloo backend (2 processes)::

    torchrun --nproc-per-node 2 examples/fsdp_finetune.py
    torchrun --nproc-per-node 2 examples/fsdp_finetune.py --steps 20

Every rank builds the same randomly initialised Llama from a config (nothing is downloaded),
then, in this order:

1. ``crossent.integrations.transformers.apply(model)``: the training loss is computed by
   linear cross entropy from the hidden states, without the (batch × sequence × vocabulary)
   logits;
2. ``fully_shard`` on every decoder layer, then on the whole model (as transformers' Trainer
   and accelerate do): the parameters are sharded across the ranks, the output embedding with
   the root. The root's forward gathers it, the crossent loss reads it there, and FSDP
   reduce-scatters its gradient as for any parameter. ``apply`` after ``fully_shard`` works
   the same.

Each rank trains on its own slice of a built-in text (Python's Zen, as bytes); rank 0 prints
the loss of every step, averaged over the ranks.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io

import torch
import torch.distributed as dist


def corpus() -> torch.Tensor:
    """The Zen of Python as byte-level token ids (3 and up; 0-2 are the special tokens)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    text = codecs.decode(this.s, "rot13")  # kept ROT13-encoded in the module
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long) + 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    args = parser.parse_args()

    import transformers
    from torch.distributed.fsdp import fully_shard

    from crossent.integrations import transformers as crossent_hf

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    config = transformers.LlamaConfig(
        vocab_size=259,  # 256 bytes + 3 special tokens
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config).train()

    crossent_hf.apply(model)  # the one line; before or after fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = corpus()
    sequences = data[: len(data) // args.seq * args.seq].view(-1, args.seq)
    gen = torch.Generator().manual_seed(1)  # the same order on every rank
    for step in range(args.steps):
        picked = torch.randint(len(sequences), (world, args.batch), generator=gen)[rank]
        input_ids = sequences[picked]
        out = model(input_ids=input_ids, labels=input_ids)  # loss through crossent
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        if rank == 0:
            print(f"step {step} loss {loss.item() / world:.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
