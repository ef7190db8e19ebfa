"""`orcd gateway`: the OpenAI-compatible HTTP gateway over the job queue (never loads torch).

Binds 127.0.0.1 unless --host says otherwise. Authentication is on unless --no-auth is given:
without --api-keys-file (or $ORCD_API_KEYS_FILE) the command refuses to start.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid

from jobs.errors import OrcdError
from jobs.limits import DEFAULT_MODEL

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gateway.service import (
        BATCH_PRIORITY,
        DEFAULT_BODY_BYTES,
        DEFAULT_FILE_BYTES,
        DEFAULT_PORT,
        DEFAULT_TIMEOUT_S,
    )

    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"default {DEFAULT_PORT}")
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
                        help=f"Redis URL (default: $REDIS_URL or {DEFAULT_REDIS_URL})")
    parser.add_argument("--prefix", default="orcd", help="Redis key prefix (default: orcd)")
    parser.add_argument("--api-keys-file", default=os.environ.get("ORCD_API_KEYS_FILE"),
                        help="accepted keys, one a line: the key, or sha256:HEX of it, "
                        "optionally followed by rpm=N tpm=N streams=N ($ORCD_API_KEYS_FILE)")
    parser.add_argument("--no-auth", action="store_true",
                        help="accept requests without a key (a trusted network only)")
    parser.add_argument("--rpm", type=int, default=0,
                        help="requests per minute per key (default 0: unlimited)")
    parser.add_argument("--tpm", type=int, default=0,
                        help="tokens (prompt + completion) per minute per key (0: unlimited)")
    parser.add_argument("--max-streams", type=int, default=0,
                        help="concurrent streams per key (default 0: unlimited)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_BODY_BYTES,
                        help=f"request body limit (default {DEFAULT_BODY_BYTES})")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_FILE_BYTES,
                        help=f"uploaded file limit (default {DEFAULT_FILE_BYTES})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds a request may take before its jobs are cancelled and it "
                        f"gets 504 (default {DEFAULT_TIMEOUT_S:g}; a body's timeout_s wins)")
    parser.add_argument("--models-dir", help="directory of NAME.gguf files, for logprobs' "
                        f"token texts (or $ORCD_MODELS_DIR; {DEFAULT_MODEL} is built in)")
    parser.add_argument("--files-dir", help="keep Batch API file contents in this directory "
                        "(shared by every gateway) instead of Redis")
    parser.add_argument("--batch-priority", type=int, default=BATCH_PRIORITY,
                        help=f"job priority of batch lines (default {BATCH_PRIORITY})")
    parser.add_argument("--batch-window", type=int, default=256,
                        help="lines of one batch in flight at once (default 256)")
    parser.add_argument("--batch-lease", type=float, default=10.0,
                        help="seconds a dead gateway keeps its batches before another takes "
                        "them over (default 10)")
    parser.add_argument("--no-batches", dest="batches", action="store_false",
                        help="serve the Batch API's endpoints but drive no batch (another "
                        "gateway does)")
    parser.add_argument("--id", dest="gateway_id", help="gateway id (default: host-pid-random)")
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (default warning)")


def config_from(args: argparse.Namespace):
    from gateway.auth import ApiKeys, Limits
    from gateway.service import GatewayConfig

    limits = Limits(args.rpm, args.tpm, args.max_streams)
    if args.no_auth and args.api_keys_file:
        raise OrcdError("give --api-keys-file or --no-auth, not both")
    if not args.no_auth and not args.api_keys_file:
        raise OrcdError("API keys are required: give --api-keys-file FILE (or "
                        "$ORCD_API_KEYS_FILE), or --no-auth to accept any request")
    api_keys = None if args.no_auth else ApiKeys.load(args.api_keys_file, limits)
    gateway_id = args.gateway_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    return GatewayConfig(
        redis_url=args.redis, prefix=args.prefix, api_keys=api_keys, default_limits=limits,
        max_body_bytes=args.max_body_bytes, max_file_bytes=args.max_file_bytes,
        timeout_s=args.timeout, models_dir=args.models_dir, files_dir=args.files_dir,
        batch_priority=args.batch_priority, batch_window=args.batch_window,
        batch_lease_s=args.batch_lease, gateway_id=gateway_id)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from jobs.client import shown_url
    from worker.log import configure_logging, get_logger

    config = config_from(args)
    configure_logging("info")
    auth = "no auth" if config.api_keys is None else f"{len(config.api_keys)} API keys"
    get_logger().info("gateway.starting", host=args.host, port=args.port,
                      gateway_id=config.gateway_id, auth=auth,
                      narration=f"Gateway {config.gateway_id} on http://{args.host}:{args.port}"
                                f"/v1 ({auth}), Redis {shown_url(args.redis)}")
    uvicorn.run(create_app(config, run_batches=args.batches), host=args.host, port=args.port, log_level=args.log_level,
                access_log=False, timeout_graceful_shutdown=5)
    return 0
