"""`python -m app drain NODE [--undrain] [--within S] [--url URL]`: take a server out of
rotation in a running app (and bring it back), through its admin endpoint.

The token is the app's own `http.admin_token` (from the same configuration), sent as a
Bearer token; it never appears in the output. The endpoint drains the process that answers:
with several workers, each must be drained (see the README).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.parse
import urllib.request

from app.cli.common import EXIT_OK, command_parser
from app.core.config import load_settings
from pg_session_router.core.errors import ConfigError, RouterError

EXAMPLE = """python -m app drain main.replica1 --within 60
  python -m app drain main.replica1 --undrain"""


def add_drain_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = command_parser(
        commands, "drain", "take a node's server out of rotation in a running app", EXAMPLE
    )
    parser.add_argument("node", help="a node name, as `check` lists them (main.replica1)")
    parser.add_argument("--undrain", action="store_true", help="bring it back")
    parser.add_argument("--within", type=float, default=30.0, help="seconds to wait for sessions")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running app")


def run_drain(args: argparse.Namespace) -> int:
    token = load_settings().http.admin_token
    if token is None:
        raise ConfigError("http.admin_token is not set: the app has no admin endpoint")
    if urllib.parse.urlsplit(args.url).scheme not in ("http", "https"):
        raise ConfigError("--url: an http:// or https:// address of the running app")
    action = "undrain" if args.undrain else "drain"
    path = f"/admin/nodes/{urllib.parse.quote(args.node, safe='')}/{action}"
    query = "" if args.undrain else f"?within={args.within:g}"
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        args.url.rstrip("/") + path + query,
        method="POST",
        headers={"Authorization": f"Bearer {token.get_secret_value()}"},
    )
    # No redirects: urllib would carry the Authorization header to wherever they point.
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(request, timeout=args.within + 10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = _detail(exc)
        raise RouterError(f"{action} {args.node}: the app answered {exc.code}{detail}") from None
    except urllib.error.URLError as exc:
        raise RouterError(f"{action} {args.node}: cannot reach {args.url}: {exc.reason}") from None
    if args.undrain:
        print(f"undrained: {', '.join(body['undrained'])}")
    else:
        report = body["drained"]
        print(
            f"drained in process {report['pid']}: {', '.join(report['nodes'])} in "
            f"{report['seconds']:.2f} s; sessions still running: {report['sessions_left']}"
        )
        print("(each process drains its own routers: with several workers, see the README)")
    return EXIT_OK


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(error.read()).get("detail")
    except (ValueError, AttributeError):
        return ""
    return f": {detail}" if isinstance(detail, str) else ""
