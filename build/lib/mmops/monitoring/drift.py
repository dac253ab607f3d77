"""Online drift detection: kernel tests over a sliding window of live events, calibrated to an ERT.

Two tests watch each signal, each given twice the signal's ERT share (a union bound). The first
statistic is the unbiased squared MMD (Gretton et al., JMLR 2012) between the last `window`
live embeddings and a fixed reference sample, with a Gaussian kernel whose bandwidth is the
median heuristic on the reference. As in Cobb, Van Looveren and Klaise, "Sequential multivariate
change detection with calibrated and memoryless false detection rates" (AISTATS 2022; the method
behind alibi-detect's `MMDDriftOnline`), the window slides one event at a time, each update costs
O((reference + window) x width), and the threshold is set by simulating streams from the
reference so that false alarms arrive at a chosen expected run time (ERT, in events). The MMD's
power against a share e of shifted events falls as e^2, so the second test counts, in the same
window, the events that are novel: whose mean kernel to the reference is below that of all but
`novelty_rate` of the reference's own points (left out in turn); a scan statistic on a binomial
rate, whose power falls only as e.

Calibration differs from alibi-detect in two ways, both towards fewer false alarms on data the
threshold never saw. Each simulated stream uses a fresh random half of the reference as reference
and draws its events from the other half, so the threshold carries the noise of having only a
finite reference, which the live test (against the whole reference) has less of. And rather than
per-step quantiles (a 1 - 1/ERT quantile cannot be estimated from a few hundred streams), a
Gumbel law is fitted to each stream's largest statistic over `horizon` events (Fisher-Tippett),
and the threshold is its quantile (1 - 1/ERT) ** horizon: the chance that a memoryless detector
with that ERT stays silent that long. alibi-detect itself is not a dependency: it is under the
BSL since 0.12.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# Pairs whose squared distances set the bandwidth: enough for a stable median.
_MEDIAN_PAIRS = 200_000
# Half of the reference is each simulated stream's reference, half its events.
MIN_REFERENCE = 20


def median_gamma(x: np.ndarray, seed: int = 0) -> float:
    """1 / median squared distance between points of `x` (the median heuristic)."""
    n = len(x)
    rng = np.random.default_rng(seed)
    pairs = min(_MEDIAN_PAIRS, n * (n - 1) // 2)
    i, j = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    keep = i != j
    d2 = ((x[i[keep]] - x[j[keep]]) ** 2).sum(1)
    median = float(np.median(d2)) if d2.size else 0.0
    return 1.0 / median if median > 1e-12 else 1.0


def rbf(x: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    """exp(-gamma ||x_i - y_j||^2) for every pair of rows."""
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.exp(-gamma * np.maximum(d2, 0.0))


def mmd2(x: np.ndarray, y: np.ndarray, gamma: float) -> float:
    """The unbiased squared MMD between samples `x` and `y` (for tests and the bench)."""
    kxx, kyy, kxy = rbf(x, x, gamma), rbf(y, y, gamma), rbf(x, y, gamma)
    n, m = len(x), len(y)
    within_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within_x + within_y - 2 * kxy.mean())


@dataclass(frozen=True)
class Calibration:
    """A threshold and how it was found."""

    threshold: float
    ert: int
    horizon: int
    streams: int
    quantile: float


def gumbel_threshold(maxima: np.ndarray, ert: float, horizon: int, streams: int) -> Calibration:
    """The level a stream's maximum over `horizon` events passes with the chance that a detector
    of expected run time `ert` alarms in that time, from a Gumbel law fitted to `maxima`."""
    from scipy.stats import gumbel_r

    quantile = (1.0 - 1.0 / ert) ** horizon
    if np.ptp(maxima) < 1e-12:
        return Calibration(float(maxima[0]), int(ert), horizon, streams, quantile)
    loc, scale = gumbel_r.fit(maxima)
    threshold = max(float(gumbel_r.ppf(quantile, loc, scale)), float(maxima.max()))
    return Calibration(threshold, int(ert), horizon, streams, quantile)


def calibrate_mmd(
    gram: np.ndarray, window: int, ert: float, streams: int, horizon: int, seed: int
) -> Calibration:
    """The MMD threshold at which windows of data like the reference alarm once per `ert`
    events; `gram` is the reference's kernel matrix."""
    n = len(gram)
    if n < MIN_REFERENCE:
        raise ValueError(f"a reference of {n} embeddings is too small (at least {MIN_REFERENCE})")
    rng = np.random.default_rng(seed)
    half = n // 2
    maxima = np.empty(streams)
    for b in range(streams):
        order = rng.permutation(n)
        ref, pool = order[:half], order[half:]
        sub = gram[np.ix_(pool, pool)].copy()
        # A point drawn twice is two draws: its similarity to itself is replaced by its mean
        # similarity to the others, as a fresh point would have.
        np.fill_diagonal(sub, (sub.sum(1) - 1.0) / max(1, len(pool) - 1))
        ref_term = (gram[np.ix_(ref, ref)].sum() - half) / (half * (half - 1))
        cross = gram[np.ix_(pool, ref)].mean(1)
        draws = rng.integers(0, len(pool), window + horizon)
        maxima[b] = _sliding_mmd2(sub, cross, ref_term, draws, window).max()
    return gumbel_threshold(maxima, ert, horizon, streams)


