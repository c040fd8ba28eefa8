import ArgumentParser
import SwiftletKit
import SwiftletSystem

/// A size as the user writes it: a number of `unit` bytes, or a number with K, M or G (binary
/// multiples); nil for anything else, zero, or a size that does not fit.
func byteCount(_ text: String, unit: UInt64) -> UInt64? {
    let multipliers: [String: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30]
    var digits = Substring(text.uppercased())
    var multiplier = unit
    if let suffix = multipliers.keys.sorted(by: { $0.count > $1.count }).first(where: { digits.hasSuffix($0) }) {
        multiplier = multipliers[suffix]!
        digits = digits.dropLast(suffix.count)
    }
    guard let value = UInt64(digits), value > 0 else { return nil }
    let (bytes, overflow) = value.multipliedReportingOverflow(by: multiplier)
    return overflow ? nil : bytes
}

extension MachineCommand {
    struct Memory: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "memory",
            abstract: "Set how much memory a running machine's guest may keep (its balloon takes the rest).",
            discussion: """
                The guest hands the rest of its memory to its balloon device, and the host takes those \
                pages back; the machine's full size gives everything back. The guest follows within \
                seconds (`machine status` shows the balloon) and takes pages back from the balloon when it \
                runs out of memory. Memory the guest frees is given back to the host without this \
                command (free page reporting). Not kept across a restart.

                  swiftlet machine memory web 256M     # the guest keeps 256 MiB
                  swiftlet machine memory web 1G       # all of a 1 GiB machine's memory again
                """)

        @OptionGroup var machine: MachineNameOptions

        @Argument(help: "The memory the guest keeps: MiB, or with a unit (512M, 2G).")
        var size: String

        @Flag(help: "Print the outcome as JSON.")
        var json = false

        func validate() throws {
            guard let bytes = byteCount(size, unit: 1 << 20), bytes >= 1 << 20 else {
                throw ValidationError("memory size \(size.debugDescription): expected MiB or a size such as 512M or 2G")
            }
        }

        func run() throws {
            let mebibytes = Int(clamping: (byteCount(size, unit: 1 << 20) ?? 0) >> 20)
            let status = try exitingOnSetupFailure { () throws(SwiftletError) in try Machines.setMemory(machine.value, mebibytes: mebibytes) }
            if json {
                print(try jsonText(status))
            } else {
                printError("machine \(machine.value): the guest is to keep \(status.targetBytes >> 20) of \(status.memoryBytes >> 20) MiB (its balloon holds \(status.balloonBytes >> 20) MiB now)")
            }
        }
    }
}
