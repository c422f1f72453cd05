#!/usr/bin/env bash
# Private nginx serving a directory (e.g. a file:// binary cache) over HTTP.
#
#   tests/support/nginx.sh start           ROOTDIR PORT
#   tests/support/nginx.sh start-throttled ROOTDIR PORT RATE   # limit_rate RATE, e.g. 200k
#   tests/support/nginx.sh stop            ROOTDIR PORT
#
# Listens on 127.0.0.1:PORT only; keepalive, sendfile and Range requests on.
# State (config, pid, logs, temp dirs) lives in /tmp/nixless-nginx-PORT.
# `start` replaces an nginx already started by this script on PORT and
# returns once the port answers. `stop` is a no-op if nothing is running.
set -euo pipefail

usage() {
  echo "usage: $0 start ROOTDIR PORT | start-throttled ROOTDIR PORT RATE | stop ROOTDIR PORT" >&2
  exit 2
}

[ $# -ge 3 ] || usage
mode=$1 root=$2 port=$3
case $port in ''|*[!0-9]*) usage ;; esac
work=/tmp/nixless-nginx-$port
pidfile=$work/nginx.pid

running_pid() {
  local pid
  [ -s "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

stop() {
  local pid i
  pid=$(running_pid) || { rm -f "$pidfile"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true   # fast shutdown
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

start() { # RATE (may be empty)
  local rate=$1 user_line="" i
  [ -d "$root" ] || { echo "nginx.sh: no such directory: $root" >&2; exit 1; }
  root=$(cd "$root" && pwd)
  stop
  mkdir -p "$work/tmp"
  # As root, keep workers as the current user so the root dir need not be
  # world-traversable (e.g. under /root).
  if [ "$(id -u)" -eq 0 ]; then
    user_line="user root root;"
  fi
  cat >"$work/nginx.conf" <<CONF
$user_line
daemon on;
master_process on;
worker_processes 2;
pid $pidfile;
error_log $work/error.log warn;
events { worker_connections 1024; }
http {
  types {
    text/x-nix-narinfo narinfo;
    text/plain ls;
  }
  default_type application/octet-stream;
  access_log $work/access.log;
  client_body_temp_path $work/tmp/body;
  proxy_temp_path $work/tmp/proxy;
  fastcgi_temp_path $work/tmp/fastcgi;
  uwsgi_temp_path $work/tmp/uwsgi;
  scgi_temp_path $work/tmp/scgi;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 65s;
  keepalive_requests 100000;
  server_tokens off;
  server {
    listen 127.0.0.1:$port;
    server_name localhost;
    root $root;
    autoindex off;
    ${rate:+limit_rate $rate;}
    location / { try_files \$uri =404; }
  }
}
CONF
  nginx -q -p "$work" -e "$work/error.log" -c "$work/nginx.conf" -t 2>"$work/configtest.log" || {
    cat "$work/configtest.log" "$work/error.log" >&2 2>/dev/null || true
    exit 1
  }
  nginx -p "$work" -e "$work/error.log" -c "$work/nginx.conf" || {
    cat "$work/error.log" >&2 2>/dev/null || true
    exit 1
  }
  for i in $(seq 1 100); do
    if running_pid >/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "nginx.sh: nginx did not come up on 127.0.0.1:$port" >&2
  cat "$work/error.log" >&2 2>/dev/null || true
  stop
  exit 1
}

case $mode in
  start) [ $# -eq 3 ] || usage; start "" ;;
  start-throttled) [ $# -eq 4 ] || usage; start "$4" ;;
  stop) stop ;;
  *) usage ;;
esac
