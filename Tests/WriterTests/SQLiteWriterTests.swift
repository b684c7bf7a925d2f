import Foundation
import QuiesceConfig
import QuiesceCore
import QuiesceSQLite
@testable import SQLiteWriter
import Testing

@Suite("sqlite writer")
struct SQLiteWriterTests {
    static let modes = ["wal", "delete"]

    // MARK: freeze and thaw

    @Test("while frozen, the application's writes wait and its reads go on; after thaw writes succeed", arguments: modes)
    func frozenDatabaseBlocksWritersNotReaders(mode: String) async throws {
        let fixture = try SQLiteFixture(mode: mode)
        defer { fixture.remove() }
        let writer = fixture.writer()

        try await writer.prepare(checkpointContext(.prepare))
        let marker = try await writer.freeze(checkpointContext(.freeze))

        let application = try fixture.connection()  // busy timeout 0: fails at once when locked
        defer { application.close() }
        let refused = #expect(throws: SQLiteError.self) {
            try application.execute("INSERT INTO orders (payload, created_at) VALUES ('while frozen', '2026-01-01T00:00:01.000Z')")
        }
        #expect(refused?.isBusy == true)
        #expect(try application.scalar(SQLiteFixture.countQuery)?.int == 100)

        try await writer.thaw(checkpointContext(.thaw), outcome: .completed)
        try application.execute("INSERT INTO orders (payload, created_at) VALUES ('after thaw', '2026-01-01T00:00:01.000Z')")
        #expect(try application.scalar(SQLiteFixture.countQuery)?.int == 101)
        #expect(marker["marker_result"] == "100")
    }

    @Test("the marker records the marker query's value, page count, journal mode and path", arguments: modes)
    func markerRecordsStateAtFreeze(mode: String) async throws {
        let fixture = try SQLiteFixture(mode: mode, rows: 250)
        defer { fixture.remove() }
        let writer = fixture.writer()

        try await writer.prepare(checkpointContext(.prepare))
        let marker = try await writer.freeze(checkpointContext(.freeze))
        try await writer.thaw(checkpointContext(.thaw), outcome: .completed)

        let reader = try fixture.connection(busyTimeout: .seconds(5))
        defer { reader.close() }
        #expect(marker["marker_query"] == SQLiteFixture.countQuery)
        #expect(marker["marker_result"] == "250")
        #expect(marker["journal_mode"] == mode)
        #expect(marker["page_count"] == (try reader.scalar("PRAGMA page_count"))?.description)
        #expect(marker["database"] == fixture.database)
    }

    @Test("a long write transaction makes freeze time out within busy_timeout, and thaw leaves the database writable",
          arguments: modes)
    func longWriteTransactionTimesOutFreeze(mode: String) async throws {
        let fixture = try SQLiteFixture(mode: mode)
        defer { fixture.remove() }
        let busyTimeout = Duration.seconds(1)
        let writer = fixture.writer(busyTimeout: busyTimeout)

        let longTransaction = try fixture.connection()
        defer { longTransaction.close() }
        try longTransaction.execute("BEGIN IMMEDIATE")
        try longTransaction.execute("INSERT INTO orders (payload, created_at) VALUES ('slow batch', '2026-01-01T00:00:01.000Z')")

        try await writer.prepare(checkpointContext(.prepare))
        let started = ContinuousClock.now
        let error = await #expect(throws: WriterError.self) {
            _ = try await writer.freeze(checkpointContext(.freeze))
        }
        let elapsed = ContinuousClock.now - started
        #expect(error?.kind == .timedOut)
        #expect(error?.message.contains("another connection held a write transaction") == true)
        #expect(error?.message.contains("nothing was snapshotted") == true)
        #expect(error?.hint?.contains("busy_timeout") == true)
        #expect(elapsed >= busyTimeout * 0.9)
        // It gave up at busy_timeout, not at the context's 10 s deadline (loose: the machine may be loaded).
        #expect(elapsed < .seconds(8))

        try await writer.thaw(checkpointContext(.thaw), outcome: .aborted)
        try longTransaction.execute("COMMIT")
        let application = try fixture.connection()
        defer { application.close() }
        try application.execute("INSERT INTO orders (payload, created_at) VALUES ('after the aborted checkpoint', '2026-01-01T00:00:01.000Z')")
        #expect(try fixture.count() == 102)
    }

    @Test("thaw while an abandoned freeze still waits for the lock ends the wait and leaves nothing locked",
          arguments: modes)
    func thawDuringWaitingFreezeReleasesEverything(mode: String) async throws {
        let fixture = try SQLiteFixture(mode: mode)
        defer { fixture.remove() }
        let writer = fixture.writer(busyTimeout: .seconds(8), timeout: .seconds(10))

        let longTransaction = try fixture.connection()
        defer { longTransaction.close() }
        try longTransaction.execute("BEGIN IMMEDIATE")

        try await writer.prepare(checkpointContext(.prepare))
        let started = ContinuousClock.now
        // The coordinator abandons a freeze at its deadline; the blocking call goes on meanwhile.
        let freeze = Task { try await writer.freeze(checkpointContext(.freeze)) }
        try await Task.sleep(for: .milliseconds(300))

        try await writer.thaw(checkpointContext(.thaw), outcome: .aborted)
        let thawed = ContinuousClock.now - started
        let error = await #expect(throws: WriterError.self) { _ = try await freeze.value }
        #expect(error?.kind == .timedOut)
        #expect(error?.message.contains("abandoned") == true)
        // Well before busy_timeout (8 s) would have ended the wait; loose for loaded machines.
        #expect(thawed < .seconds(5))
        #expect(ContinuousClock.now - started < .seconds(6))

        // The application finishes its transaction, and the writer's connection holds no lock.
        try longTransaction.execute("ROLLBACK")
        let application = try fixture.connection()
        defer { application.close() }
        try application.execute("BEGIN IMMEDIATE")
        try application.execute("INSERT INTO orders (payload, created_at) VALUES ('after thaw', '2026-01-01T00:00:01.000Z')")
        try application.execute("COMMIT")
    }

    @Test("a freeze arriving after its checkpoint was thawed does not take the lock")
    func lateFreezeAfterThawDoesNotLock() async throws {
        let fixture = try SQLiteFixture(mode: "wal")
        defer { fixture.remove() }
        let writer = fixture.writer()

        try await writer.prepare(checkpointContext(.prepare))
        try await writer.thaw(checkpointContext(.thaw), outcome: .aborted)
        let error = await #expect(throws: WriterError.self) { _ = try await writer.freeze(checkpointContext(.freeze)) }
        #expect(error?.kind == .timedOut)

        let application = try fixture.connection()
        defer { application.close() }
        try application.execute("INSERT INTO orders (payload, created_at) VALUES ('not blocked', '2026-01-01T00:00:01.000Z')")
    }

    @Test("thaw without prepare or freeze is harmless, and a writer serves checkpoint after checkpoint")
    func thawWithoutFreezeAndRepeatedCheckpoints() async throws {
        let fixture = try SQLiteFixture(mode: "delete")
        defer { fixture.remove() }
        let writer = fixture.writer()
        try await writer.thaw(checkpointContext(.thaw, id: "20260101T000000001Z"), outcome: .aborted)

        for (index, id) in ["20260101T000000002Z", "20260101T000000003Z"].enumerated() {
            try await writer.prepare(checkpointContext(.prepare, id: id))
            let marker = try await writer.freeze(checkpointContext(.freeze, id: id))
            #expect(marker["marker_result"] == "\(100 + index)")
            try await writer.thaw(checkpointContext(.thaw, id: id), outcome: .completed)
            let application = try fixture.connection()
            try application.execute("INSERT INTO orders (payload, created_at) VALUES ('between checkpoints', '2026-01-01T00:00:01.000Z')")
            application.close()
        }
        // Freeze without prepare opens its own connection.
        let marker = try await writer.freeze(checkpointContext(.freeze, id: "20260101T000000004Z"))
        #expect(marker["marker_result"] == "102")
        try await writer.thaw(checkpointContext(.thaw, id: "20260101T000000004Z"), outcome: .completed)
        #expect(try fixture.count() == 102)
    }

    @Test("a marker query returning several rows vetoes at prepare, outside the freeze")
    func markerQueryWithSeveralRowsVetoesAtPrepare() async throws {
        let fixture = try SQLiteFixture(mode: "wal")
        defer { fixture.remove() }
        let writer = fixture.writer(markerQuery: "SELECT id FROM orders")
        let error = await #expect(throws: WriterError.self) { try await writer.prepare(checkpointContext(.prepare)) }
        #expect(error?.kind == .nonRetryable)
        #expect(error?.message.contains("more than one row") == true)
        try await writer.thaw(checkpointContext(.thaw), outcome: .aborted)
    }

    // MARK: under load, then verify

    @Test("a checkpoint under an insert load holds the commits during the freeze and verifies on the copy",
          arguments: modes)
    func checkpointUnderInsertLoadVerifiesOnCopy(mode: String) async throws {
        let fixture = try SQLiteFixture(mode: mode)
        defer { fixture.remove() }
        let writer = fixture.writer()
        let stop = StopFlag()
        let database = fixture.database
        let load = Task {
            try await runBlocking {
                try SQLiteInsertWorkload.run(database: database, table: SQLiteFixture.table,
                                             busyTimeout: .seconds(5), until: { stop.isSet })
            }
        }
        defer { stop.set() }
        // Let the application get going.
        let warmUp = ContinuousClock.now
        while try fixture.count() < 120, ContinuousClock.now - warmUp < .seconds(20) {
            try await Task.sleep(for: .milliseconds(20))
        }

        try await writer.prepare(checkpointContext(.prepare))
        let marker = try await writer.freeze(checkpointContext(.freeze))
        let frozenCount = try #require(marker["marker_result"].flatMap { Int64($0) })
        #expect(try fixture.count() == frozenCount)
        try await Task.sleep(for: .milliseconds(300))
        #expect(try fixture.count() == frozenCount, "no commit may land while frozen")
        let (copy, _) = try fixture.snapshot()
        try await writer.thaw(checkpointContext(.thaw), outcome: .completed)

        let thawed = ContinuousClock.now
        while try fixture.count() <= frozenCount, ContinuousClock.now - thawed < .seconds(20) {
            try await Task.sleep(for: .milliseconds(20))
        }
        stop.set()
        let committed = try await load.value
        #expect(try fixture.count() == 100 + Int64(committed), "every committed row is in the database")
        #expect(try fixture.count() > frozenCount, "the application resumed after thaw")

        let report = try await writer.verify(copy: copy, marker: marker)
        #expect(report.ok, "\(report.details)")
        #expect(report.details.contains("PRAGMA integrity_check: ok"))
        #expect(report.details.contains { $0.contains("\(frozenCount), as at freeze") })
    }

    @Test("verify fails when the copy does not hold the marker's state", arguments: modes)
    func verifyFailsWhenMarkerDiffers(mode: String) async throws {
        let fixture = try SQLiteFixture(mode: mode)
        defer { fixture.remove() }
        let writer = fixture.writer()
        try await writer.prepare(checkpointContext(.prepare))
        var marker = try await writer.freeze(checkpointContext(.freeze))
        let (copy, _) = try fixture.snapshot()
        try await writer.thaw(checkpointContext(.thaw), outcome: .completed)

        #expect(try await writer.verify(copy: copy, marker: marker).ok)
        marker["marker_result"] = "101"
        let report = try await writer.verify(copy: copy, marker: marker)
        #expect(!report.ok)
        #expect(report.details.contains("FAILED: marker_query \"\(SQLiteFixture.countQuery)\": 100 in the copy, but 101 at freeze"))
    }

    @Test("verify fails on a copy with a corrupted page", arguments: modes)
    func verifyFailsOnCorruptedCopy(mode: String) async throws {
        let fixture = try SQLiteFixture(mode: mode, rows: 2000)
        defer { fixture.remove() }
        let writer = fixture.writer()
        try await writer.prepare(checkpointContext(.prepare))
        let marker = try await writer.freeze(checkpointContext(.freeze))
        let (copy, copyDatabase) = try fixture.snapshot()
        try await writer.thaw(checkpointContext(.thaw), outcome: .completed)
        #expect(try await writer.verify(copy: copy, marker: marker).ok)

        // Overwrite a page in the middle of the copy (never the live file, never while SQLite has it open).
        let pages = try #require(marker["page_count"].flatMap { Int($0) })
        #expect(pages > 20)
        let file = try #require(FileHandle(forWritingAtPath: copyDatabase))
        try file.seek(toOffset: UInt64(pages / 2) * 4096)
        try file.write(contentsOf: Data(repeating: 0x5a, count: 4096))
        try file.close()

        let report = try await writer.verify(copy: copy, marker: marker)
        #expect(!report.ok)
        #expect(report.details.contains { $0.hasPrefix("FAILED:") && $0.contains("integrity_check") }, "\(report.details)")
    }

    @Test("verify reports a hot journal in the copy (a write caught mid-commit) and accepts a zeroed one")
    func verifyReportsHotJournal() async throws {
        let fixture = try SQLiteFixture(mode: "delete")
        defer { fixture.remove() }
        let writer = fixture.writer()
        try await writer.prepare(checkpointContext(.prepare))
        let marker = try await writer.freeze(checkpointContext(.freeze))
        let (copy, copyDatabase) = try fixture.snapshot()
        try await writer.thaw(checkpointContext(.thaw), outcome: .completed)

        // A journal whose header was zeroed (journal_mode=PERSIST after a commit) is not hot.
        #expect(FileManager.default.createFile(atPath: copyDatabase + "-journal", contents: Data(count: 512)))
        #expect(try await writer.verify(copy: copy, marker: marker).ok)

        var header = Data([0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7])  // the journal magic
        header.append(Data(repeating: 0x01, count: 504))
        #expect(FileManager.default.createFile(atPath: copyDatabase + "-journal", contents: header))
        let report = try await writer.verify(copy: copy, marker: marker)
        #expect(!report.ok)
        #expect(report.details.contains { $0.contains("hot journal") }, "\(report.details)")
    }

    @Test("verify of a read-only copy works on a private temporary copy and leaves the copy untouched",
          .serialized, arguments: modes)
    func verifyReadOnlyCopyThroughTemporaryCopy(mode: String) async throws {
        let fixture = try SQLiteFixture(mode: mode)
        defer { fixture.remove() }
        let writer = fixture.writer()
        try await writer.prepare(checkpointContext(.prepare))
        // A write after the passive checkpoint, so that in WAL mode the -wal holds it.
        let application = try fixture.connection(busyTimeout: .seconds(5))
        try application.execute("INSERT INTO orders (payload, created_at) VALUES ('in the wal', '2026-01-01T00:00:01.000Z')")
        let marker = try await writer.freeze(checkpointContext(.freeze))
        let (copy, copyDatabase) = try fixture.snapshot()
        try await writer.thaw(checkpointContext(.thaw), outcome: .completed)
        application.close()

        let before = try Self.contents(ofDirectoryOf: copyDatabase)
        let temporaries = try Self.verifyTemporaries()
        let report = try writer.verifyCopy(copy, marker: marker, temporaryCopy: true)
        #expect(report.ok, "\(report.details)")
        #expect(report.details.contains { $0.contains("private copy") })
        #expect(report.details.contains { $0.contains("101, as at freeze") })
        #expect(try Self.contents(ofDirectoryOf: copyDatabase) == before, "the copy was not modified")
        #expect(try Self.verifyTemporaries().isSubset(of: temporaries), "the temporary copy was removed")
    }

    @Test("verify fails clearly when the database is on no copied volume or missing from the copy")
    func verifyFailsWhenCopyLacksDatabase() async throws {
        let fixture = try SQLiteFixture(mode: "wal")
        defer { fixture.remove() }
        let writer = fixture.writer()
        let marker = ConsistencyMarker(["database": fixture.database, "marker_result": "100"])

        let elsewhere = try await writer.verify(copy: CopyLayout(mounts: ["/srv/other": fixture.root + "/x"]), marker: marker)
        #expect(!elsewhere.ok)
        #expect(elsewhere.details.first?.contains("on no volume of the copy") == true)

        let empty = try await writer.verify(copy: CopyLayout(mounts: [fixture.live: fixture.root + "/empty"]), marker: marker)
        #expect(!empty.ok)
        #expect(empty.details.first?.contains("the copy has no database") == true)
    }

    @Test("the insert workload creates its table, commits until told to stop, and refuses a missing database or odd table name")
    func insertWorkloadCommitsUntilStopped() throws {
        let fixture = try SQLiteFixture(mode: "wal")
        defer { fixture.remove() }
        let end = ContinuousClock.now + .milliseconds(300)
        let committed = try SQLiteInsertWorkload.run(database: fixture.database, table: "events", busyTimeout: .seconds(1),
                                                     until: { ContinuousClock.now >= end })
        #expect(committed > 0)
        let reader = try fixture.connection()
        defer { reader.close() }
        #expect(try reader.scalar("SELECT count(*) FROM events")?.int == Int64(committed))
        #expect(try reader.scalar("SELECT count(*) FROM events WHERE created_at LIKE '20__-__-__T__:__:__.___Z'")?.int
                == Int64(committed))

        let missing = #expect(throws: (any Error).self) {
            try SQLiteInsertWorkload.run(database: fixture.live + "/app/missing.db", table: "events",
                                         busyTimeout: .seconds(1), until: { false })
        }
        #expect("\(missing.map { "\($0)" } ?? "")".contains("missing.db"))
        #expect(!FileManager.default.fileExists(atPath: fixture.live + "/app/missing.db"))
        #expect(throws: (any Error).self) {
            try SQLiteInsertWorkload.run(database: fixture.database, table: "events; DROP TABLE orders",
                                         busyTimeout: .seconds(1), until: { false })
        }
    }

    // MARK: identify

    @Test("identify names the database and its -wal, -shm and -journal files")
    func identifyListsDatabaseFiles() async throws {
        let fixture = try SQLiteFixture(mode: "wal")
        defer { fixture.remove() }
        let footprint = try await fixture.writer().identify()
        let db = fixture.database
        #expect(footprint.paths == [db, db + "-wal", db + "-shm", db + "-journal"])
    }

    @Test("a missing database is a non-retryable error naming its path")
    func missingDatabaseIsNonRetryable() async throws {
        let fixture = try SQLiteFixture(mode: "wal")
        defer { fixture.remove() }
        let path = fixture.live + "/app/missing.db"
        let writer = SQLiteWriter(common: CommonWriterSettings(name: "orders-db", type: "sqlite", order: 0,
                                                               timeout: .seconds(30), specFile: "/etc/quiesce/writers.d/orders-db.toml"),
                                  database: path)
        let error = await #expect(throws: WriterError.self) { _ = try await writer.identify() }
        #expect(error?.kind == .nonRetryable)
        #expect(error?.message.contains(path) == true)
        #expect(!FileManager.default.fileExists(atPath: path), "identify must not create the database")
        // Nor does prepare.
        await #expect(throws: WriterError.self) { try await writer.prepare(checkpointContext(.prepare)) }
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    // MARK: spec validation

    @Test("a spec with every key builds the writer")
    func fullSpecBuildsWriter() throws {
        let fixture = try SQLiteFixture(mode: "wal")
        defer { fixture.remove() }
        let writer = try makeSQLiteWriter(sqliteSpec([
            ("name", .string("orders-db")), ("type", .string("sqlite")), ("database", .string(fixture.database)),
            ("busy_timeout", .string("2s")), ("marker_query", .string("-- rows\n" + SQLiteFixture.countQuery)),
            ("order", .integer(10)), ("timeout", .string("30s")),
        ]))
        #expect(writer.database == fixture.database)
        #expect(writer.busyTimeout == .seconds(2))
        #expect(writer.timeout == .seconds(30))
        #expect(writer.order == 10)
        #expect(writer.type == "sqlite")
    }

    @Test("a spec without a database, or with a relative one, is refused")
    func specWithoutDatabaseIsRefused() throws {
        let missing = #expect(throws: ConfigError.self) {
            try makeSQLiteWriter(sqliteSpec([("name", .string("orders-db")), ("type", .string("sqlite"))]))
        }
        #expect(missing?.reason.contains("missing required key \"database\"") == true)

        let relative = #expect(throws: ConfigError.self) {
            try makeSQLiteWriter(sqliteSpec([("name", .string("orders-db")), ("type", .string("sqlite")),
                                             ("database", .string("app/orders.db"))]))
        }
        #expect(relative?.key == "database")
        #expect(relative?.line == 3)
        #expect(relative?.reason.contains("absolute path") == true)
    }

    @Test("an unknown key is refused with its line and the key it probably meant")
    func unknownKeyIsRefusedWithItsLine() throws {
        let error = #expect(throws: ConfigError.self) {
            try makeSQLiteWriter(sqliteSpec([
                ("name", .string("orders-db")), ("type", .string("sqlite")), ("database", .string("/srv/vm1/app/orders.db")),
                ("busy_timout", .string("2s")),
            ]))
        }
        #expect(error?.key == "busy_timout")
        #expect(error?.line == 4)
        #expect(error?.description.contains("orders-db.toml:4") == true)
        #expect(error?.reason.contains("did you mean \"busy_timeout\"") == true)
    }

    @Test("busy_timeout must be below timeout, explicit or default")
    func busyTimeoutNotBelowTimeoutIsRefused() throws {
        let explicit = #expect(throws: ConfigError.self) {
            try makeSQLiteWriter(sqliteSpec([
                ("name", .string("orders-db")), ("type", .string("sqlite")), ("database", .string("/srv/vm1/app/orders.db")),
                ("busy_timeout", .string("30s")), ("timeout", .string("30s")),
            ]))
        }
        #expect(explicit?.key == "busy_timeout")
        #expect(explicit?.line == 4)
        #expect(explicit?.reason.contains("must be below timeout (30 s)") == true)

        let byDefault = #expect(throws: ConfigError.self) {
            try makeSQLiteWriter(sqliteSpec([
                ("name", .string("orders-db")), ("type", .string("sqlite")), ("database", .string("/srv/vm1/app/orders.db")),
                ("timeout", .string("3s")),
            ]))
        }
        #expect(byDefault?.reason.contains("the default busy_timeout (5 s)") == true)
    }

    @Test("a marker_query that is not a single SELECT returning one value is refused",
          arguments: [
              "DELETE FROM orders",
              "UPDATE orders SET payload = ''",
              "PRAGMA journal_mode = DELETE",
              "SELECT count(*) FROM orders; DELETE FROM orders",
              "SELECT id, payload FROM orders",
              "SELECT count(*) FROM no_such_table",
              "WITH gone AS (SELECT 1) DELETE FROM orders",
              "",
          ])
    func nonSelectMarkerQueryIsRefused(query: String) throws {
        let fixture = try SQLiteFixture(mode: "wal")
        defer { fixture.remove() }
        let error = #expect(throws: ConfigError.self) {
            try makeSQLiteWriter(sqliteSpec([
                ("name", .string("orders-db")), ("type", .string("sqlite")), ("database", .string(fixture.database)),
                ("marker_query", .string(query)),
            ]))
        }
        #expect(error?.key == "marker_query")
        #expect(error?.line == 4)
        #expect(try fixture.count() == 100, "checking the query must not run it")
    }

    @Test("a marker_query is checked at identify when the database did not exist when the spec was read")
    func markerQueryCheckedAtIdentifyWhenDatabaseAppearsLater() async throws {
        let fixture = try SQLiteFixture(mode: "delete")
        defer { fixture.remove() }
        let later = fixture.live + "/app/later.db"
        let writer = try makeSQLiteWriter(sqliteSpec([
            ("name", .string("orders-db")), ("type", .string("sqlite")), ("database", .string(later)),
            ("marker_query", .string("SELECT id, payload FROM orders")),
        ]))
        try FileManager.default.copyItem(atPath: fixture.database, toPath: later)
        let error = await #expect(throws: WriterError.self) { _ = try await writer.identify() }
        #expect(error?.kind == .nonRetryable)
        #expect(error?.message.contains("one column") == true)
        #expect(error?.hint?.contains("orders-db.toml") == true)
    }

    // MARK: helpers

    static func contents(ofDirectoryOf path: String) throws -> [String: Data] {
        let directory = (path as NSString).deletingLastPathComponent
        var contents: [String: Data] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: directory) {
            contents[name] = try Data(contentsOf: URL(fileURLWithPath: directory + "/" + name))
        }
        return contents
    }

    static func verifyTemporaries() throws -> Set<String> {
        Set(try FileManager.default.contentsOfDirectory(atPath: FileManager.default.temporaryDirectory.path)
            .filter { $0.hasPrefix("quiesce-verify-") })
    }
}
