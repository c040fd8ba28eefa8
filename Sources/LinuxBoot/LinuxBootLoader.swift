import Glibc
import GuestMemory
import SwiftletSystem

/// The boot CPU's register state at the kernel's 64-bit entry point, as plain values.
public struct BootCPUState: Equatable, Sendable {
    public var rip: UInt64
    public var rsp: UInt64
    /// Linux's 64-bit boot protocol passes the zero page in RSI.
    public var rsi: UInt64
    public var cr0: UInt64
    public var cr3: UInt64
    public var cr4: UInt64
    public var efer: UInt64
    public var gdtBase: UInt64
    public var gdtLimit: UInt16
    public var idtBase: UInt64
    public var idtLimit: UInt16
    public var code: SegmentDescriptor
    public var codeSelector: UInt16
    public var data: SegmentDescriptor
    public var dataSelector: UInt16
    public var tss: SegmentDescriptor
    public var tssSelector: UInt16

    static let cr0ProtectionEnable: UInt64 = 1 << 0
    static let cr0MonitorCoprocessor: UInt64 = 1 << 1
    static let cr0ExtensionType: UInt64 = 1 << 4
    static let cr0NumericError: UInt64 = 1 << 5
    static let cr0Paging: UInt64 = 1 << 31
    static let cr4PAE: UInt64 = 1 << 5
    static let eferLME: UInt64 = 1 << 8
    static let eferLMA: UInt64 = 1 << 10
}

/// What to boot.
public struct LinuxBootConfiguration: Equatable, Sendable {
    public var kernelPath: String
    public var initrdPath: String?
    public var commandLine: String
    public var acpi: ACPIConfiguration

    public init(kernelPath: String, initrdPath: String?, commandLine: String, acpi: ACPIConfiguration) {
        self.kernelPath = kernelPath; self.initrdPath = initrdPath; self.commandLine = commandLine; self.acpi = acpi
    }
}

/// The result of preparing guest memory for boot.
public struct LinuxBootPlan: Equatable, Sendable {
    public var kernel: LoadedKernel
    public var initrd: (address: GuestAddress, size: UInt64)?
    public var zeroPage: ZeroPage
    public var cpu: BootCPUState

    public static func == (a: LinuxBootPlan, b: LinuxBootPlan) -> Bool {
        a.kernel == b.kernel && a.initrd?.address == b.initrd?.address && a.initrd?.size == b.initrd?.size
            && a.zeroPage == b.zeroPage && a.cpu == b.cpu
    }
}

/// Puts a Linux kernel, its initrd, command line, zero page, ACPI tables, page tables and GDT
/// into guest memory, and returns the boot CPU's entry state.
public enum LinuxBootLoader {
    public static func prepare(_ config: LinuxBootConfiguration, memory: GuestMemory) throws(SwiftletError) -> LinuxBootPlan {
        let kernel = try KernelLoader.load(path: config.kernelPath, into: memory)
        var zeroPage = ZeroPage(kernel: kernel)

        let cmdline = Array(config.commandLine.utf8)
        guard !cmdline.contains(0) else { throw SwiftletError(.invalidArgument, "the kernel command line contains a NUL byte") }
        guard UInt64(cmdline.count) + 1 <= min(kernel.commandLineLimit, X86Layout.commandLineMax) else {
            throw SwiftletError(.invalidArgument, "the kernel command line is \(cmdline.count) bytes; this kernel accepts at most \(kernel.commandLineLimit - 1)")
        }
        try memory.write(cmdline + [0], at: X86Layout.commandLine)
        zeroPage.setCommandLine(address: X86Layout.commandLine, length: cmdline.count)

        var initrd: (GuestAddress, UInt64)?
        if let path = config.initrdPath {
            let placed = try loadInitrd(path: path, kernel: kernel, memory: memory)
            zeroPage.setInitrd(address: placed.0, size: placed.1)
            initrd = placed
        }

        let (acpi, rsdp) = ACPITables.build(config.acpi, base: X86Layout.acpiTables)
        guard UInt64(acpi.count) <= X86Layout.biosAreaEnd - X86Layout.acpiTables.rawValue else {
            throw SwiftletError(.invalidArgument, "ACPI tables for \(config.acpi.cpuCount) vCPUs do not fit in the BIOS area")
        }
        try memory.write(acpi, at: X86Layout.acpiTables)
        zeroPage.setRSDP(rsdp)
        try zeroPage.setE820(E820.map(for: memory.regions))
        try memory.write(zeroPage.bytes, at: X86Layout.zeroPage)

        let cr3 = try PageTables.writeIdentityMap(into: memory)
        try BootGDT.write(into: memory)

        let cpu = BootCPUState(
            rip: kernel.entry.rawValue, rsp: X86Layout.bootStack, rsi: X86Layout.zeroPage.rawValue,
            cr0: BootCPUState.cr0ProtectionEnable | BootCPUState.cr0MonitorCoprocessor | BootCPUState.cr0ExtensionType
                | BootCPUState.cr0NumericError | BootCPUState.cr0Paging,
            cr3: cr3, cr4: BootCPUState.cr4PAE, efer: BootCPUState.eferLME | BootCPUState.eferLMA,
            gdtBase: X86Layout.gdt.rawValue, gdtLimit: BootGDT.gdtLimit,
            idtBase: X86Layout.idt.rawValue, idtLimit: BootGDT.idtLimit,
            code: BootGDT.code, codeSelector: BootGDT.codeSelector,
            data: BootGDT.data, dataSelector: BootGDT.dataSelector,
            tss: BootGDT.tss, tssSelector: BootGDT.tssSelector)
        return LinuxBootPlan(kernel: kernel, initrd: initrd, zeroPage: zeroPage, cpu: cpu)
    }

    /// Places the initrd page-aligned as high as the kernel allows, above the kernel, in low RAM.
    static func loadInitrd(path: String, kernel: LoadedKernel, memory: GuestMemory) throws(SwiftletError) -> (GuestAddress, UInt64) {
        let file = try OwnedFileDescriptor.openInput(path, role: "initrd")
        let size = try file.size()
        guard size > 0 else { throw SwiftletError(.invalidFormat, "initrd \(path) is empty") }
        let low = memory.regions.first { $0.start.rawValue == 0 }!
        let ceiling = min(low.end, kernel.initrdAddressMax &+ 1)
        let floor = (kernel.end + 0xFFF) & ~0xFFF
        guard ceiling > floor, size <= ceiling - floor else {
            let needMiB = (floor + size + (1 << 20) - 1) >> 20
            throw SwiftletError(.outOfBounds, "initrd \(path) (\((size + (1 << 20) - 1) >> 20) MiB) does not fit in guest memory above the kernel: use --memory \(max(needMiB + 16, 64)) or more")
        }
        let address = GuestAddress((ceiling - size) & ~0xFFF)
        try FileLoader.place(file: file, offset: 0, length: size, at: address, memory: memory, what: "initrd \(path)")
        return (address, size)
    }
}
