"""DTCH module: golden data of the seed, a float64 window oracle, state, undo and diagnostics."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dino_bridge.assign.dtch import DTCH
from tests.assign.dtch_oracle import balance_weights

GOLDEN_DIR = Path(__file__).resolve().parent / "golden_dtch"  # copied from shared/ (see its README)
LOGGER = "dino_bridge.assign.dtch"


def within_tolerance(q: torch.Tensor, q_ref) -> float:
    """Largest |q − q_ref| / (1e-6 + 2e-4·q_ref): ≤ 1 passes (the golden README's tolerance)."""
    q_ref = torch.as_tensor(q_ref, dtype=torch.float64)
    return ((q.double() - q_ref).abs() / (1e-6 + 2e-4 * q_ref)).max().item()


# ---------------------------------------------------------------------------------- golden data


def golden_cases() -> list[Path]:
    cases = sorted(GOLDEN_DIR.glob("*.npz"))
    if not cases:
        pytest.fail(
            f"DTCH golden data not found in {GOLDEN_DIR.resolve()} (see tests/assign/golden_dtch/README.md)"
        )
    return cases


GOLDEN_KWARGS = {  # our constructor argument <- the seed's attribute
    "temp_scale": "ctor_dt_temp_scale",
    "exp_power": "ctor_dt_exp_power",
    "balance_beta": "ctor_balance_beta",
    "boost_alpha": "ctor_boost_alpha",
    "boost_w_max": "ctor_boost_w_max",
    "boost_divisor": "ctor_boost_threshold_divisor",
    "boost_eps": "ctor_boost_eps",
    "logit_clamp": "ctor_logits_temp_max",
}


def test_golden_data_is_present():
    assert len(golden_cases()) == 8


def test_golden_data_is_the_recorded_copy():
    """The files equal the shared reference data they were copied from (SHA256SUMS)."""
    import hashlib

    for line in (GOLDEN_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((GOLDEN_DIR / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("case", [p.stem for p in sorted(GOLDEN_DIR.glob("*.npz"))] or ["missing"])
def test_golden_one_batch_window_reproduces_the_seed(case, caplog):
    path = GOLDEN_DIR / f"{case}.npz"
    if not path.exists():
        golden_cases()  # fails with the clear message
    data = np.load(path)
    kwargs = {ours: float(data[theirs]) for ours, theirs in GOLDEN_KWARGS.items()}
    kwargs["boost_enabled"] = bool(data["ctor_boost_enabled"])
    k = int(data["K"])
    first_rows = data["call0_logits"].shape[0]
    # One module for all calls, with a one-batch window: c06 changes N, which must re-initialise.
    dtch = DTCH(k, history_size=first_rows, **kwargs)
    worst = 0.0
    for i in range(int(data["n_calls"])):
        logits = torch.from_numpy(data[f"call{i}_logits"])
        rows = logits.shape[0]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            q = dtch(logits, float(data[f"call{i}_teacher_temp"]))
        changed = i > 0 and rows != data[f"call{i - 1}_logits"].shape[0]
        assert any("re-initialised" in r.message for r in caplog.records) == changed
        assert dtch.capacity == 1 and dtch.history_full
        q_ref = data[f"call{i}_q"]
        ratio = within_tolerance(q, q_ref)
        assert ratio <= 1.0, f"{case} call {i}: error {ratio:.3g} x tolerance"
        worst = max(worst, ratio)
        torch.testing.assert_close(
            q.double().sum(1), torch.ones(rows, dtype=torch.float64), atol=1e-6, rtol=0
        )
        # The boost mask: same prototypes as the seed's (our h is its history_Q / cap, and the
        # rarity test h < mean/d is scale-invariant).
        history = dtch.history_window.double().sum(0).numpy()
        mask = history < history.mean() / kwargs["boost_divisor"]
        assert dtch.diagnostics()["boosted"] == data[f"call{i}_boost_count"]
        np.testing.assert_array_equal(mask, data[f"call{i}_boost_mask"])
        # The seed's history_Q is (cap−1)·S + max(S, 1e-10); ours is max(S, 1e-10).
        cap_ref, history_ref = int(data[f"call{i}_cap"]), data[f"call{i}_history_Q"]
        live = history > 1e-9  # where the 1e-10 floor does not bind
        np.testing.assert_allclose(cap_ref * history[live], history_ref[live], rtol=1e-5)
    print(f"{case}: max error {worst:.3f} x tolerance")


# ------------------------------------------------------------------------ float64 window oracle


def drifting_logits(num_calls: int, rows: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    """Logits whose popular prototypes drift; prototype 0 falls from dominant to near-dead."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randn(k, generator=gen) * 0.1
    out = []
    for step in range(num_calls):
        t = step / max(1, num_calls - 1)
        bias = offsets.clone()
        bias[0] += 0.8 - 2.6 * t  # Z/T from +16 to −36 at T = 0.05
        bias[(torch.arange(k) - 5 * step) % k < 6] += 0.35  # a moving block of popular prototypes
        bias[-6:] -= 2.5  # always dead: the boost and the floors bind
        out.append((bias + 0.2 * torch.randn(rows, k, generator=gen)).float())
    return out


def oracle_targets(
    masses: list[np.ndarray], logits: torch.Tensor, temp: float, cap: int, cfg: dict
) -> np.ndarray:
    """METHOD §3 in float64, written from the formula: the window is re-summed from the S list."""
    s, gamma, beta = cfg["temp_scale"], cfg["exp_power"], cfg["balance_beta"]
    y = np.clip(logits.double().numpy() / (temp * s), -30.0, 30.0)
    e = np.exp(y)
    masses.append(np.maximum(e.sum(0), 1e-10))
    window = masses[-cap:]
    window = [masses[0]] * (cap - len(window)) + window  # not yet full: copies of the first step
    h = np.sum(window, axis=0)
    mean = h.mean()
    b = np.where(h < mean / 500.0, np.clip(np.abs(mean / (h + 1e-6) - 500.0) ** 0.3, 1.0, 50.0), 1.0)
    p = b * e / np.maximum((b * e).sum(1, keepdims=True), 1e-25)
    w = balance_weights(h, beta)
    z = np.log(np.maximum(p, 1e-25)) + np.log(w)
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    if gamma != 1:
        q = q**gamma
        q /= np.maximum(q.sum(1, keepdims=True), 1e-25)
    return q


WINDOW_CONFIGS = {
    "default": dict(temp_scale=1.0, exp_power=1.0, balance_beta=1.0),
    "s2_g2_beta0.5": dict(temp_scale=2.0, exp_power=2.0, balance_beta=0.5),
}


@pytest.mark.parametrize("config", list(WINDOW_CONFIGS))
def test_sliding_window_matches_float64_oracle(config):
    cfg = WINDOW_CONFIGS[config]
    rows, k, temp = 12, 48, 0.05
    history_size = 40  # cap = 3
    dtch = DTCH(k, history_size, **cfg)
    one_batch = DTCH(k, rows, **cfg)
    cap = history_size // rows
    calls = drifting_logits(2 * cap + 3, rows, k)
    masses: list[np.ndarray] = []
    for i, logits in enumerate(calls):
        q = dtch(logits, temp)
        assert dtch.capacity == cap and dtch.history_full == (i + 1 >= cap)
        expected = oracle_targets(masses, logits, temp, cap, cfg)
        ratio = within_tolerance(q, expected)
        assert ratio <= 1.0, f"call {i}: error {ratio:.3g} x tolerance"
        q_one = one_batch(logits, temp)
        row_l1 = (q - q_one).abs().sum(1).max().item()  # max over rows, as in the golden README
        if i >= 1:
            assert row_l1 > 0.1, f"call {i}: the window changes nothing (row-L1 {row_l1:.3g})"
        # the window really holds the last `cap` pushes (slot order is the ring's)
        np.testing.assert_allclose(
            dtch.history_window.double().sum(0).numpy(),
            np.sum(([masses[0]] * cap + masses)[-cap:], axis=0),
            rtol=1e-5,  # S summed in fp32 here, in fp64 in the oracle
        )
    soft_gap = [(z.max(1).values - z[:, 0]) / (temp * cfg["temp_scale"]) for z in (calls[0], calls[-1])]
    assert (soft_gap[0] == 0).float().mean() > 0.9  # prototype 0 starts as (nearly) every row's argmax
    assert (soft_gap[1] > 10).all()  # and ends below e^-10 of every row's maximum


# ------------------------------------------------------------------------------ state and resume


def state_bytes(module: DTCH) -> dict:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("calls_before_resume", [1, 2, 4])
def test_resume_is_bit_exact(calls_before_resume):
    rows, k, temp = 10, 40, 0.05
    calls = drifting_logits(8, rows, k, seed=1)
    uninterrupted = DTCH(k, 30)  # cap 3: resume before full, at the wrap, after it
    for logits in calls[:calls_before_resume]:
        uninterrupted(logits, temp)
    resumed = DTCH(k, 30)
    resumed.load_state_dict(state_bytes(uninterrupted))
    assert resumed.capacity == 3 and resumed.history_full == uninterrupted.history_full
    assert_same_state(resumed.state_dict(), uninterrupted.state_dict())
    for logits in calls[calls_before_resume:]:
        assert torch.equal(resumed(logits, temp), uninterrupted(logits, temp))
    assert resumed.diagnostics() == uninterrupted.diagnostics()


def test_state_of_a_fresh_module_round_trips():
    fresh = DTCH(16, 8)
    used = DTCH(16, 8)
    used(torch.randn(4, 16), 0.1)
    used.load_state_dict(state_bytes(fresh))
    assert used.capacity is None and not used.history_full
    assert_same_state(used.state_dict(), fresh.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        DTCH(17, 8).load_state_dict(state_bytes(DTCH(16, 8)))


def test_new_global_rows_after_load_reinitialise_with_warning(caplog):
    k = 32
    saved = DTCH(k, 36)
    for logits in drifting_logits(3, 12, k):  # N_g = 12, cap 3
        saved(logits, 0.05)
    loaded = DTCH(k, 36)
    loaded.load_state_dict(state_bytes(saved))
    fresh = DTCH(k, 36)
    new_logits = drifting_logits(1, 9, k, seed=5)[0]  # N_g = 9: cap 4
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        q = loaded(new_logits, 0.05)
    assert any("12 -> 9" in r.message and r.name == LOGGER for r in caplog.records)
    assert loaded.capacity == 4 and not loaded.history_full
    assert torch.equal(q, fresh(new_logits, 0.05))  # as if freshly started
    assert_same_state(loaded.state_dict(), fresh.state_dict())


def test_capacity_and_history_full():
    dtch = DTCH(8, history_size=25)
    assert dtch.capacity is None and not dtch.history_full
    logits = torch.randn(6, 8)
    for i in range(4):  # cap = 25 // 6 = 4
        dtch(logits, 0.1)
        assert dtch.capacity == 4 and dtch.history_full == (i == 3)
    dtch.reset_history()
    assert dtch.capacity is None and not dtch.history_full
    dtch(torch.randn(30, 8), 0.1)
    assert dtch.capacity == 1 and dtch.history_full  # history smaller than a batch: one batch


def test_blocked_history_is_the_flat_fp64_sum():
    dtch = DTCH(30, history_size=70)  # N_g = 10: cap 7, blocks of 3, 3 and 1 rows
    for logits in drifting_logits(11, 10, 30, seed=4):
        dtch(logits, 0.05)
        flat = dtch.history_window.double().sum(0)
        torch.testing.assert_close(dtch._history(), flat, rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- snapshot/restore


def test_restore_undoes_the_first_call():
    dtch, twin = DTCH(20, 16), DTCH(20, 16)
    before = state_bytes(dtch)
    record = dtch.snapshot()
    dtch(torch.randn(8, 20), 0.07)
    dtch.restore(record)
    assert dtch.capacity is None
    assert_same_state(dtch.state_dict(), before)
    logits = torch.randn(8, 20)
    assert torch.equal(dtch(logits, 0.07), twin(logits, 0.07))


@pytest.mark.parametrize("calls_before", [1, 2, 3, 5])
def test_restore_is_bit_exact_mid_run(calls_before, caplog):
    rows, k, temp = 8, 24, 0.05
    calls = drifting_logits(7, rows, k, seed=2)
    dtch, twin = DTCH(k, 24), DTCH(k, 24)  # cap 3
    for logits in calls[:calls_before]:
        dtch(logits, temp)
        twin(logits, temp)
    before, diagnostics = state_bytes(dtch), dtch.diagnostics()
    record = dtch.snapshot()
    dtch(calls[-1], temp)  # the skipped step
    dtch.restore(record)
    assert_same_state(dtch.state_dict(), before)
    assert dtch.diagnostics() == diagnostics
    # an undone re-initialisation (N_g 8 -> 5) is undone too
    record = dtch.snapshot()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dtch(calls[-1][:5], temp)
    assert dtch.capacity == 4
    dtch.restore(record)
    assert_same_state(dtch.state_dict(), before)
    for logits in calls[calls_before:]:
        assert torch.equal(dtch(logits, temp), twin(logits, temp))


def test_restore_refuses_to_undo_two_calls():
    dtch = DTCH(10, 10)
    record = dtch.snapshot()
    dtch(torch.randn(5, 10), 0.1)
    dtch(torch.randn(5, 10), 0.1)
    with pytest.raises(RuntimeError, match="one call"):
        dtch.restore(record)


# ---------------------------------------------------------------------------------- diagnostics


def test_diagnostics_on_crafted_input():
    k, rows, temp = 16, 4, 0.05
    dtch = DTCH(k, history_size=8)  # cap 2
    diag = dtch.diagnostics()
    assert diag["log_k"] == pytest.approx(math.log(k)) and math.isnan(diag["protos_used_soft"])
    argmaxes = [[1, 1, 2, 3], [4, 5, 5, 6], [7, 7, 7, 7]]
    outputs, masses = [], []
    for winners in argmaxes:
        logits = torch.zeros(rows, k)
        logits[torch.arange(rows), torch.tensor(winners)] = 1.0
        outputs.append(dtch(logits, temp))
        masses.append(np.maximum(np.exp(np.clip(logits.double().numpy() / temp, -30, 30)).sum(0), 1e-10))
        diag = dtch.diagnostics()
        window = outputs[-2:]
        used_soft = {w for ws in argmaxes[len(outputs) - len(window) : len(outputs)] for w in ws}
        assert diag["protos_used_soft"] == len(used_soft)
        assert diag["protos_used_sharp"] == len({int(i) for q in window for i in q.argmax(1)})
        h = np.sum(([masses[0]] + masses)[-2:], axis=0)
        p = h / h.sum()
        assert diag["history_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
        assert diag["history_max"] == pytest.approx(h.max(), rel=1e-6)
        assert diag["history_min"] == pytest.approx(h.min(), rel=1e-6)
        assert diag["boosted"] == (h < h.mean() / 500).sum()
        q = outputs[-1].double()
        entropy = -(q * q.clamp_min(1e-300).log()).sum(1).mean().item()
        assert diag["target_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert diag["protos_used_soft"] == 4  # {4, 5, 6, 7}: the first call left the window
    assert diag["boosted"] > 0


def test_constructor_rejects_bad_values():
    with pytest.raises(ValueError, match="history_size"):
        DTCH(8, 0)
    with pytest.raises(ValueError, match="logit_clamp"):
        DTCH(8, 8, logit_clamp=-40.0)
    with pytest.raises(ValueError, match="exp_power"):
        DTCH(8, 8, exp_power=0.0)
    assert DTCH(8, 8, temp_scale=2.0).exp_power == 2.0
    with pytest.raises(ValueError, match=r"logits \[N, 8\]"):
        DTCH(8, 8)(torch.randn(3, 9), 0.1)


def test_boost_disabled_and_input_untouched():
    logits = drifting_logits(1, 12, 48)[0]
    before = logits.clone()
    q_off = DTCH(48, 12, boost_enabled=False)(logits, 0.05)
    q_on = DTCH(48, 12)(logits, 0.05)
    assert torch.equal(logits, before)
    assert (q_off - q_on).abs().sum(1).max() > 1e-3
    masses: list[np.ndarray] = []
    expected = oracle_targets(masses, logits, 0.05, 1, WINDOW_CONFIGS["default"])
    assert within_tolerance(q_on, expected) <= 1.0


def test_target_entropy_is_collected_only_when_asked():
    logits = torch.randn(12, 40, generator=torch.Generator().manual_seed(0))
    dtch = DTCH(40, 24)
    dtch.collect_target_entropy = False
    q = dtch(logits, 0.1)
    assert math.isnan(dtch.diagnostics()["target_entropy"])
    dtch.collect_target_entropy = True
    q = dtch(logits, 0.1)
    expected = float(torch.special.entr(q).sum(1).mean())
    assert dtch.diagnostics()["target_entropy"] == pytest.approx(expected, rel=1e-6)
