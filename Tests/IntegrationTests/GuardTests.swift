import Foundation
import QuiesceCore
import QuiesceTestSupport
import Testing

/// Nothing stays frozen when the coordinator dies or hangs: the guard holds the thaw duty.
@Suite(.enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI))
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
            let thawed = await eventually(within: .seconds(3)) {
                site.calls("app").last == "freeze-failed" && site.calls("slow").last == "freeze-failed"
            }
            let after = ContinuousClock.now - killed
            #expect(thawed, "writers not thawed: app \(site.calls("app")), slow \(site.calls("slow"))")
            #expect(after < .seconds(1) + .milliseconds(500), "thawed \(after) after the coordinator died")
            #expect(try await timeToWrite(world) < .seconds(1))
        }
    }

    @Test func killedCoordinatorDuringTheHoldLeavesTheMountWritable() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world, holdTimeout: "30s")
            let frozenMark = world.path("frozen")
            try site.addExecWriter("app", onFreeze: "touch \(frozenMark)")
            let coordinator = try site.startCLI(["checkpoint"], environment: ["QUIESCE_FAULT_HOLD_PAUSE_MS": "25000"])
            #expect(await eventually(within: .seconds(20)) { FileManager.default.fileExists(atPath: frozenMark) })
            try await Task.sleep(for: .milliseconds(500))  // now inside the hold

            // A write issued now blocks: the guest really is frozen.
            let probe = Task { try await timeToWrite(world) }
            try await Task.sleep(for: .milliseconds(300))
            coordinator.signal(SIGKILL, group: false)
            let blocked = try await probe.value
            #expect(blocked > .milliseconds(250), "the guest was not frozen during the hold")
            #expect(blocked < .seconds(1) + .milliseconds(300), "the guest stayed frozen \(blocked) after the coordinator died")
            _ = try await runBlocking { coordinator.wait() }
            #expect(await eventually(within: .seconds(3)) { site.calls("app").last == "freeze-failed" })

            // The next run records the interrupted checkpoint as aborted and removes its partial snapshot.
            let next = try await site.runCLI(["checkpoint"])
            #expect(next.status == 0, "\(next.stderr)")
            let records = try site.installation().listCheckpoints(limit: nil)
            #expect(records.map(\.outcome) == [.aborted, .completed])
            #expect(records.first?.error?.contains("stopped during the checkpoint") ?? false)
            #expect(site.snapshotFiles() == ["\(records[1].id).img"])
        }
    }

    @Test func hungCoordinatorDuringTheHoldIsKilledAndTheMountReleasedAtTheHoldLimit() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world, holdTimeout: "2s")
            let frozenMark = world.path("frozen")
            try site.addExecWriter("app", onFreeze: "touch \(frozenMark)")
            let coordinator = try site.startCLI(["checkpoint"], environment: ["QUIESCE_FAULT_HOLD_PAUSE_MS": "25000"])
            #expect(await eventually(within: .seconds(20)) { FileManager.default.fileExists(atPath: frozenMark) })
            try await Task.sleep(for: .milliseconds(300))
            // Stop the coordinator mid-hold, as a deadlock or a stuck syscall would.
            coordinator.signal(SIGSTOP, group: false)
            let stopped = ContinuousClock.now
            let blocked = try await timeToWrite(world)
            let frozenFor = ContinuousClock.now - stopped
            #expect(blocked > .milliseconds(500), "the guest was not frozen during the hold")
            // hold_timeout (2 s) + the guard's grace, within "deadline plus one second".
            #expect(frozenFor < .seconds(3), "the guest stayed frozen \(frozenFor)")
            let status = try await runBlocking { coordinator.wait() }
            #expect(status == 128 + SIGKILL, "the guard did not kill the hung coordinator (status \(status))")
            #expect(await eventually(within: .seconds(3)) { site.calls("app").last == "freeze-failed" })
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
            #expect(try await timeToWrite(world) < .seconds(1))
            #expect(site.snapshotFiles() == [])
            #expect(ContinuousClock.now - started < .seconds(15))
        }
    }
}
