"""topdown.parallel: a batch split between this process and helper processes."""
from __future__ import annotations

import pytest
import torch

from topdown import parallel
from topdown.flows import _sift_flow_serial

ARGS = (510.0, 10200.0, 1.275, 1, 2, 3, 5, 5, None)  # alpha, d, gamma, levels, wsize, top wsize/iters, iters, trunc


def pairs(b, seed):
    g = torch.Generator().manual_seed(seed)
    f1 = torch.rand(b, 4, 9, 9, generator=g) * 255
    return f1, torch.roll(f1, 1, dims=3)


def test_helpers_compute_what_this_process_does_and_report_their_errors():
    chunks = [pairs(2, 0), pairs(3, 1), pairs(1, 2)]
    here = [_sift_flow_serial(*c, *ARGS) for c in chunks]
    split = parallel.map_split(_sift_flow_serial, chunks, ARGS)
    assert all(torch.equal(a, b) for a, b in zip(split, here))
    cpu = parallel.helper_cpu_seconds()
    assert cpu > 0 and len(parallel._HELPERS) >= 2

    pids = [h.proc.pid for h in parallel._HELPERS]
    with pytest.raises(parallel.HelperError, match=r"in helper process \d+:(.|\n)*Traceback"):
        parallel.map_split(_sift_flow_serial, [pairs(2, 0), (torch.zeros(3), torch.zeros(3))], ARGS)
    assert torch.equal(parallel.map_split(_sift_flow_serial, chunks[:2], ARGS)[1], here[1])  # still in step
    assert [h.proc.pid for h in parallel._HELPERS] == pids  # and kept

    parallel._HELPERS[0].proc.kill()  # a helper that died is replaced on the next call
    parallel._HELPERS[0].proc.wait()
    assert torch.equal(parallel.map_split(_sift_flow_serial, chunks[:2], ARGS)[1], here[1])
