"""A pool of spawned gloo rank processes for the multi-process tests, bounded in time.

``RankPool(world, runner)`` starts ``world`` processes in one gloo group (a file store in a
temporary directory) that live until :meth:`RankPool.close`: spawning and importing cost
seconds, a case milliseconds. :meth:`RankPool.run` sends a case (a picklable dict) to every
rank; each rank calls ``runner(rank, world, case)`` — a module-level function, so that the
spawned process can import it — and sends back its result or the exception it raised. Every
collective times out after ``collective_timeout_s`` and the parent waits at most
``case_timeout_s`` per case, so a hang fails the test instead of blocking the suite; after a
timeout the pool refuses further cases.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
from collections.abc import Callable

import pytest
import torch

Runner = Callable[[int, int, dict], dict]


def _rank_main(
    runner: Runner, rank: int, world: int, store: str, inbox, outbox, timeout_s: float
) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        while (case := inbox.get()) is not None:
            try:
                result = ("ok", runner(rank, world, case))
            except Exception as exc:  # noqa: BLE001 - the parent reports it
                result = ("error", f"{type(exc).__name__}: {exc}")
            outbox.put((rank, result))
    finally:
        torch.distributed.destroy_process_group()
        outbox.close()
        outbox.join_thread()  # the answers are out: skip the interpreter's slow teardown
        os._exit(0)


class RankPool:
    """``world`` spawned processes in one gloo group, each running ``runner`` on request."""

    def __init__(
        self,
        world: int,
        runner: Runner,
        *,
        collective_timeout_s: float = 30,
        case_timeout_s: float = 120,
    ) -> None:
        self.world = world
        self.case_timeout_s = case_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="crossent-ranks-")
        ctx = mp.get_context("spawn")
        self._inboxes = [ctx.Queue() for _ in range(world)]
        self._outbox = ctx.Queue()
        store = os.path.join(self._tmp.name, "store")
        self._procs = [
            ctx.Process(
                target=_rank_main,
                args=(runner, r, world, store, self._inboxes[r], self._outbox),
                kwargs={"timeout_s": collective_timeout_s},
                daemon=True,
            )
            for r in range(world)
        ]
        for proc in self._procs:
            proc.start()
        self.broken = False

    def run(self, case: dict) -> list[dict]:
        """Run ``case`` on every rank; the per-rank results in rank order."""
        if self.broken:
            pytest.fail(f"the {self.world}-rank pool is broken by an earlier timeout")
        for inbox in self._inboxes:
            inbox.put(case)
        results: dict[int, tuple] = {}
        while len(results) < self.world:
            try:
                rank, result = self._outbox.get(timeout=self.case_timeout_s)
            except queue.Empty:
                self.broken = True
                missing = sorted(set(range(self.world)) - set(results))
                pytest.fail(
                    f"no answer within {self.case_timeout_s} s from ranks {missing}: {case}"
                )
            results[rank] = result
        for rank, (status, payload) in sorted(results.items()):
            if status != "ok":
                pytest.fail(f"rank {rank} of {self.world} failed on {case}: {payload}")
        return [results[r][1] for r in range(self.world)]

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        self._tmp.cleanup()
