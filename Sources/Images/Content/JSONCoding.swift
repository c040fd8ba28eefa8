import FoundationEssentials
import SwiftletSystem

/// The JSON coders of the store and the image documents.
enum JSONCoding {
    static var decoder: JSONDecoder { JSONDecoder() }
    static var encoder: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return encoder
    }

    static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws -> T {
        try decoder.decode(T.self, from: Data(bytes))
    }

    static func encode<T: Encodable>(_ value: T, pretty: Bool = false) throws(SwiftletError) -> [UInt8] {
        let encoder = encoder
        if pretty { encoder.outputFormatting.insert(.prettyPrinted) }
        do { return Array(try encoder.encode(value)) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode \(T.self): \(error)")
        }
    }
}

/// A one-line account of a decoding error: what was wrong and where.
func describeDecodingError(_ error: any Error) -> String {
    guard let error = error as? DecodingError else { return "\(error)" }
    func path(_ context: DecodingError.Context) -> String {
        let keys = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? "." + $0.stringValue }.joined()
        return keys.isEmpty ? "" : " at \(keys)"
    }
    switch error {
    case .keyNotFound(let key, let context): return "missing \(key.stringValue)\(path(context))"
    case .typeMismatch(_, let context), .valueNotFound(_, let context), .dataCorrupted(let context):
        return context.debugDescription + path(context)
    @unknown default: return "\(error)"
    }
}
