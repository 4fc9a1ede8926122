#!/usr/bin/env python
"""RPC client of RabbitMQ tutorial 6 ("Remote procedure call"), for pika 1.x.

FibonacciRpcClient sends n to rpc_queue with its callback queue as reply_to and a fresh
correlation_id, then waits for the reply with that correlation_id. It converts n and fib(n)
to and from bytes; amqp_rpc.RpcClient does the rest, for production: a call never hangs,
fails fast when no server consumes the queue, raises the server's error replies, and is not
lost with a broker node. Usage: FibonacciRpcClient().call(30) == 832040
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence

from pika.exceptions import AMQPChannelError

from amqp_rpc import (
    DEFAULT_TIMEOUT,
    URL_HELP,
    NoServerError,
    RpcClient,
    RpcConnectionError,
    RpcError,
    RpcTimeoutError,
    default_url,
    setup_logging,
)

__all__ = [
    "FibonacciRpcClient",
    "NoServerError",
    "RpcConnectionError",
    "RpcError",
    "RpcTimeoutError",
]


class FibonacciRpcClient(RpcClient):
    """FibonacciRpcClient(url=None, timeout=10.0, queue="rpc_queue", retries=1)"""

    def call(self, n: int, timeout: float | None = None) -> int:
        """fib(n) from a server; raises RpcError, RpcTimeoutError or RpcConnectionError."""
        return read_answer(super().call(str(n).encode(), timeout))

    def call_many(
        self, ns: Iterable[int], window: int = 100, timeout: float | None = None
    ) -> list[int]:
        """[fib(n) for n in ns], window requests in flight at once; raises as call() would."""
        replies = super().call_many([str(n).encode() for n in ns], window, timeout)
        return [read_answer(reply) for reply in replies]


def read_answer(body: bytes) -> int:
    try:
        return int(body)
    except ValueError as error:  # not a number, or past the digits Python converts
        raise RpcError(f"cannot read the reply: {error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Request fib(n) from the tutorial 6 RPC server.")
    parser.add_argument("n", nargs="*", type=int, default=[30], help="n to request (default: 30)")
    parser.add_argument("--url", default=default_url(), help=URL_HELP)
    parser.add_argument("--queue", default="rpc_queue", help="request queue (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per reply")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail, pika's too")
    args = parser.parse_args(argv)
    setup_logging(args.verbose, logging.WARNING)
    try:
        with FibonacciRpcClient(args.url, args.timeout, args.queue) as fibonacci_rpc:
            for n in args.n:
                print(f" [x] Requesting fib({n})", flush=True)
                response = fibonacci_rpc.call(n)
                print(f" [.] Got {response}", flush=True)
    except ValueError as error:  # the URL, the timeout or the queue
        parser.error(str(error))
    # AMQPChannelError: the broker refused something, a permission this account lacks, say.
    except (RpcError, ConnectionError, TimeoutError, AMQPChannelError) as error:
        print(f"rpc_client: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
