import FoundationEssentials
import SwiftletSystem

extension ImageStore {
    /// The records as JSON (`image ls --json`).
    public static func json(_ images: [StoredImage]) throws(SwiftletError) -> [UInt8] {
        try JSONCoding.encode(images, pretty: true)
    }

    /// An image's record with its manifest and config documents, as JSON (`image inspect`).
    public func inspect(_ image: StoredImage) throws(SwiftletError) -> [UInt8] {
        let manifest = try readBlob(image.manifest, what: "manifest")
        let config = try readBlob(image.config, what: "image config")
        // The documents are embedded as they are stored, so what is shown is what was verified.
        let record = try JSONCoding.encode(image, pretty: true)
        var out = Array("{\n  \"image\": ".utf8) + record
        out += Array(",\n  \"manifest\": ".utf8) + manifest
        out += Array(",\n  \"config\": ".utf8) + config + Array("\n}".utf8)
        return out
    }
}
