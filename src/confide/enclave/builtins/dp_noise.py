"""Noise for the ``dp`` parameter of an analytics built-in (dp_params.py), drawn with OpenDP.

Imported only in the sandbox child by a built-in (never by the enclave process). Every draw is an
OpenDP measurement (laplace or gaussian, discrete on counts, on floats for sums); the scale of each
is the smallest OpenDP's binary search finds whose privacy map, at this task's sensitivity, stays
within that measurement's share of the task's epsilon (and delta), and the released values are
OpenDP's output. Nothing here draws randomness itself.

Privacy unit: one key (one person of the join), with at most ``max_contributions`` (m) joined rows
kept per key by the built-in before it aggregates. Removing a key then changes at most m groups'
row counts, by at most m in all (the thresholded count's L0, L1/L2 and L-infinity distances are all
m), and each sum of a column clamped to [lo, hi] by at most m * max(|lo|, |hi|) in L1 and L2, plus
the rounding of each changed group's exact sum to a float (m ulps of the largest sum possible).

The task's epsilon is split evenly over its measurements: the row count (always measured: it also
decides suppression) and one per sum. Groups found in the data (group_by) are released through
OpenDP's thresholded count (make_laplace_threshold / make_gaussian_threshold): a group is released
only when its noisy count is at least the threshold, max(k, the smallest threshold whose delta fits
the count's share of delta), so whether a group exists is itself differentially private. Without
group_by the one group is public and released when its noisy count is at least k. Suppression is
on the noisy count because a cut on the exact count would tell, with certainty, whether a group
holds k or k - 1 keys: the one key that makes the difference would be exposed. Sums are measured
only for the released groups (chosen by the count's DP output, so the composition is sequential).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

HUGE_THRESHOLD = 1 << 30


def _dp() -> Any:
    import opendp.prelude as dp  # only inside the sandbox child, never in the enclave process

    dp.enable_features("contrib")
    return dp


def _as_approx(dp: Any, meas: Any, mechanism: str, delta: float) -> Any:
    """`meas` as an (epsilon, delta) measurement: pure laplace stays as it is."""
    if mechanism == "laplace":
        return meas
    return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(meas), delta)


def _epsilon_delta(loss: Any) -> tuple[float, float]:
    return (float(loss[0]), float(loss[1])) if isinstance(loss, tuple) else (float(loss), 0.0)


def _scale(make: Callable[[float], Any], d_in: Any, epsilon: float, delta: float) -> float:
    """The smallest scale (to a relative 1e-6, by bisection in log space) whose measurement's
    privacy map at `d_in` is within (epsilon, delta); larger scales lose less."""

    def fits(scale: float) -> bool:
        try:
            eps, dl = _epsilon_delta(make(scale).map(d_in))
        except Exception:  # OpenDP refuses a map it cannot bound (a scale far too small)
            return False
        return eps <= epsilon and dl <= delta

    lo, hi = 1e-12, 1.0
    while not fits(hi):
        lo, hi = hi, hi * 1024
        if hi > 1e300:
            raise ValueError("dp: no noise scale meets the privacy loss asked for")
    while hi / lo > 1 + 1e-6:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _measure(meas: Any, d_in: Any, arg: Any) -> tuple[Any, float, float]:
    eps, dl = _epsilon_delta(meas.map(d_in))
    return meas(arg), eps, dl


def release(
    counts: Mapping[str, int],
    sums: Sequence[Mapping[str, float]],
    *,
    public: bool,
    k: int,
    epsilon: float,
    mechanism: str,
    delta: float,
    m: int,
    sum_bounds: list[float],
    sum_ulp: list[float],
) -> tuple[dict[str, int], list[dict[str, float]], dict[str, Any]]:
    """Noisy counts of the released groups, noisy sums of those groups (one map per entry of
    `sums`: group -> exact clamped sum), and what was measured. `public`: the groups are not
    found in the data (no group_by: one group, always present); `sum_bounds`: max(|lo|, |hi|) of
    each sum; `sum_ulp`: the float rounding bound of each sum's exact value."""
    dp = _dp()
    parts = 1 + len(sums)
    eps_each = epsilon / parts * (1 - 1e-9)
    # laplace spends delta only on finding groups (the threshold); gaussian on every measurement
    count_delta = delta if mechanism == "laplace" else delta / parts
    delta_each = 0.0 if mechanism == "laplace" else delta / parts
    measured: list[dict[str, Any]] = []
    if public:
        dom, met = dp.atom_domain(T=int), dp.absolute_distance(T=int)
        noise = dp.m.make_laplace if mechanism == "laplace" else dp.m.make_gaussian

        def make_count(s: float) -> Any:
            return _as_approx(dp, noise(dom, met, scale=s), mechanism, count_delta)

        scale = _scale(make_count, m, eps_each, count_delta)
        (label,) = counts
        value, eps, dl = _measure(make_count(scale), m, int(counts[label]))
        released = {label: int(value)} if int(value) >= k else {}
        threshold = k
    else:
        dom = dp.map_domain(dp.atom_domain(T=str), dp.atom_domain(T=int))
        inner = dp.absolute_distance(T=int)
        if mechanism == "laplace":
            met, d_in, noise_t = dp.l01inf_distance(inner), (m, m, m), dp.m.make_laplace_threshold
        else:
            met, d_in, noise_t = dp.l02inf_distance(inner), (m, m, m), dp.m.make_gaussian_threshold

        def make_thresholded(s: float, t: int, dl: float) -> Any:
            return _as_approx(dp, noise_t(dom, met, scale=s, threshold=t), mechanism, dl)

        # the scale for epsilon: the thresholded count's epsilon (or rho) is the plain count's at
        # sensitivity m; for gaussian, half of the delta is left to the threshold
        plain = dp.m.make_laplace if mechanism == "laplace" else dp.m.make_gaussian
        int_dom, int_met = dp.atom_domain(T=int), dp.absolute_distance(T=int)
        scale = _scale(
            lambda s: _as_approx(dp, plain(int_dom, int_met, scale=s), mechanism, count_delta / 2),
            m,
            eps_each,
            count_delta,
        )

        def fits(t: int) -> bool:  # then the smallest threshold >= k whose delta fits the share
            try:
                eps, dl = _epsilon_delta(make_thresholded(scale, int(t), count_delta).map(d_in))
            except Exception:
                return False
            return eps <= eps_each and dl <= count_delta

        if fits(k):
            threshold = k
        elif fits(HUGE_THRESHOLD):
            threshold = int(dp.binary_search(fits, bounds=(k, HUGE_THRESHOLD), T=int))  # smallest passing
        else:
            raise ValueError("dp: no threshold meets the delta asked for")
        if not fits(threshold):  # pragma: no cover - the search ends on a passing threshold
            raise ValueError("dp: the threshold found does not meet the delta asked for")
        kept, eps, dl = _measure(
            make_thresholded(scale, threshold, count_delta), d_in, {g: int(c) for g, c in counts.items()}
        )
        released = {g: int(v) for g, v in kept.items()}
    measured.append({"statistic": "count", "epsilon": eps, "delta": dl, "scale": scale})
    order = sorted(released)
    noisy_sums: list[dict[str, float]] = []
    for exact, bound, ulp in zip(sums, sum_bounds, sum_ulp, strict=True):
        sensitivity = m * bound + m * ulp
        dom = dp.vector_domain(dp.atom_domain(T=float, nan=False))
        if mechanism == "laplace":
            met, noise = dp.l1_distance(T=float), dp.m.make_laplace
        else:
            met, noise = dp.l2_distance(T=float), dp.m.make_gaussian

        def make_sum(s: float, dom: Any = dom, met: Any = met, noise: Any = noise) -> Any:
            return _as_approx(dp, noise(dom, met, scale=s), mechanism, delta_each)

        scale = _scale(make_sum, sensitivity, eps_each, delta_each)
        values: list[float] = []
        if order:
            values, eps, dl = _measure(make_sum(scale), sensitivity, [float(exact[g]) for g in order])
        else:  # nothing released: nothing drawn, the share is spent all the same
            eps, dl = _epsilon_delta(make_sum(scale).map(sensitivity))
        noisy_sums.append(dict(zip(order, (float(v) for v in values), strict=True)))
        measured.append({"statistic": "sum", "epsilon": eps, "delta": dl, "scale": scale})
    spent_eps = math.fsum(x["epsilon"] for x in measured)
    spent_delta = math.fsum(x["delta"] for x in measured)
    if spent_eps > epsilon or spent_delta > delta + 1e-300:
        raise ValueError(f"dp: the measurements spend ({spent_eps}, {spent_delta}), over the task's epsilon")
    info = {"threshold": threshold, "measurements": measured, "epsilon": spent_eps, "delta": spent_delta}
    return released, noisy_sums, info
