import Foundation
import QuiesceConfig
import QuiesceCore
import QuiesceSQLite
import Synchronization

/// Builds `sqlite` writers: an SQLite database (WAL or rollback-journal mode) held still by a
/// write transaction on a dedicated connection.
///
/// ```toml
/// name = "orders-db"
/// type = "sqlite"
/// database = "/srv/vm1/app/orders.db"            # absolute path
/// busy_timeout = "5s"                            # how long freeze waits for the write lock (below `timeout`)
/// marker_query = "SELECT count(*) FROM orders"   # optional: one value recorded at freeze, checked on copies
/// order = 10
/// timeout = "30s"
/// ```
///
/// The spec is refused when `busy_timeout` is not below `timeout`, and when `marker_query` is not
/// one read-only statement returning one column (checked against the database now if it exists,
/// otherwise at `identify`).
public struct SQLiteWriterFactory: WriterFactory {
    public let type = "sqlite"
    /// `busy_timeout` when the spec does not say.
    public static let defaultBusyTimeout: Duration = .seconds(5)

    public init() {}

    public func make(_ spec: SpecReader, common: CommonWriterSettings) throws -> any Writer {
        let database = try spec.path("database")
        let busyTimeout = try spec.duration("busy_timeout", default: Self.defaultBusyTimeout)
        let markerQuery = try spec.optionalString("marker_query")
        try spec.finish()

        if busyTimeout >= common.timeout {
            let what = spec.spec.table["busy_timeout"] == nil
                ? "the default busy_timeout (\(formatDuration(busyTimeout)))" : "busy_timeout (\(formatDuration(busyTimeout)))"
            throw spec.error("busy_timeout", "\(what) must be below timeout (\(formatDuration(common.timeout))): "
                + "freeze must give up waiting for the write lock, with a clear error, before the coordinator gives up on the writer "
                + "(set busy_timeout lower or timeout higher)")
        }
        if let markerQuery {
            if let problem = MarkerQuery.problem(text: markerQuery) {
                throw spec.error("marker_query", "\(problem), e.g. \"\(MarkerQuery.example)\"")
            }
            // Against the database when it is there; otherwise `identify` checks it.
            if SQLiteWriter.fileExists(database) {
                do {
                    let connection = try SQLiteWriter.open(database, mode: .readOnly, waitingAtMost: .seconds(1))
                    defer { connection.close() }
                    if let problem = try MarkerQuery.problem(markerQuery, on: connection) {
                        throw spec.error("marker_query", "\(problem), e.g. \"\(MarkerQuery.example)\"")
                    }
                } catch is SQLiteError {
                    // Locked, unreadable or not a database: `identify` reports it with the path.
                }
            }
        }
        return SQLiteWriter(common: common, database: database, busyTimeout: busyTimeout, markerQuery: markerQuery)
    }
}

/// An SQLite database as a writer.
///
/// - identify: the database file and its `-wal`, `-shm`, `-journal` siblings.
/// - prepare: opens a dedicated connection (read-write, never creating the file) and runs
///   `PRAGMA wal_checkpoint(PASSIVE)`, so the WAL is small before the freeze (a no-op in
///   rollback-journal mode).
/// - freeze: `BEGIN IMMEDIATE` on that connection, waiting at most `busy_timeout` for the write
///   lock. The application's other writers then wait for the lock, its readers go on. Once it is
///   held no other connection can be mid-commit, so the database file (and in WAL mode its `-wal`)
///   is consistent on disk. Records `page_count`, `journal_mode`, the `marker_query` result (read
///   inside the transaction) and the path.
/// - thaw: `ROLLBACK` and close the connection, always, even after a failed or abandoned freeze.
/// - verify: `PRAGMA integrity_check` on the copy, no hot journal, and the marker matches.
///
/// The write lock is a POSIX lock of this process: it disappears with the process, so no duty is
/// handed to the freeze guard. For the same reason this writer never opens the database file
/// other than through SQLite (closing any descriptor of the file drops every lock this process holds
/// on it); it only `stat`s it.
public final class SQLiteWriter: Writer {
    public let name: String
    public let type = "sqlite"
    public let order: Int
    public let timeout: Duration
    /// The live database's absolute path.
    public let database: String
    /// The longest freeze waits for the write lock.
    public let busyTimeout: Duration
    /// The owner's query whose single value is recorded at freeze, if any.
    public let markerQuery: String?
    let specFile: String

