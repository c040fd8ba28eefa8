import Glibc

/// Sole owner of several open file descriptors (those passed with one message, say, or
/// connections waiting to be taken); closes every one still held when the owner goes away.
/// (Arrays cannot hold `OwnedFileDescriptor`s, which cannot be copied.)
public struct OwnedFileDescriptors: ~Copyable, Sendable {
    private var descriptors: [Int32]

    /// None yet.
    public init() { descriptors = [] }

    /// Takes ownership of `rawValues`.
    public init(taking rawValues: [Int32]) {
        precondition(rawValues.allSatisfy { $0 >= 0 }, "invalid file descriptor")
        descriptors = rawValues
    }

    deinit { for fd in descriptors { Glibc.close(fd) } }

    /// The descriptors, oldest first; still owned by this value.
    public var rawValues: [Int32] { descriptors }
    public var count: Int { descriptors.count }
    public var isEmpty: Bool { descriptors.isEmpty }

    /// Adds `descriptor` at the end.
    public mutating func append(_ descriptor: consuming OwnedFileDescriptor) {
        descriptors.append(descriptor.release())
    }

    /// Adds every descriptor of `other` at the end.
    public mutating func append(contentsOf other: consuming OwnedFileDescriptors) {
        descriptors += other.release()
    }

    /// Takes the oldest descriptor out; nil when there is none.
    public mutating func removeFirst() -> OwnedFileDescriptor? {
        descriptors.isEmpty ? nil : OwnedFileDescriptor(taking: descriptors.removeFirst())
    }

    /// Gives up ownership of all of them without closing.
    public consuming func release() -> [Int32] {
        let all = descriptors
        descriptors = []
        return all
    }
}
