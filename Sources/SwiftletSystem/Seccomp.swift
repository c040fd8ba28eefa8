import CLinux
import Glibc

/// One classic-BPF instruction, laid out as the kernel's `struct sock_filter`.
public struct BPFInstruction: Equatable, Sendable, CustomStringConvertible {
    public var code: UInt16
    public var jt: UInt8
    public var jf: UInt8
    public var k: UInt32

    public init(code: UInt16, jt: UInt8 = 0, jf: UInt8 = 0, k: UInt32) {
        self.code = code; self.jt = jt; self.jf = jf; self.k = k
    }

    // The opcodes a seccomp filter uses (linux/bpf_common.h).
    /// `A = *(u32 *)(seccomp_data + k)`: BPF_LD | BPF_W | BPF_ABS.
    public static let loadWord: UInt16 = 0x20
    /// `pc += (A == k) ? jt : jf`: BPF_JMP | BPF_JEQ | BPF_K.
    public static let jumpIfEqual: UInt16 = 0x15
    /// `pc += (A >= k) ? jt : jf`: BPF_JMP | BPF_JGE | BPF_K.
    public static let jumpIfGreaterOrEqual: UInt16 = 0x35
    /// `pc += (A & k) ? jt : jf`: BPF_JMP | BPF_JSET | BPF_K.
    public static let jumpIfAnyBit: UInt16 = 0x45
    /// `return k`: BPF_RET | BPF_K.
    public static let returnConstant: UInt16 = 0x06

    static func load(_ offset: UInt32) -> BPFInstruction { BPFInstruction(code: loadWord, k: offset) }
    static func ret(_ value: UInt32) -> BPFInstruction { BPFInstruction(code: returnConstant, k: value) }

    public var description: String {
        switch code {
        case Self.loadWord: "ld [\(k)]"
        case Self.jumpIfEqual: "jeq \(k), +\(jt), +\(jf)"
        case Self.jumpIfGreaterOrEqual: "jge \(k), +\(jt), +\(jf)"
        case Self.jumpIfAnyBit: "jset \(k), +\(jt), +\(jf)"
        case Self.returnConstant: "ret \(k)"
        default: "op \(code) \(k) +\(jt) +\(jf)"
        }
    }
}

/// A seccomp allow-list filter for x86_64: the calls it names (some only with given arguments)
/// get their action, every other call the default action, and a call made through another
/// architecture's ABI (i386 `int 0x80`, x32) kills the process.
///
/// `program()` compiles it to classic BPF over `struct seccomp_data` (nr at offset 0, arch at 4,
/// argument i's low 32 bits at 16 + 8i on little-endian), in this shape:
///
///     ld [4]; jeq AUDIT_ARCH_X86_64, +1, +0; ret KILL_PROCESS     (arch check)
///     ld [0]; jge 0x40000000, +0, +1; ret KILL_PROCESS             (x32 numbers)
///     per rule: jeq NR, +0, +n; [ld [arg]; jeq/jset V, +0, +fail]...; ret ACTION; [ld [0]]
///     ret DEFAULT
///
/// A rule whose argument checks fail falls through to the next rules (and so to the default).
public struct SeccompFilter: Sendable, Equatable {
    /// What the filter does with a call (the kernel's SECCOMP_RET_* values).
    public enum Action: Sendable, Equatable {
        case allow
        /// The call fails with this errno without running.
        case errno(Int32)
        /// SIGSYS to the calling thread (`Seccomp.reportForbiddenCalls` turns it into a message and an exit).
        case trap
        /// Allowed, and logged by the kernel (audit): for finding what a program needs.
        case log
        case killProcess

        public var value: UInt32 {
            switch self {
            case .allow: 0x7fff_0000
            case .errno(let errno): 0x0005_0000 | (UInt32(truncatingIfNeeded: errno) & 0xffff)
            case .trap: 0x0003_0000
            case .log: 0x7ffc_0000
            case .killProcess: 0x8000_0000
            }
        }
    }

    /// A check on one argument's low 32 bits (the arguments Swiftlet checks are ints and flags).
    public enum Condition: Sendable, Equatable {
        case equals(argument: Int, UInt32)
        /// Every bit of the mask is set.
        case hasBits(argument: Int, UInt32)

        var argument: Int {
            switch self {
            case .equals(let argument, _), .hasBits(let argument, _): argument
            }
        }
    }

    public struct Rule: Sendable, Equatable {
        public var number: UInt32
        public var conditions: [Condition]
        public var action: Action

        public init(number: UInt32, conditions: [Condition] = [], action: Action = .allow) {
            self.number = number; self.conditions = conditions; self.action = action
        }

        /// A rule for the call `name` (its x86_64 number); nil if there is no such call.
        public init?(_ name: String, conditions: [Condition] = [], action: Action = .allow) {
            guard let number = SeccompFilter.number(of: name) else { return nil }
            self.init(number: number, conditions: conditions, action: action)
        }
    }

    public var rules: [Rule]
    public var defaultAction: Action

    public init(rules: [Rule], defaultAction: Action) {
        self.rules = rules
        self.defaultAction = defaultAction
    }

