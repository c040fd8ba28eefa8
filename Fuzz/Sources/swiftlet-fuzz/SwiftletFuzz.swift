import FuzzTargets
import Glibc
import SwiftletSystem

// libFuzzer's entry points when built for fuzzing (`make fuzz`, -sanitize=fuzzer): SWIFTLET_FUZZ_TARGET names the target; SWIFTLET_FUZZ_SEEDS=DIR writes the seed
// corpus instead. Otherwise, a small tool that replays inputs and writes the seed corpus.
#if SWIFTLET_LIBFUZZER
/// The target this process fuzzes: SWIFTLET_FUZZ_TARGET, read once.
nonisolated(unsafe) var selected: FuzzTarget?

@_cdecl("LLVMFuzzerInitialize")
func fuzzerInitialize(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>) -> Int32 {
    if let directory = getenv("SWIFTLET_FUZZ_SEEDS") {
        do { try FuzzTarget.writeSeeds(to: String(cString: directory)) } catch { fatalError("cannot write the seeds: \(error)") }
        exit(0)
    }
    let name = getenv("SWIFTLET_FUZZ_TARGET").map { String(cString: $0) } ?? ""
    guard let target = FuzzTarget(rawValue: name) else {
        print("swiftlet-fuzz: set SWIFTLET_FUZZ_TARGET to one of: \(FuzzTarget.allCases.map(\.rawValue).joined(separator: " "))")
        exit(2)
    }
    selected = target
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
func runFuzzerDriver(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
                     _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32) -> Int32

/// The program's entry point: SwiftPM links executables with `main` renamed to this symbol, so it
/// starts libFuzzer's driver itself.
@_cdecl("swiftlet_fuzz_main")
func fuzzerMain(_ argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> Int32 {
    var count = argc, arguments = argv
    return runFuzzerDriver(&count, &arguments, fuzzerTestOneInput)
}

@_cdecl("LLVMFuzzerTestOneInput")
func fuzzerTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let bytes = size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size))
    if bytes.count <= selected!.maximumInputLength { selected!.run(bytes) }
    return 0
}
#else
/// The replay tool: `swiftlet-fuzz list | seeds DIR | run TARGET FILE...`.
@main struct ReplayTool {
    static func usage() -> Never {
        print("""
            usage: swiftlet-fuzz list
                   swiftlet-fuzz seeds DIR           (writes DIR/<target>/seed-N)
                   swiftlet-fuzz run TARGET FILE...  (replays inputs, e.g. a crash libFuzzer wrote)
            """)
        exit(2)
    }

    static func main() throws {
        let arguments = CommandLine.arguments
        guard arguments.count >= 2 else { usage() }
        switch arguments[1] {
        case "list":
            for target in FuzzTarget.allCases { print(target.rawValue, target.maximumInputLength) }
        case "seeds" where arguments.count == 3:
            try FuzzTarget.writeSeeds(to: arguments[2])
        case "run" where arguments.count >= 4:
            guard let target = FuzzTarget(rawValue: arguments[2]) else { usage() }
            for path in arguments[3...] {
                target.run(try OwnedFileDescriptor.readSmallFile(path, limit: 16 << 20))
                print("\(path): ok")
            }
        default:
            usage()
        }
    }
}
#endif
