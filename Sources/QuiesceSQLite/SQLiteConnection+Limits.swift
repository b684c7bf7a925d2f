import CSQLite
import Foundation
import Synchronization

/// The bounds `limitWaits` installs: read by SQLite's busy and progress callbacks.
final class WaitLimit: Sendable {
    let busyUntil: ContinuousClock.Instant
    let stop: @Sendable () -> Bool
    init(busyUntil: ContinuousClock.Instant, stop: @escaping @Sendable () -> Bool) {
        self.busyUntil = busyUntil
        self.stop = stop
    }
}

/// What SQLite says about a statement, without running it.
public struct StatementShape: Sendable, Equatable {
    /// `sqlite3_stmt_readonly`: the statement does not write to the database.
    public var isReadOnly: Bool
    /// How many columns each result row has (0 for a statement without results).
    public var columnCount: Int
    /// Whether another statement follows the first one (`SELECT 1; DELETE …`).
    public var hasMoreStatements: Bool
}

extension SQLiteConnection {
    /// Bounds lock waits and running statements on this connection, replacing the busy timeout:
    /// a statement that meets a lock retries until `busyUntil` (then fails with SQLITE_BUSY), and
    /// a statement that runs while `stop()` is true fails at once (SQLITE_BUSY while waiting for a
    /// lock, SQLITE_INTERRUPT while running). `stop` is polled from the thread running the
    /// statement, every few milliseconds while waiting: it must be cheap and must not use this
    /// connection. Another thread uses it to cut a wait short (e.g. a thaw arriving while a freeze
    /// still waits for the write lock). `clearWaitLimits()` removes both bounds.
    public func limitWaits(busyUntil: ContinuousClock.Instant, stop: @escaping @Sendable () -> Bool) {
        handle.withLock { db in
            guard let db else { return }
            let limit = WaitLimit(busyUntil: busyUntil, stop: stop)
            let context = Unmanaged.passUnretained(limit).toOpaque()
            sqlite3_busy_handler(db, { context, _ in
                let limit = Unmanaged<WaitLimit>.fromOpaque(context!).takeUnretainedValue()
                if limit.stop() { return 0 }
                let left = limit.busyUntil - ContinuousClock.now
                if left <= .zero { return 0 }
                // Every millisecond: SQLite has no queue for its locks, so a waiter that polls
                // slowly (SQLite's own handler backs off to 100 ms) is starved by an application
                // committing back to back; a few thousand cheap wake-ups are the price.
                let step = Duration.milliseconds(1)
                let (seconds, attoseconds) = min(left, step).components
                usleep(UInt32(max(1, seconds * 1_000_000 + attoseconds / 1_000_000_000_000)))
                return 1
            }, context)
            sqlite3_progress_handler(db, 1000, { context in
                Unmanaged<WaitLimit>.fromOpaque(context!).takeUnretainedValue().stop() ? 1 : 0
            }, context)
            // Keeps the limit alive while SQLite holds a pointer to it (the previous one is released
            // only now that SQLite no longer points to it).
            waitLimit.withLock { $0 = limit }
        }
    }

    /// Removes the bounds set by `limitWaits`: no busy handler (lock conflicts fail at once,
    /// until `setBusyTimeout`) and no interruption.
    public func clearWaitLimits() {
        handle.withLock { db in
            if let db {
                sqlite3_busy_handler(db, nil, nil)
                sqlite3_progress_handler(db, 0, nil, nil)
            }
            waitLimit.withLock { $0 = nil }
        }
    }

    /// Compiles `sql` without running it and says what it is: read-only or not, how many columns,
    /// whether more statements follow. Throws the compile error (syntax, unknown table or column),
    /// including one in a statement that follows the first.
    public func inspect(_ sql: String) throws -> StatementShape {
        try handle.withLock { db in
            guard let db else { throw SQLiteError(operation: sql, code: SQLITE_MISUSE, message: "connection closed") }
            return try sql.withCString { text -> StatementShape in
                var statement: OpaquePointer?
                var tail: UnsafePointer<CChar>?
                let rc = sqlite3_prepare_v2(db, text, -1, &statement, &tail)
                guard rc == SQLITE_OK else {
                    throw SQLiteError(operation: sql, code: rc, message: String(cString: sqlite3_errmsg(db)))
                }
                defer { sqlite3_finalize(statement) }
                var shape = StatementShape(isReadOnly: statement.map { sqlite3_stmt_readonly($0) != 0 } ?? true,
                                           columnCount: Int(statement.map { sqlite3_column_count($0) } ?? 0),
                                           hasMoreStatements: false)
                if let tail, tail.pointee != 0 {
                    var next: OpaquePointer?
                    let rest = sqlite3_prepare_v2(db, tail, -1, &next, nil)
                    defer { sqlite3_finalize(next) }
                    guard rest == SQLITE_OK else {
                        throw SQLiteError(operation: sql, code: rest, message: String(cString: sqlite3_errmsg(db)))
                    }
                    // Only whitespace, comments or `;` after the first statement compile to nothing.
                    shape.hasMoreStatements = next != nil
                }
                return shape
            }
        }
    }
}

extension SQLiteError {
    /// SQLITE_ERROR: the statement itself is wrong (syntax, unknown table or column), not the database.
    public var isStatementError: Bool { code & 0xff == SQLITE_ERROR }
    /// SQLITE_CORRUPT or SQLITE_NOTADB: the file is damaged or not a database.
    public var isCorrupt: Bool { code & 0xff == SQLITE_CORRUPT || code & 0xff == SQLITE_NOTADB }
    /// SQLITE_INTERRUPT: stopped by `limitWaits`' `stop`.
    public var isInterrupted: Bool { code & 0xff == SQLITE_INTERRUPT }
}
