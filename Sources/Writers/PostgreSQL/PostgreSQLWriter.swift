import Foundation
import QuiesceConfig
import QuiesceCore
import Synchronization

/// Builds `postgresql` writers: a PostgreSQL cluster reached through libpq.
///
/// ```toml
/// name = "pg-main"
/// type = "postgresql"
/// conninfo = "host=/var/run/postgresql port=5432 dbname=postgres user=quiesce"   # never a password
/// passfile = "/etc/quiesce/pg-main.pgpass"       # optional; or PGPASSFILE / PGPASSWORD in the environment
/// data_directory = "/srv/vm1/var/lib/postgresql/15/main"   # optional: the data directory as quiesce sees it
/// mode = "checkpoint"                            # or "backup-label"
/// statement_timeout = "30s"                      # for every statement quiesce runs (CHECKPOINT included)
/// order = 10
/// timeout = "60s"
/// ```
///
/// A `conninfo` holding `password=` (or a URI with a password) is refused: writer specs may be
/// readable by others, passwords belong in a passfile (mode 0600) or the environment.
public struct PostgreSQLWriterFactory: WriterFactory {
    public let type = "postgresql"
    /// `statement_timeout` when the spec does not say.
    public static let defaultStatementTimeout: Duration = .seconds(30)

    public init() {}

    public func make(_ spec: SpecReader, common: CommonWriterSettings) throws -> any Writer {
        let conninfo = try spec.string("conninfo")
        let passfile = try spec.optionalString("passfile")
        let dataDirectory = try spec.optionalString("data_directory")
        let modeText = try spec.optionalString("mode") ?? PostgreSQLWriter.Mode.checkpoint.rawValue
        let statementTimeout = try spec.duration("statement_timeout", default: Self.defaultStatementTimeout)
        try spec.finish()

        if Self.containsPassword(conninfo) {
            throw spec.error("conninfo", "must not contain a password (writer specs are configuration, not secrets): "
                             + "remove it and put it in a passfile (mode 0600) named by `passfile`, or in PGPASSFILE or PGPASSWORD "
                             + "in quiesce's environment")
        }
        if let passfile, !passfile.hasPrefix("/") {
            throw spec.error("passfile", "must be an absolute path, found \"\(passfile)\"")
        }
        if let dataDirectory, !dataDirectory.hasPrefix("/") {
            throw spec.error("data_directory", "must be an absolute path, found \"\(dataDirectory)\"")
        }
        guard let mode = PostgreSQLWriter.Mode(rawValue: modeText) else {
            throw spec.error("mode", "expected \"checkpoint\" or \"backup-label\", found \"\(modeText)\"")
        }
        guard statementTimeout > .zero else {
            throw spec.error("statement_timeout", "must be above zero (it bounds every statement quiesce runs)")
        }
        return PostgreSQLWriter(common: common, conninfo: conninfo, passfile: passfile, dataDirectory: dataDirectory,
                                mode: mode, statementTimeout: statementTimeout)
    }

