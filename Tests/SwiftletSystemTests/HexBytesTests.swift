import FoundationEssentials
import SwiftletSystem
import Testing

struct Blobs: Codable, Equatable {
    @HexBytes var bytes: [UInt8]
    @OptionalHexBytes var maybe: [UInt8]?
    @HexByteList var list: [[UInt8]]
}

@Suite struct HexBytesTests {
    @Test func bytesAreOneHexStringInJSONAndRoundTrip() throws {
        let value = Blobs(bytes: [0x00, 0x7F, 0x80, 0xFF], maybe: [0xAB], list: [[1, 2], [], [0xFE]])
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let json = String(decoding: try encoder.encode(value), as: UTF8.self)
        #expect(json == #"{"bytes":"007f80ff","list":["0102","","fe"],"maybe":"ab"}"#)
        #expect(try JSONDecoder().decode(Blobs.self, from: Data(json.utf8)) == value)
    }

    @Test func aMissingOptionalIsLeftOutAndReadsBackAsNil() throws {
        let value = Blobs(bytes: [], maybe: nil, list: [])
        let json = String(decoding: try JSONEncoder().encode(value), as: UTF8.self)
        #expect(!json.contains("maybe"))
        #expect(try JSONDecoder().decode(Blobs.self, from: Data(json.utf8)) == value)
        #expect(try JSONDecoder().decode(Blobs.self, from: Data(#"{"bytes":"","maybe":null,"list":[]}"#.utf8)) == value)
    }

    @Test func onlyEvenRunsOfHexDigitsDecode() {
        #expect(Hex.decode("DEADbeef") == [0xDE, 0xAD, 0xBE, 0xEF])
        #expect(Hex.decode("") == [])
        for bad in ["abc", "0g", "0x12", " 12", "１２"] { #expect(Hex.decode(bad) == nil, "\(bad)") }
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(Blobs.self, from: Data(#"{"bytes":"zz","list":[]}"#.utf8)) }
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(Blobs.self, from: Data(#"{"bytes":[1,2],"list":[]}"#.utf8)) }
    }

    @Test func encodingIsTwoLowercaseDigitsPerByte() {
        let all = (0...255).map(UInt8.init)
        let text = Hex.encode(all)
        #expect(text.utf8.count == 512 && text == text.lowercased())
        #expect(Hex.decode(text) == all)
    }
}
