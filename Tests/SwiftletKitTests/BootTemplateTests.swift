import Hypervisor
@testable import SwiftletKit
import Testing
import VMM

/// What a boot template is keyed by: the files it was booted from (by place and version, or by
/// contents for an image pack's kernel and agent, unpacked anew for each run) and the shape,
/// CPU template included.
@Suite struct BootTemplateTests {
    func config(kernel: String, agent: String, cpuTemplate: CPUTemplate? = nil) -> MachineConfig {
        var config = MachineConfig(kernelPath: kernel, initrdPath: agent)
        config.cpuTemplate = cpuTemplate
        return config
    }

    @Test func anImagePacksKernelAndAgentAreKnownByContentsWhereverTheyAreUnpacked() {
        let first = config(kernel: "/unpacked/a/kernel", agent: "/unpacked/a/agent")
        let second = config(kernel: "/unpacked/b/kernel", agent: "/unpacked/b/agent")
        let digests = ["sha256:k", "sha256:a"]
        func contents(_ c: MachineConfig) -> [String: String] { [c.kernelPath: digests[0], c.initrdPath!: digests[1]] }
        #expect(BootTemplate(config: first, contents: contents(first)).directory.path == BootTemplate(config: second, contents: contents(second)).directory.path)
        #expect(BootTemplate(config: first).directory.path != BootTemplate(config: second).directory.path, "files by place: two places, two templates")
        let otherKernel = [second.kernelPath: "sha256:other", second.initrdPath!: digests[1]]
        #expect(BootTemplate(config: first, contents: contents(first)).directory.path != BootTemplate(config: second, contents: otherKernel).directory.path)
        #expect(BootTemplate(config: first, contents: contents(first)).inputs.hasPrefix("contents sha256:k\ncontents sha256:a\n"))
    }

    @Test func aCPUTemplateIsPartOfTheKey() {
        let plain = config(kernel: "/k", agent: "/a"), v2 = config(kernel: "/k", agent: "/a", cpuTemplate: .x86_64_v2)
        #expect(BootTemplate(config: plain).directory.path != BootTemplate(config: v2).directory.path)
    }
}
