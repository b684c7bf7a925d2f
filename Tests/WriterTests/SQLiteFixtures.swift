import Foundation
import Logging
import QuiesceConfig
import QuiesceCore
import QuiesceSQLite
import SQLiteWriter
import Synchronization
import Testing

/// A live SQLite database in a temporary directory of its own (standing in for a guest mount),
/// with an `orders` table shaped like the lab's, which the insert workload also writes to. `remove()` deletes it all.
struct SQLiteFixture {
    /// The temporary directory: `live/` is the "guest mount", `copy-N/` the snapshots.
    let root: String
    let live: String
    let database: String
    let mode: String

    static let table = "orders"
    static let countQuery = "SELECT count(*) FROM orders"

    /// `mode`: `wal` or `delete`. Seeds `rows` orders; every connection is closed afterwards
    /// (in WAL mode, the last close checkpoints and removes the WAL).
    init(mode: String, rows: Int = 100) throws {
        var template = Array((FileManager.default.temporaryDirectory.path + "/quiesce-sqlite-test-XXXXXX").utf8CString)
        root = try template.withUnsafeMutableBufferPointer { buffer in
            guard let made = mkdtemp(buffer.baseAddress!) else { throw POSIXFailure("mkdtemp", errno) }
            return String(cString: made)
        }
        live = root + "/live"
        database = live + "/app/orders.db"
        self.mode = mode
        try FileManager.default.createDirectory(atPath: live + "/app", withIntermediateDirectories: true)
        let connection = try SQLiteConnection(path: database, mode: .readWriteCreate)
        defer { connection.close() }
        let journalMode = try connection.scalar("PRAGMA journal_mode = \(mode)")?.text
        #expect(journalMode == mode)
        try connection.execute("""
            CREATE TABLE orders (
                id INTEGER PRIMARY KEY,
                payload TEXT NOT NULL,
                created_at TEXT NOT NULL)
            """)
        try connection.transaction {
            for i in 0..<rows {
                try connection.query("INSERT INTO orders (payload, created_at) VALUES (?, '2026-01-01T00:00:00.000Z')",
                                     [.text("order \(i) " + String(repeating: "o", count: 90))])
            }
        }
    }

    func remove() {
        try? FileManager.default.removeItem(atPath: root)
    }

    /// Another connection of "the application": no busy timeout unless asked.
    func connection(busyTimeout: Duration? = nil) throws -> SQLiteConnection {
        try SQLiteConnection(path: database, mode: .readWrite, busyTimeout: busyTimeout)
    }

    /// The row count, as a reader of the application sees it. Polls for the lock every millisecond:
    /// in rollback-journal mode, the insert workload's back-to-back commits starve a reader that
    /// backs off like SQLite's own busy handler.
    func count() throws -> Int64 {
        let reader = try connection()
        reader.limitWaits(busyUntil: .now + .seconds(10)) { false }
        defer { reader.close() }
        return try reader.scalar(Self.countQuery)?.int ?? -1
    }

    func writer(busyTimeout: Duration = .seconds(2), timeout: Duration = .seconds(10),
                markerQuery: String? = SQLiteFixture.countQuery) -> SQLiteWriter {
        SQLiteWriter(common: CommonWriterSettings(name: "orders-db", type: "sqlite", order: 10, timeout: timeout,
                                                  specFile: "/etc/quiesce/writers.d/orders-db.toml"),
                     database: database, busyTimeout: busyTimeout, markerQuery: markerQuery)
    }

    /// A byte-for-byte copy of `live/` taken by another process (`cp -a`), as a block snapshot
    /// would see it. Copying in this process would drop this process's SQLite locks on the file.
    func snapshot(_ name: String = "copy") throws -> (layout: CopyLayout, database: String) {
        let copy = root + "/" + name
        let result = try ChildProcess.runSync("cp", ["-a", live, copy], timeout: .seconds(30))
        guard result.succeeded else { throw FixtureError(description: "cp -a \(live) \(copy) failed: \(result.stderr)") }
        return (CopyLayout(mounts: [live: copy]), copy + "/app/orders.db")
    }
}

/// The SQLite writer never needs the guard (its lock dies with the process): arming is a test failure.
struct NoDutyGuardian: FreezeGuardian {
    func arm(_ duty: GuardDuty) async throws -> GuardDutyID {
        Issue.record("the sqlite writer armed a guard duty: \(duty)")
        return GuardDutyID(1)
    }
    func disarm(_ id: GuardDutyID) async throws {}
}

func checkpointContext(_ phase: Phase, id: String = "20260101T000000000Z", timeout: Duration = .seconds(10)) -> CheckpointContext {
    CheckpointContext(checkpointID: id, label: "test", phase: phase, deadline: .now + timeout, volumes: [],
                      logger: Logger(label: "sqlite-writer-test"), guardian: NoDutyGuardian())
}

/// A writer spec as the registry would read it from `writers.d/orders-db.toml`, one key per line.
func sqliteSpec(_ entries: [(String, TOMLValue)]) -> WriterSpec {
    var table = TOMLTable()
    for (index, (key, value)) in entries.enumerated() { table.set(key, value, line: index + 1) }
    return WriterSpec(file: "/etc/quiesce/writers.d/orders-db.toml", table: table)
}

/// What the registry does: read the common keys, then hand the reader to the factory.
func makeSQLiteWriter(_ spec: WriterSpec) throws -> SQLiteWriter {
    let reader = SpecReader(spec)
    let common = CommonWriterSettings(name: try reader.string("name"), type: try reader.string("type"),
                                      order: try reader.int("order", default: 0),
                                      timeout: try reader.duration("timeout", default: .seconds(60)),
                                      specFile: spec.file)
    let writer = try SQLiteWriterFactory().make(reader, common: common)
    return try #require(writer as? SQLiteWriter)
}

/// A flag tests flip to stop a workload running on another thread.
final class StopFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    var isSet: Bool { flag.load(ordering: .acquiring) }
    func set() { flag.store(true, ordering: .releasing) }
}

struct FixtureError: Error, CustomStringConvertible {
    var description: String
}
