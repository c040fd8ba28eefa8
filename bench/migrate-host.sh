#!/bin/sh
# The host side of `make bench-migrate` (scripts/bench-migrate), inside the nested test host or on
# a hardware host: an idle 512 MiB machine migrated back and forth between two SWIFTLET_HOMEs
# over 127.0.0.1 (`machine receive` / `machine migrate --max-downtime 50ms`), and QEMU microvm
# with the same kernel, memory and initramfs migrated over TCP on the same loopback (`-incoming`,
# QMP `migrate` with downtime-limit 50 ms), BENCH_RUNS times each, alternating which goes first.
# Prints RESULT lines: `RESULT swiftlet|qemu downtime_ms total_ms bytes`, or `FAILED vmm reason`.
# Environment: SWIFTLET, QEMU, KERNEL, INITRD, PYTHON, BENCH_RUNS (default 5).
set -u
runs=${BENCH_RUNS:-5}
memory=512
work=$(mktemp -d)
fail() { echo "bench-migrate: $*" >&2; exit 1; }
A=$work/a B=$work/b
SWIFTLET_HOME=$A "$SWIFTLET" machine create --name m --memory $memory > /dev/null || fail "machine create failed"
SWIFTLET_HOME=$A "$SWIFTLET" machine start m || fail "machine start failed"
progress() { echo "bench-migrate: $(cut -d' ' -f1 /proc/uptime) s: $*"; }
progress "machine started"
here=$A there=$B
port=17800

swiftlet_run() {
  port=$((port + 1))
  # Not the last run's token: the receiver truncates this file only once it has started.
  rm -f "$work/receive.out" "$work/receive.err"
  SWIFTLET_HOME=$there timeout 660 "$SWIFTLET" machine receive m --listen 127.0.0.1:$port > "$work/receive.out" 2> "$work/receive.err" &
  receiver=$!
  polls=0; while [ ! -s "$work/receive.out" ] && [ $polls -lt 300 ]; do sleep 0.1; polls=$((polls + 1)); done
  token=$(head -n 1 "$work/receive.out")
  if SWIFTLET_HOME=$here timeout 600 "$SWIFTLET" machine migrate m --to 127.0.0.1:$port --token "$token" --max-downtime 50ms --json > "$work/migrate.out" 2> "$work/migrate.err"; then
    wait $receiver
    "$PYTHON" - "$work/migrate.out" <<'PY'
import json, sys
report = [json.loads(l) for l in open(sys.argv[1]) if l.strip()][-1]
print("RESULT swiftlet %.3f %.3f %d %d" % (report["downtimeMilliseconds"], report["totalMilliseconds"], report["bytesSent"], report["rounds"]))
PY
    t=$here; here=$there; there=$t
  else
    echo "FAILED swiftlet $(tr '\n' ' ' < "$work/migrate.err")"
    kill $receiver 2>/dev/null # it would wait for a source with its token until its timeout
    wait $receiver
  fi
}

qemu_vm() {
  "$QEMU" -M microvm,x-option-roms=off,rtc=off,acpi=off,pit=off,pic=off,isa-serial=on -enable-kvm -cpu host \
    -m $memory -smp 1 -nodefaults -no-user-config -display none -no-reboot -serial "file:$work/qemu-$1.log" -device i8042 \
    -kernel "$KERNEL" -initrd "$INITRD" -append "console=ttyS0 reboot=k panic=-1 pci=off loglevel=3 -- sleep 1000000" \
    -qmp "unix:$work/qmp-$1.sock,server=on,wait=off" "$@" > /dev/null 2>&1 &
}

qemu_run() {
  port=$((port + 1))
  rm -f "$work"/qmp-*.sock
  qemu_vm src; src=$!
  sleep 3 # the guest boots to its idle shell
  qemu_vm dst -incoming tcp:127.0.0.1:$port; dst=$!
  timeout 600 "$PYTHON" - "$work/qmp-src.sock" "$work/qmp-dst.sock" $port <<'PY'
import json, socket, sys, time
def connect(path):
    for _ in range(300):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); break
        except OSError:
            time.sleep(0.1)
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
deadline = time.time() + 300
while time.time() < deadline:
    info = call(src, "query-migrate")["return"]
    if info.get("status") in ("completed", "failed", "cancelled"): break
    time.sleep(0.05)
if info.get("status") == "completed":
    print("RESULT qemu %.3f %.3f %d 0" % (info["downtime"], info["total-time"], info["ram"]["transferred"]))
else:
    print("FAILED qemu %s" % json.dumps(info))
call(src, "quit"); call(dst, "quit")
PY
  [ $? = 0 ] || echo "FAILED qemu the QMP client failed"
  # Whatever happened to the client, neither QEMU outlives its run.
  kill $src $dst 2>/dev/null
  wait $src $dst 2>/dev/null
}

i=1
while [ $i -le "$runs" ]; do
  progress "run $i of $runs"
  if [ $((i % 2)) = 1 ]; then swiftlet_run; qemu_run; else qemu_run; swiftlet_run; fi
  i=$((i + 1))
done
SWIFTLET_HOME=$here "$SWIFTLET" machine rm -f m > /dev/null 2>&1
rm -rf "$work"
