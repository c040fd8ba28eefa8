import CLinux

/// The host kernel's CSPRNG.
public enum SystemRandom {
    /// Fills `buffer` from getrandom(2), which blocks only until the host's pool is first seeded.
    public static func fill(_ buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) {
        var done = 0
        while done < buffer.count {
            // SAFETY: [done, count) lies inside `buffer`.
            let n = try systemCall("getrandom failed") { swiftlet_getrandom(buffer.baseAddress! + done, UInt(buffer.count - done), 0) }
            done += n
        }
    }
}
