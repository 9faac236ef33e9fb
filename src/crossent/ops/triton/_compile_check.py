"""Compile every kernel variant for an NVIDIA GPU target, without a GPU, and report resources.

    python -m crossent.ops.triton._compile_check [--arch 90] [--quick]

Triton's NVIDIA backend (with its bundled ``ptxas``) compiles to a cubin on any machine, so
compile errors that Triton's interpreter cannot see (type mismatches in loop-carried values,
layouts, unsupported ops) surface here, and ``cuobjdump`` reports per kernel the registers, the
stack frame (bytes per thread; beyond a few bytes it means spills), shared memory, and the count
of tensor-core instructions (HGMMA on sm_90) in the SASS. Run it with ``TRITON_INTERPRET`` unset:
the kernels must be decorated for compilation. The tests run it in a subprocess.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

_INT_ARGS_64 = {"stride_row", "stride_col"}


def _signature(kernel, pointer_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Argument types by name: pointers from ``pointer_types``, floats, ints, constexprs."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, pointer_types["*"])
        elif name == "softcap":
            sig[name] = "fp32"
        elif name in _INT_ARGS_64:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def _variants(quick: bool):
    """(label, kernel, pointer types, constexprs, options) for each variant worth compiling."""
    import torch
    import triton.language as tl

    from ._launch import bce_block, ce_block, lce_tiles, option_flags
    from ._runtime import kernels

    bce = kernels("bce_with_logits")
    ce = kernels("cross_entropy")
    lce = kernels("linear_cross_entropy")

    out = []
    dtypes = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32, fp64=torch.float64)
    for dtype, compute in [("bf16", tl.float32), ("fp64", tl.float64)]:
        if quick and dtype == "fp64":
            continue
        for flag in (True, False):  # every option on, every option off
            ce_block_v, ce_warps = ce_block(128256, dtypes[dtype])  # GPU config
            flags = option_flags(1.0 if flag else 0.0, flag, flag)
            consts = dict(flags, COMPUTE=compute, BLOCK_V=ce_block_v)
            ptr = f"*{dtype}"
            stats = "*fp64" if dtype == "fp64" else "*fp32"
            ptrs = {"*": stats, "logits_ptr": ptr, "class_weight_ptr": ptr}
            ptrs.update(target_ptr="*i64", grad_logits_ptr=ptr)
            tag = f"{dtype} softcap={flag} smooth={flag} weight={flag}"
            options = dict(num_warps=ce_warps)
            out.append((f"ce.forward {tag}", ce._forward_kernel, ptrs, consts, options))
            out.append((f"ce.backward {tag}", ce._backward_kernel, ptrs, consts, options))
    for dtype in ("bf16", "fp16", "fp32"):
        if quick and dtype != "bf16":
            continue
        for flag in (True, False):
            ptr = f"*{dtype}"
            ptrs = {"*": "*fp32", "x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr}
            ptrs.update(class_weight_ptr=ptr, target_ptr="*i64")
            flags = option_flags(1.0 if flag else 0.0, flag, flag)
            consts = dict(flags, HAS_BIAS=flag, UPCAST_DOT=False, IEEE_DOT=dtype == "fp32")
            consts.update(COMPUTE=tl.float32)
            tag = f"{dtype} all-options={flag}"
            for kernel, backward in [(lce._forward_kernel, False), (lce._backward_kernel, True)]:
                tiles = lce_tiles(dtypes[dtype], backward=backward, softcap=flag)
                launch = {k: tiles.pop(k) for k in ("num_warps", "num_stages")}
                kernel_consts = dict(consts, **tiles)
                if backward:
                    kernel_consts.update(NEED_GRAD_X=True, NEED_GRAD_W=True, NEED_GRAD_B=flag)
                label = f"lce.{'backward' if backward else 'forward'} {tag}"
                out.append((label, kernel, ptrs, kernel_consts, launch))
    bce_block_size, bce_warps = bce_block()
    for ndim in (1, 2, 4):
        for dtype in ("fp32", "bf16"):
            if quick and (dtype != "fp32" or ndim == 4):
                continue
            consts = dict(HAS_WEIGHT=True, HAS_POS_WEIGHT=True, NDIM=ndim, INDEX_64=False)
            consts.update(COMPUTE=tl.float32, BLOCK=bce_block_size)
            ptrs = {"*": f"*{dtype}", "out_ptr": "*fp32"}
            tag = f"{dtype} ndim={ndim}"
            options = dict(num_warps=bce_warps)
            for reduce in (True, False):
                fwd = dict(consts, REDUCE=reduce)
                label = f"bce.forward {tag} reduce={reduce}"
                out.append((label, bce._forward_kernel, ptrs, fwd, options))
            bwd = dict(consts, NEED_GRAD_X=True, NEED_GRAD_Y=True)
            out.append((f"bce.backward {tag}", bce._backward_kernel, ptrs, bwd, options))
    return out


def _resources(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    """REG / STACK / SHARED from ``cuobjdump -res-usage``; MMA = tensor-core instructions."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    found["MMA"] = len(re.findall(r"\b(?:HGMMA|HMMA|DMMA)\.", sass))
    return found


def main(argv: list[str] | None = None) -> int:
    """Compile all variants; print one line per kernel; exit 1 if any failed to compile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--quick", action="store_true", help="a representative subset only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    print(f"{'kernel':58s} {'regs':>5s} {'stack':>6s} {'smem':>7s} {'mma':>5s}")
    for label, kernel, ptrs, consts, options in _variants(args.quick):
        try:
            src = ASTSource(kernel, _signature(kernel, ptrs, consts), constexprs=consts)
            # FMA contraction on, as Triton 3.9 launches do by default (saying so silences its
            # warning about the default changing in 3.10).
            options = dict(options, enable_fp_fusion=True)
            compiled = triton.compile(src, target=target, options=options)
        except Exception as exc:  # report every failure, then fail the run
            failures += 1
            print(f"{label:58s} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        res = {}
        if os.path.exists(cuobjdump):
            res = _resources(compiled.asm["cubin"], cuobjdump)
        print(
            f"{label:58s} {res.get('REG', -1):5d} {res.get('STACK', -1):6d} "
            f"{compiled.metadata.shared:7d} {res.get('MMA', -1):5d}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