    /// A filter that allows the calls `names` (each must exist: a misspelled name is a
    /// programming error) plus `rules`.
    public init(allowing names: [String], rules extra: [Rule] = [], defaultAction: Action) {
        let rules = names.map { name -> Rule in
            guard let rule = Rule(name) else { preconditionFailure("no x86_64 system call named \(name)") }
            return rule
        }
        self.init(rules: rules + extra, defaultAction: defaultAction)
    }

    /// x86_64's number of the call `name`, or nil.
    public static func number(of name: String) -> UInt32? {
        let number = swiftlet_syscall_number(name)
        return number < 0 ? nil : UInt32(number)
    }

    /// The name of x86_64's call `number`, or nil.
    public static func name(of number: UInt32) -> String? {
        swiftlet_syscall_name(Int(number)).map { String(cString: $0) }
    }

    /// seccomp_data's offsets.
    static let numberOffset: UInt32 = 0, archOffset: UInt32 = 4
    static func argumentOffset(_ index: Int) -> UInt32 { 16 + 8 * UInt32(index) }
    /// Set in the numbers of the x32 ABI's calls, which arrive with x86_64's arch value.
    static let x32Bit: UInt32 = 0x4000_0000

    /// The filter as a BPF program (at most a few instructions per rule; the kernel takes up to 4096).
    public func program() -> [BPFInstruction] {
        typealias I = BPFInstruction
        let kill = Action.killProcess.value
        var program: [I] = [
            .load(Self.archOffset),
            I(code: I.jumpIfEqual, jt: 1, jf: 0, k: SWIFTLET_AUDIT_ARCH_X86_64),
            .ret(kill),
            .load(Self.numberOffset),
            I(code: I.jumpIfGreaterOrEqual, jt: 0, jf: 1, k: Self.x32Bit),
            .ret(kill),
        ]
        for rule in rules {
            precondition(rule.conditions.allSatisfy { (0..<6).contains($0.argument) }, "seccomp arguments are 0 to 5")
            // Body after the number's jump: per condition a load and a test, the return, and (with
            // conditions) the reload of the number the next rule compares.
            let checks = rule.conditions.count
            let body = checks * 2 + 1 + (checks > 0 ? 1 : 0)
            program.append(I(code: I.jumpIfEqual, jt: 0, jf: UInt8(body), k: rule.number))
            for (index, condition) in rule.conditions.enumerated() {
                // A failed check jumps to the reload: past the remaining checks and the return.
                let fail = UInt8((checks - index - 1) * 2 + 1)
                switch condition {
                case .equals(let argument, let value):
                    program.append(.load(Self.argumentOffset(argument)))
                    program.append(I(code: I.jumpIfEqual, jt: 0, jf: fail, k: value))
                case .hasBits(let argument, let mask):
                    // jset jumps on any bit: for "all bits" the mask must be one bit, or the
                    // check is split per bit.
                    precondition(mask.nonzeroBitCount == 1, "hasBits takes one bit")
                    program.append(.load(Self.argumentOffset(argument)))
                    program.append(I(code: I.jumpIfAnyBit, jt: 0, jf: fail, k: mask))
                }
            }
            program.append(.ret(rule.action.value))
            if checks > 0 { program.append(.load(Self.numberOffset)) }
        }
        program.append(.ret(defaultAction.value))
        return program
    }
}

/// Installs seccomp filters on this process, and what the process knows of its own confinement.
public enum Seccomp {
    /// Sets PR_SET_NO_NEW_PRIVS (which an unprivileged filter needs) and installs `filter` on
    /// every thread of the process (SECCOMP_FILTER_FLAG_TSYNC) and on every thread started later.
    /// A filter cannot be removed; a second one stacks (both apply).
    public static func install(_ filter: SeccompFilter) throws(SwiftletError) {
        try install(program: filter.program())
    }

    /// `install` of a filter compiled before (`SeccompFilter.program`).
    public static func install(program: [BPFInstruction]) throws(SwiftletError) {
        guard program.count <= 4096 else {
            throw SwiftletError(.invalidArgument, "the seccomp filter has \(program.count) instructions; the kernel takes at most 4096")
        }
        try systemCall("prctl(PR_SET_NO_NEW_PRIVS)") { swiftlet_set_no_new_privileges() }
        let instructions = program.map { sock_filter(code: $0.code, jt: $0.jt, jf: $0.jf, k: $0.k) }
        let result = instructions.withUnsafeBufferPointer { buffer in
            swiftlet_seccomp_install(buffer.baseAddress, UInt16(buffer.count), UInt32(SECCOMP_FILTER_FLAG_TSYNC))
        }
        if result == -1 { throw SwiftletError.system("seccomp(SECCOMP_SET_MODE_FILTER)", errno: currentErrno) }
        if result > 0 {
            throw SwiftletError(.systemCall, "seccomp: thread \(result) of this process could not take the filter (it has a filter of its own)")
        }
    }

    /// Makes a call a `.trap` filter refuses end the process with
    /// "swiftlet: seccomp: forbidden system call N (name)" on standard error (status 159, 128 + SIGSYS).
    public static func reportForbiddenCalls() throws(SwiftletError) {
        try systemCall("sigaction(SIGSYS)") { swiftlet_install_sigsys_reporter() }
        try systemCall("pthread_sigmask(SIGSYS)") { swiftlet_unblock_sigsys() }
    }
}
