"""Load for the tests: one client process calling fib(n) again and again.

    python -m tests.load_client URLS QUEUE [--seconds S] [--calls N] [--ns N,N,...]

It prints "ready" once connected and "answered N" at every tenth answer. It calls until
its stdin closes or a bound is reached (--seconds, --calls), then prints a JSON summary:
calls, answers, wrong answers, errors by type (with the first messages), and the slowest
call in seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from collections import Counter

import rpc_client
import rpc_server


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls")
    parser.add_argument("queue")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--pause", type=float, default=0.005, help="seconds between calls")
    parser.add_argument("--ns", default="0-300", help="the n to call, at random: N,N,... or A-B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    stop = threading.Event()
    # The test closes our stdin when it has seen enough.
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    first, _, last = args.ns.partition("-")
    ns = range(int(first), int(last) + 1) if last else [int(n) for n in args.ns.split(",")]
    answers = {n: rpc_server.fib(n) for n in ns}
    calls, answered, worst = 0, 0, 0.0
    wrong: list[str] = []
    errors: Counter[str] = Counter()
    first_errors: list[str] = []
    end = time.monotonic() + args.seconds
    with rpc_client.FibonacciRpcClient(args.urls, timeout=10, queue=args.queue) as client:
        print("ready", flush=True)
        while not stop.is_set() and calls < args.calls and time.monotonic() < end:
            n = random.choice(ns)
            calls += 1
            started = time.monotonic()
            try:
                result = client.call(n)
            except Exception as error:  # counted and reported: the test asserts there are none
                errors[type(error).__name__] += 1
                if len(first_errors) < 5:
                    first_errors.append(f"fib({n}): {type(error).__name__}: {error}")
            else:
                if result == answers[n]:
                    answered += 1
                    if answered % 10 == 0:  # for the test to wait on: the load goes on
                        print(f"answered {answered}", flush=True)
                elif len(wrong) < 5:
                    wrong.append(f"fib({n}) = {result}?")
            worst = max(worst, time.monotonic() - started)
            time.sleep(args.pause)
    summary = {
        "calls": calls,
        "answered": answered,
        "wrong": wrong,
        "errors": dict(errors),
        "first_errors": first_errors,
        "worst": round(worst, 3),
        "stopped": stop.is_set(),  # by the test (its stdin closed), not by a bound
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
