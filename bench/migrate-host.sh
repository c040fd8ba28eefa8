#!/bin/sh
# The host side of `make bench-migrate` (scripts/bench-migrate), inside the nested test host or on
# a hardware host: a 512 MiB machine migrated back and forth between two SWIFTLET_HOMEs over
# 127.0.0.1 (`machine receive` / `machine migrate --max-downtime 50ms`), and QEMU microvm with
# the same kernel, memory and initramfs migrated over TCP on the same loopback (`-incoming`, QMP
# `migrate` with downtime-limit 50 ms), BENCH_RUNS times each per dirty rate, alternating which
# goes first. Both copy round after round for up to 60 s (QEMU has no limit of rounds; Swiftlet's
# default of 30 is lifted), then give up. In both guests bench/migratebench.c writes RATE MiB/s into its memory and watches
# its clock: the largest stop it saw around the migration is the guest's measure of the downtime.
# Prints `RESULT swiftlet|qemu RATE downtime_ms total_ms bytes rounds guest_gap_ms reached_rate`
# lines, or `FAILED swiftlet|qemu RATE reason`.
# Environment: SWIFTLET, QEMU, KERNEL, PYTHON, MIGRATEBENCH (the static guest program), QEMU_INITRD
# (the initramfs with the program as /bin/migratebench),
# BENCH_RUNS (default 5), BENCH_RATES (default "0 10 100", MiB/s).
set -u
runs=${BENCH_RUNS:-5}
rates=${BENCH_RATES:-0 10 100}
memory=512
work=$(mktemp -d)
fail() { echo "bench-migrate: $*" >&2; exit 1; }
progress() { echo "bench-migrate: $(cut -d' ' -f1 /proc/uptime) s: $*"; }
A=$work/a B=$work/b
here=$A there=$B
port=17800

SWIFTLET_HOME=$A "$SWIFTLET" machine create --name m --memory $memory > /dev/null || fail "machine create failed"
SWIFTLET_HOME=$A "$SWIFTLET" machine start m || fail "machine start failed"
progress "machine started"
SWIFTLET_HOME=$A "$SWIFTLET" machine exec -i m -- sh -c 'cat > /root/migratebench && chmod 755 /root/migratebench' < "$MIGRATEBENCH" \
  || fail "cannot copy the guest program into the machine"
in_guest() { SWIFTLET_HOME=$here "$SWIFTLET" machine exec m -- sh -c "$1"; }

# The guest's largest stop (ms) in the output of migratebench since its mark, and its last rate.
guest_gap() {
  "$PYTHON" -c '
import sys
gaps, rate = [], 0.0
for line in sys.stdin:
    p = line.split()
    if len(p) == 4 and p[0] == "gap_us":
        gaps.append(int(p[1])); rate = float(p[3])
print("%.3f %.1f" % (max(gaps) / 1000, rate) if gaps else "nan nan")'
}

swiftlet_run() { # RATE
  port=$((port + 1))
  # Not the last run's token: the receiver truncates this file only once it has started.
  rm -f "$work/receive.out" "$work/receive.err"
  SWIFTLET_HOME=$there timeout 660 "$SWIFTLET" machine receive m --listen 127.0.0.1:$port > "$work/receive.out" 2> "$work/receive.err" &
  receiver=$!
  polls=0; while [ ! -s "$work/receive.out" ] && [ $polls -lt 300 ]; do sleep 0.1; polls=$((polls + 1)); done
  token=$(head -n 1 "$work/receive.out")
  in_guest 'kill -USR1 $(cat /dev/shm/mb.pid)'
  sleep 1
  if SWIFTLET_HOME=$here timeout 600 "$SWIFTLET" machine migrate m --to 127.0.0.1:$port --token "$token" --max-downtime 50ms --max-rounds 1000 --timeout 60s --json > "$work/migrate.out" 2> "$work/migrate.err"; then
    wait $receiver
    t=$here; here=$there; there=$t
    sleep 2 # a window or two of the guest's watch after the resume
    gap=$(in_guest 'cat /dev/shm/mb.out' | guest_gap)
    grep -h "arrived by migration" "$here/machines/m/vmm.log" 2>/dev/null | tail -n 1 | sed 's/^/bench-migrate: destination: /'
    "$PYTHON" - "$work/migrate.out" "$1" "$gap" <<'PY'
import json, sys
report = [json.loads(l) for l in open(sys.argv[1]) if l.strip()][-1]
steps = report.get("pauseSteps") or []
print("bench-migrate: source: pause, " + ", ".join("%s +%.1f ms" % (s["name"], s["milliseconds"]) for s in steps))
print("RESULT swiftlet %s %.3f %.3f %d %d %s" % (sys.argv[2], report["downtimeMilliseconds"], report["totalMilliseconds"], report["bytesSent"], report["rounds"], sys.argv[3]))
PY
  else
    echo "FAILED swiftlet $1 $(tr '\n' ' ' < "$work/migrate.err")"
    # The source told the receiver it gave up: it cleans up and ends by itself. Only a receiver
    # no source reached waits on (until its timeout): stopped after 30 s.
    polls=0; while kill -0 $receiver 2>/dev/null && [ $polls -lt 300 ]; do sleep 0.1; polls=$((polls + 1)); done
    kill $receiver 2>/dev/null
    wait $receiver
    echo "bench-migrate: the receiver said: $(tr '\n' ' ' < "$work/receive.err" | cut -c1-300)"
  fi
}

