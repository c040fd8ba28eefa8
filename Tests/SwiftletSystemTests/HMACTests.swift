import SwiftletSystem
import Testing

@Suite struct HMACTests {
    /// RFC 4231's test cases 1, 2 and 6 (a key longer than SHA-256's block is hashed first).
    @Test(arguments: [
        (Array(repeating: UInt8(0x0b), count: 20), "Hi There",
         "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
        (Array("Jefe".utf8), "what do ya want for nothing?",
         "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
        (Array(repeating: UInt8(0xaa), count: 131), "Test Using Larger Than Block-Size Key - Hash Key First",
         "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    ])
    func rfc4231Vectors(key: [UInt8], message: String, expected: String) {
        #expect(Hex.encode(HMACSHA256.authenticationCode(of: Array(message.utf8), key: key)) == expected)
    }

    @Test func constantTimeEqualComparesEveryByteAndTheLength() {
        let code = HMACSHA256.authenticationCode(of: [1, 2, 3], key: [4])
        #expect(HMACSHA256.constantTimeEqual(code, code))
        for i in code.indices {
            var changed = code
            changed[i] ^= 1
            #expect(!HMACSHA256.constantTimeEqual(code, changed))
        }
        #expect(!HMACSHA256.constantTimeEqual(code, Array(code.dropLast())))
        #expect(!HMACSHA256.constantTimeEqual([], code))
    }

    /// A code computed piece by piece, arrays and buffers mixed, is the one-shot code.
    @Test func aCodeInPiecesIsTheCodeOfTheWhole() {
        let key = [UInt8](repeating: 0x0b, count: 100) // longer than a block: hashed first
        let message = (0..<5000).map { UInt8(truncatingIfNeeded: $0 * 7) }
        var code = HMACSHA256.Code(key: key)
        code.update(Array(message[0..<1]))
        message[1..<4097].withUnsafeBytes { code.update($0) }
        code.update(Array(message[4097...]))
        #expect(code.finalize() == HMACSHA256.authenticationCode(of: message, key: key))
    }
}
