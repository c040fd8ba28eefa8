#!/bin/sh
# The host side of `make bench-net` (scripts/bench-net runs it inside the nested test host, or
# directly on hardware KVM). Prints "RESULT VMM KEY VALUE" lines; scripts/bench-net sums them up.
#
# Per run, alternating which goes first, with the guest's checksum offload on, then off: Swiftlet
# (`swiftlet run --net -p 127.0.0.1:18080:7777`) and QEMU microvm (virtio-net-device, `-netdev stream` to a passt of its own started with
# `--socket`, `-t 127.0.0.1/18081:7777`) boot the same kernel and the same EROFS root disk (the
# layer of the benchmark image as Swiftlet converted it); the guest (bench/net-guest.sh) runs
# iperf3 guest→host and host→guest against the iperf3 server on this host's 127.0.0.1:5201
# (10.0.2.2 in the guest, through passt), then an echo server on port 7777 that this script's
# client times BENCH_RR_N round trips of 64 bytes against through the published port.
# Then `swiftlet run -- true` with and without --net, from the boot template and --cold.
#
# Environment: SWIFTLET (binary), QEMU, KERNEL (vmlinux), IMAGE (OCI layout), NETBENCH (this
# host's netbench), SWIFTLET_HOME, BENCH_RUNS (default 5), BENCH_SECONDS (per iperf3 run,
# default 3), BENCH_RR_N (default 1000), BENCH_RUN_REPEATS (default 10), BENCH_ONLY=qemu (the
# QEMU half alone) or BENCH_ONLY=run (the --net overhead alone).
set -u
runs=${BENCH_RUNS:-5} secs=${BENCH_SECONDS:-3} rrn=${BENCH_RR_N:-1000}
out=$(mktemp -d /tmp/bench-net.XXXXXX); chmod 755 "$out"
fail() { echo "bench-net: $*" >&2; exit 1; }
memory=256

iperf3 -s -B 127.0.0.1 -p 5201 -D --logfile "$out/iperf3-server.log" || fail "cannot start the iperf3 server"

digest=$("$SWIFTLET" image pull -q "$IMAGE" | tr -d ' \n') || fail "swiftlet image pull $IMAGE failed"
# Waits (up to $2 s) for the line $3 in file $1.
# (sh has only global variables: the helpers' counters are named apart from the run loop's $i.)
wait_for() {
  polls=0
  while ! grep -q "$3" "$1" 2>/dev/null; do
    polls=$((polls + 1)); [ "$polls" -gt $(($2 * 10)) ] && return 1
    usleep 100000
  done
}

# Once the guest's echo server is up (its line in $log), times request/response round trips
# through published port $3 and prints them as RESULT $1 ...; else shows $log and stops $pid.
measure_rr() {
  if wait_for "$log" 600 netbench-echo-ready; then
    "$NETBENCH" rr 127.0.0.1 "$3" "$rrn" 64 | sed -n "s/^rr_us p50=\([0-9.]*\) p90=\([0-9.]*\).*/RESULT $1 rr_p50_us \1\nRESULT $1 rr_p90_us \2/p"
  else
    echo "bench-net: the $2 guest's echo server did not start; its output:" >&2; cat "$log" >&2
    kill "$pid" 2>/dev/null
  fi
}

# The name results go under: the VMM, with "-nooffload" when the guest's checksum offload is off ($1).
label() { if [ "$2" = off ]; then echo "$1-nooffload"; else echo "$1"; fi; }

# A run: $1 the run's name (for its log), $2 on or off (the guest's checksum offload).
swiftlet_net_run() {
  log=$out/swiftlet-$1-$2.log name=$(label swiftlet "$2")
  "$SWIFTLET" run --net -p 127.0.0.1:18080:7777 --memory "$memory" --kernel "$KERNEL" --image "$digest" \
    -e BENCH_MODE=swiftlet -e "BENCH_SECONDS=$secs" -e "BENCH_OFFLOAD=$2" -- /bench/guest > "$log" 2>&1 &
  pid=$!
  measure_rr "$name" Swiftlet 18080
  wait "$pid" || { echo "bench-net: swiftlet run failed; its output:" >&2; cat "$log" >&2; }
  sed -n "s/^RESULT /RESULT $name /p" "$log"
  offload_state "$name" "$log" "$1"
}

# What the guest's ethtool said of its checksum offload, once per VMM and mode (on run 1).
offload_state() {
  [ "$3" = 1 ] || return 0
  sed -n "s/^OFFLOAD \([a-z-]*\): \([a-z]*\).*/OFFLOAD $1 \1 \2/p" "$2" | tr -d '\r'
}

