import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// Networking (issue 18) through the CLI, in the nested test host, whose guest/nested/net-services
/// provides: dnsmasq on 127.0.0.1:53 as the host's resolver serving *.swiftlet.test (allowed and
/// denied → 192.0.2.1, rebind → 127.0.0.1, private → 10.9.8.7, metadata → 169.254.169.254,
/// blackhole → 192.0.2.99), its query log at $SWIFTLET_DNS_LOG, busybox httpd serving
/// $SWIFTLET_HTTP_PAGE on 127.0.0.1, ::1 and 192.0.2.1, port $SWIFTLET_HTTP_PORT, and IPv6
/// (2001:db8:1::1/64, gateway $SWIFTLET_NET_GATEWAY6).
/// (No `wget -T` here: Debian's static busybox 1.35 wget segfaults when a connection made under
/// -T fails; a refused connection ends wget at once without it.)
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"),
       .enabled(if: TestHost.environment("SWIFTLET_NET_TESTS") == "1", "needs the nested test host's network services (SWIFTLET_NET_TESTS)"))
struct NetworkIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let home = TemporaryDirectory()
    let port = TestHost.environment("SWIFTLET_HTTP_PORT") ?? "8088"
    let page = TestHost.environment("SWIFTLET_HTTP_PAGE") ?? "swiftlet-nested-host-page"
    let dnsLog = TestHost.environment("SWIFTLET_DNS_LOG") ?? "/tmp/swiftlet-net/dnsmasq.log"

    func run(_ arguments: [String], _ script: String) -> Subprocess {
        Subprocess.run([swiftlet, "run"] + arguments + ["--", "sh", "-c", script], environment: ["SWIFTLET_HOME": home.path], timeout: 300)
    }

    func machine(_ arguments: [String]) -> Subprocess {
        Subprocess.run([swiftlet, "machine"] + arguments, environment: ["SWIFTLET_HOME": home.path], timeout: 300)
    }

    func shell(_ line: String) -> Subprocess {
        Subprocess.run(["/bin/sh", "-c", line], environment: ["SWIFTLET_HOME": home.path, "S": swiftlet], timeout: 300)
    }

    /// Guest shell lines that try a TCP connection to `address` port 80 (5 s at most) and print
    /// "nc-status N" and how long it took, "elapsed-ms N" (busybox `date` has no %N: /proc/uptime).
    static func timedConnection(to address: String) -> String {
        """
        read t0 rest < /proc/uptime
        nc -w 5 \(address) 80 < /dev/null; echo "nc-status $?"
        read t1 rest < /proc/uptime
        awk -v a="$t0" -v b="$t1" 'BEGIN { print "elapsed-ms", int((b - a) * 1000) }'
        """
    }

    /// The milliseconds `timedConnection` printed.
    static func elapsedMilliseconds(_ output: String) -> Int? {
        output.split(separator: "\n").first { $0.hasPrefix("elapsed-ms ") }.flatMap { Int($0.dropFirst(11)) }
    }

    func dnsLogText() -> String {
        usleep(300_000)  // dnsmasq writes its log a moment after answering
        return shell("cat '\(dnsLog)'").stdout
    }

    @Test func withoutAFlagTheGuestHasOnlyLoopback() {
        let r = run([], "ls /sys/class/net")
        #expect(r.status == 0 && r.stdout.split(separator: "\n") == ["lo"], "\(r.stdout)|\(r.stderr)")
    }

    @Test func netFetchesAPageFromTheHostAndResolvesNames() {
        let r = run(["--net"], """
            ls /sys/class/net | tr '\\n' ' '; echo
            wget -q -O - http://host.swiftlet.internal:\(port)/
            nslookup allowed.swiftlet.test 2>&1 | grep -c 192.0.2.1
            """)
        #expect(r.status == 0, "\(r.stdout)|\(r.stderr)")
        #expect(r.stdout.contains("eth0"), "\(r.stdout)")
        #expect(r.stdout.contains(page), "\(r.stdout)|\(r.stderr)")
        #expect(dnsLogText().contains("allowed.swiftlet.test"), "the query reached the host's resolver")
    }

    @Test func anAllowedNameWorksADeniedOneIsNXDOMAINAndNeverForwarded() {
        let r = run(["--allow-host", "allowed.swiftlet.test"], """
            wget -q -O - http://allowed.swiftlet.test:\(port)/ || echo allowed-fetch-failed
            nslookup denied.swiftlet.test > /tmp/denied 2>&1; echo "denied-status $?"; cat /tmp/denied
            """)
        #expect(r.stdout.contains(page) && !r.stdout.contains("allowed-fetch-failed"), "\(r.stdout)|\(r.stderr)")
        #expect(r.stdout.contains("denied-status 1") || r.stdout.contains("NXDOMAIN"), "\(r.stdout)")
        let log = dnsLogText()
        #expect(log.contains("allowed.swiftlet.test"), "the allowed name was resolved upstream:\n\(log)")
        #expect(!log.contains("denied.swiftlet.test"), "the denied name reached the host's resolver:\n\(log)")
    }

    @Test func aDeniedAddressIsRefusedFastAndOtherResolversAndMetadataAreBlocked() {
        // 192.0.2.99 is a black hole behind the test host's dummy0: only a refusal ends it fast.
        let r = run(["--allow-host", "allowed.swiftlet.test"], """
            \(Self.timedConnection(to: "192.0.2.99"))
            nslookup allowed.swiftlet.test 192.0.2.53 > /dev/null 2>&1; echo "other-dns $?"
            nslookup allowed.swiftlet.test 8.8.8.8 > /dev/null 2>&1; echo "google-dns $?"
            wget -q -O - http://169.254.169.254/ > /dev/null 2>&1; echo "metadata $?"
            """)
        #expect(!r.stdout.contains("nc-status 0"), "\(r.stdout)|\(r.stderr)")
        let elapsed = Self.elapsedMilliseconds(r.stdout)
        #expect(elapsed != nil && elapsed! < 1000, "a blocked connection must be refused in under 1 s: \(r.stdout)")
        #expect(r.stdout.contains("other-dns 1") && r.stdout.contains("google-dns 1"), "\(r.stdout)")
        #expect(r.stdout.contains("metadata 1"), "\(r.stdout)")
        // Metadata is blocked under plain --net too.
        let open = run(["--net"], "wget -q -O - http://169.254.169.254/ > /dev/null 2>&1; echo \"metadata $?\"")
        #expect(open.stdout.contains("metadata 1"), "\(open.stdout)|\(open.stderr)")
    }

    @Test func aRebindingAnswerIsNotHonoured() {
        // rebind.swiftlet.test answers 127.0.0.1, private.swiftlet.test 10.9.8.7, metadata.swiftlet.test
        // 169.254.169.254: allowed names, but addresses a DNS answer must not open.
        let r = run(["--allow-host", "*.swiftlet.test"], """
            for n in rebind private metadata; do
              nc -w 3 $n.swiftlet.test \(port) < /dev/null > /dev/null 2>&1; echo "$n $?"
            done
            wget -q -O - http://allowed.swiftlet.test:\(port)/ || echo allowed-fetch-failed
            """)
        #expect(r.stdout.contains("rebind 1") && r.stdout.contains("private 1") && r.stdout.contains("metadata 1"), "\(r.stdout)|\(r.stderr)")
        #expect(r.stdout.contains(page), "a wildcard allows allowed.swiftlet.test: \(r.stdout)")
    }

    @Test func ipv6WorksWhereTheHostHasItUnderTheSamePolicy() {
        // The test host has 2001:db8:1::1/64 and a default route via 2001:db8:1::fe, which passt
        // maps to the host's ::1 (httpd listens there). The guest's address comes from passt's
        // router advertisement (SLAAC): wait for it.
        let gateway = TestHost.environment("SWIFTLET_NET_GATEWAY6") ?? "2001:db8:1::fe"
        let waitForAddress = """
            for i in $(seq 75); do ip -6 addr show dev eth0 scope global | grep inet6 | grep -qv tentative && break; usleep 200000; done
            ip -6 addr show dev eth0 scope global | grep -o 'inet6 [0-9a-f:]*/64'
            """
        let open = run(["--net"], waitForAddress + "\ntimeout 20 wget -q -O - 'http://[\(gateway)]:\(port)/'; echo \"v6-fetch $?\"")
        #expect(open.stdout.contains("inet6 2001:db8:1:"), "a SLAAC address in the host's prefix: \(open.stdout)|\(open.stderr)")
        #expect(open.stdout.contains(page) && open.stdout.contains("v6-fetch 0"), "\(open.stdout)|\(open.stderr)")
        // An allow-list by IPv6 CIDR: that address works, another is refused at once, IPv4 is closed.
        let listed = run(["--allow-cidr", gateway + "/128"], waitForAddress + """

            timeout 20 wget -q -O - 'http://[\(gateway)]:\(port)/'; echo "v6-fetch $?"
            \(Self.timedConnection(to: "2001:db8:1::99"))
            timeout 20 wget -q -O - http://10.0.2.2:\(port)/ > /dev/null 2>&1; echo "v4-host $?"
            """)
        #expect(listed.stdout.contains(page) && listed.stdout.contains("v6-fetch 0"), "\(listed.stdout)|\(listed.stderr)")
        let elapsed = Self.elapsedMilliseconds(listed.stdout)
        #expect(listed.stdout.contains("nc-status 1") && elapsed != nil && elapsed! < 1000, "refused in under 1 s: \(listed.stdout)")
        #expect(listed.stdout.contains("v4-host 1"), "\(listed.stdout)")
        #expect(listed.stderr.contains("blocked tcp to [2001:db8:1::99]:80"), "the blocked attempt is logged: \(listed.stderr)")
    }

    @Test func anImageSnapshotKeepsItsNICAndPolicyAndRunsTakeOwnOptions() {
        let snapshot = home.path + "/net.snap"
        let made = Subprocess.run([swiftlet, "snapshot", "--allow-host", "allowed.swiftlet.test", "-o", snapshot],
                                  environment: ["SWIFTLET_HOME": home.path], timeout: 300)
        #expect(made.status == 0, "\(made.stderr)")
        // Without network options, the snapshot's policy.
        let kept = run(["--from", snapshot], """
            wget -q -O - http://allowed.swiftlet.test:\(port)/ || echo allowed-fetch-failed
            wget -q -O - http://host.swiftlet.internal:\(port)/ > /dev/null 2>&1; echo "host $?"
            """)
        #expect(kept.stdout.contains(page) && !kept.stdout.contains("allowed-fetch-failed"), "\(kept.stdout)|\(kept.stderr)")
        #expect(kept.stdout.contains("host 1"), "host.swiftlet.internal is not on the snapshot's allow-list: \(kept.stdout)")
        // With them, the run's own.
        let open = run(["--from", snapshot, "--net"], "wget -q -O - http://host.swiftlet.internal:\(port)/")
        #expect(open.status == 0 && open.stdout.contains(page), "\(open.stdout)|\(open.stderr)")
    }

    @Test func aPublishedPortAnswersTheHostIsExclusiveAndComesBackAfterRestore() throws {
        let server = "mkdir -p /tmp/www; echo machine-page > /tmp/www/index.html; setsid httpd -p 80 -h /tmp/www </dev/null >/dev/null 2>&1"
        // A few tries (the server may still be starting), each bounded: a connection the guest
        // never answers stalls (as every one did after a restore, before the agent announced
        // the guest with a gratuitous ARP and passt still sent to the broadcast address).
        func fetch() -> String {
            var text = ""
            for _ in 0..<3 {
                text = shell("timeout 10 wget -q -O - http://127.0.0.1:18080/ 2>&1").stdout
                if text.contains("machine-page") { break }
                usleep(500_000)
            }
            return text
        }
        let created = machine(["create", "--name", "web", "--memory", "128", "-p", "127.0.0.1:18080:80"])
        #expect(created.status == 0, "\(created.stderr)")
        #expect(machine(["start", "web"]).status == 0)
        #expect(machine(["exec", "web", "--", "sh", "-c", server]).status == 0)
        #expect(fetch().contains("machine-page"))
        let ls = machine(["ls", "--json"])
        #expect(ls.stdout.contains("18080"), "machine ls --json shows the port: \(ls.stdout)")
        // Publishing gives no outbound access; a blocked attempt is refused at once and logged in the machine's log.
        let out = machine(["exec", "web", "--", "sh", "-c", "nc -w 5 192.0.2.1 \(port) < /dev/null; echo \"nc-status $?\""])
        #expect(out.stdout.contains("nc-status 1"), "\(out.stdout)|\(out.stderr)")
        let vmmLog = shell("cat \"$SWIFTLET_HOME/machines/web/vmm.log\"").stdout
        #expect(vmmLog.contains("blocked tcp to 192.0.2.1:\(port)"), "vmm.log: \(vmmLog)")

        // A second machine cannot take the port: a clear error naming it.
        #expect(machine(["create", "--name", "clash", "--memory", "128", "-p", "127.0.0.1:18080:80"]).status == 0)
        let clash = machine(["start", "clash"])
        #expect(clash.status != 0 && clash.stderr.contains("18080"), "\(clash.status) \(clash.stderr)")
        #expect(fetch().contains("machine-page"), "the first machine keeps its port")
        _ = machine(["rm", "clash"])

        // After a snapshot and a restore (the source stopped first), the port answers again.
        let snapshot = home.path + "/snap"
        let taken = machine(["snapshot", "web", "-o", snapshot])
        #expect(taken.status == 0, "\(taken.stderr)")
        _ = machine(["stop", "web"])
        let restored = machine(["restore", snapshot, "--name", "back"])
        #expect(restored.status == 0, "\(restored.stderr)")
        var running = machine(["exec", "back", "--", "sh", "-c", "pidof httpd || (\(server))"])
        if running.status != 0 { running = machine(["exec", "back", "--", "sh", "-c", server]) }
        #expect(fetch().contains("machine-page"), "the restored machine's published port answers")
        _ = machine(["stop", "back"])
    }
}
