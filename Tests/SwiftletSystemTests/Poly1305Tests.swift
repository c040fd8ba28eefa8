import SwiftletSystem
import Testing

@Suite struct Poly1305Tests {
    func tag(_ key: [UInt8], _ message: [UInt8]) -> String {
        var mac = Poly1305(key: key)
        mac.update(message)
        return Hex.encode(mac.finalize())
    }

    /// RFC 8439, section 2.5.2.
    @Test func theRFCsExample() {
        let key = Hex.decode("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")!
        #expect(tag(key, Array("Cryptographic Forum Research Group".utf8)) == "a8061dc1305136c6c22b8baf0c0127a9")
    }

    /// Tags computed with Python's integers straight from the RFC's definition
    /// ((acc + block) × r mod 2^130 − 5, + s mod 2^128): lengths around the 16-byte block, and
    /// the limbs' extremes (every bit set; a sum just above 2^130 − 5, which the last step reduces).
    @Test(arguments: [
        (0, "d0ddeaf704111e2b3845525f6c798693"), (1, "d7ed141c4288b087ad244de409c1e950"),
        (15, "62f39d32afb665eb25902a88661ad384"), (16, "a41b85d14be2128fc56544d7af40b430"),
        (17, "7567566c445fd3aa0abbddbe5d20093e"), (33, "0600bbc7ab324a210859260330e76763"),
        (64, "a615846fa7404e1668f81fe9b8098ad7"), (100, "110ec399487510f7ccf328ef5316c29e"),
        (1000, "b498100046ac50d7542c95986ec8397d"), (4116, "14a972bd4351d9215ebf166b014afc89"),
    ])
    func agreesWithTheDefinition(length: Int, expected: String) {
        let key = (0..<32).map { UInt8(truncatingIfNeeded: $0 * 13 + length) }
        let message = (0..<length).map { UInt8(truncatingIfNeeded: $0 * 7 + length) }
        #expect(tag(key, message) == expected)
    }

    @Test func extremes() {
        #expect(tag([UInt8](repeating: 0xff, count: 32), [UInt8](repeating: 0xff, count: 64)) == "900fe32bc15fa8d7bca8efe4c7e37eb1")
        #expect(tag([2] + [UInt8](repeating: 0, count: 31), [UInt8](repeating: 0xff, count: 16)) == "03000000000000000000000000000000")
    }

    @Test func piecesGiveTheTagOfTheWhole() {
        let key = (0..<32).map { UInt8(truncatingIfNeeded: $0 * 31 + 5) }
        let message = (0..<1000).map { UInt8(truncatingIfNeeded: $0 * 11 + 1) }
        for pieces in [[1000], [1, 999], [15, 1, 16, 968], [7, 9, 33, 3, 948], [999, 1]] {
            var mac = Poly1305(key: key)
            var offset = 0
            for count in pieces {
                message[offset..<(offset + count)].withUnsafeBytes { mac.update($0) }
                offset += count
            }
            #expect(Hex.encode(mac.finalize()) == tag(key, message), "pieces \(pieces)")
        }
    }
}
