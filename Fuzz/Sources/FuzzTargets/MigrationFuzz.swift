import Glibc
import MachineState
import SwiftletSystem
@testable import VMM

/// A migration stream's messages as the destination's `MigrationReceiver` takes them: what a
/// source that holds the token could send (the fuzzer cannot forge the codes of one that does
/// not). The input is records of a type byte, a 2-byte length and the payload: the first is the
/// layout, the second the disk list, the rest page runs, zero runs and disk writes (type modulo
/// 3). Whatever is accepted, the memory file and every disk file keep exactly the sizes the
/// layout and disk list gave them.
enum MigrationStreamFuzz {
    static func run(_ bytes: [UInt8]) {
        var records: [(type: UInt8, payload: [UInt8])] = []
        var at = 0
        while at + 3 <= bytes.count {
            let length = Int(bytes[at + 1]) | Int(bytes[at + 2]) << 8
            let end = min(bytes.count, at + 3 + length)
            records.append((bytes[at], Array(bytes[(at + 3)..<end])))
            at = end
        }
        guard records.count >= 2 else { return }
        let path = Scratch.directory + "/migration"
        try? FileTree.remove(path)
        mkdir(path, 0o700)
        let directory = SnapshotDirectory(path)
        guard let receiver = try? MigrationReceiver(layout: records[0].payload, directory: directory, maximumBytes: 64 << 20) else { return }
        guard (try? receiver.disks(records[1].payload)) != nil else { return }
        for record in records.dropFirst(2) {
            switch record.type % 3 {
            case 0: _ = try? receiver.write(pages: record.payload)
            case 1: _ = try? receiver.zero(record.payload)
            default: _ = try? receiver.write(disk: record.payload)
            }
        }
        precondition((try? receiver.descriptor.size()) == receiver.file.fileBytes, "the memory file grew past its layout")
        for (_, disk) in receiver.diskFiles {
            precondition((try? disk.file.size()) == disk.size, "a disk file grew past its size")
        }
    }

    static func record(_ type: UInt8, _ payload: [UInt8]) -> [UInt8] {
        [type, UInt8(payload.count & 0xFF), UInt8(payload.count >> 8)] + payload
    }

    static func seeds() -> [[UInt8]] {
        let layout = [UInt8](repeating: 3, count: 16) + LittleEndian.bytes(2, 4)
            + LittleEndian.bytes(0, 8) + LittleEndian.bytes(0x10_0000, 8) + LittleEndian.bytes(0x20_0000, 8) + LittleEndian.bytes(0x4000, 8)
        let disks = LittleEndian.bytes(1, 4) + LittleEndian.bytes(1, 4) + LittleEndian.bytes(0x20000, 8)
        let page = LittleEndian.bytes(5, 8) + LittleEndian.bytes(1, 4) + [UInt8](repeating: 0xAB, count: 4096)
        let zero = LittleEndian.bytes(256, 8) + LittleEndian.bytes(3, 4)
        let disk = LittleEndian.bytes(1, 4) + LittleEndian.bytes(0x1F000, 8) + [UInt8](repeating: 0xCD, count: 4096)
        return [
            record(4, layout) + record(13, disks) + record(0, page) + record(1, zero) + record(2, disk),
            record(4, layout) + record(13, LittleEndian.bytes(0, 4)) + record(0, page),
            record(4, Array(layout.prefix(30))) + record(13, disks),
        ]
    }
}
