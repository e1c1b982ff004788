"""`python -m app demo`: a dev cluster, migrated, serving the example app on loopback.

Starts a primary and two streaming replicas, creates the `app` role (an ordinary role, so
row-level security applies to it) and the example tenants (`acme`: its own database, `globex`:
a schema, `initech`: rows), writes a configuration for them, migrates, serves, and removes
everything on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from app.core.config import CONFIG_FILE_ENV
from pg_session_router.devcluster import DevCluster

APP_ROLE = "app"


def demo_config(cluster: DevCluster) -> str:
    replicas = ", ".join(
        f'"{cluster.url(node.name, database="app", user=APP_ROLE)}"' for node in cluster.replicas
    )
    return f"""\
[database]
default_cluster = "main"

[database.clusters.main]
primary = "{cluster.url("primary", database="app", user=APP_ROLE)}"
replicas = [{replicas}]

[database.tenants.acme]
strategy = "database"
database = "acme"

[database.tenants.globex]
strategy = "schema"

[database.tenants.initech]
strategy = "row"

[http]
health_details_public = true   # a local demo: show every node in /health/db, /status, /metrics
status_page = true
metrics = true
route_header = true
"""


def prepare(cluster: DevCluster) -> None:
    """Role, databases, configuration file; the caller migrates."""
    cluster.create_role(APP_ROLE, createdb=True)
    for database in ("app", "acme"):
        cluster.create_database(database, owner=APP_ROLE)
    config_file = cluster.base_dir / "settings.toml"
    config_file.write_text(demo_config(cluster))
    os.environ[CONFIG_FILE_ENV] = str(config_file)


def run_demo(*, port: int, replicas: int) -> int:
    import uvicorn

    from app.db.migrate import migrate_everything

    # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception, so the
    # `with` below still removes the cluster instead of the process dying on the spot.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"starting a PostgreSQL primary and {replicas} replicas ...", flush=True)
    with DevCluster(replicas) as cluster:
        prepare(cluster)
        asyncio.run(migrate_everything())
        cluster.wait_replayed()
        print(_banner(cluster, port), flush=True)
        uvicorn.run("app.main:app", host="127.0.0.1", port=port, log_level="info")
    print("dev cluster removed", flush=True)
    return 0


def _banner(cluster: DevCluster, port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    nodes = ", ".join(f"{node.name}={node.port}" for node in cluster.nodes.values())
    return f"""
dev cluster up ({nodes}); configuration in {os.environ[CONFIG_FILE_ENV]}
try, in another terminal:
  curl -s -X POST {base}/items -H 'X-Tenant-ID: acme' -H 'content-type: application/json' \\
       -d '{{"name": "anvil"}}'
  curl -s {base}/items -H 'X-Tenant-ID: acme'          # database tenant, read from a replica
  curl -s {base}/items -H 'X-Tenant-ID: globex'        # schema tenant: sees none of acme's
  curl -s -X POST {base}/items -H 'X-Tenant-ID: initech' -H 'content-type: application/json' \\
       -d '{{"name": "stapler"}}'                      # row-level-security tenant
  curl -s {base}/reports/items -H 'X-Tenant-ID: initech'  # raw SQL, still confined
  curl -si -X POST {base}/items -H 'X-Tenant-ID: acme' -H 'content-type: application/json' \\
       -d '{{"name": "fresh"}}' | grep -i consistency  # send it back on a GET: read your write
  curl -s {base}/items -H 'X-Tenant-ID: nobody'        # 404 unknown tenant
  curl -s {base}/health/db                              # roles, lag, breaker state, pools
add a tenant while the app runs (served at once, no restart):
  APP_CONFIG_FILE={os.environ[CONFIG_FILE_ENV]} \\
    {sys.executable} -m app tenants add newco --strategy schema
  curl -s {base}/items -H 'X-Tenant-ID: newco'
Ctrl-C stops the app and removes the cluster.
"""
