/// A guest-physical address.
public struct GuestAddress: RawRepresentable, Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    public var rawValue: UInt64

    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt64) { self.rawValue = rawValue }

    @inlinable public static func < (a: GuestAddress, b: GuestAddress) -> Bool { a.rawValue < b.rawValue }

    /// This address plus `offset`, or nil on overflow.
    @inlinable public func adding(_ offset: UInt64) -> GuestAddress? {
        let (sum, overflow) = rawValue.addingReportingOverflow(offset)
        return overflow ? nil : GuestAddress(sum)
    }

    /// This address plus `offset`; traps on overflow (for constant layout arithmetic).
    @inlinable public static func + (a: GuestAddress, offset: UInt64) -> GuestAddress { GuestAddress(a.rawValue + offset) }

    public var description: String { "0x" + String(rawValue, radix: 16) }
}
