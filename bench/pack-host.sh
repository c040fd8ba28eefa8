#!/bin/sh
# The host side of `make bench-pack` (scripts/bench-pack runs it inside the nested test host, or
# directly on hardware KVM). Prints "RESULT KEY VALUE" lines; scripts/bench-pack sums them up.
#
# A 512 MiB machine's snapshot of the benchmark's busybox image (`swiftlet snapshot`) is packed
# (`pack create --from`, and once more as a program with --executable), and the image itself
# (`pack create --image`); sizes and creation times are reported. Then, BENCH_RUNS times in
# rotation, the time to the first output of `echo hi`: `run --from DIR` (the snapshot as it is),
# `run --image SNAPSHOT.swiftlet` (unpacked but for its memory, which the guest's faults bring in
# lazily), the program, the image's pack as a program (disk only: booted cold, no home), `run --image
# IMAGE.swiftlet` (unpacked, then its boot template restored) and `run --image DIGEST` (the image from the
# store, its boot template restored), each a new process timed from its start to its exit.
#
# Then, 3 times each, the host memory of the process running `echo hi` from the snapshot pack and
# from the directory, once `hi` is out (RssAnon: the guest memory brought in, and the VMM's own;
# RssFile: pages of mapped files, the snapshot's memory file for `--from`).
#
# Environment: SWIFTLET (binary), IMAGE (OCI layout), NETBENCH (this host's timer), SWIFTLET_HOME,
# BENCH_RUNS (default 10).
set -u
runs=${BENCH_RUNS:-10}
work=$(mktemp -d /tmp/bench-pack.XXXXXX)
fail() { echo "bench-pack: $*" >&2; exit 1; }
memory=512

digest=$("$SWIFTLET" image pull -q "$IMAGE" | tr -d ' \n') || fail "swiftlet image pull $IMAGE failed"
"$SWIFTLET" snapshot --image "$digest" --memory "$memory" -o "$work/snap" > /dev/null || fail "swiftlet snapshot failed"

# Times one command (ms, from its process's start to its exit); the command must succeed.
timed() {
  "$NETBENCH" time "$@" > /dev/null 2> "$work/timed.log" || { cat "$work/timed.log" >&2; fail "$* failed"; }
  sed -n 's/^elapsed_ms \([0-9.]*\) status 0$/\1/p' "$work/timed.log"
}
bytes() { wc -c < "$1" | tr -d ' '; }

echo "RESULT create_snapshot_ms $(timed "$SWIFTLET" pack create --from "$work/snap" -o "$work/snap.swiftlet")"
echo "RESULT create_program_ms $(timed "$SWIFTLET" pack create --from "$work/snap" -o "$work/app" --executable)"
echo "RESULT create_image_ms $(timed "$SWIFTLET" pack create --image "$digest" -o "$work/image.swiftlet")"
"$SWIFTLET" pack create --image "$digest" -o "$work/image-app" --executable > /dev/null || fail "pack create --image --executable failed"
echo "RESULT snapshot_pack_bytes $(bytes "$work/snap.swiftlet")"
echo "RESULT program_bytes $(bytes "$work/app")"
echo "RESULT image_pack_bytes $(bytes "$work/image.swiftlet")"
# What the parts hold: the snapshot directory's files (apparent and allocated) and the image's
# layer disks (as the pack records them).
echo "RESULT snapshot_dir_apparent_bytes $(du -sb "$work/snap" | cut -f1)"
echo "RESULT snapshot_dir_allocated_bytes $(( $(du -sk "$work/snap" | cut -f1) * 1024 ))"
"$SWIFTLET" pack inspect --json "$work/snap.swiftlet" > "$work/snap.json"
"$SWIFTLET" pack inspect --json "$work/image.swiftlet" > "$work/image.json"
echo "MANIFEST snapshot $work/snap.json"
echo "MANIFEST image $work/image.json"
sed 's/^/MANIFEST-snapshot /' "$work/snap.json"
sed 's/^/MANIFEST-image /' "$work/image.json"

# Warm-up: each kind once (the image's boot template is saved by its first run).
for args in "--from $work/snap" "--image $work/snap.swiftlet" "--image $work/image.swiftlet" "--image $digest"; do
  "$SWIFTLET" run $args -- echo hi > /dev/null || fail "swiftlet run $args failed"
done
"$work/app" -- echo hi > /dev/null || fail "the packed program failed"
"$work/image-app" -- echo hi > /dev/null || fail "the packed image program failed"

i=1
while [ "$i" -le "$runs" ]; do
  echo "RESULT first_output_from_dir_ms $(timed "$SWIFTLET" run --from "$work/snap" -- echo hi)"
  echo "RESULT first_output_snapshot_pack_ms $(timed "$SWIFTLET" run --image "$work/snap.swiftlet" -- echo hi)"
  echo "RESULT first_output_program_ms $(timed "$work/app" -- echo hi)"
  echo "RESULT first_output_image_program_ms $(timed "$work/image-app" -- echo hi)"
  echo "RESULT first_output_image_pack_ms $(timed "$SWIFTLET" run --image "$work/image.swiftlet" -- echo hi)"
  echo "RESULT first_output_image_template_ms $(timed "$SWIFTLET" run --image "$digest" -- echo hi)"
  i=$((i + 1))
done

# "anon file" (kB) of a run of "$@" -- sh -c 'echo hi; sleep 3', read once `hi` is out.
resident() {
  "$@" -- sh -c 'echo hi; sleep 3' > "$work/resident.out" &
  pid=$!
  for _ in $(seq 1200); do grep -q hi "$work/resident.out" 2>/dev/null && break; sleep 0.05; done
  anon=$(sed -n 's/^RssAnon:[[:space:]]*\([0-9]*\).*/\1/p' /proc/$pid/status)
  file=$(sed -n 's/^RssFile:[[:space:]]*\([0-9]*\).*/\1/p' /proc/$pid/status)
  wait $pid || fail "$* failed"
  echo "$anon $file"
}
for _ in 1 2 3; do
  set -- $(resident "$SWIFTLET" run --image "$work/snap.swiftlet")
  echo "RESULT rss_anon_snapshot_pack_kb $1"; echo "RESULT rss_file_snapshot_pack_kb $2"
  set -- $(resident "$SWIFTLET" run --from "$work/snap")
  echo "RESULT rss_anon_from_dir_kb $1"; echo "RESULT rss_file_from_dir_kb $2"
done
rm -rf "$work"
