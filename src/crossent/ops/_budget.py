"""Chunk and block sizes: every byte budget and rows-per-chunk formula in one place.

Three mechanisms size their work in rows:

- the blocked eager cross entropy (``crossent.ops.eager``) runs each torch op on a block of
  rows: :func:`block_rows`, from the ``BLOCK_*`` budgets;
- the chunked linear losses (``crossent.ops.chunked``, ``crossent.ops.soft_chunked``) hold one
  chunk of logits (and scratch chunks) at a time: :func:`choose_chunk_rows`, from
  ``ROWS_PER_THREAD``/``HOST_CHUNK_BYTES`` on the host and ``CHUNK_BYTES`` or
  ``SOFT_CHUNK_BYTES`` elsewhere;
- the vocab-parallel losses (``crossent.distributed``) hold a chunk of temporaries per logit:
  :func:`budget_rows` of ``VOCAB_PARALLEL_CHUNK_BYTES``.

The measurements behind each number are in the comments below and in docs/linear.md and
docs/distillation.md.
"""

from __future__ import annotations

import torch

__all__ = [
    "BLOCK_BYTES_PER_THREAD",
    "BLOCK_MAX_BYTES",
    "BLOCK_MIN_BYTES",
    "CHUNK_BYTES",
    "HOST_CHUNK_BYTES",
    "ROWS_PER_THREAD",
    "SOFT_CHUNK_BYTES",
    "VOCAB_PARALLEL_CHUNK_BYTES",
    "block_rows",
    "budget_rows",
    "choose_chunk_rows",
]

# Blocked eager cross entropy: work per parallel region. Each torch op on a block is one
# parallel region, which ends in a barrier: when another process keeps a core busy, every
# barrier waits for the thread that shares that core, so many small blocks turn into many
# stalls (measured at 2048×32000 on 2 busy cores: 1 MB blocks 1.9× torch's time, 32 MB per
# thread 0.6×). Blocks therefore give every thread this many bytes of float32 work, capped so
# that the scratch block stays small beside the N×C gradient; with one thread the block size
# barely matters (2-32 MB within 5%).
BLOCK_BYTES_PER_THREAD = 32 << 20
BLOCK_MIN_BYTES = 1 << 20
BLOCK_MAX_BYTES = 64 << 20

# Chunked linear cross entropy. Each chunk streams the weight (V×D) through two matmuls and the
# float32 weight gradient through a third, whatever its number of rows B, while its matmul work
# grows with B: B sets the arithmetic intensity of those streams. On the host it is sized by
# work per thread, ROWS_PER_THREAD rows for each torch thread (one thread computes half as fast
# as two, so it needs half the rows per weight pass; measured on 2 cores: 256 rows a thread run
# within a few percent of three unchunked matmuls, 64 rows 30% slower, and a busy core or
# bandwidth taken by other processes widens the gap), up to HOST_CHUNK_BYTES of scratch.
# Elsewhere (accelerators, whose chunked path is a fallback) the scratch budget is CHUNK_BYTES.
# The scratch is one chunk of logits (two with softcap); see docs/linear.md.
CHUNK_BYTES = 32 * 1024 * 1024
ROWS_PER_THREAD = 256
HOST_CHUNK_BYTES = 64 * 1024 * 1024

# Soft targets (linear cross entropy with probabilities, distillation): scratch budget of one
# chunk, all (B, V) buffers together: the student's logits and the objective's scratch (one to
# four more). Six times the linear cross entropy budget, so that a distillation chunk has
# 384-512 rows at V=32000 float32: each chunk re-reads both weights and reads and writes the
# (V, D) weight gradient, and on the 2-core CPU 512-row chunks ran 7% faster than 336-row ones
# and 35% faster than 160-row ones (docs/distillation.md).
SOFT_CHUNK_BYTES = 6 * CHUNK_BYTES

# Vocab-parallel losses: the chunk temporaries of every logit of a chunk together.
VOCAB_PARALLEL_CHUNK_BYTES = 256 * 2**20


def block_rows(
    row_bytes: int,
    threads: int,
    *,
    per_thread: int = BLOCK_BYTES_PER_THREAD,
    min_bytes: int = BLOCK_MIN_BYTES,
    max_bytes: int = BLOCK_MAX_BYTES,
) -> int:
    """Rows per block of the blocked eager cross entropy (>= 1).

    A block holds ``per_thread`` bytes of work for each of ``threads`` threads, within
    ``[min_bytes, max_bytes]``: enough work per thread that the barrier closing each op is rare,
    little enough that the scratch block stays small beside the gradient.
    """
    budget = max(min_bytes, min(threads * per_thread, max_bytes))
    return max(1, budget // max(1, row_bytes))


def budget_rows(budget_bytes: int, row_bytes: int) -> int:
    """How many rows of ``row_bytes`` fit ``budget_bytes`` (may be 0; rows of 0 bytes count
    as 1 byte)."""
    return budget_bytes // max(1, row_bytes)


def choose_chunk_rows(
    n_rows: int,
    n_classes: int,
    acc_dtype: torch.dtype,
    *,
    softcap: bool = False,
    chunk_size: int | None = None,
    budget_bytes: int = CHUNK_BYTES,
    threads: int | None = None,
) -> int:
    """Rows per chunk of the chunked linear losses: ``chunk_size`` if given, else from the work
    per thread or a budget.

    A chunk holds ``rows × n_classes`` elements of ``acc_dtype`` (twice that with softcap).
    With ``threads`` (host): ``ROWS_PER_THREAD × threads`` rows, at most as many as fit
    ``HOST_CHUNK_BYTES``; without: as many as fit ``budget_bytes``. The result is clamped to
    ``[1, max(n_rows, 1)]`` and, above 16 rows, rounded down to a multiple of 16 (whole
    SIMD/matmul register blocks).

    Args:
        n_rows: number of tokens to process.
        n_classes: V, the number of classes (times the number of buffers for soft targets).
        acc_dtype: dtype of the chunk buffer.
        softcap: whether a second (tanh-derivative) buffer is needed.
        chunk_size: explicit override.
        budget_bytes: scratch budget when ``threads`` is None.
        threads: the number of threads the matmuls run on (host), or None.

    Returns:
        The number of rows per chunk (>= 1).
    """
    if chunk_size is not None:
        rows = chunk_size
    else:
        elem = torch.empty((), dtype=acc_dtype).element_size()
        row_bytes = max(1, n_classes) * elem * (2 if softcap else 1)
        if threads is None:
            rows = budget_rows(budget_bytes, row_bytes)
        else:
            rows = min(ROWS_PER_THREAD * max(1, threads), HOST_CHUNK_BYTES // row_bytes)
        rows = max(1, rows)
        if rows > 16:
            rows -= rows % 16
    return max(1, min(rows, max(n_rows, 1)))