qemu_vm() { # NAME RATE [QEMU options]
  name=$1 rate=$2; shift 2
  "$QEMU" -M microvm,x-option-roms=off,rtc=off,acpi=off,pit=off,pic=off,isa-serial=on -enable-kvm -cpu host \
    -m $memory -smp 1 -nodefaults -no-user-config -display none -no-reboot -serial "file:$work/qemu-$name.log" -device i8042 \
    -kernel "$KERNEL" -initrd "$QEMU_INITRD" -append "console=ttyS0 reboot=k panic=-1 pci=off loglevel=3 -- /bin/migratebench $rate" \
    -qmp "unix:$work/qmp-$name.sock,server=on,wait=off" "$@" > "$work/qemu-$name.err" 2>&1 &
}

qemu_run() { # RATE
  port=$((port + 1))
  rm -f "$work"/qmp-*.sock "$work"/qemu-*.log
  qemu_vm src "$1"; src=$!
  sleep 4 # the guest boots and its program runs
  qemu_vm dst "$1" -incoming tcp:127.0.0.1:$port; dst=$!
  timeout 600 "$PYTHON" - "$work/qmp-src.sock" "$work/qmp-dst.sock" $port "$1" "$work/qemu-dst.log" <<'PY'
import json, socket, sys, time
def connect(path):
    for _ in range(300):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path); break
        except OSError:
            s.close(); time.sleep(0.1)
    else:
        sys.exit("FAILED qemu %s no QMP socket at %s" % (sys.argv[4], path))
    f = s.makefile("rw"); json.loads(f.readline())
    return f
def call(f, command, **arguments):
    f.write(json.dumps({"execute": command, "arguments": arguments}) + "\n"); f.flush()
    while True:
        reply = json.loads(f.readline())
        if "return" in reply or "error" in reply: return reply
src, dst = connect(sys.argv[1]), connect(sys.argv[2])
call(src, "qmp_capabilities"); call(dst, "qmp_capabilities")
call(src, "migrate-set-parameters", **{"downtime-limit": 50})
call(src, "migrate", uri="tcp:127.0.0.1:" + sys.argv[3])
deadline = time.time() + 60 # as Swiftlet's --timeout 60s
while time.time() < deadline:
    info = call(src, "query-migrate")["return"]
    if info.get("status") in ("completed", "failed", "cancelled"): break
    time.sleep(0.05)
if info.get("status") == "completed":
    time.sleep(3) # a window or two of the guest's watch after the resume
    gaps, rate = [], 0.0
    for line in open(sys.argv[5], errors="replace"):
        p = line.split()
        if len(p) == 4 and p[0] == "gap_us":
            gaps.append(int(p[1])); rate = float(p[3])
    gap = "%.3f %.1f" % (max(gaps) / 1000, rate) if gaps else "nan nan"
    print("RESULT qemu %s %.3f %.3f %d %d %s" % (sys.argv[4], info["downtime"], info["total-time"], info["ram"]["transferred"],
                                               info.get("ram", {}).get("dirty-sync-count", 0), gap))
else:
    if info.get("status") not in ("failed", "cancelled"): call(src, "migrate_cancel")
    print("FAILED qemu %s %s after %d s: %s" % (sys.argv[4], info.get("status"), 60, json.dumps(info.get("ram", {}))))
call(src, "quit"); call(dst, "quit")
PY
  [ $? = 0 ] || echo "FAILED qemu $1 the QMP client failed: $(cat "$work"/qemu-*.err | tr '\n' ' ')"
  # Whatever happened to the client, neither QEMU outlives its run.
  kill $src $dst 2>/dev/null
  wait $src $dst 2>/dev/null
}

for rate in $rates; do
  in_guest 'kill $(cat /dev/shm/mb.pid 2>/dev/null) 2>/dev/null; setsid /root/migratebench '"$rate"' > /dev/shm/mb.out 2>&1 < /dev/null & echo $! > /dev/shm/mb.pid' \
    || fail "cannot start the guest program"
  sleep 3
  i=1
  while [ $i -le "$runs" ]; do
    progress "$rate MiB/s: run $i of $runs"
    if [ $((i % 2)) = 1 ]; then swiftlet_run "$rate"; qemu_run "$rate"; else qemu_run "$rate"; swiftlet_run "$rate"; fi
    i=$((i + 1))
  done
done
SWIFTLET_HOME=$here "$SWIFTLET" machine rm -f m > /dev/null 2>&1
rm -rf "$work"