    /// `password=…` in a key/value string, or `user:password@` in a URI.
    static func containsPassword(_ conninfo: String) -> Bool {
        let lowered = conninfo.lowercased()
        if lowered.hasPrefix("postgresql://") || lowered.hasPrefix("postgres://") {
            let rest = lowered.drop { $0 != "/" }.dropFirst(2)
            let authority = rest.prefix { $0 != "/" && $0 != "?" }
            if let at = authority.lastIndex(of: "@"), authority[..<at].contains(":") { return true }
            return lowered.contains("password=")
        }
        return lowered.range(of: #"(^|\s)password\s*="#, options: .regularExpression) != nil
    }
}

/// A PostgreSQL cluster as a writer.
///
/// - identify: connects and asks the server for `data_directory` (needs `pg_read_all_settings`),
///   resolves `pg_wal` through its symlink and reads every tablespace's location; all of them
///   are the footprint, so the coordinator refuses a snapshot set that misses one (PostgreSQL
///   requires one simultaneous snapshot of all of them).
/// - prepare: `CHECKPOINT` (needs `pg_checkpoint`): the slow flush happens outside the freeze, so
///   the snapshot needs little redo.
/// - freeze, `checkpoint` mode: opens (or keeps) a session and records `pg_current_wal_lsn()`,
///   the timeline and the server version. The atomic block snapshot is then a crash-consistent
///   image taken right after a checkpoint: PostgreSQL starts on it with ordinary crash recovery.
/// - freeze, `backup-label` mode: `pg_backup_start(label, fast => true)` in the held session.
/// - thaw: `pg_backup_stop(wait_for_archive => false)` in `backup-label` mode, keeping the
///   `labelfile`, `spcmapfile` and stop LSN; then ends the session. A session lost during the
///   freeze is reported here (the server ended the backup itself when it lost the session).
/// - postSnapshot: in `backup-label` mode, the label and tablespace map, byte for byte, as
///   recovery metadata (never written into the live data directory).
/// - verify: starts `postgres` on the copy as the `postgres` user with no TCP listener, waits for
///   it, checks it is not in recovery and its WAL position is at least the marker, runs
///   `pg_amcheck`, reports how it recovered, and stops it.
///
/// Everything the writer holds is a database session: it dies with this process, and the server
/// then ends a backup in progress by itself, so nothing is handed to the freeze guard.
public final class PostgreSQLWriter: Writer {
    /// How the freeze makes the snapshot recoverable.
    public enum Mode: String, Sendable {
        /// CHECKPOINT at prepare, the WAL position at freeze: a crash-consistent snapshot.
        case checkpoint
        /// `pg_backup_start`/`pg_backup_stop` around the snapshot, keeping the backup label:
        /// for a DR site that restores from a WAL archive.
        case backupLabel = "backup-label"
    }

    public let name: String
    public let type = "postgresql"
    public let order: Int
    public let timeout: Duration
    /// The libpq connection string (no password).
    public let conninfo: String
    public let passfile: String?
    /// The data directory as quiesce sees it, when it differs from the server's view (a guest's
    /// filesystem mounted elsewhere); nil: the server's `data_directory`.
    public let dataDirectory: String?
    public let mode: Mode
    public let statementTimeout: Duration
    let specFile: String

    private struct State {
        var session: Session?
        var thawedCheckpoint: String?
        /// What `pg_backup_stop` returned, for `postSnapshot`.
        var backup: (checkpointID: String, metadata: RecoveryMetadata)?
        /// Why the backup metadata is missing, for `postSnapshot`.
        var backupProblem: (checkpointID: String, problem: String)?
    }
    private let state = Mutex(State())

    /// Marker keys.
    static let lsnKey = "lsn"
    static let timelineKey = "timeline"
    static let serverVersionKey = "server_version"
    static let dataDirectoryKey = "data_directory"
    static let modeKey = "mode"
    static let backupLabelKey = "backup_label"
    /// Recovery metadata file names.
    public static let labelFile = "backup_label"
    public static let tablespaceMapFile = "tablespace_map"
    public static let stopLSNFile = "backup_stop_lsn"

    public init(common: CommonWriterSettings, conninfo: String, passfile: String? = nil, dataDirectory: String? = nil,
                mode: Mode = .checkpoint, statementTimeout: Duration = PostgreSQLWriterFactory.defaultStatementTimeout) {
        self.name = common.name
        self.order = common.order
        self.timeout = common.timeout
        self.specFile = common.specFile
        self.conninfo = conninfo
        self.passfile = passfile
        self.dataDirectory = dataDirectory
        self.mode = mode
        self.statementTimeout = statementTimeout
    }

    var specPlace: String { specFile.isEmpty ? "the writer's spec" : specFile }
    var subject: String { "PostgreSQL server (\(conninfo))" }

    // MARK: connecting

    /// A new session, with errors that say what to fix.
    func connect(within limit: Duration) throws -> PGConnection {
        do {
            return try PGConnection(conninfo: conninfo, connectTimeout: min(limit, .seconds(30)), passfile: passfile,
                                    statementTimeout: statementTimeout, applicationName: "quiesce \(name)")
        } catch let error as PGError {
            throw describe(error, doing: "connecting to")
        }
    }

