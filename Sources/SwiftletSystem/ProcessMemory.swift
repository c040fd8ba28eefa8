/// A process's memory use as its kernel accounts it (/proc/PID/status).
public enum ProcessMemory {
    /// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`, `RssAnon`, ...) of process `pid`
    /// (this one when nil); nil when the process or the field is not there.
    public static func statusKiB(_ field: String, pid: Int32? = nil) -> Int? {
        let path = "/proc/\(pid.map { String($0) } ?? "self")/status"
        guard let text = try? OwnedFileDescriptor.readSmallTextFile(path) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(field + ":") {
            return line.dropFirst(field.count + 1).split(separator: " ").compactMap { Int($0) }.first
        }
        return nil
    }

    /// This process's resident memory now (VmRSS), in KiB.
    public static func residentKiB() -> Int? { statusKiB("VmRSS") }
}
