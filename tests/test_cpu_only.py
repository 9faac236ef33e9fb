"""CPU-only use stays light: a process that only ever passes CPU tensors never imports triton
(about 90 MB of resident memory and a noticeable import time on the first call)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import crossent
    import crossent.nn as cnn

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, -100])
    probs = torch.rand(6, 5, generator=g)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(5, 8, generator=g, requires_grad=True)
    losses = [
        crossent.cross_entropy(logits, target, label_smoothing=0.1),
        crossent.cross_entropy(torch.randn(4, 3000, requires_grad=True), torch.tensor([0, 1, 2, 3])),
        crossent.cross_entropy(logits, probs),
        crossent.nll_loss(logits.log_softmax(1), target),
        crossent.binary_cross_entropy(torch.sigmoid(logits), probs),
        crossent.binary_cross_entropy_with_logits(logits, probs, pos_weight=torch.ones(5)),
        crossent.linear_cross_entropy(h, w, target),
        cnn.CrossEntropyLoss()(logits, target),
        cnn.NLLLoss()(logits.log_softmax(1), target),
        cnn.BCELoss()(torch.sigmoid(logits), probs),
        cnn.BCEWithLogitsLoss()(logits, probs),
        cnn.LinearCrossEntropyLoss(8, 5)(h, target),
    ]
    sum(losses).backward()
    print("triton" in sys.modules, sorted(m for m in sys.modules if m.startswith("triton"))[:3])
    """
)


def test_cpu_calls_of_every_loss_never_import_triton():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRITON_INTERPRET", "CROSSENT_BACKEND", "PYTHONPATH")
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().startswith("False"), out.stdout
