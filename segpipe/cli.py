"""`segpipe`: `stack up|down|status` starts the local services; `leaderboard ...` is the leaderboard tool;
`weights fetch|push` keeps pretrained encoder weights in the S3 store."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from segpipe import stack
from segpipe.storage import StorageError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segpipe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stack", help="start/stop/show the local S3, Prefect and leaderboard services")
    st_sub = st.add_subparsers(dest="action", required=True)
    for action, help_ in (("up", "start the missing services (idempotent)"),
                          ("down", "stop the services `up` started; data is kept"),
                          ("status", "show each service, its state, URL and pid"),
                          ("credentials", "write <home>/credentials.env without starting anything (docker compose)"),
                          ("dvc-remote", "point the DVC remote at $SEGPIPE_S3_ENDPOINT with the environment's "
                                         "credentials (a container's worker)"),
                          ("weed-security", "write SeaweedFS's security.toml (JWT keys, gRPC mTLS, admin password) "
                                            "into --dir, as `up` does for its own weed (a container's store)")):
        a = st_sub.add_parser(action, help=help_, epilog=(
            f"Failed or crashed flow runs are posted to ${stack.ALERT_WEBHOOK_ENV} when it is set: a URL, read from "
            "the environment only, never the command line." if action == "up" else None))
        a.add_argument("--home", help="stack home (default: $SEGPIPE_HOME or ./.segpipe)")
        if action == "weed-security":
            a.add_argument("--dir", required=True, type=Path,
                           help="where weed will look for it: its working directory or $HOME/.seaweedfs")
        if action == "up":
            a.add_argument("--only", help=f"comma-separated subset of {','.join(stack.SERVICES)}")
            a.add_argument("--no-leaderboard", action="store_true", help="start everything but the leaderboard")
            a.add_argument("--s3-port", type=int, help="S3 endpoint port (env SEGPIPE_S3_PORT, default 8333)")
            a.add_argument("--prefect-port", type=int, help="Prefect port (env SEGPIPE_PREFECT_PORT, default 4200)")
            a.add_argument("--leaderboard-port", type=int,
                           help="leaderboard port (env SEGPIPE_LEADERBOARD_PORT, default 8765)")
            a.add_argument("--weed-base-port", type=int,
                           help="first of 7 consecutive SeaweedFS internal ports (env SEGPIPE_WEED_BASE_PORT, "
                                "default s3 port + 1; each also uses port + 10000 for gRPC)")
            a.add_argument("--labels", help="hidden test labels for the leaderboard (default: data.hidden_labels)")
            # gone: the URL may carry a token, and `ps` shows argv to every local user; kept only to say so
            a.add_argument("--alert-webhook", help=argparse.SUPPRESS)
    sub.add_parser("leaderboard", help="the leaderboard client/server (segpipe leaderboard --help)", add_help=False)
    w = sub.add_parser("weights", help="pretrained encoder weights kept in the S3 store (fetched once)")
    w_sub = w.add_subparsers(dest="action", required=True)
    f = w_sub.add_parser("fetch", help="download from the hub (needs internet) into the local cache and the store")
    f.add_argument("encoder")
    f.add_argument("--weights", default="imagenet")
    pu = w_sub.add_parser("push", help="put a weights file obtained elsewhere into the store")
    pu.add_argument("file")
    pu.add_argument("encoder")
    pu.add_argument("--weights", default="imagenet")
    return p


def _weights(args: argparse.Namespace) -> int:
    from segpipe import weights     # lazy: imports torch and smp
    try:
        if args.action == "fetch":
            path = weights.resolve(args.encoder, args.weights)
            print(f"{args.encoder}/{args.weights}: {path}")
        else:
            print(f"{args.encoder}/{args.weights}: stored at {weights.push(args.file, args.encoder, args.weights)}")
    except (weights.WeightsUnavailable, KeyError, StorageError, RuntimeError) as e:
        print(f"segpipe weights {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "leaderboard":
        from segpipe import leaderboard   # lazy: the stack commands must not pay for (or need) it
        return leaderboard.main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "weights":
        return _weights(args)
    try:
        if args.action == "up":
            if args.alert_webhook is not None:
                print(f"segpipe stack up: --alert-webhook is gone: a URL on the command line is visible to every "
                      f"local user (`ps`); export {stack.ALERT_WEBHOOK_ENV}=URL instead (and rotate the URL's token "
                      "if it carries one)", file=sys.stderr)
                return 2
            # None: every service, the leaderboard only where there are hidden labels to serve (stack.up)
            services = [s.strip() for s in args.only.split(",")] if args.only else None
            if args.no_leaderboard:
                services = [s for s in services or stack.SERVICES if s != "leaderboard"]
            ports = {"s3": args.s3_port, "prefect": args.prefect_port, "leaderboard": args.leaderboard_port,
                     "weed_base": args.weed_base_port}
            t0 = time.monotonic()
            st = stack.up(args.home, {k: v for k, v in ports.items() if v}, services,
                          labels=args.labels)       # the webhook: $SEGPIPE_ALERT_WEBHOOK, read by stack.up
            print(stack.format_status(st))
            home = stack.stack_home(args.home)
            print(f"\nup in {time.monotonic() - t0:.0f}s; credentials: source {home / 'credentials.env'}")
        elif args.action == "credentials":
            print(f"credentials: {stack.write_credentials(args.home)}")
        elif args.action == "dvc-remote":
            stack.configure_dvc_from_env()
            print(f"dvc remote {stack.DVC_REMOTE}: {os.environ['SEGPIPE_S3_ENDPOINT']}")
        elif args.action == "weed-security":
            args.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            print(f"weed security: {stack.write_weed_security(args.dir)}")
        elif args.action == "down":
            stopped = stack.down(args.home)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        else:
            print(stack.format_status(stack.status(args.home)))
    except (stack.StackError, StorageError) as e:
        print(f"segpipe stack {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
