"""Launch configuration of every Triton kernel: block and tile sizes, warps, stages, flags.

The GPU counterpart of ``crossent.ops._budget``: the kernels' tile shapes are chosen from the
sm_90 compile report of ``python -m crossent.ops.triton._compile_check`` (registers, stack
spills, tensor-core instructions), not from byte budgets, and are to be re-tuned with
``benchmarks/bench_gpu.py``. Under Triton's interpreter every kernel gets the smallest blocks it
accepts, so that the tests' small shapes still cross block and tile edges.

The constexpr option flags every cross entropy kernel takes (``HAS_SOFTCAP``,
``HAS_SMOOTHING``, ``HAS_WEIGHT``) are derived here too (:func:`option_flags`), so that the
kernel files' launchers and the compile check spell them once.
"""

from __future__ import annotations

import torch
import triton

from ._runtime import interpreting


def option_flags(softcap: float, with_smoothing: bool, has_weight: bool) -> dict[str, bool]:
    """The constexpr flags of the cross entropy kernels (``softcap`` 0.0 means none)."""
    return dict(HAS_SOFTCAP=softcap != 0.0, HAS_SMOOTHING=with_smoothing, HAS_WEIGHT=has_weight)


def ce_block(n_classes: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of cross entropy on logits (one program per row).

    On the GPU: up to 8192 classes per iteration (16 KB of bf16 per row and step), enough bytes
    in flight per program to stream at bandwidth; 2048 for float64, whose soft-capped backward
    spilled 704 bytes of stack at 8192.
    """
    if interpreting():
        return 32, 1
    cap = 2048 if dtype == torch.float64 else 8192
    block = min(cap, triton.next_power_of_2(max(n_classes, 1)))
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, num_warps


def lce_tiles(dtype: torch.dtype, backward: bool, softcap: bool = False) -> dict[str, int]:
    """Tile sizes and launch options of linear cross entropy (launch keyword arguments).

    BLOCK_N x BLOCK_V logit tiles over BLOCK_D slices of the hidden dimension; the backward also
    takes GROUP_N (row blocks that sweep the vocabulary together). Interpreter: the smallest
    tiles ``tl.dot`` accepts (16). GPU (Hopper):

    * 16-bit data: 128 x 128 logit tiles (wgmma), 8 warps; the forward streams 64-wide hidden
      slices in 3 stages; the backward holds the dz tile and two products, so its hidden slices
      are 32 wide to stay in registers (64 spilled 880 bytes of stack per thread), and with
      soft-capping (one more live tile: the slope) its tiles are 64 x 128 (128 x 128 spilled
      464 bytes).
    * float32/float64: 32 x 64 x 32 tiles, 4 warps; their products run on the FMA units (or TF32
      when torch's float32 matmul precision allows it) and larger tiles spill.
    """
    if interpreting():
        tiles = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, GROUP_N=2, num_warps=1, num_stages=1)
    elif dtype in (torch.float16, torch.bfloat16):
        block_n = 64 if backward and softcap else 128
        block_d = 32 if backward else 64
        tiles = dict(
            BLOCK_N=block_n, BLOCK_V=128, BLOCK_D=block_d, GROUP_N=8, num_warps=8, num_stages=3
        )
    else:
        tiles = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, GROUP_N=8, num_warps=4, num_stages=2)
    if not backward:
        del tiles["GROUP_N"]
    return tiles


def dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    """UPCAST_DOT for bfloat16 under the interpreter; IEEE_DOT as torch's matmul would compute.

    torch multiplies float32 matrices exactly unless ``torch.set_float32_matmul_precision`` was
    lowered ('high'/'medium' allow TF32), so the kernels follow that setting.
    """
    exact_fp32 = torch.get_float32_matmul_precision() == "highest"
    return dict(
        UPCAST_DOT=interpreting() and dtype == torch.bfloat16,
        IEEE_DOT=dtype == torch.float64 or (dtype == torch.float32 and exact_fp32),
    )


def bce_block() -> tuple[int, int]:
    """(elements per program, num_warps) of BCE with logits: 2048 x 8 warps on a GPU.

    On the GPU each thread handles 8 consecutive elements (two 16-byte loads per float32
    operand), few enough registers for several programs per SM.
    """
    return (64, 1) if interpreting() else (2048, 8)
