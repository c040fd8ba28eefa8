// SHA-256 and HMAC live in their own small target so the guest agent can have them without the
// rest of SwiftletSystem; everything that imports SwiftletSystem still sees them.
@_exported import SwiftletDigest