def _sliding_mmd2(
    gram: np.ndarray, cross: np.ndarray, ref_term: float, draws: np.ndarray, window: int
) -> np.ndarray:
    """The statistic after each event from the `window`-th on, for a stream of pool indices."""
    n = len(draws)
    # Event t's similarity to the window - 1 events before it (what it adds entering the
    # window) and event l's to the window - 1 after it (what it takes away leaving), one
    # diagonal of the stream's kernel matrix at a time: only the band is ever needed.
    row, col = np.zeros(n), np.zeros(n)
    for lag in range(1, min(window, n)):
        pairs_at_lag = gram[draws[lag:], draws[:-lag]]
        row[lag:] += pairs_at_lag
        col[:-lag] += pairs_at_lag
    steps = np.cumsum(row[window:] - col[: n - window])
    pairs = row[:window].sum() + np.concatenate([[0.0], steps])
    cross_sum = np.convolve(cross[draws], np.ones(window), mode="valid")
    return ref_term + 2 * pairs / (window * (window - 1)) - 2 * cross_sum / window


def novelty_cutoff(gram: np.ndarray, rate: float) -> tuple[float, float]:
    """The mean-kernel level below which an event is novel, and the chance a fresh event of the
    reference's law is: an upper 95% bound, from the reference's points each left out in turn."""
    from scipy.stats import beta

    n = len(gram)
    left_out = (gram.sum(1) - np.diag(gram)) / (n - 1)
    cutoff = float(np.quantile(left_out, rate))
    below = int((left_out < cutoff).sum())
    return cutoff, float(beta.ppf(0.95, below + 1, n - below))


def calibrate_novelty(
    p: float, window: int, ert: float, streams: int, horizon: int, seed: int
) -> Calibration:
    """The count of novel events in a window that data like the reference passes once per `ert`
    events, when each event is novel with chance `p`."""
    rng = np.random.default_rng(seed)
    maxima = np.empty(streams)
    kernel = np.ones(window)
    for b in range(streams):
        novel = (rng.random(window + horizon) < p).astype(float)
        maxima[b] = np.convolve(novel, kernel, mode="valid").max()
    calibration = gumbel_threshold(maxima, ert, horizon, streams)
    return dataclasses.replace(calibration, threshold=float(np.floor(calibration.threshold)))


@dataclass(frozen=True)
class Reading:
    """A signal's statistics after each event of an update (NaN until the window is full)."""

    mmd: np.ndarray
    novel: np.ndarray

    def alarms(self, detector: OnlineDetector) -> np.ndarray:
        """Per event: whether either test passes its threshold."""
        with np.errstate(invalid="ignore"):
            return (self.mmd > detector.mmd.threshold) | (self.novel > detector.novelty.threshold)


