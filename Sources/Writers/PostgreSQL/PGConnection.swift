import CLibPQ
import Foundation
import QuiesceCore
import Synchronization

/// A failure reported by libpq or the server: the server's message and, for errors the
/// server raised, its SQLSTATE (`28P01`, `42501`, …).
struct PGError: Error, Sendable, CustomStringConvertible {
    enum Stage: Sendable { case connect, query }
    var stage: Stage
    /// The primary message (libpq's text for connection failures), trimmed.
    var message: String
    /// Five-character SQLSTATE, when the server sent one.
    var sqlState: String?

    var description: String { sqlState.map { "\(message) (SQLSTATE \($0))" } ?? message }

    /// Wrong password, or none supplied where one is required.
    var isAuthenticationFailure: Bool {
        sqlState == "28P01" || sqlState == "28000"
            || message.contains("password authentication failed")
            || message.contains("no password supplied")
            || message.contains("authentication failed")
    }

    /// The server could not be reached at all (nothing listening, no socket, no route).
    var isUnreachable: Bool {
        stage == .connect && !isAuthenticationFailure
            && ["Connection refused", "No such file or directory", "could not connect", "timeout expired",
                "could not translate host name", "No route to host", "Network is unreachable"]
                .contains { message.contains($0) }
    }

    var isInsufficientPrivilege: Bool { sqlState == "42501" }
    /// The session is gone (server shut down, backend terminated, socket closed).
    var isConnectionLost: Bool {
        sqlState.map { $0.hasPrefix("08") || $0 == "57P01" || $0 == "57P02" || $0 == "57P03" } ?? false
            || message.contains("server closed the connection")
            || message.contains("no connection to the server")
            || message.contains("terminating connection")
            || message.contains("connection to server was lost")
    }
}

/// One libpq connection, text results only. Blocking: use it through `runBlocking`, never on
/// the cooperative pool. Calls are serialized; `cancel()` may be called from any thread to cut
/// short the statement in progress.
final class PGConnection: @unchecked Sendable {
    private let connection: OpaquePointer
    private let canceller: OpaquePointer?
    private let lock = NSLock()
    private let closed = Atomic<Bool>(false)

    /// Connects with `conninfo` (a libpq connection string or URI), giving up after
    /// `connectTimeout` (whole seconds, at least 2, as libpq counts them). `passfile` overrides
    /// `PGPASSFILE`; `statementTimeout` is set for the session.
    init(conninfo: String, connectTimeout: Duration, passfile: String?, statementTimeout: Duration?,
         applicationName: String = "quiesce") throws {
        var keywords = ["dbname", "connect_timeout", "application_name", "fallback_application_name"]
        var values = [conninfo, "\(max(2, Int(connectTimeout.seconds.rounded(.up))))", applicationName, applicationName]
        if let passfile {
            keywords.append("passfile")
            values.append(passfile)
        }
        if let statementTimeout {
            keywords.append("options")
            values.append("-c statement_timeout=\(max(1, Int(statementTimeout.milliseconds)))")
        }
        let keywordPointers = keywords.map { strdup($0) } + [nil]
        let valuePointers = values.map { strdup($0) } + [nil]
        defer {
            keywordPointers.forEach { free($0) }
            valuePointers.forEach { free($0) }
        }
        // expand_dbname = 1: the first "dbname" is parsed as a connection string; later keywords override it.
        let k: [UnsafePointer<CChar>?] = keywordPointers.map { $0.map { UnsafePointer($0) } }
        let v: [UnsafePointer<CChar>?] = valuePointers.map { $0.map { UnsafePointer($0) } }
        let made = PQconnectdbParams(k, v, 1)
        guard let made else { throw PGError(stage: .connect, message: "libpq could not allocate a connection") }
        guard PQstatus(made) == CONNECTION_OK else {
            let message = Self.trim(String(cString: PQerrorMessage(made)))
            PQfinish(made)
            throw PGError(stage: .connect, message: message)
        }
        // libpq prints server notices (WARNING, NOTICE) to stderr by default: not in quiesce's output.
        PQsetNoticeProcessor(made, { _, _ in }, nil)
        connection = made
        canceller = PQgetCancel(made)
    }

    deinit { close() }

    /// Ends the session (the server rolls back anything open and ends a backup it started). Idempotent.
    func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        lock.lock()
        defer { lock.unlock() }
        if let canceller { PQfreeCancel(canceller) }
        PQfinish(connection)
    }

    var isClosed: Bool { closed.load(ordering: .acquiring) }

    /// The server's version as an integer (150004 for 15.4).
    var serverVersion: Int32 {
        lock.lock()
        defer { lock.unlock() }
        return PQserverVersion(connection)
    }

    /// Asks the server to cancel the statement in progress, if any. Safe from any thread.
    func cancel() {
        guard !isClosed, let canceller else { return }
        var buffer = [CChar](repeating: 0, count: 256)
        _ = PQcancel(canceller, &buffer, Int32(buffer.count))
    }

    /// Runs one statement with text parameters; returns its rows (nil for SQL NULL).
    @discardableResult
    func query(_ sql: String, _ parameters: [String?] = []) throws -> [[String?]] {
        guard !isClosed else { throw PGError(stage: .query, message: "no connection to the server (the session was closed)") }
        lock.lock()
        defer { lock.unlock() }
        let pointers = parameters.map { $0.map { strdup($0) } ?? nil }
        defer { pointers.forEach { free($0) } }
        let values: [UnsafePointer<CChar>?] = pointers.map { $0.map { UnsafePointer($0) } }
        let result = PQexecParams(connection, sql, Int32(parameters.count), nil, parameters.isEmpty ? nil : values, nil, nil, 0)
        guard let result else {
            throw PGError(stage: .query, message: Self.trim(String(cString: PQerrorMessage(connection))))
        }
        defer { PQclear(result) }
        let status = PQresultStatus(result)
        guard status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK else {
            let primary = PQresultErrorField(result, Int32(UInt8(ascii: "M"))).map { String(cString: $0) }
            let state = PQresultErrorField(result, Int32(UInt8(ascii: "C"))).map { String(cString: $0) }
            let message = primary ?? Self.trim(String(cString: PQerrorMessage(connection)))
            throw PGError(stage: .query, message: message.isEmpty ? "the statement failed (\(String(cString: PQresStatus(status))))" : message,
                          sqlState: state)
        }
        var rows: [[String?]] = []
        let columns = PQnfields(result)
        for row in 0..<PQntuples(result) {
            rows.append((0..<columns).map { column in
                PQgetisnull(result, row, column) != 0 ? nil : String(cString: PQgetvalue(result, row, column))
            })
        }
        return rows
    }

    /// The first column of the first row.
    func scalar(_ sql: String, _ parameters: [String?] = []) throws -> String? {
        try query(sql, parameters).first?.first ?? nil
    }

    static func trim(_ text: String) -> String {
        text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }.joined(separator: "; ")
    }
}

/// A WAL position, `16/B374D848`, comparable.
struct LSN: Comparable, Sendable, CustomStringConvertible {
    var value: UInt64
    init?(_ text: String) {
        let parts = text.split(separator: "/")
        guard parts.count == 2, let high = UInt64(parts[0], radix: 16), let low = UInt64(parts[1], radix: 16),
              high <= UInt64(UInt32.max), low <= UInt64(UInt32.max) else { return nil }
        value = high << 32 | low
    }
    static func < (a: LSN, b: LSN) -> Bool { a.value < b.value }
    var description: String { String(format: "%X/%X", UInt32(value >> 32), UInt32(value & 0xffff_ffff)) }
}
