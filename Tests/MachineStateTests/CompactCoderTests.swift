import SwiftletSystem
import Testing
@testable import MachineState

@Suite struct CompactCoderTests {
    enum Shape: Codable, Equatable {
        case point
        case circle(radius: Double)
        case named(String, tags: [String])
    }
    struct Inner: Codable, Equatable {
        var id: UInt8
        var note: String?
    }
    struct Everything: Codable, Equatable {
        var flag = true
        var off = false
        var small: Int8 = -128
        var big: UInt64 = .max
        var negative: Int64 = .min
        var word: UInt32 = 0xDEAD_BEEF
        var int = -42
        var real = 3.25
        var single: Float = 0.5
        var text = "grüße, \"quoted\" \u{0}"
        var empty = ""
        var none: Int?
        var some: Int? = 7
        var list: [UInt16] = [1, 2, 65535]
        var noList: [Inner] = []
        var optionals: [Int?] = [1, nil, 3]
        var nested: [[Inner]] = [[Inner(id: 1, note: nil)], [], [Inner(id: 2, note: "n")]]
        var byName: [String: Int] = ["a": 1, "b": 2]
        var byNumber: [UInt32: String] = [3: "three", 1 << 31: "big"]
        var shapes: [Shape] = [.point, .circle(radius: 1.5), .named("x", tags: ["t"])]
    }

    @Test func everyKindOfValueRoundTrips() throws {
        let value = Everything()
        let bytes = try CompactCoder.encode(value)
        #expect(try CompactCoder.decode(Everything.self, from: bytes) == value)
        #expect(try CompactCoder.decode([Int].self, from: CompactCoder.encode([Int]())) == [])
        #expect(try CompactCoder.decode(String.self, from: CompactCoder.encode("top")) == "top")
    }

    /// The bytes themselves (docs/snapshot-format.md): a keyed container of a true, a UInt32, an
    /// Int8, a string and an array of one UInt8; an absent optional is left out.
    @Test func theEncodingIsTheDocumentedBytes() throws {
        struct Small: Codable, Equatable {
            var b = true
            var u: UInt32 = 1
            var i: Int8 = -1
            var s = "h"
            var l: [UInt8] = [2]
            var n: Int?
        }
        func key(_ name: String) -> [UInt8] { [1, 0, 0, 0] + Array(name.utf8) }
        let entries: [UInt8] = key("b") + [2]
            + key("u") + [4, 1, 0, 0, 0, 0, 0, 0, 0]
            + key("i") + [3] + [UInt8](repeating: 0xFF, count: 8)
            + key("s") + [6, 1, 0, 0, 0, 0x68]
            + key("l") + [7, 13, 0, 0, 0, 1, 0, 0, 0, 4, 2, 0, 0, 0, 0, 0, 0, 0]
        let expected: [UInt8] = [8, UInt8(entries.count + 4), 0, 0, 0, 5, 0, 0, 0] + entries
        #expect(try CompactCoder.encode(Small()) == expected)
        #expect(try CompactCoder.decode(Small.self, from: expected) == Small())
    }

    @Test func missingKeysReadAsAbsentAndExtraKeysAreIgnored() throws {
        struct Old: Codable { var a = 1; var gone = "x" }
        struct New: Codable, Equatable { var a: Int; var added: String? }
        #expect(try CompactCoder.decode(New.self, from: CompactCoder.encode(Old())) == New(a: 1, added: nil))
        struct Required: Codable { var a: Int; var b: Int }
        #expect { try CompactCoder.decode(Required.self, from: CompactCoder.encode(Old())) } throws: {
            ($0 as! SwiftletError).message.contains("no b")
        }
    }

    @Test func typeMismatchesAndOverflowsNameTheirPlace() throws {
        struct Narrow: Codable { var list: [UInt8] }
        struct Wide: Codable { var list: [Int] }
        #expect { try CompactCoder.decode(Narrow.self, from: CompactCoder.encode(Wide(list: [1, 300]))) } throws: {
            let m = ($0 as! SwiftletError).message
            return m.contains("list.1") && m.contains("300") && m.contains("UInt8")
        }
        struct Text: Codable { var list: String }
        #expect { try CompactCoder.decode(Text.self, from: CompactCoder.encode(Wide(list: []))) } throws: {
            ($0 as! SwiftletError).message.contains("expected a string, found an array")
        }
    }

    @Test func everyTruncationAndTrailingByteIsRefused() throws {
        let bytes = try CompactCoder.encode(Everything())
        for length in 0..<bytes.count {
            #expect(throws: SwiftletError.self, "cut to \(length) bytes") { try CompactCoder.decode(Everything.self, from: Array(bytes.prefix(length))) }
        }
        #expect { try CompactCoder.decode(Everything.self, from: bytes + [0]) } throws: {
            ($0 as! SwiftletError).message.contains("1 bytes after the value")
        }
    }

    @Test func corruptLengthsTagsAndNestingAreRefusedWithoutCrashing() throws {
        let bytes = try CompactCoder.encode(Everything())
        // Every single-byte change either still decodes (a changed number or letter) or is refused.
        for index in bytes.indices {
            for flip: UInt8 in [0x01, 0x80, 0xFF] {
                var broken = bytes
                broken[index] ^= flip
                _ = try? CompactCoder.decode(Everything.self, from: broken)
            }
        }
        #expect { try CompactCoder.decode(Int.self, from: [42]) } throws: { ($0 as! SwiftletError).message.contains("unknown value tag 42") }
        // An array claiming more bytes than there are.
        #expect(throws: SwiftletError.self) { try CompactCoder.decode([Int].self, from: [7, 0xFF, 0xFF, 0xFF, 0x7F, 1, 0, 0, 0]) }
        // An array claiming more elements than its bytes could hold.
        #expect(throws: SwiftletError.self) { try CompactCoder.decode([Int].self, from: [7, 4, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0x7F]) }
        // Arrays nested past the limit.
        var deep: [UInt8] = []
        for level in 0..<100 { deep += [7] + LittleEndian.bytes(UInt64(4 + (99 - level) * 9), 4) + [1, 0, 0, 0] }
        deep += [0]
        #expect { try CompactCoder.decode([Int].self, from: deep) } throws: { ($0 as! SwiftletError).message.contains("nest deeper") }
        // Keys that are not UTF-8.
        #expect(throws: SwiftletError.self) { try CompactCoder.decode([String: Int].self, from: [8, 14, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0xFF, 0]) }
    }
}
