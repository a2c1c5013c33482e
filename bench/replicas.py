"""Announces per second: one tracker process keeping peers in memory (the embedded default), and
one and two tracker processes sharing Redis (issue 15). Run from this tree:

    python -m bench.replicas --seconds 10

The load is bench/trackers.py's: wrk, an announce script over 5,000 peers of one registered
torrent (one in five a seeder), numwant 50, signed swarm token; the same total number of
connections in every case, split evenly over the processes (one wrk per tracker process, run at
once). Reported per case: announces/s (sum), p50/p99 latency, errors, the machine's CPU idle, and
CPU-seconds per 1,000 announces of the tracker processes and of redis-server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

from bench import services
from bench.loadgen import WrkResult, wrk
from bench.sampler import cpu_jiffies
from bench.trackers import register_and_script
from shoal import metainfo, peercerts, protocol, signing
from shoal.cluster import Cluster, command, make_keys, source_path
from shoal.oci import Digest
from tests.support.procs import free_port, proc_stats
from tests.support.redis import RedisServer

CASES = {"memory-1": (None, 1), "redis-1": ("redis", 1), "redis-2": ("redis", 2)}


def evalsha_usec(redis: RedisServer) -> float:
    """Redis's own time per script call (INFO commandstats: the scripts run as EVALSHA)."""
    out = subprocess.run(["redis-cli", "-p", str(redis.port), "--no-auth-warning", "-a", redis.password,
                          "INFO", "commandstats"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(kv.split("=", 1) for kv in line.split(":", 1)[1].split(","))
            return float(fields["usec_per_call"])
    return 0.0


def run_case(work: Path, name: str, *, seconds: int, connections: int) -> dict[str, object]:
    store, processes = CASES[name]
    work.mkdir(parents=True, exist_ok=True)
    keys = make_keys(work / "keys")
    data = b"replica bench" * 1000
    digest = Digest(hashlib.sha256(data).hexdigest())
    (work / digest.hex).write_bytes(data)
    ports = [free_port() for _ in range(processes)]
    key = signing.load_private_key(str(keys["signing_key"]), "signing_key")
    raw = metainfo.create(work / digest.hex, digest, announce=[protocol.ANNOUNCE.url(f"http://127.0.0.1:{p}")
                                                                  for p in ports],
                          root_cert=peercerts.ca_certificate(key))
    meta = metainfo.parse(raw)
    token = signing.issue_token(key, "bench", 3600, meta.digest.hex)
    redis = RedisServer(work / "redis").start() if store == "redis" else None
    cluster = Cluster(keys, [], tracker_url="", origin_url="", log={"level": "warning"})
    procs = []
    logs = []
    try:
        for i, port in enumerate(ports):
            extra = {"redis": redis.settings("bench:")} if redis is not None else {}
            config = work / f"tracker{i}.yaml"
            # the load generator announces thousands of peers from one address
            config.write_text(yaml.safe_dump(cluster.tracker(listen=f"127.0.0.1:{port}",
                                                             max_peers_per_address=100_000, **extra)))
            logs.append(open(work / f"tracker{i}.log", "ab"))  # noqa: SIM115
            procs.append(subprocess.Popen(command("tracker", config), stdout=logs[-1], stderr=logs[-1],
                                          env={"PYTHONPATH": source_path(services.ROOT)}))
        script = register_and_script(work, ports, keys, key, raw, token)
        # warm up: fill the swarm with its 5,000 peers before measuring
        wrk(f"http://127.0.0.1:{ports[0]}", threads=1, connections=8, seconds=2, script=script)
        pids = [p.pid for p in procs] + ([redis.proc.pid] if redis is not None and redis.proc is not None else [])
        cpu0 = {pid: proc_stats(pid)[1] for pid in pids}
        idle0, total0 = cpu_jiffies()
        results: list[WrkResult] = []
        lock = threading.Lock()

        def load(port: int) -> None:
            r = wrk(f"http://127.0.0.1:{port}", threads=1, connections=connections // processes, seconds=seconds,
                    script=script)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=load, args=(p,)) for p in ports]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        idle1, total1 = cpu_jiffies()
        cpu1 = {pid: proc_stats(pid)[1] for pid in pids}
        script_usec = evalsha_usec(redis) if redis is not None else 0.0
        announces = sum(r.requests_per_second for r in results) * seconds
        tracker_cpu = sum(cpu1[p.pid] - cpu0[p.pid] for p in procs)
        redis_cpu = (cpu1[pids[-1]] - cpu0[pids[-1]]) if redis is not None else 0.0
        return {
            "case": name, "processes": processes, "store": store or "memory", "connections": connections,
            "announces_per_second": round(sum(r.requests_per_second for r in results)),
            "p50_ms": round(max(r.p50_ms for r in results), 2), "p99_ms": round(max(r.p99_ms for r in results), 2),
            "errors": sum(r.errors for r in results),
            "cpu_idle_percent": round(100 * (idle1 - idle0) / max(total1 - total0, 1), 1),
            "tracker_cpu_s_per_1k": round(1000 * tracker_cpu / max(announces, 1), 3),
            "redis_cpu_s_per_1k": round(1000 * redis_cpu / max(announces, 1), 3),
            "redis_script_usec": script_usec,
        }
    finally:
        services.stop_all(procs)  # (killed after 20 s: a tracker that hangs must not stop the bench)
        for log in logs:
            log.close()
        if redis is not None:
            redis.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "replicas.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-replicas-") as tmp:
        for round_ in range(args.rounds):
            for name in CASES:
                row = run_case(Path(tmp) / f"{name}-{round_}", name, seconds=args.seconds,
                               connections=args.connections)
                rows.append({**row, "round": round_ + 1})
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    base = sorted(r["announces_per_second"] for r in rows if r["case"] == "memory-1")  # type: ignore[type-var]
    base_median = base[len(base) // 2]
    print(f"\n{'case':10} {'announces/s':>12} {'x memory-1':>11} {'p50':>8} {'p99':>8} {'CPU idle':>9} "
          f"{'tracker CPU-s/1k':>17} {'redis CPU-s/1k':>15} {'script us':>10}")
    for name in CASES:
        sel = sorted((r for r in rows if r["case"] == name), key=lambda r: r["announces_per_second"])  # type: ignore
        mid = sel[len(sel) // 2]
        rate = float(mid["announces_per_second"])  # type: ignore[arg-type]
        print(f"{name:10} {rate:12.0f} {rate / float(base_median):10.2f}x {mid['p50_ms']:>6}ms {mid['p99_ms']:>6}ms "  # type: ignore[arg-type]
              f"{mid['cpu_idle_percent']:>8}% {mid['tracker_cpu_s_per_1k']:>17} {mid['redis_cpu_s_per_1k']:>15} "
              f"{mid['redis_script_usec']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
