"""DTCH on 2 gloo ranks equals DTCH on 1 rank with the rows concatenated, call after call.

Stated tolerance: |q_ranks − q_single| ≤ 1e-6 + 2e-4·q_single element-wise (the golden tolerance).
The only difference is the fp32 summation order of the column mass S (per rank, then over ranks,
versus all rows at once), ~1e-7 relative, which the boost amplifies near its threshold.
The window, the argmax rings and the counters are identical on both ranks, bit for bit.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from dino_bridge.assign.dtch import DTCH
from tests.distributed_utils import spawn

K, TEMP, HISTORY = 40, 0.05, 36
# Rows per rank and call: unequal ranks (N_g = 12, cap 3), then a change of N_g (re-init), and back.
ROWS = [(5, 7)] * 5 + [(6, 4)] + [(5, 7)] * 4


def make_calls(seed: int = 0) -> list[torch.Tensor]:
    """Global logits per call: drifting popular prototypes, one falling dead, a few always dead."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randn(K, generator=gen) * 0.1
    calls = []
    for step, (n0, n1) in enumerate(ROWS):
        bias = offsets.clone()
        bias[0] += 0.8 - 0.3 * step
        bias[(torch.arange(K) - 4 * step) % K < 5] += 0.35
        bias[-5:] -= 2.5
        calls.append(bias + 0.2 * torch.randn(n0 + n1, K, generator=gen))
    return calls


def _rank_fn(rank: int, world: int, calls: list[torch.Tensor]):
    dtch = DTCH(K, HISTORY)
    outputs, warnings = [], []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("dino_bridge.assign.dtch").addHandler(handler)
    for logits, (n0, _) in zip(calls, ROWS):
        mine = logits[:n0] if rank == 0 else logits[n0:]
        outputs.append(dtch(mine, TEMP))
    # Tensors would travel through shared-memory file descriptors, which vanish when this process
    # exits before the parent unpickles them: return numpy arrays (pickled by value).
    state = {
        key: value.numpy() if torch.is_tensor(value) else value for key, value in dtch.state_dict().items()
    }
    return [q.numpy() for q in outputs], state, dtch.diagnostics(), warnings


def test_two_ranks_equal_one_rank_on_the_concatenation():
    calls = make_calls()
    results = spawn(_rank_fn, 2, calls)
    single = DTCH(K, HISTORY)
    single_out = [single(logits, TEMP) for logits in calls]

    (out0, state0, diag0, warn0), (out1, state1, diag1, warn1) = results
    out0, out1 = [torch.from_numpy(q) for q in out0], [torch.from_numpy(q) for q in out1]
    state0, state1 = (
        {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in st.items()}
        for st in (state0, state1)
    )
    # identical state on both ranks, bit for bit
    assert state0.keys() == state1.keys() == single.state_dict().keys()
    for key in state0:
        if torch.is_tensor(state0[key]):
            assert torch.equal(state0[key], state1[key]), key
        else:
            assert state0[key] == state1[key] == single.state_dict()[key], key
    assert diag0 == diag1
    assert len(warn0) == len(warn1) == 2  # N_g 12 -> 10 -> 12

    worst = 0.0
    for i, q_single in enumerate(single_out):
        q = torch.cat([out0[i], out1[i]])
        err = ((q.double() - q_single.double()).abs() / (1e-6 + 2e-4 * q_single.double())).max().item()
        assert err <= 1.0, f"call {i}: error {err:.3g} x tolerance"
        worst = max(worst, err)
    assert diag0["boosted"] > 0  # the boost (on the global history) was exercised

    torch.testing.assert_close(
        state0["history_window"], single.state_dict()["history_window"], rtol=1e-6, atol=0
    )
    for ring in ("soft_argmax_window", "sharp_argmax_window"):
        assert torch.equal(state0[ring], single.state_dict()[ring])
    for name in ("protos_used_soft", "protos_used_sharp", "boosted"):
        assert diag0[name] == single.diagnostics()[name]

    # The state is world-size independent: rank 0's state continues on one process.
    resumed = DTCH(K, HISTORY)
    resumed.load_state_dict(state0)
    nxt = make_calls(seed=1)[0]
    q_resumed, q_single = resumed(nxt, TEMP), single(nxt, TEMP)
    err = ((q_resumed.double() - q_single.double()).abs() / (1e-6 + 2e-4 * q_single.double())).max()
    assert err <= 1.0
    print(f"2 ranks vs 1: max error {worst:.3g} x tolerance")
