import CSQLite
import Foundation
import Synchronization

/// An SQLite error: what we were doing, SQLite's message and result code.
public struct SQLiteError: Error, Sendable, CustomStringConvertible {
    public var operation: String
    public var code: Int32
    public var message: String
    public var description: String { "\(operation): \(message) (SQLite code \(code))" }
    /// SQLITE_BUSY or SQLITE_LOCKED: someone else holds the lock.
    public var isBusy: Bool { code & 0xff == SQLITE_BUSY || code & 0xff == SQLITE_LOCKED }
}

/// A value read from or bound to a statement.
public enum SQLiteValue: Sendable, Equatable, CustomStringConvertible {
    case null
    case integer(Int64)
    case real(Double)
    case text(String)
    case blob([UInt8])

    public var description: String {
        switch self {
        case .null: "NULL"
        case .integer(let v): "\(v)"
        case .real(let v): "\(v)"
        case .text(let v): v
        case .blob(let v): "x'" + v.map { String(format: "%02x", $0) }.joined() + "'"
        }
    }
    public var int: Int64? { if case .integer(let v) = self { v } else { nil } }
    public var text: String? {
        switch self {
        case .text(let v): v
        case .null: nil
        default: description
        }
    }
}

/// One connection to an SQLite database through the system libsqlite3.
///
/// Calls are serialized by a mutex, so the connection can be shared between tasks;
/// calls block (busy timeouts), so async code should make them through `runBlocking`.
public final class SQLiteConnection: Sendable {
    let handle: Mutex<OpaquePointer?>
    public let path: String
    /// What the handlers installed by `limitWaits` read; only changed while `handle` is locked.
    let waitLimit = Mutex<WaitLimit?>(nil)

    public struct OpenMode: Sendable {
        var flags: Int32
        public static let readWriteCreate = OpenMode(flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
        public static let readWrite = OpenMode(flags: SQLITE_OPEN_READWRITE)
        public static let readOnly = OpenMode(flags: SQLITE_OPEN_READONLY)
    }

    public init(path: String, mode: OpenMode = .readWriteCreate, busyTimeout: Duration? = nil) throws {
        var db: OpaquePointer?
        let rc = sqlite3_open_v2(path, &db, mode.flags | SQLITE_OPEN_NOMUTEX, nil)
        if rc != SQLITE_OK {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? "cannot open"
            sqlite3_close_v2(db)
            throw SQLiteError(operation: "open \(path)", code: rc, message: message)
        }
        sqlite3_extended_result_codes(db, 1)
        if let busyTimeout {
            sqlite3_busy_timeout(db, clampedMilliseconds(busyTimeout))
        }
        self.handle = Mutex(db)
        self.path = path
    }

    deinit {
        handle.withLock { db in
            if let d = db { sqlite3_close_v2(d) }
            db = nil
        }
    }

    /// Closes now (idempotent). Releases every lock this connection holds.
    public func close() {
        handle.withLock { db in
            if let d = db { sqlite3_close_v2(d) }
            db = nil
        }
    }

    public func setBusyTimeout(_ timeout: Duration) {
        handle.withLock { db in _ = sqlite3_busy_timeout(db, clampedMilliseconds(timeout)) }
    }

    /// Runs one or more statements without results.
    public func execute(_ sql: String) throws {
        try handle.withLock { db in
            guard let db else { throw SQLiteError(operation: sql, code: SQLITE_MISUSE, message: "connection closed") }
            var errorMessage: UnsafeMutablePointer<CChar>?
            let rc = sqlite3_exec(db, sql, nil, nil, &errorMessage)
            if rc != SQLITE_OK {
                let message = errorMessage.map { String(cString: $0) } ?? String(cString: sqlite3_errmsg(db))
                sqlite3_free(errorMessage)
                throw SQLiteError(operation: sql, code: rc, message: message)
            }
        }
    }

    /// Runs one statement with bound parameters (`?`), returning every row.
    @discardableResult
    public func query(_ sql: String, _ parameters: [SQLiteValue] = []) throws -> [[SQLiteValue]] {
        try query(sql, parameters, limit: Int.max)
    }

    /// Runs one statement with bound parameters (`?`), returning at most `limit` rows
    /// (the statement is not stepped further: a large result costs no more than `limit` rows).
    public func query(_ sql: String, _ parameters: [SQLiteValue] = [], limit: Int) throws -> [[SQLiteValue]] {
        try handle.withLock { db in
            guard let db else { throw SQLiteError(operation: sql, code: SQLITE_MISUSE, message: "connection closed") }
            var statement: OpaquePointer?
            var rc = sqlite3_prepare_v2(db, sql, -1, &statement, nil)
            guard rc == SQLITE_OK, let statement else {
                throw SQLiteError(operation: sql, code: rc, message: String(cString: sqlite3_errmsg(db)))
            }
            defer { sqlite3_finalize(statement) }
            let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)
            for (index, value) in parameters.enumerated() {
                let i = Int32(index + 1)
                switch value {
                case .null: sqlite3_bind_null(statement, i)
                case .integer(let v): sqlite3_bind_int64(statement, i, v)
                case .real(let v): sqlite3_bind_double(statement, i, v)
                case .text(let v): sqlite3_bind_text(statement, i, v, -1, transient)
                case .blob(let v): sqlite3_bind_blob(statement, i, v, Int32(v.count), transient)
                }
            }
            var rows: [[SQLiteValue]] = []
            while rows.count < limit {
                rc = sqlite3_step(statement)
                if rc == SQLITE_DONE { break }
                guard rc == SQLITE_ROW else {
                    throw SQLiteError(operation: sql, code: rc, message: String(cString: sqlite3_errmsg(db)))
                }
                var row: [SQLiteValue] = []
                for column in 0..<sqlite3_column_count(statement) {
                    switch sqlite3_column_type(statement, column) {
                    case SQLITE_INTEGER: row.append(.integer(sqlite3_column_int64(statement, column)))
                    case SQLITE_FLOAT: row.append(.real(sqlite3_column_double(statement, column)))
                    case SQLITE_TEXT: row.append(.text(String(cString: sqlite3_column_text(statement, column))))
                    case SQLITE_BLOB:
                        let count = Int(sqlite3_column_bytes(statement, column))
                        let bytes = sqlite3_column_blob(statement, column)
                        row.append(.blob(count == 0 ? [] : Array(UnsafeRawBufferPointer(start: bytes, count: count))))
                    default: row.append(.null)
                    }
                }
                rows.append(row)
            }
            return rows
        }
    }

    /// The first column of the first row, or nil.
    public func scalar(_ sql: String, _ parameters: [SQLiteValue] = []) throws -> SQLiteValue? {
        try query(sql, parameters).first?.first
    }

    /// Runs `body` in a transaction (BEGIN IMMEDIATE … COMMIT, ROLLBACK on error).
    public func transaction<T>(_ body: () throws -> T) throws -> T {
        try execute("BEGIN IMMEDIATE")
        do {
            let result = try body()
            try execute("COMMIT")
            return result
        } catch {
            try? execute("ROLLBACK")
            throw error
        }
    }

    /// Whether a transaction is open on this connection.
    public var inTransaction: Bool {
        handle.withLock { db in db.map { sqlite3_get_autocommit($0) == 0 } ?? false }
    }

    public static var libraryVersion: String { String(cString: sqlite3_libversion()) }
}

private func clampedMilliseconds(_ d: Duration) -> Int32 {
    let (seconds, attoseconds) = d.components
    let ms = Double(seconds) * 1000 + Double(attoseconds) / 1e15
    return Int32(max(0, min(ms, Double(Int32.max))))
}
