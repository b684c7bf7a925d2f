import Foundation
import QuiesceCore
import QuiesceSQLite
import Testing
@testable import QuiesceCatalog

@Suite("Catalog: what `quiesce checkpoints` and `quiesce writers list` read")
struct CatalogTests {
    let pgMain = WriterResult(name: "pg-main", type: "postgresql", state: "stable",
                              marker: ConsistencyMarker(["lsn": "0/3000060", "timeline": "1"]),
                              recovery: RecoveryMetadata(files: ["backup_label": "START WAL LOCATION: 0/3000028\n"]))
    let app = WriterResult(name: "app-db", type: "sqlite", state: "stable",
                           marker: ConsistencyMarker(["page_count": "912", "journal_mode": "wal", "marker": "42"]))

    @Test func completedCheckpointReadsBackWithMarkersRecoveryAndSnapshots() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/var/lib/quiesce/catalog.db")
            var record = checkpoint(0, .running, label: "nightly")
            try await catalog.begin(record)
            #expect(try catalog.checkpoint(id: record.id)?.outcome == .running)

            record = checkpoint(0, .completed, label: "nightly", writers: [pgMain, app], volumes: ["vm1", "vm2"])
            try await catalog.finish(record)

            #expect(try catalog.checkpoint(id: record.id) == record)
            #expect(try catalog.checkpoints() == [record])
            #expect(try catalog.latestCompleted(volume: "vm2") == record)
            #expect(try catalog.latestCompleted(volume: "vm3") == nil)

