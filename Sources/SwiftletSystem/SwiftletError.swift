import SystemPackage

/// The one error type of Swiftlet: what went wrong, in words a user can act on, with the
/// system error underneath when there is one.
public struct SwiftletError: Error, CustomStringConvertible, Sendable, Equatable {
    /// Broad classes of failure; callers (and the CLI's exit status) switch on these, not on text.
    public enum Code: String, Sendable, Equatable {
        /// A flag or configuration value is out of range or contradictory.
        case invalidArgument
        /// A file or device was not found.
        case notFound
        /// Permission to a file or device was denied.
        case permissionDenied
        /// An input file (kernel, initrd, image) is malformed or of the wrong kind.
        case invalidFormat
        /// The host cannot do what was asked (missing KVM capability, PVM, too many vCPUs).
        case unsupported
        /// Guest memory access out of bounds, or the guest's layout does not fit.
        case outOfBounds
        /// A system call failed unexpectedly.
        case systemCall
        /// The guest did something fatal (panic, triple fault, emulation failure).
        case guestFailure
        /// A signal (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT) asked the work to stop; `signal` says which.
        case interrupted
    }

    public var code: Code
    public var message: String
    public var cause: Errno?
    /// The signal that stopped the work (`.interrupted` only).
    public var signal: Int32?

    public init(_ code: Code, _ message: String, cause: Errno? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    /// The work was stopped by `signal` (a shell reports such an end as status 128 + signal).
    public static func interrupted(by signal: Int32, _ what: String = "interrupted") -> SwiftletError {
        var error = SwiftletError(.interrupted, what)
        error.signal = signal
        return error
    }

    public var description: String {
        guard let cause, !message.contains(cause.description) else { return message }
        return "\(message) (\(cause.description))"
    }

    /// An error for a failed system call, classified by its errno.
    public static func system(_ what: String, errno: Errno) -> SwiftletError {
        let code: Code
        switch errno {
        case .noSuchFileOrDirectory: code = .notFound
        case .permissionDenied, .notPermitted: code = .permissionDenied
        case .invalidArgument: code = .invalidArgument
        default: code = .systemCall
        }
        return SwiftletError(code, what, cause: errno)
    }
}
