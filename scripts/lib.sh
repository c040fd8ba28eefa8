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

# Whether apt has package lists at all (a fresh Debian system has none until `apt-get update`).
apt_lists_present() { compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; }

# Installs the named Debian packages that are missing (needs root or sudo). Without package lists
# it fetches them first; if an install fails (lists out of date), it fetches them and tries once
# more. apt-get's errors stay on stderr.
need_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  if ! apt_lists_present; then
    log "fetching the package lists (apt-get update): this system has none"
    $sudo apt-get update -q >/dev/null || die "apt-get update failed: cannot install ${missing[*]}"
  fi
  log "installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null && return 0
  log "apt-get install failed: fetching the package lists again (apt-get update) and retrying"
  { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; } \
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

# Packs the rootfs unpacked at $1/b back into the OCI layout $1/L with command $3, and moves the
# layout to $2 (replacing it); $1 goes.
finish_image() {
  local work=$1 image=$2
  umoci repack --image "$work/L:latest" "$work/b" >/dev/null
  umoci config --image "$work/L:latest" --os linux --architecture amd64 --config.cmd "$3" >&2
  umoci gc --layout "$work/L" >&2
  chmod -R a+rX "$work/L"
  mkdir -p "$(dirname "$image")"; rm -rf "$image"; mv "$work/L" "$image"; rm -rf "$work"
}

# The benchmarks' image: busybox and its applets in one layer, an OCI layout made with umoci,
# cached by the packages' versions. Prints its path.
bench_busybox_image() {
  need_packages umoci busybox-static >&2
  image=$SWIFTLET_CACHE/bench-run/$(cache_key "$(dpkg-query -W -f='${Version}' busybox-static umoci)$(declare -f bench_busybox_image)" /dev/null)
  make_image() {
    [ -f "$image/oci-layout" ] && return 0
    local work; work=$(mktemp -d)
    umoci init --layout "$work/L" >&2; umoci new --image "$work/L:latest" >&2
    umoci unpack --rootless --image "$work/L:latest" "$work/b" >/dev/null
    local r=$work/b/rootfs
    mkdir -p "$r"/{bin,etc,tmp,root,proc,sys,dev}; chmod 1777 "$r/tmp"
    cp /bin/busybox "$r/bin/"
    for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$r/bin/$a"; done
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$r/etc/passwd"; printf 'root:x:0:\n' > "$r/etc/group"
    finish_image "$work" "$image" /bin/sh
  }
  with_lock "$SWIFTLET_CACHE/bench-run.lock" make_image >&2
  echo "$image"
}

# Sums up the Swift Testing output in LOG: lists each skipped test with its reason, ends with
# "LABEL: N passed, N failed, N skipped", and fails when a test failed, none passed, or a test
# skipped for a reason that none of the ALLOWED extended regular expressions matches (a test
# skipped in several attempts counts once). Matches the result symbols as any non-space run, so
# it reads the output in any locale.
#   summarize_tests LABEL LOG [ALLOWED]...
summarize_tests() {
  local label=$1 log=$2; shift 2
  local lines passed failed skips
  lines=$(sed 's/\x1b\[[0-9;]*m//g; s/\r$//' "$log" | grep -E '^[^ ]+ Test ' | grep -vE '^[^ ]+ Test run with' || true)
  passed=$(grep -cE '^[^ ]+ Test .* passed after' <<< "$lines" || true)
  failed=$(grep -cE '^[^ ]+ Test .* failed after' <<< "$lines" || true)
  skips=$( (grep -E '^[^ ]+ Test .* skipped(: "|\.$)' <<< "$lines" || true) \
    | sed -E 's/^[^ ]+ Test (.*) skipped(: "(.*)"|\.)$/\1\t\3/' | sort -u)
  local skipped=0 refused=0 reason names count pattern allowed
  [ -z "$skips" ] || echo "$label: skipped tests, by reason:"
  while IFS= read -r reason; do
    [ -n "$skips" ] || break
    names=$(awk -F '\t' -v r="$reason" '$2 == r { print $1 }' <<< "$skips")
    count=$(wc -l <<< "$names")
    skipped=$((skipped + count)) allowed=0
    for pattern in "$@"; do
      if grep -qE -- "$pattern" <<< "$reason"; then allowed=1; break; fi
    done
    if [ "$allowed" = 1 ]; then
      echo "  ${reason:-(no reason given)} ($count): $(paste -sd ' ' <<< "$names")"
    else
      refused=$((refused + count))
      echo "  NOT ALLOWED TO SKIP HERE: ${reason:-(no reason given)} ($count): $(paste -sd ' ' <<< "$names")"
    fi
  done < <(cut -f2 <<< "$skips" | sort -u)
  [ "$refused" -eq 0 ] || echo "error: $refused tests skipped that must run here (marked above)" >&2
  echo "$label: $passed passed, $failed failed, $skipped skipped"
  [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ] && [ "$refused" -eq 0 ]
}

# The network benchmark's image (`make bench-net`): bench_busybox_image's busybox plus Debian's
# iperf3 with the libraries it loads (at their Debian paths), bench/netbench.c built static as
# /bin/netbench, and bench/net-guest.sh as /bench/guest; an OCI layout made with umoci, cached by
# the packages' versions and those files. Prints its path.
bench_net_image() {
  need_packages umoci busybox-static iperf3 ethtool gcc libc6-dev >&2
  image=$SWIFTLET_CACHE/bench-net/$(cache_key "$(dpkg-query -W -f='${Version}' busybox-static umoci iperf3 libiperf0 ethtool libc6)$(declare -f bench_net_image)" \
    "$SWIFTLET_ROOT/bench/netbench.c" "$SWIFTLET_ROOT/bench/net-guest.sh")
  make_net_image() {
    [ -f "$image/oci-layout" ] && return 0
    local work; work=$(mktemp -d)
    umoci init --layout "$work/L" >&2; umoci new --image "$work/L:latest" >&2
    umoci unpack --rootless --image "$work/L:latest" "$work/b" >/dev/null
    local r=$work/b/rootfs
    mkdir -p "$r"/{bin,etc,tmp,root,proc,sys,dev,bench}; chmod 1777 "$r/tmp"
    cp /bin/busybox "$r/bin/"
    for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$r/bin/$a"; done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$r/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$r/etc/group"
    mkdir -p "$r/usr/bin"; cp /usr/bin/iperf3 "$r/usr/bin/iperf3"; cp /usr/sbin/ethtool "$r/usr/bin/ethtool"
    local lib
    for lib in $({ ldd /usr/bin/iperf3; ldd /usr/sbin/ethtool; } | grep -o '/[^ ]*' | sort -u); do
      mkdir -p "$r$(dirname "$lib")"; cp -L "$lib" "$r$lib"
    done
    gcc -static -O2 -o "$r/bin/netbench" "$SWIFTLET_ROOT/bench/netbench.c"
    cp "$SWIFTLET_ROOT/bench/net-guest.sh" "$r/bench/guest"; chmod 755 "$r/bench/guest"
    finish_image "$work" "$image" /bench/guest
  }
  with_lock "$SWIFTLET_CACHE/bench-net.lock" make_net_image >&2
  echo "$image"
}
