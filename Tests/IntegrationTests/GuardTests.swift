import Foundation
import QuiesceCore
import QuiesceTestSupport
import Testing

/// Nothing stays frozen when the coordinator dies or hangs: the guard holds the thaw duty.
@Suite(.enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI), .serialized)
struct GuardTests {
    /// How long a write to the guest takes now (it blocks while the filesystem is frozen).
    func timeToWrite(_ world: TestWorld, limit: Duration = .seconds(15)) async throws -> Duration {
        let started = ContinuousClock.now
        try await withDeadline(.now + limit, limit: limit) {
            try await writeDurably("probe\n", to: "\(world.guest)/probe-\(UUID().uuidString)")
        }
        return ContinuousClock.now - started
    }

    @Test func killedCoordinatorDuringFreezeLeavesTheWritersThawed() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            let frozenMark = world.path("frozen")
            try site.addExecWriter("app", order: 0)
            try site.addExecWriter("slow", order: 10, timeout: "30s", onFreeze: "touch \(frozenMark); sleep 20")
            let coordinator = try site.startCLI(["checkpoint"])
            #expect(await eventually(within: .seconds(20)) { FileManager.default.fileExists(atPath: frozenMark) })

            coordinator.signal(SIGKILL, group: false)
            let killed = ContinuousClock.now
            _ = try await runBlocking { coordinator.wait() }
            // The guard runs `freeze-failed` for every exec writer that was asked to freeze.
            let thawed = await eventually(within: .seconds(20)) {
                site.calls("app").last == "freeze-failed" && site.calls("slow").last == "freeze-failed"
            }
            let after = ContinuousClock.now - killed
            #expect(thawed, "writers not thawed: app \(site.calls("app")), slow \(site.calls("slow"))")
            // On the coordinator's death, not at the writers' deadline (80 s away here: freeze budgets,
            // hold limit and thaw); the bound leaves room for two script runs on a loaded machine.
            #expect(after < .seconds(20), "thawed \(after) after the coordinator died")
            // Writable: a write and fsync complete (a frozen guest would block them until thawed).
            #expect(try await timeToWrite(world) < .seconds(5))
            coordinator.terminate()
        }
    }

    @Test func killedCoordinatorDuringTheHoldLeavesTheMountWritable() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world, holdTimeout: "30s")
            try site.addExecWriter("app")
            let coordinator = try site.startCLI(["checkpoint"], environment: ["QUIESCE_FAULT_HOLD_PAUSE_MS": "25000"])
            // A write pending for 200 ms: the guest is held. Kill the coordinator right then.
            let probe = StallProbe(directory: world.guest, threshold: .seconds(1)) { _ in coordinator.signal(SIGKILL, group: false) }
            let exitCode = await exitStatus(of: coordinator, within: .seconds(60))
            await probe.stop()
            #expect(exitCode == 128 + SIGKILL, "the coordinator was not killed mid-hold (status \(String(describing: exitCode)))")
            let stall = try #require(probe.stall, "the guest was never held")
            let completed = try #require(probe.completion(of: stall.write.name), "the guest is still frozen")
            // At once, not at the hold deadline 30 s away (2 s leaves room for a loaded machine).
            #expect(completed - stall.actedAt < .seconds(2), "the guest stayed frozen \(completed - stall.actedAt) after the coordinator died")
            #expect(await eventually(within: .seconds(5)) { site.calls("app").last == "freeze-failed" })

            // The next run records the interrupted checkpoint as aborted and removes its partial snapshot.
            let next = try await site.runCLI(["checkpoint"])
            #expect(next.status == 0, "\(next.stderr)")
            let records = try site.installation().listCheckpoints(limit: nil)
            #expect(records.map(\.outcome) == [.aborted, .completed])
            #expect(records.first?.error?.contains("stopped during the checkpoint") ?? false)
            #expect(site.snapshotFiles() == records.dropFirst().map { "\($0.id).img" })
            coordinator.terminate()
        }
    }

    @Test func hungCoordinatorDuringTheHoldIsKilledAndTheMountReleasedAtTheHoldLimit() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world, holdTimeout: "4s")
            try site.addExecWriter("app")
            let coordinator = try site.startCLI(["checkpoint"], environment: ["QUIESCE_FAULT_HOLD_PAUSE_MS": "25000"])
            // Stop the coordinator mid-hold, as a deadlock or a stuck syscall would.
            let probe = StallProbe(directory: world.guest, threshold: .seconds(1)) { _ in coordinator.signal(SIGSTOP, group: false) }
            let status = await exitStatus(of: coordinator, within: .seconds(60))
            await probe.stop()
            coordinator.terminate()
            #expect(status == 128 + SIGKILL, "the guard did not kill the hung coordinator (status \(String(describing: status)))")
            let stall = try #require(probe.stall, "the guest was never held")
            let completed = try #require(probe.completion(of: stall.write.name), "the guest is still frozen")
            // hold_timeout (4 s) + the guard's grace: within "deadline plus one second".
            #expect(completed - stall.write.issued < .seconds(5), "the guest stayed frozen \(completed - stall.write.issued)")
            #expect(await eventually(within: .seconds(5)) { site.calls("app").last == "freeze-failed" })
        }
    }

    @Test func snapshotSlowerThanTheHoldLimitAbortsAndReleases() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world, holdTimeout: "1s")
            try site.addExecWriter("app")
            let started = ContinuousClock.now
            let result = try await site.runCLI(["checkpoint"], environment: ["QUIESCE_FAULT_HOLD_PAUSE_MS": "3000"])
            #expect(result.status == 5, "exit \(result.status): \(result.stderr)")
            #expect(result.stderr.contains("hold limit of 1 s"))
            #expect(site.calls("app") == ["freeze", "freeze-failed"])
            // Writable again: a write and fsync complete (a frozen guest would block them).
            #expect(try await timeToWrite(world) < .seconds(5))
            #expect(site.snapshotFiles() == [])
            #expect(ContinuousClock.now - started < .seconds(15))
        }
    }
}