            // Another process (the CLI) opening the same file sees the same thing.
            let reopened = try Catalog(path: "\(dir)/var/lib/quiesce/catalog.db")
            #expect(try reopened.checkpoint(id: record.id) == record)
        }
    }

    @Test func abortedCheckpointNamesThePhaseTheWriterAndTheError() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            var record = checkpoint(0, .aborted, writers: [
                WriterResult(name: "pg-main", type: "postgresql", state: "failed-at-freeze", errorKind: .timedOut,
                             error: "timed out after 60 s waiting for CHECKPOINT"),
                app,
            ])
            record.failedPhase = .freeze
            record.failedWriter = "pg-main"
            record.error = "writer \"pg-main\" failed at freeze: timed out after 60 s waiting for CHECKPOINT"
            try await catalog.begin(checkpoint(0, .running))
            try await catalog.finish(record)

            let read = try #require(try catalog.checkpoint(id: record.id))
            #expect(read == record)
            #expect(read.failedPhase == .freeze)
            #expect(read.writers.first?.errorKind == .timedOut)
            #expect(read.snapshots.isEmpty)
            #expect(try catalog.latestCompleted() == nil)
        }
    }

    @Test func timesReadBackEqualToTheMillisecond() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            let now = Date()
            var record = CheckpointRecord(id: CheckpointRecord.makeID(at: now), label: nil, startedAt: now)
            record.outcome = .completed
            record.endedAt = now.addingTimeInterval(0.0127)
            try await catalog.finish(record)

            let read = try #require(try catalog.checkpoint(id: record.id))
            #expect(unixMilliseconds(read.startedAt) == unixMilliseconds(now))
            #expect(abs(read.startedAt.timeIntervalSince(now)) <= 0.0005)
            #expect(abs(try #require(read.endedAt).timeIntervalSince(record.endedAt!)) <= 0.0005)
            // A time already on a whole millisecond reads back exactly.
            #expect(date(unixMilliseconds: unixMilliseconds(time(minutes: 7))) == time(minutes: 7))
        }
    }

    @Test func listWithLastShowsTheNewestOldestFirst() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            // Recorded out of order: the list is by start time, not by insertion.
            let records = [3, 0, 4, 1, 2].map { checkpoint($0, $0 == 2 ? .aborted : .completed) }
            for record in records { try await catalog.finish(record) }
            let ids = (0...4).map { CheckpointRecord.makeID(at: time(minutes: $0)) }

            #expect(try catalog.checkpoints().map(\.id) == ids)
            #expect(try catalog.checkpoints(limit: 2).map(\.id) == Array(ids[3...]))
            #expect(try catalog.checkpoints(limit: 50).map(\.id) == ids)
            #expect(try catalog.checkpoints(limit: 0).isEmpty)
            #expect(try catalog.latestCompleted()?.id == ids[4])
        }
    }

    @Test func sameCheckpointIDTwiceIsRefused() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            try await catalog.begin(checkpoint(0, .running))
            await #expect(throws: CatalogError.self) { try await catalog.begin(checkpoint(0, .running)) }
        }
    }

    /// The coordinator records a run while cron's `quiesce checkpoints list` and an operator's
    /// `quiesce writers list` read the same file through their own connections.
    @Test func readersAndTheCoordinatorShareTheCatalog() async throws {
        try await withTemporaryDirectory { dir in
            let path = "\(dir)/catalog.db"
            let coordinator = try Catalog(path: path)
            let reader = try Catalog(path: path)
            let app = self.app
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    for n in 0..<60 {
                        let record = checkpoint(n, .running)
                        try await coordinator.begin(record)
                        await coordinator.writerState("app-db", type: "sqlite", state: .frozen, errorKind: .none,
                                                      error: nil, checkpointID: record.id)
                        try await coordinator.finish(checkpoint(n, .completed, writers: [app]))
                    }
                }
                group.addTask {
                    var seen = 0
                    while seen < 60 {
                        let list = try reader.checkpoints()
                        #expect(list.count >= seen, "the list went backwards")
                        // A reader never sees a completed checkpoint without its writers.
                        #expect(list.allSatisfy { $0.outcome != .completed || $0.writers == [app] })
                        seen = list.filter { $0.outcome == .completed }.count
                        _ = try reader.writerStatuses()
                        try await Task.sleep(for: .milliseconds(1))
                    }
                }
                try await group.waitForAll()
            }
            #expect(try reader.writerStatuses().first?.lastSuccessfulCheckpoint == checkpoint(59, .completed).id)
        }
    }

    // MARK: Writer status

    @Test func failedWriterStaysReportedUntilItsNextCompletedCheckpoint() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            func status() throws -> WriterStatus { try #require(try catalog.writerStatuses().first { $0.name == "pg-main" }) }
            let timeout = "writer \"pg-main\" failed at freeze: timed out after 60 s"

            // 1: pg-main times out at freeze.
            let first = checkpoint(0, .running)
            try await catalog.begin(first)
            await catalog.writerState("pg-main", type: "postgresql", state: .waitingForFreeze, errorKind: .none,
                                      error: nil, checkpointID: first.id)
            #expect(try status().state == "waiting-for-freeze")
            await catalog.writerState("pg-main", type: "postgresql", state: .failed(at: .freeze), errorKind: .timedOut,
                                      error: timeout, checkpointID: first.id)
            try await catalog.finish(checkpoint(0, .aborted, writers: [
                WriterResult(name: "pg-main", type: "postgresql", state: "failed-at-freeze", errorKind: .timedOut, error: timeout),
            ]))
            #expect(try status().state == "failed-at-freeze")
            #expect(try status().lastErrorKind == .timedOut)
            #expect(try status().lastError == timeout)
            #expect(try status().lastSuccessfulCheckpoint == nil)

            // 2: pg-main freezes and thaws fine, but another writer aborts the run: the error stays.
            let second = checkpoint(1, .running)
            try await catalog.begin(second)
            for state in [WriterState.waitingForFreeze, .frozen, .waitingForThaw, .stable] {
                await catalog.writerState("pg-main", type: "postgresql", state: state, errorKind: .none, error: nil,
                                          checkpointID: second.id)
            }
            try await catalog.finish(checkpoint(1, .aborted, writers: [pgMain]))
            #expect(try status().state == "stable")
            #expect(try status().lastErrorKind == .timedOut)
            #expect(try status().lastError == timeout)

            // 3: a completed checkpoint clears it.
            let third = checkpoint(2, .running)
            try await catalog.begin(third)
            await catalog.writerState("pg-main", type: "postgresql", state: .stable, errorKind: .none, error: nil,
                                      checkpointID: third.id)
            #expect(try status().lastErrorKind == .timedOut)
            try await catalog.finish(checkpoint(2, .completed, writers: [pgMain]))
            #expect(try status() == WriterStatus(name: "pg-main", type: "postgresql", state: "stable",
                                                 lastErrorKind: .none, lastError: nil,
                                                 lastSuccessfulCheckpoint: third.id, updatedAt: try status().updatedAt))

            // A writer's `stable` reported after its checkpoint completed also clears an error.
            await catalog.writerState("app-db", type: "sqlite", state: .failed(at: .prepare), errorKind: .retryable,
                                      error: "database is locked", checkpointID: third.id)
            #expect(try catalog.writerStatuses().first { $0.name == "app-db" }?.lastErrorKind == .retryable)
            await catalog.writerState("app-db", type: "sqlite", state: .stable, errorKind: .none, error: nil,
                                      checkpointID: third.id)
            let appDB = try #require(try catalog.writerStatuses().first { $0.name == "app-db" })
            #expect(appDB.lastErrorKind == .none && appDB.lastError == nil)
            #expect(appDB.lastSuccessfulCheckpoint == third.id)
        }
    }

    @Test func removedWriterIsForgotten() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            try await catalog.finish(checkpoint(0, .completed, writers: [pgMain, app]))
            #expect(try catalog.writerStatuses().map(\.name) == ["app-db", "pg-main"])
            try catalog.forgetWriter(name: "app-db")
            try catalog.forgetWriter(name: "app-db") // already gone: fine
            #expect(try catalog.writerStatuses().map(\.name) == ["pg-main"])
            // The checkpoint still records what the writer did.
            #expect(try catalog.checkpoints().first?.writers.map(\.name) == ["pg-main", "app-db"])
        }
    }

    // MARK: Recovery

    @Test func checkpointOfAKilledCoordinatorIsAbortedAndReturnedForCleanup() async throws {
        try await withTemporaryDirectory { dir in
            let path = "\(dir)/catalog.db"
            let catalog = try Catalog(path: path)
            let done = checkpoint(0, .completed, writers: [pgMain])
            try await catalog.finish(done)
            // The coordinator began a checkpoint, froze pg-main and was killed.
            let interrupted = checkpoint(1, .running)
            try await catalog.begin(interrupted)
            await catalog.writerState("pg-main", type: "postgresql", state: .frozen, errorKind: .none, error: nil,
                                      checkpointID: interrupted.id)

            // The next run takes the lock, then recovers.
            let lock = try CheckpointLock.acquire(catalogPath: path, holder: "quiesce checkpoint")
            defer { lock.release() }
            let recovered = try catalog.recoverInterrupted()
            #expect(recovered.map(\.id) == [interrupted.id])
            #expect(recovered.first?.outcome == .aborted)
            #expect(recovered.first?.error == Catalog.interruptedMessage)
            #expect(Catalog.interruptedMessage.contains("killed or crashed"))

            let read = try #require(try catalog.checkpoint(id: interrupted.id))
            #expect(read.outcome == .aborted)
            #expect(read.endedAt != nil)
            #expect(read.error == Catalog.interruptedMessage)
            #expect(try catalog.checkpoint(id: done.id) == done)

            let status = try #require(try catalog.writerStatuses().first)
            #expect(status.state == "stable")
            #expect(status.lastErrorKind == .retryable)
            #expect(status.lastError?.contains(interrupted.id) == true)
            #expect(status.lastSuccessfulCheckpoint == done.id)

            #expect(try catalog.recoverInterrupted().isEmpty)
        }
    }

    @Test func recoveringWithoutTheCheckpointLockIsRefused() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            let running = checkpoint(0, .running)
            try await catalog.begin(running)
            #expect {
                try catalog.recoverInterrupted()
            } throws: { error in
                guard case CatalogError.lockNotHeld = error else { return false }
                return "\(error)".contains("\(dir)/catalog.db.lock")
            }
            // A released lock is not a held lock.
            try CheckpointLock.acquire(catalogPath: "\(dir)/catalog.db", holder: "test").release()
            #expect(throws: CatalogError.self) { try catalog.recoverInterrupted() }
            #expect(try catalog.checkpoint(id: running.id)?.outcome == .running)
        }
    }

    // MARK: Retention

    @Test func pruneKeepsTheNewestCompletedAndEveryHeldBase() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            let a0 = checkpoint(0, .aborted), c1 = checkpoint(1, .completed), a1 = checkpoint(2, .aborted)
            let c2 = checkpoint(3, .completed), c3 = checkpoint(4, .completed), a2 = checkpoint(5, .aborted)
            let c4 = checkpoint(6, .completed), a3 = checkpoint(7, .aborted), c5 = checkpoint(8, .completed)
            let running = checkpoint(9, .running)
            for record in [a0, c1, a1, c2, c3, a2, c4, a3, c5] { try await catalog.finish(record) }
            try await catalog.begin(running)
            try catalog.hold(checkpointID: c2.id, holder: "dr-site-a")

            // keep 2: c4 and c5 stay, c2 is dr-site-a's base; aborted runs older than c4 go.
            #expect(try catalog.pruneCandidates(keep: 2).map(\.id) == [a0, c1, a1, c3, a2].map(\.id))
            // Candidates carry their snapshot files, for the caller to delete.
            #expect(try catalog.pruneCandidates(keep: 2).first { $0.id == c3.id }?.snapshots == c3.snapshots)

            // More to keep than there are: only aborted runs before the oldest completed one go.
            #expect(try catalog.pruneCandidates(keep: 10).map(\.id) == [a0.id])
            // keep 0: everything but the held base and the running checkpoint.
            #expect(try catalog.pruneCandidates(keep: 0).map(\.id) == [a0, c1, a1, c3, a2, c4, a3, c5].map(\.id))

            // Once dr-site-a acknowledged c5 and let c2 go, c2 can be pruned.
            try catalog.hold(checkpointID: c5.id, holder: "dr-site-a")
            #expect(try catalog.release(holder: "dr-site-a", checkpointID: c2.id) == 1)
            #expect(try catalog.pruneCandidates(keep: 2).map(\.id) == [a0, c1, a1, c2, c3, a2].map(\.id))
        }
    }

    /// The drop-ins a checkpoint was taken with come back as they were, each text stored once,
    /// and go when no checkpoint uses them any more.
    @Test func writerSpecsOfACheckpointAreKeptOnceAndPrunedWithTheLastUser() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            let first = checkpoint(0, .completed), second = checkpoint(1, .completed), third = checkpoint(2, .completed)
            for record in [first, second, third] { try await catalog.finish(record) }
            let db = "name = \"db\"\ntype = \"sqlite\"\npath = \"/srv/db\"\n"
            let app = "name = \"app\"\ntype = \"exec\"\ncommand = \"/usr/local/bin/app-hook\"\n"
            let edited = app + "verify = true\n"
            try catalog.recordSpecs(checkpointID: first.id, [("db", db), ("app", app)])
            try catalog.recordSpecs(checkpointID: second.id, [("db", db), ("app", edited)])

            #expect(try catalog.specs(checkpointID: first.id)?.map(\.text) == [app, db])
            #expect(try catalog.specs(checkpointID: second.id)?.map(\.text) == [edited, db])
            #expect(try catalog.specs(checkpointID: third.id) == nil, "nothing recorded is not an empty list")
            let raw = try SQLiteConnection(path: "\(dir)/catalog.db")
            #expect(try raw.scalar("SELECT count(*) FROM writer_specs")?.int == 3)

            // The first checkpoint goes: its old "app" text with it, the shared "db" text stays.
            try catalog.delete(checkpointID: first.id)
            #expect(try raw.scalar("SELECT count(*) FROM writer_specs")?.int == 2)
            #expect(try catalog.specs(checkpointID: second.id)?.map(\.text) == [edited, db])
            #expect(throws: CatalogError.self) { try catalog.recordSpecs(checkpointID: "no-such-checkpoint", [("db", db)]) }
        }
    }

    @Test func onlyACompletedCheckpointCanBeHeld() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            let c1 = checkpoint(1, .completed), c2 = checkpoint(2, .completed), aborted = checkpoint(3, .aborted)
            for record in [c1, c2, aborted] { try await catalog.finish(record) }

            #expect(throws: CatalogError.self) { try catalog.hold(checkpointID: aborted.id, holder: "dr-site-a") }
            #expect(throws: CatalogError.self) { try catalog.hold(checkpointID: "20991231T000000000Z", holder: "dr-site-a") }

            try catalog.hold(checkpointID: c1.id, holder: "dr-site-a")
            try catalog.hold(checkpointID: c1.id, holder: "dr-site-a") // again: harmless
            try catalog.hold(checkpointID: c1.id, holder: "dr-site-b")
            try catalog.hold(checkpointID: c2.id, holder: "dr-site-a")
            #expect(try catalog.holds().map { "\($0.checkpointID) \($0.holder)" }
                    == ["\(c1.id) dr-site-a", "\(c1.id) dr-site-b", "\(c2.id) dr-site-a"])

            #expect(try catalog.release(holder: "dr-site-a") == 2)
            #expect(try catalog.holds().map(\.holder) == ["dr-site-b"])
            #expect(try catalog.release(holder: "dr-site-a") == 0)
        }
    }

    @Test func deletingAHeldCheckpointIsRefusedNamingTheHolder() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            let base = checkpoint(0, .completed, writers: [pgMain]), next = checkpoint(1, .completed)
            try await catalog.finish(base)
            try await catalog.finish(next)
            try catalog.hold(checkpointID: base.id, holder: "dr-site-a")

            #expect {
                try catalog.delete(checkpointID: base.id)
            } throws: { error in
                guard case CatalogError.checkpointHeld(_, let id, let holders) = error else { return false }
                return id == base.id && holders == ["dr-site-a"] && "\(error)".contains("\"dr-site-a\"")
                    && "\(error)".contains(base.id)
            }
            #expect(try catalog.checkpoint(id: base.id) == base)

            try catalog.release(holder: "dr-site-a")
            try catalog.delete(checkpointID: base.id)
            #expect(try catalog.checkpoint(id: base.id) == nil)
            #expect(try catalog.checkpoints().map(\.id) == [next.id])
            // Its writer results and snapshot files went with it.
            let raw = try SQLiteConnection(path: "\(dir)/catalog.db")
            #expect(try raw.scalar("SELECT count(*) FROM checkpoint_writers")?.int == 0)
            #expect(try raw.scalar("SELECT count(*) FROM snapshot_files")?.int == 1)

            #expect(throws: CatalogError.self) { try catalog.delete(checkpointID: base.id) }
            let running = checkpoint(2, .running)
            try await catalog.begin(running)
            #expect(throws: CatalogError.self) { try catalog.delete(checkpointID: running.id) }
        }
    }

    // MARK: The file

    @Test func newCatalogIsPrivateDurableAndVersioned() async throws {
        try await withTemporaryDirectory { dir in
            let path = "\(dir)/var/lib/quiesce/catalog.db"
            _ = try Catalog(path: path)
            var info = stat()
            #expect(stat("\(dir)/var/lib/quiesce", &info) == 0 && info.st_mode & 0o777 == 0o700)
            #expect(stat("\(dir)/var/lib", &info) == 0 && info.st_mode & 0o777 == 0o700)
            #expect(stat(path, &info) == 0 && info.st_mode & 0o777 == 0o600)
            let raw = try SQLiteConnection(path: path)
            #expect(try raw.scalar("PRAGMA journal_mode")?.text == "wal")
            #expect(try raw.scalar("PRAGMA user_version")?.int == Int64(Catalog.schemaVersion))
            #expect(try raw.scalar("PRAGMA integrity_check")?.text == "ok")
        }
    }

    @Test func catalogWrittenByANewerQuiesceIsRefused() async throws {
        try await withTemporaryDirectory { dir in
            let path = "\(dir)/catalog.db"
            _ = try Catalog(path: path)
            try SQLiteConnection(path: path).execute("PRAGMA user_version = \(Catalog.schemaVersion + 1)")
            #expect {
                _ = try Catalog(path: path)
            } throws: { error in
                guard case CatalogError.newerSchema = error else { return false }
                let text = "\(error)"
                return text.contains(path) && text.contains("newer quiesce") && text.contains("upgrade quiesce")
            }
        }
    }

    @Test func fileThatIsNotACatalogIsRefused() async throws {
        try await withTemporaryDirectory { dir in
            try "hello\n".write(toFile: "\(dir)/notes.txt", atomically: true, encoding: .utf8)
            #expect {
                _ = try Catalog(path: "\(dir)/notes.txt")
            } throws: { error in
                guard case CatalogError.notACatalog = error else { return false }
                return "\(error)".contains("\(dir)/notes.txt")
            }

            try SQLiteConnection(path: "\(dir)/app.db").execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
            #expect {
                _ = try Catalog(path: "\(dir)/app.db")
            } throws: { error in
                guard case CatalogError.notACatalog = error else { return false }
                return "\(error)".contains("orders")
            }
        }
    }

    @Test func catalogUnderAFileNamesTheDirectoryItCannotCreate() async throws {
        try await withTemporaryDirectory { dir in
            try "".write(toFile: "\(dir)/lib", atomically: true, encoding: .utf8)
            #expect {
                _ = try Catalog(path: "\(dir)/lib/quiesce/catalog.db")
            } throws: { error in
                guard case CatalogError.cannotCreateDirectory(_, let directory, _) = error else { return false }
                return directory == "\(dir)/lib/quiesce" && "\(error)".contains("not a directory")
            }
        }
    }
}
