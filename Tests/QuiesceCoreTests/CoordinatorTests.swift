import Foundation
import Logging
import QuiesceCore
import QuiesceGuard
import QuiesceTestSupport
import Synchronization
import Testing

@Suite struct CoordinatorTests {
    func coordinator(_ writers: [any Writer], journal: MemoryJournal) throws -> Coordinator {
        let executable = try Executables.requireQuiesce()
        return Coordinator(writers: writers, volumes: [], providers: [:], holdTimeout: .seconds(2), journal: journal,
                           startGuard: { try await GuardProcess.start(executable: executable) },
                           logger: Logger(label: "test"))
    }

    @Test func writersFreezeByOrderGroupAndThawInReverse() async throws {
        let log = EventLog()
        let writers = [
            ScriptedWriter(name: "db", order: 20, log: log),
            ScriptedWriter(name: "app", order: 0, log: log),
            ScriptedWriter(name: "cache", order: 10, log: log),
        ]
        let result = try await coordinator(writers, journal: MemoryJournal(log: log)).checkpoint(label: "t")
        #expect(result.error == nil)
        #expect(result.record.outcome == .completed)
        let freezes = log.all.filter { $0.hasSuffix(":freeze") }
        #expect(freezes == ["app:freeze", "cache:freeze", "db:freeze"])
        let thaws = log.all.filter { $0.contains(":thaw:") }
        #expect(thaws == ["db:thaw:completed", "cache:thaw:completed", "app:thaw:completed"])
        // Every prepare happens before any freeze.
        let lastPrepare = log.all.lastIndex { $0.hasSuffix(":prepare") }!
        let firstFreeze = log.all.firstIndex { $0.hasSuffix(":freeze") }!
        #expect(lastPrepare < firstFreeze)
        #expect(result.record.writers.map(\.marker?["writer"]) == ["db", "app", "cache"])
        #expect(result.record.freezeWindowMs != nil)
    }

    @Test func vetoAtFreezeAbortsAndThawsEveryWriterAskedToFreeze() async throws {
        let log = EventLog()
        let writers = [
            ScriptedWriter(name: "first", order: 0, log: log),
            ScriptedWriter(name: "vetoer", order: 10, log: log, freezeBehaviour: .veto("disk quota exceeded")),
            ScriptedWriter(name: "sibling", order: 10, log: log),
            ScriptedWriter(name: "later", order: 20, log: log),
        ]
        let journal = MemoryJournal(log: log)
        let result = try await coordinator(writers, journal: journal).checkpoint(label: nil)
        guard case .writerFailed(let writer, let phase, let error)? = result.error else {
            Issue.record("expected a writer failure, got \(String(describing: result.error))")
            return
        }
        #expect(writer == "vetoer")
        #expect(phase == .freeze)
        #expect(error.message.contains("disk quota exceeded"))
        #expect(result.record.outcome == .aborted)
        #expect(result.record.failedWriter == "vetoer")
        #expect(result.record.failedPhase == .freeze)
        // The group that was asked is thawed and told; the later group was never frozen, nor thawed.
        #expect(log.all.contains("first:thaw:aborted"))
        #expect(log.all.contains("vetoer:thaw:aborted"))
        #expect(log.all.contains("sibling:thaw:aborted"))
        #expect(!log.all.contains("later:freeze"))
        #expect(!log.all.contains { $0.hasPrefix("later:thaw") })
        #expect(log.all.contains("state:vetoer:failed-at-freeze"))
        #expect(journal.finished.withLock { $0?.outcome } == .aborted)
    }

    @Test func hangingWriterTimesOutWithoutHoldingTheCoordinator() async throws {
        let log = EventLog()
        let writers = [
            ScriptedWriter(name: "stuck", order: 0, timeout: .milliseconds(300), log: log, freezeBehaviour: .block(.seconds(60))),
            ScriptedWriter(name: "other", order: 0, log: log),
        ]
        let started = ContinuousClock.now
        let result = try await coordinator(writers, journal: MemoryJournal(log: log)).checkpoint(label: nil)
        let elapsed = ContinuousClock.now - started
        guard case .writerFailed("stuck", .freeze, let error)? = result.error else {
            Issue.record("expected stuck to fail at freeze, got \(String(describing: result.error))")
            return
        }
        #expect(error.kind == .timedOut)
        // Had it waited for the stuck call, it would have taken 60 s; the bound is loose for loaded CI machines.
        #expect(elapsed < .seconds(30), "the coordinator waited for a stuck writer (\(elapsed))")
        #expect(log.all.contains("other:thaw:aborted"))
        #expect(log.all.contains("stuck:thaw:aborted"))
    }

