#!/bin/sh
# The benchmark guest's script (`make bench-net`, scripts/bench-net): one iperf3 run guest→host and
# one host→guest against the iperf3 server on the host's loopback (10.0.2.2 through passt), then a
# TCP echo server on port 7777 for the host's request/response client, then the end.
# BENCH_MODE=qemu (init under QEMU microvm: mounts, and the interface configured here as Swiftlet's
# agent configures it) or swiftlet (run by `swiftlet run --net`); BENCH_SECONDS per iperf3 run;
# BENCH_OFFLOAD=on (default) or off.
export PATH=/bin:/usr/bin TMPDIR=/tmp
if [ "$BENCH_MODE" = qemu ]; then
  mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t tmpfs tmp /tmp; mount -t devtmpfs dev /dev 2>/dev/null
  ip link set lo up
  ip link set eth0 mtu 65520 up
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
# BENCH_OFFLOAD=off: the guest computes and checks its checksums itself (ethtool turns transmit
# and receive checksum offload off, so the device's CSUM and GUEST_CSUM go unused).
if [ "${BENCH_OFFLOAD:-on}" = off ]; then
  ethtool -K eth0 tx off rx off > /dev/null 2>&1 || echo "bench-guest: ethtool -K eth0 tx off rx off failed"
fi
ethtool -k eth0 2>&1 | awk '/^(tx|rx)-checksumming:/ { print "OFFLOAD", $1, $2 }'
secs=${BENCH_SECONDS:-3}
iperf3 -c 10.0.2.2 -p 5201 -t "$secs" -f m 2>&1 | awk '/receiver$/ { print "RESULT g2h_gbps", $(NF-2) / 1000 } /error/ { print }'
iperf3 -c 10.0.2.2 -p 5201 -t "$secs" -f m -R 2>&1 | awk '/receiver$/ { print "RESULT h2g_gbps", $(NF-2) / 1000 } /error/ { print }'
netbench echo 7777
echo "bench-guest-done"
[ "$BENCH_MODE" = qemu ] && reboot -f
exit 0
