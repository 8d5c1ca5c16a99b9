#!/usr/bin/env python
"""One streamrec stream worker per container, its Prometheus metrics reachable by Prometheus.

`streams.metrics.serve()` (started by `STREAMREC_METRICS_PORT`) binds 127.0.0.1, which is right
for the embedded stack but unreachable from the Prometheus container. So this entry point does not
set `STREAMREC_METRICS_PORT`; it serves the same process-wide registry on
`METRICS_ADDR:METRICS_PORT` (default 0.0.0.0:9100, the compose network only) and then runs, in
this process, exactly what `streamrec serve workers` runs:

    python -m faust -A streams.app worker --without-web
"""

from __future__ import annotations

import os


def main() -> None:
    from prometheus_client import start_http_server

    start_http_server(
        int(os.environ.get("METRICS_PORT", "9100")), addr=os.environ.get("METRICS_ADDR", "0.0.0.0")
    )
    from faust.cli.faust import cli

    level = os.environ.get("LOG_LEVEL", "info")
    cli(
        args=["-A", "streams.app", "worker", "--without-web", "--loglevel", level],
        prog_name="faust",
    )


if __name__ == "__main__":
    main()
