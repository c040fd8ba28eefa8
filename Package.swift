// swift-tools-version:6.0
import PackageDescription

let strict: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "swiftlet",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "swiftlet", targets: ["swiftlet"]),
        .executable(name: "swiftlet-pull", targets: ["swiftlet-pull"]),
        .library(name: "Swiftlet", targets: ["SwiftletKit", "VMM", "SwiftletNet", "Hypervisor"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
    ],
    targets: [
        .target(name: "CLinux"),
        .target(
            name: "SwiftletSystem",
            dependencies: ["CLinux", "SwiftletDigest", .product(name: "SystemPackage", package: "swift-system")],
            swiftSettings: strict),
        // The seam between the VMM and a hypervisor: protocols and plain architectural values, no system calls.
        .target(name: "Hypervisor", dependencies: ["SwiftletSystem"], swiftSettings: strict),
        // The KVM backend: the only target that issues KVM ioctls.
        .target(name: "KVM", dependencies: ["Hypervisor", "CLinux", "SwiftletSystem"], swiftSettings: strict),
        .target(name: "GuestMemory", dependencies: ["SwiftletSystem", "CLinux"], swiftSettings: strict),
        .target(name: "MachineState", dependencies: ["GuestMemory", "SwiftletSystem", "SwiftletDigest"], swiftSettings: strict),
        .target(name: "LinuxBoot", dependencies: ["GuestMemory", "SwiftletSystem"], swiftSettings: strict),
        .target(name: "SwiftletDigest", dependencies: ["CDigest"], swiftSettings: strict),
        .target(name: "AgentProtocol", dependencies: ["SwiftletDigest"], swiftSettings: strict),
        .target(
            name: "CCompression",
            linkerSettings: [.linkedLibrary("z"), .linkedLibrary("zstd")]),
        .target(name: "CDigest"),
        .target(name: "Images", dependencies: ["SwiftletSystem", "CCompression"], swiftSettings: strict),
        // The portable single-file format (docs/pack-format.md): writer, reader, checks.
        .target(name: "Pack", dependencies: ["Hypervisor", "SwiftletSystem", "SwiftletDigest", "CCompression"], swiftSettings: strict),
        // The registry client, kept out of the VMM's executable: `swiftlet` runs `swiftlet-pull`.
        .target(
            name: "ImageRegistry",
            dependencies: ["Images", "SwiftletSystem", .product(name: "AsyncHTTPClient", package: "async-http-client")],
            swiftSettings: strict),
        .executableTarget(name: "swiftlet-pull", dependencies: ["ImageRegistry", "Images", "SwiftletSystem"], swiftSettings: strict),
        .target(name: "Virtio", dependencies: ["GuestMemory", "SwiftletSystem"], swiftSettings: strict),
        // Frames, DNS messages, the network policy and the egress filter between a guest's NIC and passt.
        .target(name: "SwiftletNet", dependencies: ["SwiftletSystem"], swiftSettings: strict),
        .target(name: "Devices", dependencies: ["Virtio", "GuestMemory", "SwiftletNet", "SwiftletSystem"], swiftSettings: strict),
        .target(
            name: "VMM",
            dependencies: ["Hypervisor", "KVM", "GuestMemory", "MachineState", "LinuxBoot", "Virtio", "Devices", "AgentProtocol", "SwiftletNet", "SwiftletSystem", "CLinux"],
            swiftSettings: strict),
        // The use cases: machine store and lifecycle, the VMM process and its control protocol,
        // boot templates, image resolution and `run`. The public Swift API (product Swiftlet).
        .target(
            name: "SwiftletKit",
            dependencies: ["VMM", "Hypervisor", "Devices", "MachineState", "AgentProtocol", "Images", "Pack", "SwiftletNet", "SwiftletSystem", "CLinux"],
            swiftSettings: strict),
        // Argument parsing and presentation only.
        .executableTarget(
            name: "swiftlet",
            dependencies: ["SwiftletKit", "VMM", "Hypervisor", "Devices", "Images", "Pack", "SwiftletNet", "SwiftletSystem", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: strict),
        .executableTarget(
            name: "swiftlet-example",
            dependencies: ["SwiftletKit", "VMM"],
            path: "Examples/swiftlet-example",
            swiftSettings: strict),
        .target(name: "CGuestSupport", path: "Guest/CGuestSupport"),
        .executableTarget(
            name: "swiftlet-init",
            dependencies: ["AgentProtocol", "CGuestSupport"],
            path: "Guest/swiftlet-init",
            swiftSettings: strict),
        .executableTarget(
            name: "swiftlet-bench",
            dependencies: ["SwiftletSystem", "CLinux", "VMM", "TestSupport"],
            path: "bench/Sources/swiftlet-bench",
            swiftSettings: strict),
        // Fuzz targets (`make fuzz`): entry points over the code that reads outside input, and the
        // libFuzzer driver (a replay tool when not built with -sanitize=fuzzer). Debug builds only:
        // the targets reach internals through @testable imports.
        .target(
            name: "FuzzTargets",
            dependencies: ["Virtio", "Devices", "GuestMemory", "MachineState", "AgentProtocol", "Images", "Pack", "VMM", "Hypervisor", "SwiftletKit", "SwiftletNet", "SwiftletSystem"],
            path: "Fuzz/Sources/FuzzTargets",
            swiftSettings: strict),
        .executableTarget(name: "swiftlet-fuzz", dependencies: ["FuzzTargets", "SwiftletSystem"], path: "Fuzz/Sources/swiftlet-fuzz", swiftSettings: strict),

        .target(name: "TestSupport", dependencies: ["GuestMemory", "Virtio", "SwiftletSystem", "CLinux"], path: "Tests/TestSupport", swiftSettings: strict),
        .testTarget(name: "SwiftletSystemTests", dependencies: ["SwiftletSystem", "CLinux"], swiftSettings: strict),
        .testTarget(name: "PackTests", dependencies: ["Pack", "Hypervisor", "SwiftletDigest", "SwiftletSystem", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "MachineStateTests", dependencies: ["MachineState", "GuestMemory", "SwiftletSystem", "SwiftletDigest", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "GuestMemoryTests", dependencies: ["GuestMemory"], swiftSettings: strict),
        .testTarget(name: "LinuxBootTests", dependencies: ["LinuxBoot", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "AgentTests", dependencies: ["VMM", "AgentProtocol", "CLinux", "SwiftletSystem", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "ImagesTests", dependencies: ["Images", "ImageRegistry", "SwiftletSystem", "TestSupport",
                                                      .product(name: "AsyncHTTPClient", package: "async-http-client")], swiftSettings: strict),
        .testTarget(name: "AgentProtocolTests", dependencies: ["AgentProtocol"], swiftSettings: strict),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "SwiftletNetTests", dependencies: ["SwiftletNet", "SwiftletSystem"], swiftSettings: strict),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "Virtio", "SwiftletNet", "MachineState", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "KVMTests", dependencies: ["KVM", "Hypervisor", "GuestMemory", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "VMMTests", dependencies: ["VMM", "Hypervisor", "MachineState", "KVM", "Devices", "GuestMemory", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "CLITests", dependencies: ["TestSupport", "Pack", "Hypervisor", "SwiftletSystem"], swiftSettings: strict),
        .testTarget(name: "SwiftletKitTests", dependencies: ["SwiftletKit", "VMM", "Images", "SwiftletNet", "SwiftletSystem", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "FuzzTests", dependencies: ["FuzzTargets"], swiftSettings: strict),
        .testTarget(name: "IntegrationTests", dependencies: ["TestSupport", "CLinux", "SwiftletSystem", "VMM", "Hypervisor", "AgentProtocol"], swiftSettings: strict),
    ]
)
