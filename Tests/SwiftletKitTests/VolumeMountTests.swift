import FoundationEssentials
import SwiftletSystem
import Testing
@testable import SwiftletKit

/// The volumes a restore is given against the ones a snapshot's machine had, and what a
/// snapshot keeps of them.
@Suite struct VolumeMountTests {
    static func mount(_ host: String, _ guest: String, readOnly: Bool = false) -> VolumeMount {
        VolumeMount(hostPath: host, guestPath: guest, readOnly: readOnly)
    }

    @Test func givenVolumesAreMatchedToTheSavedOnesByGuestDirectory() throws {
        let saved = [Self.mount("", "/work"), Self.mount("", "/ref", readOnly: true)]
        let given = [Self.mount("/h/ref", "/ref/", readOnly: true), Self.mount("/h/work", "//work")]
        let ordered = try VolumeMount.matching(given, saved: saved, what: "S")
        #expect(ordered.map(\.hostPath) == ["/h/work", "/h/ref"], "in the saved order, whatever the order given")
        #expect(try VolumeMount.matching([], saved: [], what: "S").isEmpty)
    }

    @Test func missingOtherOrDifferentlyWritableVolumesAreRefusedWithTheOptionsToGive() {
        let saved = [Self.mount("", "/work"), Self.mount("", "/ref", readOnly: true)]
        func refusal(_ given: [VolumeMount], _ saved: [VolumeMount]) -> String {
            do { _ = try VolumeMount.matching(given, saved: saved, what: "S"); return "accepted" } catch { return error.message }
        }
        #expect(refusal([], saved).contains("-v HOST_DIR:/work -v HOST_DIR:/ref:ro"))
        #expect(refusal([Self.mount("/h", "/work"), Self.mount("/h2", "/other", readOnly: true)], saved).contains("other guest paths"))
        #expect(refusal([Self.mount("/h", "/work"), Self.mount("/h2", "/ref")], saved).contains("read-only"))
        #expect(refusal([Self.mount("/h", "/work")], []).contains("shared no host directories"))
    }

    @Test func aSnapshotsRecordKeepsNoHostDirectory() throws {
        var record = MachineRecord(name: "m", source: "alpine", layers: [], defaults: .plain, cpus: 1, memoryMiB: 128,
                                   kernel: nil, diskMiB: 64, created: 0)
        record.volumes = [Self.mount("/home/me/secret-project", "/work")]
        let text = try MachineSnapshotRecord.encode(record)
        #expect(!text.contains("secret-project"))
        let back = try JSONDecoder().decode(MachineRecord.self, from: Data(text.utf8))
        #expect(back.volumes == [Self.mount("", "/work")])
    }
}
