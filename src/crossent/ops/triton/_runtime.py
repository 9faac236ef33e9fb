"""Loading the kernel modules, and the host-side facts their launchers need.

Always reach a kernel module through :func:`kernels` (``kernels("cross_entropy")``), never with
``import crossent.ops.triton.cross_entropy``: that import would rebind the package attribute
``cross_entropy`` from the public function to the module.

``@triton.jit`` decides at decoration time whether a kernel is compiled for the GPU or run by
Triton's interpreter (``TRITON_INTERPRET``). The kernel modules are therefore imported lazily, on
the first launch, and imported afresh if the interpreter setting has changed since: importing
``crossent.ops.triton`` never pins the mode, and a test that turns the interpreter on before its
first call gets interpreted kernels even if some other module imported this package earlier.
Which modules count as kernel modules is read from the modules themselves (every loaded
submodule of the package holding a ``@triton.jit`` function, defined there or imported), so no
list needs updating when a kernel file is added.

Adding a Triton kernel (a new file ``ops/triton/<name>.py``):

1. Open the file with the reads / writes / assumes comment (as the other kernel files do), then
   the module docstring with the math. Import ``triton`` at the top: the file is only ever
   imported through :func:`kernels`, never by ``import crossent.ops.triton``.
2. Kernels compute statistics (or elementwise values) and their gradients only; the loss
   conventions (label smoothing, class weight on the target, z-loss, ignore mask, the 'mean'
   denominator) stay in torch code, in ``crossent.ops._stats``. Shared device functions go in
   ``_helpers.py`` as ``@triton.jit`` functions (inlined: they cost nothing).
3. Block and tile sizes, warps, stages and the constexpr option flags go in ``_launch.py``.
4. Host launchers ``forward`` / ``backward`` in the file, computing in
   ``crossent.ops._stats.compute_dtype`` and never reading tensor values on the host.
5. Register the torch custom ops in ``_ops.py`` (``torch.library.custom_op``, ``register_fake``,
   ``register_autograd``), each calling ``check_runnable`` and ``kernels("<name>")``.
6. The public entry in ``ops/triton/__init__.py``, called from ``functional.py`` / ``linear.py``
   only after ``crossent._checks`` has validated the arguments, and picked by
   ``crossent._backend.select_backend``.
7. Tests in ``tests/test_triton.py`` against torch eager (values, gradients, a shape that crosses
   every block edge, ``opcheck``, ``torch.compile(fullgraph=True)``), and a variant in
   ``_compile_check._variants`` so that ``tests/test_triton_tools.py`` compiles it for sm_90.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch

from ..._backend import triton_importable, triton_interpreting

_mode: list[bool] = []  # the interpreter setting the imported kernel modules were decorated for


def _kernel_modules() -> list[str]:
    """The loaded submodules of this package that hold ``@triton.jit`` functions."""
    from triton.runtime.jit import KernelInterface

    prefix = f"{__package__}."
    return [
        name
        for name, module in list(sys.modules.items())
        if name.startswith(prefix)
        and module is not None
        and any(isinstance(value, KernelInterface) for value in vars(module).values())
    ]


def kernels(name: str) -> types.ModuleType:
    """The kernel module ``crossent.ops.triton.<name>``, decorated for the current mode."""
    interpret = triton_interpreting()
    if _mode and _mode[0] != interpret:
        # The mode flipped: forget every kernel module, so that the imports below decorate them
        # afresh (a kernel module re-imports the helpers it uses, which are forgotten too).
        for module_name in _kernel_modules():
            del sys.modules[module_name]
    _mode[:] = [interpret]
    # Importing a submodule binds it as an attribute of the package, and two kernel files share
    # their names with public functions of the package (``cross_entropy``,
    # ``linear_cross_entropy``): put the function back.
    package = sys.modules[__package__]
    public = package.__dict__.get(name)
    module = importlib.import_module(f"{__package__}.{name}")
    if public is not None and public is not module:
        setattr(package, name, public)
    return module


def interpreting() -> bool:
    """Whether the kernels run under Triton's interpreter (CPU tensors) right now."""
    return triton_interpreting()


def check_runnable(*tensors: torch.Tensor | None) -> None:
    """Raise RuntimeError unless the kernels can run on these tensors' devices.

    Device checks only: no values are read, nothing synchronises. Skipped while
    ``torch.compile`` traces (the tensors are fakes then; the ops run the same check for real).
    """
    if torch.compiler.is_compiling():
        return
    if not triton_importable():
        raise RuntimeError(
            "crossent's Triton kernels need the triton package, which cannot be imported; "
            "install it (pip install 'crossent[gpu]') or use the torch backend"
        )
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(
            "crossent's Triton kernels expect every tensor on one device, got "
            + ", ".join(sorted(str(d) for d in devices))
        )
    device = next(iter(devices), None)
    if device is not None and device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(
            f"crossent's Triton kernels need CUDA tensors, got tensors on {device}; for CPU "
            "tensors turn on Triton's interpreter (TRITON_INTERPRET=1) before the first call"
        )


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (a small fixed number under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def tl_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype for a torch dtype (only the ones the kernels use)."""
    import triton.language as tl

    return {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }[dtype]
