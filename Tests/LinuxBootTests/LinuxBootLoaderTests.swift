import GuestMemory
import SwiftletSystem
import Testing
import TestSupport
@testable import LinuxBoot

@Suite struct LinuxBootLoaderTests {
    let acpi = ACPIConfiguration(cpuCount: 2, sleepControlPort: 0x600, pvpanicPort: 0x505)

    func prepare(kernel: [UInt8], initrd: [UInt8]? = nil, cmdline: String = "console=ttyS0", memoryMiB: UInt64 = 64) throws -> (LinuxBootPlan, GuestMemory) {
        let dir = TemporaryDirectory()
        let kernelPath = dir.write("kernel", kernel)
        let initrdPath = initrd.map { dir.write("initrd", $0) }
        let memory = try GuestMemory(anonymous: X86Layout.ramRanges(bytes: memoryMiB << 20))
        let plan = try LinuxBootLoader.prepare(
            LinuxBootConfiguration(kernelPath: kernelPath, initrdPath: initrdPath, commandLine: cmdline, acpi: acpi), memory: memory)
        return (plan, memory)
    }

    @Test func bootCPUStateFollowsThe64BitProtocol() throws {
        let (plan, memory) = try prepare(kernel: TinyGuest.elf(code: [0xF4], address: 0x1000000))
        #expect(plan.cpu.rip == 0x1000000)
        #expect(plan.cpu.rsi == X86Layout.zeroPage.rawValue)
        #expect(plan.cpu.cr0 & 0x8000_0001 == 0x8000_0001) // PG | PE
        #expect(plan.cpu.cr4 & 0x20 != 0)                  // PAE
        #expect(plan.cpu.efer == 0x500)                    // LME | LMA
        #expect(plan.cpu.codeSelector == 0x10 && plan.cpu.dataSelector == 0x18)
        let page = try memory.read(count: ZeroPage.size, at: X86Layout.zeroPage)
        #expect(page == plan.zeroPage.bytes)
        #expect(try memory.read(count: 14, at: X86Layout.commandLine) == Array("console=ttyS0\0".utf8))
        #expect(Array(try memory.read(count: 8, at: X86Layout.acpiTables)) == Array("RSD PTR ".utf8))
    }

    @Test func initrdGoesPageAlignedAtTheTopOfLowMemory() throws {
        let initrd = [UInt8](repeating: 7, count: 10_000)
        let (plan, memory) = try prepare(kernel: TinyGuest.elf(code: [0xF4], address: 0x1000000), initrd: initrd)
        let placed = try #require(plan.initrd)
        #expect(placed.size == 10_000)
        #expect(placed.address.rawValue % 4096 == 0)
        #expect(placed.address.rawValue + placed.size <= 64 << 20)
        #expect(placed.address.rawValue + placed.size > (64 << 20) - 8192)
        #expect(try memory.read(count: 10_000, at: placed.address) == initrd)
        #expect(plan.zeroPage.initrdAddress == placed.address.rawValue)
    }

    @Test func initrdThatDoesNotFitSaysHowMuchMemory() throws {
        let big = [UInt8](repeating: 1, count: 40 << 20)
        #expect { try prepare(kernel: TinyGuest.elf(code: [0xF4], address: 0x1000000), initrd: big, memoryMiB: 48) } throws: {
            guard let e = $0 as? SwiftletError else { return false }
            return e.code == .outOfBounds && e.message.contains("does not fit") && e.message.contains("--memory")
        }
    }

    @Test func emptyInitrdIsRejected() throws {
        #expect { try prepare(kernel: TinyGuest.elf(code: [0xF4], address: 0x1000000), initrd: []) } throws: {
            ($0 as? SwiftletError)?.message.contains("is empty") == true
        }
    }

    @Test func commandLineLimits() throws {
        let long = String(repeating: "x", count: 3000)
        #expect { try prepare(kernel: TinyGuest.elf(code: [0xF4], address: 0x1000000), cmdline: long) } throws: {
            ($0 as? SwiftletError)?.message.contains("at most 2047") == true
        }
        #expect { try prepare(kernel: TinyGuest.elf(code: [0xF4], address: 0x1000000), cmdline: "a\0b") } throws: {
            ($0 as? SwiftletError)?.message.contains("NUL") == true
        }
    }
}
