import Foundation
import QuiesceSQLite

/// A small application-like write load for an SQLite database: one row per transaction, on a
/// connection of its own, retrying when the database is locked — as a real application does
/// while the `sqlite` writer holds the write lock. Used by the lab demo and integration tests,
/// usually in a process of its own.
public enum SQLiteInsertWorkload {
    /// Inserts rows into `table` of the existing database at `database`, one transaction each,
    /// until `stop()` returns true; returns how many rows it committed.
    ///
    /// Creates the table if it is missing, as
    /// `(id INTEGER PRIMARY KEY, payload TEXT NOT NULL, created_at TEXT NOT NULL)`; an existing
    /// table needs `payload` and `created_at` text columns, and defaults for any others.
    /// `created_at` is the commit's UTC time to the millisecond (`2026-11-25T11:40:12.345Z`).
    /// Each transaction waits up to `busyTimeout` for the lock; when that runs out it is rolled
    /// back and tried again after a short pause (a busy database is not an error). `stop` is
    /// checked between transactions, so it takes effect within one `busyTimeout`.
    /// Throws any other failure (missing database, bad table, disk full).
    public static func run(database: String, table: String, busyTimeout: Duration,
                           until stop: @Sendable () -> Bool) throws -> Int {
        guard !table.isEmpty, table.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }),
              !table.first!.isNumber else {
            throw WorkloadError(description: "insert workload: table name \"\(table)\" must be letters, digits and _ (not starting with a digit)")
        }
        let connection: SQLiteConnection
        do {
            connection = try SQLiteConnection(path: database, mode: .readWrite, busyTimeout: busyTimeout)
        } catch {
            throw WorkloadError(description: "insert workload: cannot open \(database) (it must exist): \(error)")
        }
        defer { connection.close() }

        try retryingWhileBusy(connection, until: stop) {
            try connection.execute("""
                CREATE TABLE IF NOT EXISTS "\(table)" (
                    id INTEGER PRIMARY KEY,
                    payload TEXT NOT NULL,
                    created_at TEXT NOT NULL)
                """)
        }

        let insert = "INSERT INTO \"\(table)\" (payload, created_at) VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
        let filler = String(repeating: "x", count: 96)
        var committed = 0
        while !stop() {
            let done = try retryingWhileBusy(connection, until: stop) {
                try connection.execute("BEGIN IMMEDIATE")
                try connection.query(insert, [.text("row \(committed + 1) pid \(getpid()) \(filler)")])
                try connection.execute("COMMIT")
            }
            if done { committed += 1 }
            // Think time, as an application serving requests has: without it one process
            // re-takes the lock at once and its peers, backing off in SQLite's busy handler, starve.
            usleep(UInt32.random(in: 500...2_000))
        }
        return committed
    }

    /// Runs `body` until it succeeds (true) or `stop()` (false), rolling back and pausing 5–20 ms
    /// after each SQLITE_BUSY.
    @discardableResult
    private static func retryingWhileBusy(_ connection: SQLiteConnection, until stop: @Sendable () -> Bool,
                                          _ body: () throws -> Void) throws -> Bool {
        while !stop() {
            do {
                try body()
                return true
            } catch let error as SQLiteError where error.isBusy {
                if connection.inTransaction { try? connection.execute("ROLLBACK") }
                usleep(UInt32.random(in: 5_000...20_000))
            } catch {
                if connection.inTransaction { try? connection.execute("ROLLBACK") }
                throw WorkloadError(description: "insert workload on \(connection.path): \(error)")
            }
        }
        return false
    }
}

struct WorkloadError: Error, CustomStringConvertible {
    var description: String
}