qemu_net_run() {
  log=$out/qemu-$1-$2.log sock=/tmp/passt-bench-$$.sock name=$(label qemu "$2")
  rm -f "$sock"
  passt -f -q -s "$sock" -a 10.0.2.15 -n 24 -g 10.0.2.2 --dns-forward 10.0.2.3 -t 127.0.0.1/18081:7777 \
    > "$out/passt-$1-$2.log" 2>&1 &
  passt=$!
  polls=0; while [ ! -S "$sock" ] && [ "$polls" -lt 600 ]; do usleep 100000; polls=$((polls + 1)); done
  [ -S "$sock" ] || { cat "$out/passt-$1-$2.log" >&2; fail "passt did not create $sock"; }
  "$QEMU" -M microvm,x-option-roms=off,rtc=off,acpi=off,pit=off,pic=off,isa-serial=on -enable-kvm -cpu host \
    -m "$memory" -smp 1 -nodefaults -no-user-config -display none -no-reboot -serial stdio -device i8042 \
    -drive "id=root,file=$erofs,format=raw,if=none,readonly=on" -device virtio-blk-device,drive=root \
    -netdev "stream,id=net,server=off,addr.type=unix,addr.path=$sock" -device virtio-net-device,netdev=net,mac=02:53:57:00:00:01 \
    -kernel "$KERNEL" \
    -append "console=ttyS0 reboot=k panic=-1 pci=off loglevel=3 root=/dev/vda rootfstype=erofs ro init=/bench/guest BENCH_MODE=qemu BENCH_SECONDS=$secs BENCH_OFFLOAD=$2" \
    > "$log" 2>&1 < /dev/null &
  pid=$!
  measure_rr "$name" QEMU 18081
  wait "$pid" || { echo "bench-net: qemu failed; its output:" >&2; cat "$log" >&2; }
  kill "$passt" 2>/dev/null; wait "$passt" 2>/dev/null
  sed -n "s/^RESULT /RESULT $name /p" "$log" | tr -d '\r'
  offload_state "$name" "$log" "$1"
}

# One warm-up run (imports the disk, saves the --net boot template), then the root disk's path.
# BENCH_ONLY=qemu: the QEMU half alone (a Swiftlet without networking still makes the disk);
# BENCH_ONLY=run: only the time --net adds to `run`.
only=${BENCH_ONLY:-}
if [ "$only" = qemu ] || [ "$only" = run ]; then
  "$SWIFTLET" run --memory "$memory" --kernel "$KERNEL" --image "$digest" -- true || fail "swiftlet run (warm-up) failed"
else
  swiftlet_net_run warmup on > /dev/null
fi
hex=$("$SWIFTLET" image inspect "$digest" | tr -d ' \n' | sed -n 's/.*"diffIDs":\["sha256:\([0-9a-f]*\)".*/\1/p')
erofs=$SWIFTLET_HOME/disks/sha256/$hex.erofs
[ -f "$erofs" ] || fail "no root disk at $erofs"
echo "ROOTFS $erofs"
i=1
[ "$only" = run ] && i=$((runs + 1))
while [ "$i" -le "$runs" ]; do
  for offload in on off; do
    if [ "$only" = qemu ]; then qemu_net_run "$i" $offload
    elif [ $((i % 2)) = 1 ]; then swiftlet_net_run "$i" $offload; qemu_net_run "$i" $offload
    else qemu_net_run "$i" $offload; swiftlet_net_run "$i" $offload; fi
  done
  i=$((i + 1))
done

# Time added to `run` by --net: the same `true`, four ways in rotation, after a warm-up of each
# (the first run of each machine shape saves its boot template).
timed() {
  "$NETBENCH" time "$SWIFTLET" run "$@" --memory "$memory" --kernel "$KERNEL" --image "$digest" -- true \
    > /dev/null 2> "$out/timed.log"
  sed -n 's/^elapsed_ms \([0-9.]*\) status 0$/\1/p' "$out/timed.log"
}
for v in "" "--net"; do timed $v > /dev/null; done
repeats=${BENCH_RUN_REPEATS:-10}
i=1
[ "$only" = qemu ] && i=$((repeats + 1))
while [ "$i" -le "$repeats" ]; do
  for v in plain net cold cold_net; do
    case $v in plain) a="" ;; net) a="--net" ;; cold) a="--cold" ;; cold_net) a="--cold --net" ;; esac
    ms=$(timed $a)
    if [ -n "$ms" ]; then echo "RESULT run $v $ms"; else echo "bench-net: swiftlet run $a -- true failed:" >&2; cat "$out/timed.log" >&2; fi
  done
  i=$((i + 1))
done
kill "$(pidof iperf3)" 2>/dev/null
rm -rf "$out"