    /// A WriterError for a libpq or server failure.
    func describe(_ error: PGError, doing: String) -> WriterError {
        if error.isAuthenticationFailure {
            let source = passfile.map { "the passfile \($0)" } ?? "PGPASSFILE, PGPASSWORD or ~/.pgpass of the user running quiesce"
            return WriterError(.nonRetryable, "\(doing) \(subject): authentication failed: \(error.message)",
                               hint: "wrong or missing password: fix the entry for this host, port, database and user in \(source) "
                               + "(format host:port:database:user:password, mode 0600), or the role's password on the server "
                               + "(ALTER ROLE … PASSWORD), and check pg_hba.conf")
        }
        if error.isUnreachable {
            return WriterError(.retryable, "\(doing) \(subject): the server is unreachable: \(error.message)",
                               hint: "start the server, or fix host/port in conninfo in \(specPlace) "
                               + "(for a Unix socket, host is the socket's directory, e.g. /var/run/postgresql)")
        }
        if error.isInsufficientPrivilege {
            return WriterError(.nonRetryable, "\(doing) \(subject): permission denied: \(error.message)",
                               hint: "grant the writer's role what it needs: GRANT pg_checkpoint, pg_read_all_settings TO <role>; "
                               + "and for mode = \"backup-label\" GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), "
                               + "pg_backup_stop(boolean) TO <role> (see docs/writers.md)")
        }
        if error.isConnectionLost {
            return WriterError(.retryable, "\(doing) \(subject): the connection was lost: \(error.message)",
                               hint: "the server restarted or terminated quiesce's session: check the server's log, then retry")
        }
        if error.sqlState == "57014" {
            return WriterError(.timedOut, "\(doing) \(subject): the statement was cancelled (statement_timeout is "
                               + "\(formatDuration(statementTimeout)), or the writer's deadline passed): \(error.message)",
                               hint: "raise statement_timeout or timeout in \(specPlace), or look at the server's I/O")
        }
        return WriterError(.nonRetryable, "\(doing) \(subject): \(error)",
                           hint: "check the server's log and the writer's spec \(specPlace)")
    }

    /// Runs `body` on a fresh session, closed afterwards.
    func withSession<T>(within limit: Duration, doing: String, _ body: (PGConnection) throws -> T) throws -> T {
        let connection = try connect(within: limit)
        defer { connection.close() }
        do {
            return try body(connection)
        } catch let error as PGError {
            throw describe(error, doing: doing)
        }
    }

    // MARK: identify

    /// The server's data directory, WAL directory and tablespaces.
    struct Layout: Sendable {
        var serverDataDirectory: String
        var dataDirectory: String
        var walDirectory: String
        var tablespaces: [String]
        var paths: [String] { [dataDirectory, walDirectory] + tablespaces }
    }

    public func identify() async throws -> WriterFootprint {
        let layout = try await runBlocking { [self] in try readLayout(within: timeout) }
        return WriterFootprint(paths: layout.paths)
    }

    func readLayout(within limit: Duration) throws -> Layout {
        try withSession(within: limit, doing: "reading the data directory of") { connection in
            let serverDirectory: String
            do {
                guard let value = try connection.scalar("SELECT current_setting('data_directory')"), !value.isEmpty else {
                    throw PGError(stage: .query, message: "the server reported no data_directory")
                }
                serverDirectory = value
            } catch let error as PGError where error.isInsufficientPrivilege {
                throw WriterError(.nonRetryable, "the role of \(subject) may not read data_directory: \(error.message)",
                                  hint: "GRANT pg_read_all_settings TO <role>; (quiesce needs the path to check that the data is in the snapshot set)")
            }
            let locations = try connection.query(
                "SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace WHERE pg_tablespace_location(oid) <> '' ORDER BY spcname")
            let local = dataDirectory ?? serverDirectory
            func seen(_ serverPath: String) -> String {
                guard dataDirectory != nil else { return serverPath }
                if serverPath == serverDirectory { return local }
                if serverPath.hasPrefix(serverDirectory + "/") { return local + serverPath.dropFirst(serverDirectory.count) }
                return serverPath
            }
            // pg_wal may be a symlink to another filesystem (initdb --waldir).
            let wal = Self.resolve(local + "/pg_wal")
            var tablespaces: [String] = []
            for row in locations {
                guard let location = row.count > 1 ? row[1] : nil else { continue }
                tablespaces.append(Self.resolve(seen(location)))
            }
            return Layout(serverDataDirectory: serverDirectory, dataDirectory: Self.resolve(local),
                          walDirectory: wal, tablespaces: tablespaces)
        }
    }

