#!/bin/sh
# The benchmark guest's script (`make bench-net`, scripts/bench-net): one iperf3 run guest→host and
# one host→guest against the iperf3 server on the host's loopback (10.0.2.2 through passt), then a
# TCP echo server on port 7777 for the host's request/response client, then the end.
# BENCH_MODE=qemu (init under QEMU microvm: mounts, and the interface configured here as Swiftlet's
# agent configures it) or swiftlet (run by `swiftlet run --net`); BENCH_SECONDS per iperf3 run.
export PATH=/bin:/usr/bin TMPDIR=/tmp
if [ "$BENCH_MODE" = qemu ]; then
  mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t tmpfs tmp /tmp; mount -t devtmpfs dev /dev 2>/dev/null
  ip link set lo up
  ip link set eth0 mtu 65520 up
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
secs=${BENCH_SECONDS:-3}
iperf3 -c 10.0.2.2 -p 5201 -t "$secs" -f g 2>&1 | awk '/receiver$/ { print "RESULT g2h_gbps", $(NF-2) } /error/ { print }'
iperf3 -c 10.0.2.2 -p 5201 -t "$secs" -f g -R 2>&1 | awk '/receiver$/ { print "RESULT h2g_gbps", $(NF-2) } /error/ { print }'
netbench echo 7777
echo "bench-guest-done"
[ "$BENCH_MODE" = qemu ] && reboot -f
exit 0
