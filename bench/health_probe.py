"""CPU per HTTP health check: the h11 probe (sidecar/httpprobe.py) against the httpx one.

Run from the repository root (a loopback service only, on 127.0.0.1):

    python bench/health_probe.py [--runs 5] [--checks 300] [--rate 20]

A keep-alive service (sidecar.httpserver, as the status port serves) runs in a process of
its own, so its CPU is not counted. Each run is a fresh child process for one variant,
old and new interleaved: it opens its client, warms up with a few checks, then runs
`--checks` checks at `--rate` a second (spaced, so caches cool a little between checks as
at the real 1/s) and reports the process CPU spent inside the checks (CLOCK_PROCESS_CPUTIME_ID,
nanosecond resolution) divided by their number, plus its RSS. The figure printed per
variant is the median over runs. "old" is the probe health.py had before issue 13's
change, copied below (httpx.AsyncClient, streamed GET, capped body read).
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import trio

BODY_LIMIT = 64 * 1024
WARMUP = 10


def serve() -> None:
    """The service: /healthz answers 200 over HTTP/1.1 keep-alive until stdin closes."""
    from sidecar.httpserver import HTTPServer, Limits, Response

    async def main() -> None:
        server = HTTPServer(
            {"/healthz": lambda: Response(b"ok\n", "text/plain")},
            not_found="only /healthz",
            limits=Limits(request_timeout=60.0),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, "127.0.0.1", 0)
            print(server.ports[0], flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the parent is done
            nursery.cancel_scope.cancel()

    trio.run(main)


async def old_probe(url: str) -> tuple[Callable[[], Awaitable[int]], Callable[[], Awaitable[None]]]:
    """The httpx probe as health.py had it (`_new_http_client` + `_probe_http`)."""
    import httpx

    refuse_all = http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
    client = httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=None,
        cookies=http.cookiejar.CookieJar(policy=refuse_all),
        headers={"User-Agent": "fip-sidecar-health"},
        verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
    )

    async def get() -> int:
        async with client.stream("GET", url) as response:
            received = 0
            async for chunk in response.aiter_raw():
                received += len(chunk)
                if received >= BODY_LIMIT:
                    break
        return response.status_code

    return get, client.aclose


async def new_probe(url: str) -> tuple[Callable[[], Awaitable[int]], Callable[[], Awaitable[None]]]:
    from sidecar.httpprobe import HTTPProbe

    probe = HTTPProbe(url, body_limit=BODY_LIMIT)
    return probe.get, probe.aclose


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(variant: str, url: str, checks: int, rate: float) -> None:
    async def main() -> dict[str, float]:
        make = old_probe if variant == "old" else new_probe
        get, aclose = await make(url)
        for _ in range(WARMUP):
            assert await get() == 200
        spent = 0
        failures = 0
        next_start = trio.current_time()
        for _ in range(checks):
            next_start += 1.0 / rate
            await trio.sleep_until(next_start)
            before = time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID)
            with trio.move_on_after(0.8):  # as HealthChecker bounds a check
                if await get() != 200:
                    failures += 1
            spent += time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID) - before
        await aclose()
        return {"cpu_us": spent / checks / 1000, "rss_kib": rss_kib(), "failures": failures}

    print(json.dumps(trio.run(main)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per variant (interleaved)")
    parser.add_argument("--checks", type=int, default=300, help="checks per run")
    parser.add_argument("--rate", type=float, default=20.0, help="checks per second")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if args.child:
        child(args.child, args.url, args.checks, args.rate)
        return

    me = os.path.abspath(__file__)
    server = subprocess.Popen(
        [sys.executable, me, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}/healthz"
        results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        sizes = ["--checks", str(args.checks), "--rate", str(args.rate)]
        for run in range(args.runs):
            for variant in ("old", "new"):
                out = subprocess.run(
                    [sys.executable, me, "--child", variant, "--url", url, *sizes],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                result = json.loads(out)
                results[variant].append(result)
                print(
                    f"run {run + 1} {variant}: {result['cpu_us']:.0f} us/check, "
                    f"RSS {result['rss_kib'] / 1024:.1f} MiB, failures {result['failures']:.0f}",
                    flush=True,
                )
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=10)
    print(f"{args.checks} checks at {args.rate:g}/s, median over {args.runs} runs:")
    for variant, runs in results.items():
        cpu = statistics.median(r["cpu_us"] for r in runs)
        rss = statistics.median(r["rss_kib"] for r in runs) / 1024
        print(f"  {variant}: {cpu:.0f} us CPU per check, RSS {rss:.1f} MiB")


if __name__ == "__main__":
    main()
