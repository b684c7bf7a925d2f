import Foundation
import Quiesce
import QuiesceCore
import QuiesceTestSupport
import ReflinkProvider
import Testing

/// A checkpoint on a real XFS datastore with a real ext4 guest, through the coordinator.
@Suite(.enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI), .serialized)
struct CheckpointTests {
    @Test func completedSnapshotSharesExtentsWithTheImageAndHoldsWhatWasWrittenBeforeTheFreeze() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            try site.addExecWriter("app")
            let before = String(repeating: "before the freeze\n", count: 60_000)
            try await writeDurably(before, to: "\(world.guest)/data.txt")

            let result = try await site.installation().checkpoint(label: "t")
            #expect(result.error == nil)
            let record = result.record
            #expect(record.outcome == .completed)
            let hold = try #require(record.holdWindowMs)
            let freeze = try #require(record.freezeWindowMs)
            #expect(hold > 0 && hold < 10_000)
            #expect(freeze >= hold)
            print("checkpoint \(record.id): freeze window \(freeze) ms, hold window \(hold) ms")

            // The application is told, in order, with its context.
            #expect(site.calls("app") == ["freeze", "thaw"])
            let log = try String(contentsOfFile: "\(site.logs)/app.log", encoding: .utf8)
            #expect(log.contains("freeze \(record.id) writer=app volume=vm1"))
            #expect(log.contains("thaw \(record.id) writer=app volume=vm1 outcome=completed"))
            #expect(record.writers.first?.marker?["calls"] == "1")

            let snapshot = try #require(record.snapshots.first)
            #expect(snapshot.path == "\(world.volume.snapshotDirectory)/\(record.id).img")
            // Overwrite the data after the checkpoint: the snapshot must keep the old bytes.
            try await writeDurably(String(repeating: "after the checkpoint\n", count: 60_000), to: "\(world.guest)/data.txt")
            try world.syncGuests()

            let imageExtents = try ExtentMap.extents(of: world.image)
            let snapshotExtents = try ExtentMap.extents(of: snapshot.path)
            let shared = ExtentMap.sharedBytes(imageExtents, snapshotExtents)
            let snapshotData = ExtentMap.dataBytes(snapshotExtents)
            #expect(shared > 0)
            // Only what changed since (about 1 MiB of file data and metadata) is unshared.
            #expect(snapshotData - shared < 16 << 20, "snapshot has \(snapshotData) data bytes, \(shared) shared")

