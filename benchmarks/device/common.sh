# Sourced by the device scripts: `source "$(dirname "$0")/common.sh"; begin_run "${1:-/tmp/out}"`.

# The device preamble (.whl/preamble.sh) puts the checkout on PYTHONPATH, where our kernels/ folder would shadow PyPI's
# `kernels` (imported by diffusers): keep only the installed fewstep (pip install . before sourcing this).
PYTHONPATH=$(printf '%s' "${PYTHONPATH:-}" | tr ':' '\n' | grep -vxF -e "$PWD" -e . -e '' | paste -sd: -)
export PYTHONPATH

# The device's copy of the work tree carries the git metadata of an older commit: rows would name the wrong one.
# Pass the commit from the machine that sent the tree: `FEWSTEP_COMMIT=$(git rev-parse --short HEAD)` in the run's
# command (fewstep.clients.bench_util.git_commit reads it first).
if [ -z "${FEWSTEP_COMMIT:-}" ]; then
  echo "warning: FEWSTEP_COMMIT is not set; rows will name the device copy's (possibly stale) HEAD" >&2
fi

begin_run() {  # begin_run DEST: logs, rows and reports go to $OUT; at exit they come back as DEST/results.tgz
  set -uo pipefail
  FINAL=$(mkdir -p "$1" && cd "$1" && pwd)  # at most 8 files come back from a GPU run: keep DEST to 2-3
  OUT=/tmp/fewstep_run_$$
  mkdir -p "$OUT"
  trap '(cd "$OUT" && tar czf "$FINAL/results.tgz" -- * 2>/dev/null; ls -la "$FINAL")' EXIT
  export PYTHONUNBUFFERED=1
  T0=$(date +%s)
  restore_inductor_cache
}

stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

wants() { [[ " $PARTS " == *" $1 "* ]]; }  # wants NAME: is NAME in the script's space-separated PARTS?

# Inductor's cache turns a cold compile of SD-Turbo's three buckets (254 s) into a
# warm one (69 s), but a lent machine starts bare. So a script returns the cache as $OUT/inductor_cache.tgz (when
# it fits the 16 MB a returned file may have), the files are copied to out/carry/ here, and the next run's
# call carries out/carry and restores them before compiling. Same image, torch and GPU: the cache keys match.
INDUCTOR_CACHE=${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/fewstep/inductor}

restore_inductor_cache() {
  local tgz=${1:-out/carry/inductor_cache.tgz}
  if [ -f "$tgz" ]; then
    mkdir -p "$(dirname "$INDUCTOR_CACHE")" && tar xzf "$tgz" -C "$(dirname "$INDUCTOR_CACHE")" \
      && echo "restored Inductor cache from $tgz ($(du -sh "$INDUCTOR_CACHE" | cut -f1))"
  fi
}

save_inductor_cache() {  # save_inductor_cache OUT
  [ -d "$INDUCTOR_CACHE" ] || return 0
  tar czf /tmp/inductor_cache.tgz -C "$(dirname "$INDUCTOR_CACHE")" "$(basename "$INDUCTOR_CACHE")"
  local size
  size=$(stat -c %s /tmp/inductor_cache.tgz)
  if [ "$size" -lt 16000000 ]; then
    cp /tmp/inductor_cache.tgz "$1/inductor_cache.tgz" && echo "Inductor cache returned ($size bytes)"
  else
    echo "Inductor cache is $size bytes: over the 16 MB a returned file may have; not returned"
  fi
}

# serve_ready NAME PORT ARGS...: `fewstep serve --port PORT ARGS...` in the background (log $OUT/serve_NAME.log, pid in
# $SERVER_PID), then wait up to $T_READY seconds (default 240) for /ready; returns 1, with the log's tail, if it never
# got there. Stop it with `stop_server`.
serve_ready() {
  local name=$1 port=$2
  shift 2
  fewstep serve --port "$port" "$@" > "$OUT/serve_$name.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 "${T_READY:-240}"); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 1
  done
  if curl -sf "http://127.0.0.1:$port/ready" >/dev/null; then
    stamp "server $name ready ($(grep -oE 'uvloop|asyncio' "$OUT/serve_$name.log" | head -1), $(grep -oE 'httptools|h11' "$OUT/serve_$name.log" | head -1))"
    return 0
  fi
  echo "server $name not ready:"; tail -20 "$OUT/serve_$name.log"
  return 1
}

stop_server() { kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; }
