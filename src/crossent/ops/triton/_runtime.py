"""Loading the kernel modules, and the host-side facts their launchers need.

Always reach a kernel module through :func:`kernels` (``kernels("cross_entropy")``), never with
``import crossent.ops.triton.cross_entropy``: that import would rebind the package attribute
``cross_entropy`` from the public function to the module.

``@triton.jit`` decides at decoration time whether a kernel is compiled for the GPU or run by
Triton's interpreter (``TRITON_INTERPRET``). The kernel modules are therefore imported lazily, on
the first launch, and re-imported if the interpreter setting has changed since: importing
``crossent.ops.triton`` never pins the mode, and a test that turns the interpreter on before its
first call gets interpreted kernels even if some other module imported this package earlier.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch

from ..._backend import triton_importable, triton_interpreting

_KERNEL_MODULES = ("_helpers", "cross_entropy", "linear_cross_entropy", "bce_with_logits")
_mode: list[bool] = []  # the interpreter setting the imported kernel modules were decorated for


def kernels(name: str) -> types.ModuleType:
    """The kernel module ``crossent.ops.triton.<name>``, decorated for the current mode."""
    interpret = triton_interpreting()
    if _mode and _mode[0] != interpret:
        # The mode flipped: re-decorate every imported kernel module, helpers first, since the
        # others bind the helpers' names when they are imported.
        for module_name in _KERNEL_MODULES:
            module = sys.modules.get(f"{__package__}.{module_name}")
            if module is not None:
                importlib.reload(module)
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


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any floating input is float64, else float32 (the kernels' statistics dtype)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype for a torch dtype (only the ones the kernels use)."""
    import triton.language as tl

    return {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }[dtype]