    @Test func vetoAtPrepareNeverFreezesAnything() async throws {
        let log = EventLog()
        let writers = [
            ScriptedWriter(name: "a", order: 0, log: log, prepareBehaviour: .veto("replica lag too high")),
            ScriptedWriter(name: "b", order: 0, log: log),
        ]
        let result = try await coordinator(writers, journal: MemoryJournal(log: log)).checkpoint(label: nil)
        #expect(result.error?.phase == .prepare)
        #expect(result.error?.writer == "a")
        #expect(!log.all.contains { $0.hasSuffix(":freeze") })
        #expect(!log.all.contains { $0.contains(":thaw:") })
    }

    @Test func writerStatesAreJournaledThroughTheRun() async throws {
        let log = EventLog()
        let result = try await coordinator([ScriptedWriter(name: "w", order: 0, log: log)],
                                           journal: MemoryJournal(log: log)).checkpoint(label: nil)
        #expect(result.error == nil)
        let states = log.all.filter { $0.hasPrefix("state:w:") }
        #expect(states == ["state:w:waiting-for-freeze", "state:w:frozen", "state:w:waiting-for-thaw", "state:w:stable"])
    }

    @Test func dataOutsideTheSnapshotSetIsRefusedAtIdentify() async throws {
        let log = EventLog()
        var writer = ScriptedWriter(name: "stray", order: 0, log: log)
        writer.footprint = WriterFootprint(paths: ["/var/lib/somewhere/data.db"])
        let result = try await coordinator([writer], journal: MemoryJournal(log: log)).checkpoint(label: nil)
        guard case .outsideSnapshotSet("stray", let path, _)? = result.error else {
            Issue.record("expected outsideSnapshotSet, got \(String(describing: result.error))")
            return
        }
        #expect(path == "/var/lib/somewhere/data.db")
        #expect(!log.all.contains("stray:prepare"))
    }

    @Test func thawFailureIsReportedButTheCheckpointStands() async throws {
        let log = EventLog()
        let writers = [ScriptedWriter(name: "w", order: 0, log: log, thawBehaviour: .veto("service restart failed"))]
        let result = try await coordinator(writers, journal: MemoryJournal(log: log)).checkpoint(label: nil)
        #expect(result.error == nil)
        #expect(result.record.outcome == .completed)
        #expect(result.thawErrors.count == 1)
        #expect(log.all.contains("state:w:failed-at-thaw"))
    }
}

@Suite struct DeadlineTests {
    @Test func abandonsAnOperationThatIgnoresCancellation() async throws {
        let finished = Mutex(false)
        await #expect(throws: DeadlineExceeded.self) {
            try await withDeadline(.now + .milliseconds(200), limit: .milliseconds(200)) {
                try await runBlocking {
                    usleep(10_000_000)
                    finished.withLock { $0 = true }
                }
            }
        }
        // The caller got its answer while the stuck operation was still stuck.
        #expect(!finished.withLock { $0 }, "withDeadline waited for the operation to finish")
    }

    @Test func returnsTheResultWhenInTime() async throws {
        let value = try await withDeadline(.now + .seconds(5), limit: .seconds(5)) { 42 }
        #expect(value == 42)
    }

    @Test func durationsParseAsConfigsWriteThem() {
        #expect(parseDuration("60s") == .seconds(60))
        #expect(parseDuration("500ms") == .milliseconds(500))
        #expect(parseDuration("2m") == .seconds(120))
        #expect(parseDuration("1.5s") == .milliseconds(1500))
        #expect(parseDuration("soon") == nil)
        #expect(parseDuration("-1s") == nil)
    }

    @Test func checkpointIDsSortByTimeAndAreFilenameSafe() {
        let a = CheckpointRecord.makeID(at: Date(timeIntervalSince1970: 1_764_000_000))
        let b = CheckpointRecord.makeID(at: Date(timeIntervalSince1970: 1_764_000_000.5))
        #expect(a < b)
        #expect(CheckpointRecord.isValidID(a))
        #expect(!CheckpointRecord.isValidID("../etc/passwd"))
        #expect(!a.contains("/"))
    }
}
