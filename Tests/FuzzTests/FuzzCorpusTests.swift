import FuzzTargets
import Glibc
import Testing

/// The fuzz targets' committed seed corpus (Fuzz/corpus/<target>), replayed through the same
/// entry points libFuzzer drives. A target that traps ends the test run. Serialized: the device
/// targets share one guest memory and one vsock device.
@Suite(.serialized) struct FuzzCorpusTests {
    static let root = String(#filePath.dropLast("/Tests/FuzzTests/FuzzCorpusTests.swift".count)) + "/Fuzz"

    static func inputs(_ kind: String, _ target: FuzzTarget) -> [(name: String, bytes: [UInt8])] {
        let directory = "\(root)/\(kind)/\(target.rawValue)"
        guard let dir = opendir(directory) else { return [] }
        defer { closedir(dir) }
        var result: [(String, [UInt8])] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            guard !name.hasPrefix(".") else { continue }
            result.append((name, read(directory + "/" + name)))
        }
        return result.sorted { $0.0 < $1.0 }
    }

    static func read(_ path: String) -> [UInt8] {
        guard let file = fopen(path, "r") else { return [] }
        defer { fclose(file) }
        var bytes: [UInt8] = [], chunk = [UInt8](repeating: 0, count: 65536)
        while case let n = fread(&chunk, 1, chunk.count, file), n > 0 { bytes += chunk[0..<n] }
        return bytes
    }

    @Test(arguments: FuzzTarget.allCases)
    func seedCorpusRunsClean(_ target: FuzzTarget) {
        let seeds = Self.inputs("corpus", target)
        #expect(!seeds.isEmpty, "Fuzz/corpus/\(target.rawValue) has no seeds: run `swiftlet-fuzz seeds Fuzz/corpus`")
        for seed in seeds { target.run(seed.bytes) }
    }

    /// The seed generators still produce inputs the targets accept without trapping (the corpus
    /// is made from them; a format change shows up here first).
    @Test(arguments: FuzzTarget.allCases)
    func generatedSeedsRunClean(_ target: FuzzTarget) throws {
        let seeds = try target.seeds()
        #expect(!seeds.isEmpty)
        for seed in seeds { target.run(seed) }
    }
}
