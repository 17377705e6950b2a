"""Running independent per-weight or per-module work side by side on the CPU's cores."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def one_thread_each(device: torch.device | str = "cpu") -> Iterator[Callable]:
    """A ``map`` that runs independent work items on every thread torch may use, each item on one thread (a plain
    ``map`` for work on a GPU, which queues it anyway).

    Each item (a module's small products, one base weight's eigendecomposition) is too small, or too sequential,
    for torch's or BLAS's own threads to pay off; running items side by side does (torch and LAPACK release the
    GIL). Inside, torch and the BLAS libraries that numpy and scipy load run one thread each, so the workers do not
    oversubscribe the cores; both thread counts are restored afterwards.
    """
    workers = torch.get_num_threads()
    if workers <= 1 or torch.device(device).type != "cpu":
        yield map
        return
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=workers) as pool:
            yield pool.map
    finally:
        torch.set_num_threads(workers)