    /// The dedicated connection of the checkpoint in progress.
    private struct State {
        var session: FreezeSession?
        /// The last checkpoint thawed: a freeze of it arriving late (abandoned by the
        /// coordinator) must not take the lock again.
        var thawedCheckpoint: String?
    }
    private let state = Mutex(State())

    /// Marker keys.
    static let databaseKey = "database"
    static let pageCountKey = "page_count"
    static let journalModeKey = "journal_mode"
    static let markerQueryKey = "marker_query"
    static let markerResultKey = "marker_result"

    /// A writer for `database`. The factory validates the spec; this does not (`busyTimeout`
    /// must be below `common.timeout`, `markerQuery` one read-only statement returning one value).
    public init(common: CommonWriterSettings, database: String, busyTimeout: Duration = SQLiteWriterFactory.defaultBusyTimeout,
                markerQuery: String? = nil) {
        self.name = common.name
        self.order = common.order
        self.timeout = common.timeout
        self.specFile = common.specFile
        self.database = database
        self.busyTimeout = busyTimeout
        self.markerQuery = markerQuery
    }

    private var subject: String { "database \(database)" }
    private var specPlace: String { specFile.isEmpty ? "the writer's spec" : specFile }

    // MARK: identify

    public func identify() async throws -> WriterFootprint {
        try await runBlocking { [self] in
            try checkDatabaseFile()
            if let markerQuery { try checkMarkerQuery(markerQuery) }
        }
        return WriterFootprint(paths: [database, database + "-wal", database + "-shm", database + "-journal"])
    }

