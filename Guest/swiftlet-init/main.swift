import AgentProtocol
import CGuestSupport
import Glibc

// swiftlet-init: the guest's PID 1 and agent. It mounts the guest's filesystems, makes the image
// disk (read-only, under a writable overlay) the root, connects to the host over vsock, and runs
// the commands the host sends, streaming their input and output and reporting how they ended.
//
// The initramfs's /init (guest/agent/init.c) mounts /proc first: the static Swift runtime needs it.
// As an ordinary process (`swiftlet-init --unix PATH`) it skips the set-up and serves a Unix
// socket instead, so the agent's behaviour can be tested on the host.

// A command that closes its input must not kill the agent when it writes there (EPIPE instead).
signal(SIGPIPE, SIG_IGN)
let arguments = CommandLine.arguments
let connect: () -> Int32
if arguments.count == 3 && arguments[1] == "--unix" {
    connect = {
        let fd = guest_unix_connect(arguments[2])
        guard fd >= 0 else { Log.fatal("cannot connect to \(arguments[2])") }
        return fd
    }
} else if getpid() == 1 {
    let options = BootOptions(commandLine: (try? readText("/proc/cmdline")) ?? "")
    GuestSetup.run(options)
    connect = { GuestSetup.connectToHost(options) }
} else {
    Log.fatal("usage: swiftlet-init (as PID 1 in a Swiftlet guest) | swiftlet-init --unix SOCKET")
}
var session = Session(connection: connect(), connect: connect)
// A lost connection (a restore from a snapshot resets vsock connections) is made again: the host
// that restored the machine waits for the agent's `ready`. The host closing it ends the machine.
while session.run() == .connectionLost {
    session.reconnect(connect())
}
if getpid() == 1 { GuestSetup.powerOff() }
exit(0)
