"""nginx as a plain reverse proxy: the reference target of the proxy benchmarks (proxy_overhead.py,
proxy_diagnostics.py).

Owns: nginx's configuration (1 worker, upstream keepalive, proxy_buffering off) and starting it
with its files under a temporary prefix. Must NOT: measure anything, or listen beyond 127.0.0.1.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from support import free_port, wait_http_ok

NGINX = "/usr/sbin/nginx"

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/client_body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  upstream backend {{ server 127.0.0.1:{up_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port} backlog=1024;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


def start_nginx(binary: str, tmp: Path, up_port: int, procs: list[subprocess.Popen]) -> tuple[subprocess.Popen, int]:
    """nginx as a plain reverse proxy to the upstream (NGINX_CONF, files under ``tmp``); returns
    the process (appended to ``procs``) and its port, once it answers."""
    port = free_port()
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=tmp, up_port=up_port, port=port))
    ng = subprocess.Popen([binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                          stderr=subprocess.DEVNULL)
    procs.append(ng)
    wait_http_ok(f"http://127.0.0.1:{port}/health", proc=ng, name="nginx")
    return ng, port
