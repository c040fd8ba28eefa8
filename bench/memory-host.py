#!/usr/bin/env python3
"""The host side of `make bench-memory` (scripts/bench-memory), inside the nested test host or on a
hardware host: the same guest (kernel, the demo initramfs, 768 MiB, one vCPU) under `swiftlet boot
--balloon` and under QEMU microvm with `virtio-balloon-device,free-page-reporting=on`, running one
workload from its kernel command line: idle, then 400 MiB of bytes that are not zeros written to a
tmpfs, then the file deleted. The VMM process's resident memory (VmRSS) is sampled every 50 ms;
printed per run: `RESULT vmm idle_kib filled_kib after_kib return_ms` (return_ms: from the guest
saying it deleted the file to the VMM holding 300 MiB less than when filled; -1 if not within
20 s; after_kib: 20 s after the delete), or `FAILED vmm reason`. BENCH_RUNS runs of each, alternating.
Environment: SWIFTLET, QEMU, KERNEL, INITRD, BENCH_RUNS (default 3)."""
import os, subprocess, sys, tempfile, time

MEMORY_MIB = 768
WORKLOAD = ("sleep 1; mkdir -p /mnt; mount -t tmpfs -o size=600m tmpfs /mnt; echo BENCH-IDLE; sleep 3; "
            "yes swiftlet-balloon-bench | head -c 419430400 > /mnt/x; echo BENCH-FILLED; sleep 3; "
            "rm /mnt/x; echo BENCH-FREED; sleep 30")
BASE = "console=ttyS0 reboot=k panic=-1 pci=off loglevel=3"
# QEMU microvm names its one virtio-mmio device on the kernel command line, and would append it
# after the `--` that starts init's arguments, where the kernel never sees it: the option goes
# before, written here (the slot QEMU gives a machine's only virtio device), and QEMU's own is off.
QEMU_DEVICE = "virtio_mmio.device=512@0xfeb00e00:12"
work = tempfile.mkdtemp()


def command(vmm, log):
    if vmm == "swiftlet":
        return [os.environ["SWIFTLET"], "boot", "--kernel", os.environ["KERNEL"], "--initrd", os.environ["INITRD"],
                "--memory", str(MEMORY_MIB), "--balloon", "--", "sh", "-c", WORKLOAD]
    return [os.environ["QEMU"], "-M", "microvm,x-option-roms=off,rtc=off,acpi=off,pit=off,pic=off,isa-serial=on,auto-kernel-cmdline=off",
            "-enable-kvm", "-cpu", "host", "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-serial", "file:" + log, "-device", "i8042",
            "-device", "virtio-balloon-device,free-page-reporting=on",
            "-kernel", os.environ["KERNEL"], "-initrd", os.environ["INITRD"],
            "-append", BASE + " " + QEMU_DEVICE + ' -- sh -c "' + WORKLOAD + '"']


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run(vmm, index):
    log = os.path.join(work, f"{vmm}-{index}.log")
    out = open(log, "w") if vmm == "swiftlet" else subprocess.DEVNULL
    process = subprocess.Popen(command(vmm, log), stdout=out, stderr=subprocess.STDOUT)
    samples, marks = [], {}
    start = time.monotonic()
    try:
        while time.monotonic() - start < 120:
            now = time.monotonic()
            rss = rss_kib(process.pid)
            if rss is None or process.poll() is not None:
                break
            samples.append((now, rss))
            try:
                text = open(log, errors="replace").read()
            except OSError:
                text = ""
            for mark in ("BENCH-IDLE", "BENCH-FILLED", "BENCH-FREED"):
                if mark in text and mark not in marks:
                    marks[mark] = now
            if "BENCH-FREED" in marks and now - marks["BENCH-FREED"] > 20:
                break
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    if len(marks) < 3:
        tail = open(log, errors="replace").read()[-300:].replace("\n", " ") if os.path.exists(log) else ""
        print(f"FAILED {vmm} the guest did not get through its workload (marks {sorted(marks)}): {tail}", flush=True)
        return

    def at(t):  # the last sample at or before t
        before = [rss for when, rss in samples if when <= t]
        return before[-1] if before else samples[0][1]

    idle = at(marks["BENCH-IDLE"] + 2.5)  # in the idle seconds before the write begins
    filled = at(marks["BENCH-FREED"] - 0.1)  # written, before the delete
    freed = marks["BENCH-FREED"]
    back = next((when for when, rss in samples if when >= freed and rss <= filled - 300 * 1024), None)
    after = samples[-1][1]
    return_ms = (back - freed) * 1000 if back is not None else -1
    print(f"RESULT {vmm} {idle} {filled} {after} {return_ms:.0f}", flush=True)


runs = int(os.environ.get("BENCH_RUNS", "3"))
for i in range(runs):
    print(f"bench-memory: run {i + 1} of {runs}", flush=True)
    for vmm in (("swiftlet", "qemu") if i % 2 == 0 else ("qemu", "swiftlet")):
        run(vmm, i)
