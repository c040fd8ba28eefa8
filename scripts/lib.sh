# Shared helpers for Swiftlet's setup scripts. Sourced, not executed.
set -euo pipefail

SWIFTLET_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SWIFTLET_CACHE=${SWIFTLET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/swiftlet}

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# sha256 over the given files' contents plus any extra strings, first 16 hex digits.
cache_key() {
  local extra=$1; shift
  { printf '%s\n' "$extra"; cat "$@"; } | sha256sum | cut -c1-16
}

# Installs the named Debian packages that are missing (needs root or sudo).
need_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; } \
    || die "could not install ${missing[*]} with apt-get"
}

# Runs "$@" holding an exclusive lock on the named file, so parallel builds of one cache entry wait.
with_lock() {
  local lock=$1; shift
  mkdir -p "$(dirname "$lock")"
  exec 9>"$lock"
  flock 9
  "$@"
  exec 9>&-
}
