#!/usr/bin/env python
"""RPC server of RabbitMQ tutorial 6 ("Remote procedure call"), for pika 1.x.

It consumes rpc_queue and answers each request, n, with fib(n), published to the request's
reply_to queue with its correlation_id. on_request() is the tutorial's, and the one function
to change to serve another procedure. amqp_rpc.RpcServer does the rest, for production
(error replies, acks after the broker has the reply, failover, SIGTERM): see the README.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Sequence

from pika.exceptions import AMQPChannelError

from amqp_rpc import URL_HELP, RpcServer, default_url, setup_logging

MAX_N = 20_000  # fib(20000) has 4180 digits, within the 4300 Python converts by default
FAST_N = 20_000  # fib(n) up to this takes milliseconds: no worker thread is needed


def fib(n: int) -> int:
    """The tutorial's fib(n), as a loop: its recursion takes exponential time."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def on_request(body: bytes, max_n: int = MAX_N, quiet: bool = False) -> bytes:
    """The reply to a request: fib(n) for the n in its body. A ValueError says what is wrong
    with the request: the caller gets it as an error reply, "invalid request: ..."."""
    n = parse_request(body, max_n)
    if not quiet:
        print(f" [.] fib({n})", flush=True)
    return str(fib(n)).encode()


def parse_request(body: bytes, max_n: int) -> int:
    """n from a request's body; raise ValueError saying what is wrong."""
    text = body.decode("utf-8", errors="replace").strip()
    # The length first: a huge body is never parsed; isascii: int() takes "+5", "1_0", "٣".
    if len(text) > len(str(max_n)) or not (text.isascii() and text.isdigit()) or int(text) > max_n:
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise ValueError(f"n must be an integer from 0 to {max_n}, got {shown!r}")
    return int(text)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Answer fib(n) requests from a RabbitMQ queue: the RPC server of tutorial 6.",
    )
    parser.add_argument("--url", default=default_url(), help=URL_HELP)
    parser.add_argument("--queue", default="rpc_queue", help="request queue (default: %(default)s)")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=1,
        help="requests worked on at once; 1 spreads slow calls fairly (default: 1)",
    )
    parser.add_argument("--max-n", type=int, default=MAX_N, help="largest n (default: %(default)s)")
    volume = parser.add_mutually_exclusive_group()
    volume.add_argument("-q", "--quiet", action="store_true", help="print no [.] line per request")
    volume.add_argument("-v", "--verbose", action="store_true", help="log debug detail, pika's too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.max_n < 0:
        parser.error(f"--max-n must be at least 0, got {args.max_n}")
    handler = functools.partial(on_request, max_n=args.max_n, quiet=args.quiet)
    threaded = args.max_n > FAST_N  # a raised --max-n may take longer than heartbeats allow
    awaiting = functools.partial(print, " [x] Awaiting RPC requests", flush=True)
    try:
        server = RpcServer(handler, args.url, args.queue, args.prefetch, threaded, awaiting)
    except ValueError as error:  # the URL, the queue or the prefetch
        parser.error(str(error))
    setup_logging(args.verbose, logging.INFO)
    sys.set_int_max_str_digits(0)  # a raised --max-n answers past 4300 digits
    try:
        server.run()
    except ConnectionError as error:  # no node took the first connection
        print(f"rpc_server: {error}", file=sys.stderr)
        return 1
    except AMQPChannelError as error:  # a queue declared otherwise, a permission missing
        print(f"rpc_server: the broker refused: {error!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