    /// The path with symlinks resolved, or the path itself if it cannot be resolved here.
    static func resolve(_ path: String) -> String {
        guard let real = realpath(path, nil) else { return path }
        defer { free(real) }
        return String(cString: real)
    }

    // MARK: prepare

    public func prepare(_ context: CheckpointContext) async throws {
        let started = ContinuousClock.now
        try await runBlocking { [self] in
            try withSession(within: context.remaining, doing: "CHECKPOINT on") { connection in
                do {
                    try connection.query("CHECKPOINT")
                } catch let error as PGError where error.isInsufficientPrivilege {
                    throw WriterError(.nonRetryable, "the role of \(subject) may not run CHECKPOINT: \(error.message)",
                                      hint: "GRANT pg_checkpoint TO <role>; (PostgreSQL 15 and later)")
                }
            }
        }
        context.logger.debug("CHECKPOINT done", metadata: [
            "writer": "\(name)", "ms": "\(Int((ContinuousClock.now - started).milliseconds))",
        ])
    }

    // MARK: freeze

    public func freeze(_ context: CheckpointContext) async throws -> ConsistencyMarker {
        let id = context.checkpointID
        if state.withLock({ $0.thawedCheckpoint == id }) { throw abandoned() }
        let connection = try await runBlocking { [self] in try connect(within: context.remaining) }
        let session = Session(checkpointID: id, connection: connection)
        let (stale, thawed) = state.withLock { state -> (Session?, Bool) in
            if state.thawedCheckpoint == id { return (nil, true) }
            defer { state.session = session }
            return (state.session, false)
        }
        if let stale { stale.connection.close() }
        if thawed {
            connection.close()
            throw abandoned()
        }
        defer { session.freezeDone = true }
        do {
            return try await runBlocking { [self] in try holdSession(session, context) }
        } catch {
            // Thaw closes the session; a failed freeze must not leave a backup running meanwhile.
            if mode == .backupLabel { connection.close() }
            throw error
        }
    }

    private func abandoned() -> WriterError {
        WriterError(.timedOut, "freeze of \(subject) was abandoned: thaw came before it finished")
    }

    private func holdSession(_ session: Session, _ context: CheckpointContext) throws -> ConsistencyMarker {
        let connection = session.connection
        var marker = ConsistencyMarker()
        marker[Self.modeKey] = mode.rawValue
        do {
            if mode == .backupLabel {
                let label = "quiesce \(context.checkpointID)"
                do {
                    marker[Self.lsnKey] = try connection.scalar("SELECT pg_backup_start($1, true)::text", [label]) ?? "?"
                } catch let error as PGError where error.isInsufficientPrivilege {
                    throw WriterError(.nonRetryable, "the role of \(subject) may not start a backup: \(error.message)",
                                      hint: "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean) TO <role>;")
                } catch let error as PGError where error.sqlState == "55000" {
                    throw WriterError(.retryable, "\(subject) cannot start a backup: \(error.message)",
                                      hint: "backup-label mode needs wal_level = replica or logical and a primary (not a standby)")
                }
                marker[Self.backupLabelKey] = label
                session.backupStarted = true
            } else {
                marker[Self.lsnKey] = try connection.scalar("SELECT pg_current_wal_lsn()::text") ?? "?"
            }
            let row = try connection.query(
                "SELECT ('x' || substr(pg_walfile_name($1::pg_lsn), 1, 8))::bit(32)::int::text, current_setting('server_version')",
                [marker[Self.lsnKey]]).first ?? []
            marker[Self.timelineKey] = row.first ?? nil ?? "?"
            marker[Self.serverVersionKey] = row.count > 1 ? row[1] ?? "?" : "?"
        } catch let error as PGError {
            throw describe(error, doing: mode == .backupLabel ? "starting the backup on" : "recording the WAL position of")
        }
        do {
            if let server = try connection.scalar("SELECT current_setting('data_directory')") {
                marker[Self.dataDirectoryKey] = dataDirectory ?? server
            }
        } catch let error as PGError {
            throw describe(error, doing: "reading data_directory of")
        }
        context.logger.info("session held", metadata: ["writer": "\(name)", "marker": "\(marker.summary)"])
        return marker
    }

