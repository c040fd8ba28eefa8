import GuestMemory
import Hypervisor
import KVM
import SwiftletSystem

/// A one-vCPU VM with 16 KiB of RAM at 0 and `code` at 0x1000, entered in real mode. No
/// in-kernel irqchip unless asked (without one, HLT returns to the VMM).
struct RealModeGuest {
    let system: KVMSystem
    let vm: VirtualMachine
    let memory: GuestMemory
    let vcpu: VCPU
    static let codeAddress: UInt64 = 0x1000
    static let memorySize: UInt64 = 0x4000

    init(code: [UInt8], memory existing: GuestMemory? = nil, irqchip: Bool = false) throws {
        system = try KVMSystem()
        vm = try system.createVirtualMachine()
        try vm.setTSSAddress(0xFFFB_D000)
        if irqchip { try vm.createInterruptController() }
        memory = try existing ?? GuestMemory(anonymous: [(GuestAddress(0), Self.memorySize)])
        let region = memory.regions[0]
        try vm.setMemoryRegion(slot: 0, guestAddress: 0, size: region.size, host: region.hostAddress)
        if existing == nil { try memory.write(code, at: GuestAddress(Self.codeAddress)) }
        vcpu = try vm.createVCPU(id: 0)
        var sregs = try vcpu.specialRegisters()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        try vcpu.setSpecialRegisters(sregs)
        var regs = Registers()
        regs.rip = Self.codeAddress
        regs.rflags = 0x2
        try vcpu.setRegisters(regs)
    }

    /// Runs until an exit other than `.interrupted`.
    func next() throws -> VCPUExit {
        while true {
            let exit = try vcpu.run()
            if case .interrupted = exit { continue }
            return exit
        }
    }

    /// Lets KVM finish the access the last exit was for (an OUT completes, and RIP moves past it,
    /// only on the next KVM_RUN), without running the guest further: what the VMM does before it
    /// saves a paused vCPU. Saved right after the exit, the state would repeat the access.
    func completePendingAccess() throws {
        vcpu.requestExit()
        defer { vcpu.clearExitRequest() }
        guard case .interrupted = try vcpu.run() else { throw SwiftletError(.guestFailure, "the guest ran on past an exit request") }
    }

    /// The next exit, which must be an OUT; returns (port, byte).
    func nextOut() throws -> (UInt16, UInt8)? {
        guard case .io(let io) = try next(), io.isWrite else { return nil }
        return (io.port, io.data[0])
    }
}

/// Real-mode instructions.
enum Real {
    static func movDX(_ port: UInt16) -> [UInt8] { [0xBA, UInt8(port & 0xFF), UInt8(port >> 8)] }
    static func movAL(_ v: UInt8) -> [UInt8] { [0xB0, v] }
    static let outDXAL: [UInt8] = [0xEE]
    static let inALDX: [UInt8] = [0xEC]
    static func addAL(_ v: UInt8) -> [UInt8] { [0x04, v] }
    static func storeAL(_ address: UInt16) -> [UInt8] { [0xA2, UInt8(address & 0xFF), UInt8(address >> 8)] }
    static func loadAL(_ address: UInt16) -> [UInt8] { [0xA0, UInt8(address & 0xFF), UInt8(address >> 8)] }
    static let incAL: [UInt8] = [0xFE, 0xC0]
    static let hlt: [UInt8] = [0xF4]
    static let spin: [UInt8] = [0xEB, 0xFE]
    static let popcntAXAX: [UInt8] = [0xF3, 0x0F, 0xB8, 0xC0]
    static func lidt(_ address: UInt16) -> [UInt8] { [0x0F, 0x01, 0x1E, UInt8(address & 0xFF), UInt8(address >> 8)] }
    static let int3: [UInt8] = [0xCC]
}
