import Foundation
import QuiesceCore
@testable import QuiesceGuard
import QuiesceTestSupport
import Testing

@Suite struct GuardProcessTests {
    @Test func coordinatorDeathRemovesOnlyLockFilesThatAreStillOurs() async throws {
        let executable = try Executables.requireQuiesce()
        try await withTemporaryDirectory { directory in
            let ours = "\(directory)/ours.lock", theirs = "\(directory)/theirs.lock", unchecked = "\(directory)/plain.lock"
            try "1234:host".write(toFile: ours, atomically: true, encoding: .utf8)
            // Our lock went, and a delivery took a lock of the same name since.
            try "5678:host".write(toFile: theirs, atomically: true, encoding: .utf8)
            try "anything".write(toFile: unchecked, atomically: true, encoding: .utf8)

            let guardProcess = try await GuardProcess.start(executable: executable)
            let ids = try await guardProcess.arm(all: [
                .removeFile(path: ours, expectedContent: "1234:host"),
                .removeFile(path: theirs, expectedContent: "1234:host"),
                .removeFile(path: unchecked),
            ], deadline: .now + .seconds(60))
            #expect(ids.count == 3 && Set(ids).count == 3)
            let status = await guardProcess.abandon()

            #expect(status == 1, "the guard should report that it had duties to run")
            #expect(!FileManager.default.fileExists(atPath: ours), "our lock was left behind")
            #expect(FileManager.default.fileExists(atPath: theirs), "someone else's lock was removed")
            #expect(!FileManager.default.fileExists(atPath: unchecked))
        }
    }

    @Test func disarmedDutiesAreNotRunAndCloseRunsNothing() async throws {
        let executable = try Executables.requireQuiesce()
        try await withTemporaryDirectory { directory in
            let kept = "\(directory)/kept.lock", removed = "\(directory)/removed.lock"
            for path in [kept, removed] { try "x".write(toFile: path, atomically: true, encoding: .utf8) }
            let guardProcess = try await GuardProcess.start(executable: executable)
            let ids = try await guardProcess.arm(all: [.removeFile(path: kept), .removeFile(path: removed)],
                                                 deadline: .now + .seconds(60))
            try await guardProcess.disarm(all: [ids[0]])
            #expect(await guardProcess.abandon() == 1)
            #expect(FileManager.default.fileExists(atPath: kept), "a disarmed duty ran")
            #expect(!FileManager.default.fileExists(atPath: removed))
        }
    }
}
