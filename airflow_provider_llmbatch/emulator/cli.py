"""``llmbatch-emulator``: serve the vendors' Batch APIs on loopback until interrupted."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from airflow_provider_llmbatch.emulator.config import DEFAULT_API_KEY, DEFAULT_TIME_SCALE, EmulatorConfig
from airflow_provider_llmbatch.emulator.server import Emulator

API_KEY_ENV = "LLMBATCH_EMULATOR_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="llmbatch-emulator",
        description="Serve Zhipu, Moonshot, DashScope and OpenAI-style Batch APIs locally.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port to bind, 0 for any (default: 8765)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=DEFAULT_TIME_SCALE,
        help=(
            "multiplier of phase durations: a batch lasts about 1.4 s times this"
            f" (default: {DEFAULT_TIME_SCALE:g}, long enough for a sensor to defer; 0.1 for quick tests)"
        ),
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"the key to accept (default: ${API_KEY_ENV} or {DEFAULT_API_KEY!r})",
    )
    parser.add_argument("--data-dir", default=None, help="where files are kept (default: a temp dir)")
    parser.add_argument("--fail-pattern", default="^fail", help="custom_id regex of requests that fail")
    parser.add_argument(
        "--transient-pattern",
        default="^retry",
        help="custom_id regex of requests that fail once, rate limited, and succeed when sent again",
    )
    parser.add_argument(
        "--reply",
        action="append",
        default=[],
        metavar="REGEX=TEXT",
        help="a canned chat answer for prompts matching REGEX (repeatable; first match wins)",
    )
    parser.add_argument(
        "--invalid-output-pattern",
        default="^badjson",
        help="custom_id regex of JSON requests answered invalidly (not JSON, or a required field missing)",
    )
    parser.add_argument("--rate-limits", action="store_true", help="enforce documented per-minute limits")
    parser.add_argument("--seed", type=int, default=0, help="seed of probabilistic faults")
    parser.add_argument(
        "--upload-mbps",
        type=float,
        default=None,
        help="take upload bodies in at most this many megabits per second, as a link would (default: no cap)",
    )
    parser.add_argument("--access-log", action="store_true", help="log each request line (never headers)")
    parser.add_argument("--log-level", default="warning", help="server log level (default: warning)")
    return parser


def _reply(rule: str, parser: argparse.ArgumentParser) -> tuple[str, str]:
    pattern, sep, text = rule.partition("=")
    if not sep or not pattern:
        parser.error(f"--reply expects REGEX=TEXT, got {rule!r}")
    return pattern, text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator in the foreground; print each vendor's base URL; stop on SIGINT/SIGTERM."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = EmulatorConfig(
        time_scale=args.time_scale,
        fail_custom_id_pattern=args.fail_pattern,
        transient_custom_id_pattern=args.transient_pattern,
        rate_limits=args.rate_limits,
        seed=args.seed,
        replies=tuple(_reply(rule, parser) for rule in args.reply),
        invalid_output_custom_id_pattern=args.invalid_output_pattern,
        upload_bytes_per_second=args.upload_mbps * 125_000 if args.upload_mbps else None,
    )
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or DEFAULT_API_KEY
    emulator = Emulator(
        config,
        api_key=api_key,
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        access_log=args.access_log,
        log_level=args.log_level,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    emulator.start()
    try:
        print(f"llmbatch emulator on {emulator.url} (control: {emulator.url}/_emulator/health)", flush=True)
        for name, url in emulator.vendors().items():
            print(f"  {name:<10} {url}", flush=True)
        while not stop.wait(0.5):
            if not emulator.running:
                return 1
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