            let held = try await world.withMountedCopy(of: snapshot.path) { root in
                try String(contentsOfFile: "\(root)/data.txt", encoding: .utf8)
            }
            #expect(held == before)
            let attributes = try FileManager.default.attributesOfItem(atPath: snapshot.path)
            #expect((attributes[.posixPermissions] as? Int) == 0o400)
        }
    }

    @Test func writeIssuedDuringTheHoldCompletesAfterReleaseAndIsAbsentFromTheSnapshot() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            try site.addExecWriter("app")
            let probes = "\(world.guest)/probes"
            try FileManager.default.createDirectory(atPath: probes, withIntermediateDirectories: true)
            // An application writing continuously; a capture as slow as a struggling datastore's
            // keeps the guest held for 1.5 s.
            let probe = StallProbe(directory: probes)
            let result = try await site.runCLI(["checkpoint", "--json"], environment: ["QUIESCE_FAULT_HOLD_PAUSE_MS": "1500"])
            await probe.stop()
            #expect(result.status == 0, "checkpoint failed: \(result.stderr)")
            let record = try JSONDecoder.iso8601.decode(CheckpointRecord.self, from: Data(result.stdout.utf8))
            let snapshot = try #require(record.snapshots.first)

            let writes = probe.writes
            let held = try #require(writes.firstIndex { w in w.completed.map { $0 - w.issued > .seconds(1) } ?? false },
                                    "no write was held by the checkpoint")
            #expect(held > 0, "the probe had not written before the hold")
            let (heldName, before) = (writes[held].name, writes[held - 1].name)
            let live = FileManager.default.fileExists(atPath: "\(probes)/\(heldName)")
            let (heldInSnapshot, beforeInSnapshot) = try await world.withMountedCopy(of: snapshot.path) { root in
                (FileManager.default.fileExists(atPath: "\(root)/probes/\(heldName)"),
                 FileManager.default.fileExists(atPath: "\(root)/probes/\(before)"))
            }
            #expect(live, "the write held during the checkpoint was lost")
            #expect(!heldInSnapshot, "a write issued during the hold is in the snapshot")
            #expect(beforeInSnapshot, "a write completed before the hold is missing from the snapshot")
        }
    }

    @Test func vetoingWriterAbortsAndEveryOtherWriterIsThawedWithFreezeFailed() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            try site.addExecWriter("app", order: 0)
            try site.addExecWriter("vetoer", order: 10, onFreeze: "echo 'replication lag too high' >&2; exit 3")
            try site.addExecWriter("db", order: 10)
            try site.addExecWriter("late", order: 20)

            let result = try await site.installation().checkpoint(label: nil)
            guard case .writerFailed("vetoer", .freeze, let error)? = result.error else {
                Issue.record("expected vetoer to fail at freeze, got \(String(describing: result.error))")
                return
            }
            #expect(error.message.contains("exited with status 3"))
            #expect(error.message.contains("replication lag too high"))
            #expect(ExitStatus.of(result) == .writerFailed)
            #expect(result.record.outcome == .aborted)
            #expect(site.calls("app") == ["freeze", "freeze-failed"])
            #expect(site.calls("vetoer") == ["freeze", "freeze-failed"])
            #expect(site.calls("db") == ["freeze", "freeze-failed"])
            #expect(site.calls("late") == [], "a writer of a later group was frozen after the veto")
            #expect(site.snapshotFiles() == [])

            let stored = try #require(try site.installation().openCatalog().checkpoint(id: result.record.id))
            #expect(stored.outcome == .aborted)
            #expect(stored.failedWriter == "vetoer")
            #expect(stored.failedPhase == .freeze)
            let listing = try site.installation().listWriters()
            #expect(listing.first { $0.name == "vetoer" }?.state == "failed-at-freeze")
            #expect(listing.first { $0.name == "vetoer" }?.lastError == "retryable")
            #expect(listing.first { $0.name == "app" }?.state == "stable")
        }
    }

    @Test func hangingWriterTimesOutAndIsKilledAndEveryOtherWriterIsThawed() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            let token = "600.\(getpid())\(Int.random(in: 1000...9999))"
            try site.addExecWriter("app", order: 0)
            try site.addExecWriter("stuck", order: 0, timeout: "1s", onFreeze: "sleep \(token)")

            // Timed in its own process and on the thread that waits for it, so that a busy test
            // process cannot inflate it.
            let quiesce = try Executables.requireQuiesce()
            let config = site.config
            let (run, elapsed) = try await runBlocking { () throws -> (CommandResult, Duration) in
                let started = ContinuousClock.now
                let run = try ChildProcess.runSync(quiesce, ["checkpoint", "--config", config], timeout: .seconds(120))
                return (run, ContinuousClock.now - started)
            }
            #expect(run.status == ExitStatus.writerTimedOut.rawValue, "\(run.stderr)")
            #expect(run.stderr.contains("writer \"stuck\" failed at freeze"))
            // The script sleeps 600 s; the checkpoint gives up at its 1 s timeout (loose bound for loaded machines).
            #expect(elapsed < .seconds(15), "took \(elapsed)")
            #expect(site.calls("app") == ["freeze", "freeze-failed"])
            #expect(site.calls("stuck") == ["freeze", "freeze-failed"])
            #expect(site.snapshotFiles() == [])
            var survivor = ""
            for _ in 0..<20 {
                survivor = try await ChildProcess.run("pgrep", ["-f", "sleep \(token)"]).stdout
                if survivor.isEmpty { break }
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(survivor.isEmpty, "the hung freeze script was left running (pid \(survivor))")
        }
    }

    @Test func snapshotSetOfTwoVolumesIsTakenWithBothMountsHeld() async throws {
        try await TestWorld.with(.init(volumes: ["vm1", "vm2"])) { world in
            let site = try TestSite(world)
            try site.addExecWriter("app")
            for volume in world.volumes {
                try await writeDurably("data of \(volume.name)\n", to: "\(volume.mount!)/id.txt")
            }
            let result = try await site.installation().checkpoint(label: nil)
            #expect(result.error == nil)
            #expect(result.record.snapshots.map(\.volume).sorted() == ["vm1", "vm2"])
            for snapshot in result.record.snapshots {
                let text = try await world.withMountedCopy(of: snapshot.path) { root in
                    try String(contentsOfFile: "\(root)/id.txt", encoding: .utf8)
                }
                #expect(text == "data of \(snapshot.volume)\n")
            }
        }
    }

    @Test func datastoreThatCannotReflinkIsRefusedBeforeAnythingFreezes() async throws {
        try await TestWorld.with(.init(datastore: .ext4)) { world in
            let site = try TestSite(world)
            try site.addExecWriter("app")
            let result = try await site.installation().checkpoint(label: nil)
            guard case .providerFailed(.prepare, let error)? = result.error else {
                Issue.record("expected a provider failure at prepare, got \(String(describing: result.error))")
                return
            }
            #expect(error.description.contains("ext4"))
            #expect(error.description.contains("reflink=1"))
            #expect(ExitStatus.of(result) == .providerFailed)
            #expect(site.calls("app") == [], "a writer was frozen although the datastore cannot snapshot")
        }
    }
}

extension JSONDecoder {
    static var iso8601: JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }
}
