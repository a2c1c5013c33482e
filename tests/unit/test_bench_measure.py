"""The rollout bench's arithmetic: CPU-bound marking, percentiles, bytes by source, targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import rollout
from bench.report import plot_timeline, rollout_table, targets
from bench.rollout import RolloutResult, percentile, settled_idle
from bench.sampler import Timeline
from bench.services import registry_bytes


def timeline(idle_per_half_second: list[int]) -> Timeline:
    """Samples every 0.5 s on a 2-core machine at 100 jiffies a second per core."""
    tl = Timeline(0.0, 0.5, sent={"registry": [], "h1": []}, received={"registry": [], "h1": []})
    idle = total = 0
    for n, pct in enumerate([0, *idle_per_half_second]):
        total += 100 if n else 0
        idle += pct if n else 0
        tl.t.append(n * 0.5)
        tl.cpu_idle.append(idle)
        tl.cpu_total.append(total)
        tl.sent["registry"].append(n * 1000)
        tl.received["registry"].append(n * 10)
        tl.sent["h1"].append(n * 50)
        tl.received["h1"].append(n * 900)
    return tl


def test_one_second_windows_find_the_busy_seconds() -> None:
    tl = timeline([10, 10, 90, 90, 10, 30, 50, 50])  # seconds at 10 %, 90 %, 20 %, 50 % idle
    assert [round(s) for s in tl.idle_per_second()] == [10, 90, 20, 50]
    assert tl.low_idle_share() == 0.25  # 20 % itself is not under 20 %
    assert tl.idle_percent() == 42.5
    assert tl.delta("registry") == (8000, 80)
    assert tl.delta("h1") == (400, 7200)


def test_the_idle_while_hosts_finish_is_read_from_the_samples_around_them() -> None:
    tl = timeline([50, 50, 50, 50, 0, 2, 50, 50])  # busy from 2.0 to 3.0 s
    assert tl.idle_between(2.1, 2.9) == 1.0  # the samples at 2.0 and 3.0 around the two
    assert tl.idle_between(2.0, 3.0) == 1.0
    assert tl.idle_between(2.2, 2.2) == 0.0  # one host done: one interval at least
    assert tl.idle_between(1.0, 3.5) == 30.4  # (50 + 50 + 0 + 2 + 50) / 5
    assert tl.idle_between(-5.0, 99.0) == tl.idle_percent()
    assert timeline([]).idle_between(0.0, 1.0) == -1.0


def test_the_idle_cost_is_read_once_the_agents_have_settled(monkeypatch: pytest.MonkeyPatch) -> None:
    # idle % of successive one-second windows: agents still settling, then steady
    windows = iter([40, 70, 88, 95, 94, 96])
    jiffies = [0, 0]  # idle, total

    def read() -> tuple[int, int]:
        return jiffies[0], jiffies[1]

    def elapse(_: float) -> None:
        jiffies[0] += next(windows)
        jiffies[1] += 100

    monkeypatch.setattr(rollout, "cpu_jiffies", read)
    assert settled_idle(sleep=elapse) == 94.5  # not the 40 % of the first window
    windows = iter([10, 50, 10, 50])
    assert settled_idle(windows=4, sleep=elapse) == 50  # never settles: the last window, and it stops


def test_nearest_rank_percentiles_of_64_hosts() -> None:
    times = [float(i) for i in range(1, 65)]
    assert percentile(times, 0.5) == 32.0
    assert percentile(times, 0.99) == 64.0  # with 64 hosts p99 is the slowest one
    assert percentile(times, 0.999) == 64.0
    assert percentile(list(range(1000)), 0.99) == 989


def test_registry_egress_that_left_the_host_is_told_from_the_origins(tmp_path: Path) -> None:
    log = tmp_path / "registry.log"
    line = ('time="x" level=info msg="response completed" http.request.remoteaddr="{addr}" '
            'http.request.method=GET http.response.status=200 http.response.written={n}\n')
    log.write_text(line.format(addr="10.199.0.2:40001", n=5000)  # the origin beside it
                   + line.format(addr="10.199.1.7:40002", n=300)  # an agent's small blob
                   + line.format(addr="[fd00:88::1:3]:40003", n=20)
                   + 'level=info msg="response completed" http.response.written=-\n')
    assert registry_bytes(log, {"10.199.0.2"}) == (5320, 320)
    assert registry_bytes(tmp_path / "absent.log", set()) == (0, 0)


def result(**kw: object) -> RolloutResult:
    base: dict[str, object] = dict(
        system="shoal", hosts=10, image_bytes=4_000_000, cap_bytes=1_000_000, total_seconds=8.0, p50_seconds=4.0,
        p99_seconds=5.0, registry_egress_bytes=1_000_000, errors=[], cpu_idle_percent=50.0, fetch_bytes=1_000_000,
        seeder_upload_bytes=1_100_000)
    base.update(kw)
    return RolloutResult(**base)  # type: ignore[arg-type]


def test_a_rolling_update_is_judged_by_the_hosts_that_join_a_swarm_with_the_blob() -> None:
    r = result(scenario="rolling", waves=4, wave_hosts=3,
               host_seconds=[3.0, 2.5, 2.0, 1.05, 1.2, 1.0, 1.0, 1.0, 1.0, 1.1])
    row = r.row()
    assert row["ideal_seconds"] == 1.0  # the new blobs, not the whole image
    assert row["ratio_to_ideal"] == 2.0  # four waves one after the other: 8 s against 4 x 1 s
    assert row["joined_max_x"] == 1.2  # the first wave's 3 s is a cold swarm's
    assert row["seeder_ratio"] == 1.1 and row["egress_ratio"] == 1.0
    assert not row["cpu_bound"]
    assert result(cpu_idle_percent=19.9).row()["cpu_bound"]
    assert result().row()["joined_max_x"] is None


def test_cpu_bound_runs_do_not_count_toward_a_target(tmp_path: Path) -> None:
    fast = {**result(total_seconds=1.2).row(), "run": 1}
    slow_busy = {**result(total_seconds=9.0, cpu_idle_percent=5.0).row(), "run": 2}
    lines = "\n".join(targets([fast, slow_busy]))
    assert "last host done <= 1.3x: 1 of 1 link-bound shoal runs meet it (worst 1.2x); 1 CPU-bound not counted" \
        in lines
    table = "\n".join(rollout_table([fast, slow_busy]))
    assert "| no: CPU-bound |" in table and "| yes |" in table
    row = {**result(timeline=timeline([50] * 6).to_json(), wave_starts=[0.2, 1.5]).row(), "run": 1}
    plot_timeline(row, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