class OnlineDetector:
    """One signal's detector: `update` with live embeddings, read the statistics per event.

    Calibrating costs a few seconds: build it off the serving path, and `reset` (cheap) to
    start again on the same reference.
    """

    def __init__(
        self,
        reference: np.ndarray,
        window: int,
        ert: float,
        streams: int = 300,
        horizon: int = 1000,
        seed: int = 0,
        novelty_rate: float = 0.01,
    ) -> None:
        self.reference = np.asarray(reference, dtype=np.float64)
        n = len(self.reference)
        if n < MIN_REFERENCE:
            raise ValueError(
                f"a reference of {n} embeddings is too small (at least {MIN_REFERENCE})"
            )
        self.window = window
        self.gamma = median_gamma(self.reference, seed)
        gram = rbf(self.reference, self.reference, self.gamma)
        # Two tests share the signal's ERT: each alarms half as often.
        self.mmd = calibrate_mmd(gram, window, 2 * ert, streams, horizon, seed)
        self.cutoff, self.novel_chance = novelty_cutoff(gram, novelty_rate)
        self.novelty = calibrate_novelty(
            self.novel_chance, window, 2 * ert, max(streams, 1000), horizon, seed
        )
        self._ref_term = float((gram.sum() - n) / (n * (n - 1)))
        # Live kernels in single precision: twice the speed of the exps and products per event,
        # errors near 1e-7 against statistics near 1e-2 (the window's pair sum is recomputed
        # from its kernel matrix each batch, so rounding never accumulates).
        self._live_reference = self.reference.astype(np.float32)
        self.reset()

    def reset(self) -> None:
        """Forget every event seen."""
        width, w = self.reference.shape[1], self.window
        self._ring = np.zeros((w, width), dtype=np.float32)
        self._gram = np.zeros((w, w))  # kernel between ring slots
        self._cross = np.zeros(w)  # each slot's mean kernel to the reference
        self._pairs = 0.0
        self.seen = 0

    def update(self, x: np.ndarray) -> Reading:
        """The statistics after each row of `x`."""
        x = np.asarray(x, dtype=np.float32)
        if not len(x):
            return Reading(np.zeros(0), np.zeros(0))
        cross = rbf(x, self._live_reference, self.gamma).mean(1, dtype=np.float64)
        filling = max(0, min(len(x), self.window - self.seen))
        parts = [self._fill(x[:filling], cross[:filling])] if filling else []
        for start in range(filling, len(x), self.window):
            stop = start + self.window
            parts.append(self._slide(x[start:stop], cross[start:stop]))
        return Reading(*(np.concatenate(values) for values in zip(*parts, strict=True)))

    def _fill(self, x: np.ndarray, cross: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The first `window` events, one at a time; statistics from the last of them."""
        for point, near in zip(x, cross, strict=True):
            slot = self.seen
            self._ring[slot] = point
            k = rbf(point[None], self._ring[: slot + 1], self.gamma)[0]
            k[slot] = 1.0
            self._gram[slot, : slot + 1] = k
            self._gram[: slot + 1, slot] = k
            self._pairs += 2 * (k.sum() - 1.0)
            self._cross[slot] = near
            self.seen += 1
        mmd, novel = np.full(len(x), np.nan), np.full(len(x), np.nan)
        if self.seen == self.window:
            mmd[-1], novel[-1] = self._statistic(), float((self._cross < self.cutoff).sum())
        return mmd, novel

    def _slide(self, x: np.ndarray, cross: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Up to `window` events into a full window, vectorised: each replaces the oldest."""
        w, b = self.window, len(x)
        slots = (self.seen + np.arange(b)) % w  # distinct: b <= window
        to_old = rbf(x, self._ring, self.gamma)  # (b, w): new events against the ring
        to_new = rbf(x, x, self.gamma)
        old_pairs = self._gram[np.ix_(slots, slots)]
        new_old = to_old[:, slots]  # [j, k]: new event j against the old event at slots[k]
        # Event i leaves its slot's old event: the old event's pairs with the old events still
        # in (not yet replaced) and the new events already in.
        leaving = self._gram[slots].sum(1) - np.tril(old_pairs).sum(1) + np.triu(new_old, 1).sum(0)
        entering = to_old.sum(1) - np.tril(new_old).sum(1) + np.tril(to_new, -1).sum(1)
        pairs = self._pairs + 2 * np.cumsum(entering - leaving)
        cross_sum = self._cross.sum() + np.cumsum(cross - self._cross[slots])
        novel_now = int((self._cross < self.cutoff).sum())
        novel = novel_now + np.cumsum((cross < self.cutoff).astype(int))
        novel -= np.cumsum((self._cross[slots] < self.cutoff).astype(int))
        self._ring[slots] = x
        self._gram[slots, :] = to_old
        self._gram[:, slots] = to_old.T
        self._gram[np.ix_(slots, slots)] = to_new
        self._cross[slots] = cross
        self._pairs = float(self._gram.sum() - w)  # = pairs[-1], without accumulated rounding
        self.seen += b
        mmd = self._ref_term + pairs / (w * (w - 1)) - 2 * cross_sum / w
        return mmd, novel.astype(float)

    def _statistic(self) -> float:
        w = self.window
        return float(self._ref_term + self._pairs / (w * (w - 1)) - 2 * self._cross.sum() / w)
