"""The soak's flatness rule: a leak fails it, a burst of connections does not."""

from __future__ import annotations

from tests.support.soakcheck import flat


def test_descriptors_by_median_ignore_a_burst_but_not_a_leak() -> None:
    steady = [20.0] * 30
    burst = [*steady[:25], 44.0, *steady[26:]]  # one sample during a burst of keep-alive connections
    assert flat(burst, 16, by_median=True)[0]
    assert not flat(burst, 16)[0]  # by peak the burst would look like growth
    leak = [20.0 + i * 4 for i in range(30)]  # descriptors taken and never given back
    ok, detail = flat(leak, 16, by_median=True)
    assert not ok and "median" in detail
    assert flat(leak, 16)[0] is ok  # for a steady leak the median is as strict as the peak


def test_peaks_catch_memory_growth() -> None:
    rss = [100.0] * 20 + [100.0 + 10 * i for i in range(10)]
    assert not flat(rss, 16)[0]
    assert flat([100.0] * 30, 16)[0]
