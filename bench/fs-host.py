#!/usr/bin/env python3
"""The host side of `make bench-fs` (scripts/bench-fs), inside the nested test host or on a hardware
host: the same guest (kernel, the demo initramfs, 512 MiB, one vCPU) sharing one host directory,
under `swiftlet boot --share DIR` (virtio-fs served inside the VMM; 4 MiB readahead, as the agent
sets it) and under QEMU microvm with
`-fsdev local,security_model=none -device virtio-9p-device` (9p2000.L, msize 512 KiB, the kernel's
default cache mode, none), running one workload from its kernel command line:

  write   dd of a BENCH_FS_MIB MiB file (1 MiB blocks, fsync at the end)
  read    page cache dropped, the file read back (1 MiB blocks)
  create  BENCH_FS_FILES empty files (xargs touch), in one directory
  stat    caches dropped, `ls -l` of that directory (a stat of every file)
  find    caches dropped, `find` over it
  unlink  `rm -r` of the directory

The guest times each phase with /proc/uptime (10 ms ticks) and prints them; printed per run:
`RESULT vmm write_ms read_ms create_ms stat_ms find_ms unlink_ms`, or `FAILED vmm reason`.
BENCH_RUNS runs of each, alternating, after one warm-up run of each (not reported). Environment: SWIFTLET, QEMU, KERNEL, INITRD, BENCH_RUNS
(default 5), BENCH_FS_MIB (default 256), BENCH_FS_FILES (default 10000)."""
import os, shutil, subprocess, sys, tempfile, time

MIB = int(os.environ.get("BENCH_FS_MIB", "256"))
FILES = int(os.environ.get("BENCH_FS_FILES", "10000"))
BASE = "console=ttyS0 reboot=k panic=-1 pci=off loglevel=3"
# QEMU microvm names its one virtio-mmio device on the kernel command line, and would append it
# after the `--` that starts init's arguments, where the kernel never sees it: the option goes
# before, written here (the slot QEMU gives a machine's only virtio device), and QEMU's own is off.
QEMU_DEVICE = "virtio_mmio.device=512@0xfeb00e00:12"
PHASES = ("write", "read", "create", "stat", "find", "unlink")


def workload(mount):
    # t: centiseconds since boot (/proc/uptime; 1$c keeps a fraction like 08 decimal); each phase prints PHASE=ms.
    return ("t() { read u r < /proc/uptime; s=${u%.*}; c=${u#*.}; echo $((s*100+1$c-100)); }; mkdir -p /mnt/fs && " + mount + " && "
            "cd $D && a=$(t) && dd if=/dev/zero of=$D/big bs=1M count=" + str(MIB) + " conv=fsync 2>/dev/null && b=$(t) && "
            "echo 3 > /proc/sys/vm/drop_caches && c=$(t) && dd if=$D/big of=/dev/null bs=1M 2>/dev/null && d=$(t) && "
            "mkdir $D/m && cd $D/m && e=$(t) && seq 1 " + str(FILES) + " | xargs touch && f=$(t) && "
            "cd / && echo 3 > /proc/sys/vm/drop_caches && g=$(t) && ls -l $D/m > /dev/null && h=$(t) && "
            "echo 3 > /proc/sys/vm/drop_caches && i=$(t) && n=$(find $D/m | wc -l) && j=$(t) && "
            "rm -r $D/m && k=$(t) && rm $D/big && "
            "echo BENCH-FS files=$n write=$(((b-a)*10)) read=$(((d-c)*10)) create=$(((f-e)*10)) stat=$(((h-g)*10)) "
            "find=$(((j-i)*10)) unlink=$(((k-j)*10)) BENCH-END")


def command(vmm, directory, log):
    if vmm == "swiftlet":
        # As the guest agent does: 4 MiB of readahead (FUSE starts at 128 KiB).
        mount = "mount -t virtiofs swiftlet /mnt/fs && echo 4096 > /sys/class/bdi/$(grep \' /mnt/fs \' /proc/self/mountinfo | cut -d\' \' -f3)/read_ahead_kb && D=/mnt/fs/v0"
        return [os.environ["SWIFTLET"], "boot", "--kernel", os.environ["KERNEL"], "--initrd", os.environ["INITRD"],
                "--memory", "512", "--share", directory, "--", "sh", "-c", workload(mount)]
    mount = "mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 share /mnt/fs && D=/mnt/fs"
    return [os.environ["QEMU"], "-M", "microvm,x-option-roms=off,rtc=off,acpi=off,pit=off,pic=off,isa-serial=on,auto-kernel-cmdline=off",
            "-enable-kvm", "-cpu", "host", "-m", "512", "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-serial", "file:" + log, "-device", "i8042",
            "-fsdev", "local,id=fs0,path=" + directory + ",security_model=none",
            "-device", "virtio-9p-device,fsdev=fs0,mount_tag=share",
            "-kernel", os.environ["KERNEL"], "-initrd", os.environ["INITRD"],
            "-append", BASE + " " + QEMU_DEVICE + ' -- sh -c "' + workload(mount) + '"']


def run(vmm, index, work, report=True):
    directory = os.path.join(work, f"share-{vmm}-{index}")
    os.mkdir(directory)
    log = os.path.join(work, f"{vmm}-{index}.log")
    out = open(log, "w") if vmm == "swiftlet" else subprocess.DEVNULL
    process = subprocess.Popen(command(vmm, directory, log), stdout=out, stderr=subprocess.STDOUT)
    text = ""
    start = time.monotonic()
    try:
        while time.monotonic() - start < 1800 and process.poll() is None:
            try:
                text = open(log, errors="replace").read()
            except OSError:
                text = ""
            if "BENCH-END" in text or "exited with status" in text:
                break
            time.sleep(0.2)
        text = open(log, errors="replace").read()
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)
    line = next((l for l in text.splitlines() if l.startswith("BENCH-FS") and "BENCH-END" in l), None)
    if line is None:
        print(f"FAILED {vmm} the guest did not get through its workload: {text[-400:].replace(chr(10), ' ')}", flush=True)
        return
    values = dict(word.split("=", 1) for word in line.split() if "=" in word)
    if values.get("files") != str(FILES + 1):
        print(f"FAILED {vmm} find saw {values.get('files')} entries, not {FILES + 1}", flush=True)
        return
    if report:
        print("RESULT " + vmm + " " + " ".join(values[p] for p in PHASES), flush=True)


work = tempfile.mkdtemp(dir=os.environ.get("BENCH_FS_DIR"))
runs = int(os.environ.get("BENCH_RUNS", "5"))
try:
    # One run of each first, not counted: the first guest of a fresh test host pays for memory
    # the host has not touched yet, whichever VMM it is.
    print("bench-fs: warm-up run of each (not counted)", flush=True)
    for vmm in ("swiftlet", "qemu"):
        run(vmm, "warm-up", work, report=False)
    for i in range(runs):
        print(f"bench-fs: run {i + 1} of {runs} ({MIB} MiB, {FILES} files)", flush=True)
        for vmm in (("swiftlet", "qemu") if i % 2 == 0 else ("qemu", "swiftlet")):
            run(vmm, i, work)
finally:
    shutil.rmtree(work, ignore_errors=True)