    /// `stat` only: opening the file outside SQLite would drop this process's SQLite locks on it.
    private func checkDatabaseFile() throws {
        var info = stat()
        guard stat(database, &info) == 0 else {
            let code = errno
            if code == ENOENT {
                throw WriterError(.nonRetryable, "\(subject) does not exist",
                                  hint: "check `database` in \(specPlace), or create the database before registering it")
            }
            throw WriterError(.nonRetryable, "cannot stat \(subject): \(String(cString: strerror(code)))",
                              hint: "quiesce must be able to read and write the database and its directory")
        }
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw WriterError(.nonRetryable, "\(subject) is not a regular file",
                              hint: "`database` in \(specPlace) must name the database file itself")
        }
    }

    private func checkMarkerQuery(_ query: String) throws {
        do {
            let connection = try Self.open(database, mode: .readOnly, waitingAtMost: busyTimeout)
            defer { connection.close() }
            if let problem = try MarkerQuery.problem(query, on: connection) {
                throw WriterError(.nonRetryable, "marker_query \"\(query)\" \(problem)",
                                  hint: "fix marker_query in \(specPlace): one SELECT returning one value, e.g. \"\(MarkerQuery.example)\"")
            }
        } catch let error as SQLiteError {
            throw describe(error, doing: "checking marker_query on")
        }
    }

    // MARK: prepare

    public func prepare(_ context: CheckpointContext) async throws {
        let session = try await runBlocking { [self] in try openSession(context) }
        let stale = state.withLock { state -> FreezeSession? in
            defer { state.session = session }
            return state.session
        }
        if let stale {
            stale.cancel()
            _ = try? await runBlocking { stale.release() }
        }
    }

    /// Opens the dedicated connection, shrinks the WAL, and runs the marker query once (outside the
    /// freeze, so a query returning several rows vetoes here rather than at freeze).
    private func openSession(_ context: CheckpointContext) throws -> FreezeSession {
        let connection: SQLiteConnection
        do {
            connection = try Self.open(database, mode: .readWrite, waitingAtMost: min(busyTimeout, context.remaining))
        } catch let error as SQLiteError {
            throw describe(error, doing: "opening")
        }
        do {
            let checkpoint = try connection.query("PRAGMA wal_checkpoint(PASSIVE)").first ?? []
            let mode = try connection.scalar("PRAGMA journal_mode")?.text ?? "?"
            if mode == "wal", checkpoint.count == 3 {
                context.logger.debug("passive WAL checkpoint", metadata: [
                    "database": "\(database)", "wal_frames": "\(checkpoint[1])", "checkpointed": "\(checkpoint[2])",
                ])
            }
            if let markerQuery {
                _ = try markerValue(markerQuery, on: connection)
            }
            connection.clearWaitLimits()
        } catch {
            connection.close()
            if let error = error as? SQLiteError { throw describe(error, doing: "preparing") }
            throw error
        }
        return FreezeSession(checkpointID: context.checkpointID, connection: connection)
    }

    // MARK: freeze

    public func freeze(_ context: CheckpointContext) async throws -> ConsistencyMarker {
        let session = try await runBlocking { [self] in try dedicatedSession(for: context) }
        return try await runBlocking { [self] in try holdWriteLock(session, context) }
    }

    /// The session prepared for this checkpoint, or a new one (prepare not called, or for another run).
    private func dedicatedSession(for context: CheckpointContext) throws -> FreezeSession {
        let id = context.checkpointID
        enum Found { case session(FreezeSession), thawed, none }
        let found = state.withLock { state -> Found in
            if state.thawedCheckpoint == id { return .thawed }
            if let session = state.session, session.checkpointID == id { return .session(session) }
            return .none
        }
        switch found {
        case .session(let session): return session
        case .thawed: throw abandoned()
        case .none: break
        }
        let session = try openSession(context)
        let (stale, thawed) = state.withLock { state -> (FreezeSession?, Bool) in
            // Thaw may have come while the connection was opening: then it must not be used.
            if state.thawedCheckpoint == id { return (nil, true) }
            defer { state.session = session }
            return (state.session, false)
        }
        if let stale { stale.cancel(); stale.release() }
        if thawed {
            session.release()
            throw abandoned()
        }
        return session
    }

    private func abandoned() -> WriterError {
        WriterError(.timedOut, "freeze of \(subject) was abandoned: thaw came before it finished, and the write lock is not held")
    }

    /// BEGIN IMMEDIATE within min(busy_timeout, time left), then the marker, inside the transaction.
    private func holdWriteLock(_ session: FreezeSession, _ context: CheckpointContext) throws -> ConsistencyMarker {
        let connection = session.connection
        let deadline = context.deadline
        let started = ContinuousClock.now
        let wait = min(busyTimeout, context.remaining)
        connection.limitWaits(busyUntil: started + wait) { session.isCancelled || ContinuousClock.now >= deadline }
        defer { connection.clearWaitLimits() }
        guard !session.isCancelled else { throw abandoned() }

        do {
            try connection.execute("BEGIN IMMEDIATE")
        } catch let error as SQLiteError where error.isBusy {
            if session.isCancelled { throw abandoned() }
            let waited = formatDuration(ContinuousClock.now - started)
            let limit = wait < busyTimeout
                ? "the \(formatDuration(wait)) left before the freeze deadline (busy_timeout is \(formatDuration(busyTimeout)))"
                : "busy_timeout (\(formatDuration(busyTimeout)))"
            throw WriterError(.timedOut,
                "\(subject): could not take the write lock after \(waited): another connection held a write transaction "
                + "(or back-to-back ones) for longer than \(limit); the application's writes were not blocked and nothing was snapshotted",
                hint: "raise busy_timeout in \(specPlace) (it must stay below timeout, \(formatDuration(timeout))), "
                + "or find the application's long-running write transaction")
        } catch let error as SQLiteError {
            if session.isCancelled { throw abandoned() }
            throw describe(error, doing: "locking")
        }

        do {
            var marker = ConsistencyMarker()
            marker[Self.databaseKey] = database
            marker[Self.pageCountKey] = try connection.scalar("PRAGMA page_count")?.description ?? "?"
            marker[Self.journalModeKey] = try connection.scalar("PRAGMA journal_mode")?.text ?? "?"
            if let markerQuery {
                marker[Self.markerQueryKey] = markerQuery
                marker[Self.markerResultKey] = try markerValue(markerQuery, on: connection)
            }
            if session.isCancelled { throw abandoned() }
            context.logger.info("write lock held", metadata: [
                "database": "\(database)", "waited_ms": "\(Int((ContinuousClock.now - started).milliseconds))",
                "marker": "\(marker.summary)",
            ])
            return marker
        } catch {
            // Do not keep other writers waiting for a freeze that failed: thaw will close the rest.
            connection.clearWaitLimits()
            try? connection.execute("ROLLBACK")
            if session.isCancelled { throw abandoned() }
            if let error = error as? SQLiteError {
                if error.isInterrupted {
                    throw WriterError(.timedOut, "\(subject): reading the marker (page_count, journal_mode, marker_query) did not finish before the freeze deadline",
                                      hint: "marker_query runs inside the freeze window: make it cheaper (an indexed count, a max(id)) in \(specPlace)")
                }
                throw describe(error, doing: "recording the marker of")
            }
            throw error
        }
    }

    /// The marker query's single value, as text.
    func markerValue(_ query: String, on connection: SQLiteConnection) throws -> String {
        let rows = try connection.query(query, limit: 2)
        guard rows.count <= 1 else {
            throw WriterError(.nonRetryable, "marker_query \"\(query)\" returned more than one row",
                              hint: "fix marker_query in \(specPlace): it must return a single value, e.g. \"\(MarkerQuery.example)\"")
        }
        return rows.first?.first?.description ?? SQLiteValue.null.description
    }

    // MARK: thaw

    public func thaw(_ context: CheckpointContext, outcome: CheckpointOutcome) async throws {
        let session = state.withLock { state -> FreezeSession? in
            state.thawedCheckpoint = context.checkpointID
            defer { state.session = nil }
            return state.session
        }
        guard let session else { return }
        // Cuts short a freeze still waiting for the lock; then ROLLBACK and close.
        session.cancel()
        let problem = try await runBlocking { session.release() }
        if let problem {
            context.logger.warning("ROLLBACK failed; the connection was closed, which releases the lock",
                                   metadata: ["database": "\(database)", "error": "\(problem)"])
        }
    }

    // MARK: errors

    /// A WriterError for an SQLite failure while `doing` something to the database.
    func describe(_ error: SQLiteError, doing: String) -> WriterError {
        if error.isBusy {
            return WriterError(.retryable, "\(doing) \(subject): the database stayed locked for busy_timeout (\(formatDuration(busyTimeout))): \(error.message)",
                               hint: "retry; if it persists, find the application's long-running transaction or raise busy_timeout in \(specPlace)")
        }
        if error.isCorrupt {
            return WriterError(.nonRetryable, "\(doing) \(subject): \(error.message)",
                               hint: "the file is damaged or not an SQLite database: check `database` in \(specPlace) and run PRAGMA integrity_check")
        }
        return WriterError(.nonRetryable, "\(doing) \(subject): \(error.message) (SQLite code \(error.code))",
                           hint: "quiesce needs read-write access to the database, its directory and its -wal/-shm files")
    }

    /// A connection whose lock waits, all together, end after `wait`. It polls for locks every
    /// millisecond: SQLite's own busy handler backs off to 100 ms and loses the lock, again and
    /// again, to an application committing back to back.
    static func open(_ path: String, mode: SQLiteConnection.OpenMode, waitingAtMost wait: Duration) throws -> SQLiteConnection {
        let connection = try SQLiteConnection(path: path, mode: mode)
        connection.limitWaits(busyUntil: .now + wait) { false }
        return connection
    }

    static func fileExists(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0
    }
}

/// One checkpoint's dedicated connection. Thaw cancels it (cutting short any wait) and releases it.
final class FreezeSession: Sendable {
    let checkpointID: String
    let connection: SQLiteConnection
    private let cancelled = Atomic<Bool>(false)

    init(checkpointID: String, connection: SQLiteConnection) {
        self.checkpointID = checkpointID
        self.connection = connection
    }

    var isCancelled: Bool { cancelled.load(ordering: .acquiring) }
    func cancel() { cancelled.store(true, ordering: .releasing) }

    /// ROLLBACK if a transaction is open, then close (which releases every lock in any case).
    /// Blocking: waits for a statement still running on the connection, which a cancelled
    /// session's limits end within milliseconds. Idempotent. Returns the ROLLBACK error, if any.
    @discardableResult
    func release() -> String? {
        connection.clearWaitLimits()
        var problem: String?
        if connection.inTransaction {
            do { try connection.execute("ROLLBACK") } catch { problem = "\(error)" }
        }
        connection.close()
        return problem
    }
}