    // MARK: thaw

    public func thaw(_ context: CheckpointContext, outcome: CheckpointOutcome) async throws {
        let session = state.withLock { state -> Session? in
            state.thawedCheckpoint = context.checkpointID
            defer { state.session = nil }
            return state.session
        }
        guard let session else { return }
        defer { session.connection.close() }
        // A freeze still running its statement (abandoned at its deadline): cut it short.
        if !session.freezeDone { session.connection.cancel() }
        if session.connection.isClosed {
            if mode == .backupLabel { recordBackupProblem(context.checkpointID, "the session was closed before thaw") }
            return
        }
        try await runBlocking { [self] in try endSession(session, context, outcome: outcome) }
    }

    private func endSession(_ session: Session, _ context: CheckpointContext, outcome: CheckpointOutcome) throws {
        let connection = session.connection
        if mode == .backupLabel && session.backupStarted {
            do {
                let row = try connection.query("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)").first ?? []
                var files: [String: String] = [:]
                files[Self.stopLSNFile] = (row.first ?? nil) ?? ""
                files[Self.labelFile] = row.count > 1 ? row[1] ?? "" : ""
                if row.count > 2, let map = row[2], !map.isEmpty { files[Self.tablespaceMapFile] = map }
                let metadata = RecoveryMetadata(files: files)
                state.withLock { $0.backup = (context.checkpointID, metadata) }
            } catch let error as PGError {
                let described = describe(error, doing: "ending the backup (pg_backup_stop) on")
                if error.isConnectionLost {
                    recordBackupProblem(context.checkpointID,
                                        "the session holding the backup was lost during the freeze (\(error.message)); the server ended the backup itself")
                    throw WriterError(.inconsistent,
                        "the session holding the backup of \(subject) was lost during the freeze: \(error.message); "
                        + "the server ended the backup itself, and this checkpoint has no backup label",
                        hint: "check the server's log for why the session ended (restart, pg_terminate_backend, idle_session_timeout), then retry")
                }
                recordBackupProblem(context.checkpointID, described.description)
                throw described
            }
        } else {
            // Checkpoint mode: the session only proves the server stayed up through the freeze.
            do {
                try connection.query("SELECT 1")
            } catch let error as PGError {
                guard outcome == .completed else { return }
                throw WriterError(.retryable, "the session to \(subject) was lost during the freeze: \(error.message)",
                                  hint: "the snapshot is crash-consistent, but the server restarted or ended quiesce's session: check its log")
            }
        }
    }

    private func recordBackupProblem(_ id: String, _ problem: String) {
        state.withLock { $0.backupProblem = (id, problem) }
    }

    // MARK: post-snapshot

    public func postSnapshot(_ context: CheckpointContext) async throws -> RecoveryMetadata {
        guard mode == .backupLabel else { return RecoveryMetadata() }
        let (backup, problem) = state.withLock { state in
            defer { state.backup = nil; state.backupProblem = nil }
            return (state.backup, state.backupProblem)
        }
        if let backup, backup.checkpointID == context.checkpointID { return backup.metadata }
        let why = problem.flatMap { $0.checkpointID == context.checkpointID ? $0.problem : nil } ?? "pg_backup_stop did not run"
        throw WriterError(.inconsistent, "no backup label for this checkpoint of \(subject): \(why)",
                          hint: "retry the checkpoint; mode = \"backup-label\" needs the session to last from freeze to thaw")
    }
}

/// One checkpoint's held session.
final class Session: Sendable {
    let checkpointID: String
    let connection: PGConnection
    private let started = Atomic<Bool>(false)
    private let frozen = Atomic<Bool>(false)

    /// pg_backup_start succeeded in this session.
    var backupStarted: Bool {
        get { started.load(ordering: .acquiring) }
        set { started.store(newValue, ordering: .releasing) }
    }
    /// Freeze has finished with this session (its statements are done).
    var freezeDone: Bool {
        get { frozen.load(ordering: .acquiring) }
        set { frozen.store(newValue, ordering: .releasing) }
    }

    init(checkpointID: String, connection: PGConnection) {
        self.checkpointID = checkpointID
        self.connection = connection
    }
}
