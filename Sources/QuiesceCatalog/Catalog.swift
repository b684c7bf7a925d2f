import Foundation
import QuiesceCore
import QuiesceSQLite
import Synchronization

/// A writer's last known state, as `quiesce writers list` shows it (like `vssadmin list writers`).
///
/// A writer that failed keeps its `lastErrorKind` and `lastError` until it takes part in a
/// completed checkpoint.
public struct WriterStatus: Sendable, Codable, Equatable {
    public var name: String
    public var type: String
    /// `stable`, `waiting-for-freeze`, `frozen`, `waiting-for-thaw` or `failed-at-<phase>`.
    public var state: String
    public var lastErrorKind: WriterErrorKind
    public var lastError: String?
    /// The id of the last completed checkpoint the writer took part in.
    public var lastSuccessfulCheckpoint: String?
    public var updatedAt: Date

    public init(name: String, type: String, state: String, lastErrorKind: WriterErrorKind = .none,
                lastError: String? = nil, lastSuccessfulCheckpoint: String? = nil, updatedAt: Date) {
        self.name = name
        self.type = type
        self.state = state
        self.lastErrorKind = lastErrorKind
        self.lastError = lastError
        self.lastSuccessfulCheckpoint = lastSuccessfulCheckpoint
        self.updatedAt = updatedAt
    }
}

/// The checkpoint catalog: an SQLite database (WAL, `synchronous=FULL`) recording every
/// checkpoint with its writers' results and snapshot files, each writer's current status,
/// and the retention holds that keep a DR target's base checkpoint from being pruned.
///
/// The catalog must live on a filesystem outside the snapshot set (by default
/// `/var/lib/quiesce/catalog.db`): the coordinator writes to it between phases, never
/// during the hold window. Times are stored as unix milliseconds: a `Date` reads back
/// equal to the millisecond.
///
/// Calls block (SQLite, with a busy timeout of a few seconds) and are serialized within
/// the process; several processes may open the same catalog. One checkpoint at a time is
/// enforced by `CheckpointLock`, not by the catalog.
/// A DR target's last acknowledged checkpoint of one volume.
public struct TargetAcknowledgement: Sendable, Codable, Equatable {
    public var target: String
    public var volume: String
    public var checkpointID: String
    /// When that checkpoint was taken: the DR copy's data is this old.
    public var checkpointTime: Date
    public var acknowledgedAt: Date
    /// Whether the target verified that checkpoint on receipt; nil if it does not verify.
    public var verified: Bool?
    public var verifyFailures: [String]
}

public final class Catalog: CheckpointJournal, Sendable {
    /// The database file.
    public let path: String
    private let connection: Mutex<SQLiteConnection>

    /// How long a call waits for another process's write lock before failing with `CatalogError.busy`.
    static let busyTimeout: Duration = .seconds(5)

    /// Opens the catalog at `path`, creating its directory (mode 0700), the file (0600) and
    /// the schema if needed, or upgrading an older schema.
    ///
    /// Throws `CatalogError`: `.newerSchema` if a newer quiesce wrote it, `.notACatalog` if the
    /// file is some other database or damaged, `.notWritable` / `.cannotCreateDirectory`.
    public init(path: String) throws {
        self.path = path
        let directory = parentDirectory(of: path)
        if let failure = createDirectories(directory) {
            throw CatalogError.cannotCreateDirectory(path: path, directory: directory, reason: failure)
        }
        // SQLite gives the -wal and -shm files the database file's mode: create it 0600 first.
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        if fd >= 0 {
            close(fd)
        } else if errno != EEXIST {
            throw CatalogError.notWritable(path: path, reason: String(cString: strerror(errno)))
        }
        let db: SQLiteConnection
        do {
            db = try SQLiteConnection(path: path, mode: .readWrite, busyTimeout: Self.busyTimeout)
            try db.execute("PRAGMA foreign_keys = ON")
            if try db.scalar("PRAGMA journal_mode")?.text?.lowercased() != "wal" {
                let mode = try db.scalar("PRAGMA journal_mode = WAL")?.text ?? "?"
                guard mode.lowercased() == "wal" else {
                    throw CatalogError.storage(path: path, operation: "switch to WAL journal mode",
                                               reason: "SQLite kept journal mode \(mode) (the filesystem may not support shared memory, e.g. NFS)")
                }
            }
            try db.execute("PRAGMA synchronous = FULL")
            try CatalogSchema.migrate(db)
        } catch {
            throw CatalogError.from(error, path: path, operation: "open")
        }
        connection = Mutex(db)
    }

    /// The schema version this quiesce writes (`PRAGMA user_version`).
    public static var schemaVersion: Int { CatalogSchema.version }

    // MARK: CheckpointJournal

    /// Records a `running` row for the checkpoint. Throws `.duplicateCheckpoint` if the id is taken.
    public func begin(_ record: CheckpointRecord) async throws {
        try await runBlocking { try self.recordBegin(record) }
    }

    /// Records a writer's new state. A failure state or an error is kept as the writer's last
    /// error until the writer takes part in a completed checkpoint; `stable` after a completed
    /// checkpoint clears it. Best effort: a catalog failure here does not fail the checkpoint,
    /// and `finish` records each writer's final state again.
    public func writerState(_ name: String, type: String, state: WriterState, errorKind: WriterErrorKind,
                            error: String?, checkpointID: String) async {
        _ = try? await runBlocking {
            try self.recordWriterState(name, type: type, state: state, errorKind: errorKind, error: error,
                                       checkpointID: checkpointID)
        }
    }

    /// Records the final row, its writers' results and its snapshot files in one transaction.
    /// For a completed checkpoint, every writer in it gets it as its last successful
    /// checkpoint and its last error is cleared.
    public func finish(_ record: CheckpointRecord) async throws {
        try await runBlocking { try self.recordFinish(record) }
    }

    func recordBegin(_ record: CheckpointRecord) throws {
        try write("record the start of checkpoint \(record.id)") { db in
            if try db.scalar("SELECT 1 FROM checkpoints WHERE id = ?", [.text(record.id)]) != nil {
                throw CatalogError.duplicateCheckpoint(path: path, id: record.id)
            }
            try store(record, new: true, db)
        }
    }

    func recordFinish(_ record: CheckpointRecord) throws {
        try write("record the end of checkpoint \(record.id)") { db in
            try store(record, new: false, db)
            let at = unixMilliseconds(record.endedAt ?? Date())
            for writer in record.writers {
                if record.outcome == .completed {
                    try markSucceeded(writer.name, type: writer.type, state: writer.state,
                                      checkpointID: record.id, at: at, db)
                } else {
                    try updateStatus(writer.name, type: writer.type, state: writer.state, errorKind: writer.errorKind,
                                     error: writer.error, checkpointID: record.id, at: at, db)
                }
            }
        }
    }

    func recordWriterState(_ name: String, type: String, state: WriterState, errorKind: WriterErrorKind,
                           error: String?, checkpointID: String) throws {
        try write("record the state of writer \(name)") { db in
            let at = unixMilliseconds(Date())
            let completed = try db.scalar("SELECT outcome FROM checkpoints WHERE id = ?", [.text(checkpointID)])?.text
                == CheckpointRecord.Outcome.completed.rawValue
            if state == .stable, error == nil, errorKind == .none, completed {
                try markSucceeded(name, type: type, state: state.description, checkpointID: checkpointID, at: at, db)
            } else {
                try updateStatus(name, type: type, state: state.description, errorKind: errorKind, error: error,
                                 checkpointID: checkpointID, at: at, db)
            }
        }
    }

    /// Builds a catalog of many new records in one transaction (tests, imports).
    func recordAll(_ records: [CheckpointRecord]) throws {
        try write("record \(records.count) checkpoints") { db in
            for record in records { try store(record, new: true, db) }
        }
    }

    // MARK: Reads

    /// Every checkpoint, oldest first; with `limit`, the newest `limit` of them, still oldest first.
    /// Without `details`, the records carry no writers and snapshot files: a listing of a
    /// large catalog then skips decoding every marker (100,000 rows: 6 s → well under 1 s).
    public func checkpoints(limit: Int? = nil, details: Bool = true) throws -> [CheckpointRecord] {
        if let limit, limit <= 0 { return [] }
        return try read("list checkpoints") { db in
            guard let limit else { return try loadRecords(chosen: nil, [], db, writers: details, snapshots: details) }
            return try loadRecords(chosen: "SELECT seq FROM checkpoints ORDER BY started_at DESC, id DESC LIMIT ?",
                                   [.integer(Int64(limit))], db, writers: details, snapshots: details)
        }
    }

    /// One checkpoint with its writers and snapshot files, or nil if the id is unknown.
    public func checkpoint(id: String) throws -> CheckpointRecord? {
        try read("read checkpoint \(id)") { db in
            try loadRecords(chosen: "SELECT seq FROM checkpoints WHERE id = ?", [.text(id)], db).first
        }
    }

    /// The newest completed checkpoint; with `volume`, the newest completed one that has a
    /// snapshot of that volume (the base of its next delta).
    public func latestCompleted(volume: String? = nil) throws -> CheckpointRecord? {
        try read("find the latest completed checkpoint") { db in
            if let volume {
                return try loadRecords(chosen: """
                    SELECT c.seq FROM checkpoints c WHERE c.outcome = 'completed'
                    AND EXISTS (SELECT 1 FROM snapshot_files s WHERE s.checkpoint = c.seq AND s.volume = ?)
                    ORDER BY c.started_at DESC, c.id DESC LIMIT 1
                    """, [.text(volume)], db).first
            }
            return try loadRecords(chosen: """
                SELECT seq FROM checkpoints WHERE outcome = 'completed' ORDER BY started_at DESC, id DESC LIMIT 1
                """, [], db).first
        }
    }

    /// Every writer that has reported a state, by name.
    public func writerStatuses() throws -> [WriterStatus] {
        try read("read writer statuses") { db in
            try db.query("""
                SELECT name, type, state, last_error_kind, last_error, last_successful_checkpoint, updated_at
                FROM writer_status ORDER BY name
                """).map { row in
                WriterStatus(name: row[0].text ?? "", type: row[1].text ?? "", state: row[2].text ?? "",
                             lastErrorKind: errorKind(row[3]), lastError: row[4].text,
                             lastSuccessfulCheckpoint: row[5].text,
                             updatedAt: date(unixMilliseconds: row[6].int ?? 0))
            }
        }
    }

    /// Drops a writer's status (after `quiesce writers remove`); nothing if it had none.
    /// Checkpoints keep their record of the writer.
    public func forgetWriter(name: String) throws {
        try write("forget writer \(name)") { db in
            try db.query("DELETE FROM writer_status WHERE name = ?", [.text(name)])
        }
    }

    // MARK: Recovery

    /// The message recorded on a checkpoint whose coordinator died mid-run.
    public static let interruptedMessage =
        "the coordinator stopped during the checkpoint (killed or crashed); the guard released what it held"

    /// Marks every checkpoint still `running` as `aborted` (their coordinator is gone) and
    /// returns them, so the caller can discard their partial snapshot files. Writers that
    /// were left mid-checkpoint by them are reported `stable` with a `retryable` last error.
    ///
    /// Only call this while holding the `CheckpointLock` of this catalog: the lock is what
    /// proves no coordinator is at work. Throws `CatalogError.lockNotHeld` if no process
    /// holds it.
    public func recoverInterrupted() throws -> [CheckpointRecord] {
        try requireCheckpointLock()
        return try write("recover interrupted checkpoints") { db in
            var records = try loadRecords(chosen: "SELECT seq FROM checkpoints WHERE outcome = 'running'", [], db)
            guard !records.isEmpty else { return [] }
            let now = Date()
            let at = unixMilliseconds(now)
            for index in records.indices {
                records[index].outcome = .aborted
                records[index].endedAt = date(unixMilliseconds: at)
                records[index].error = Self.interruptedMessage
                let id = records[index].id
                try db.query("UPDATE checkpoints SET outcome = 'aborted', ended_at = ?, error = ? WHERE id = ?",
                             [.integer(at), .text(Self.interruptedMessage), .text(id)])
                try db.query("""
                    UPDATE writer_status SET state = 'stable', last_error_kind = ?, last_error = ?, updated_at = ?
                    WHERE last_checkpoint = ? AND state <> 'stable' AND state NOT LIKE 'failed-at-%'
                    """, [.text(WriterErrorKind.retryable.rawValue),
                          .text("checkpoint \(id) was interrupted: \(Self.interruptedMessage)"), .integer(at), .text(id)])
            }
            return records
        }
    }

    private func requireCheckpointLock() throws {
        let lockPath = CheckpointLock.lockPath(forCatalog: path)
        let fd = open(lockPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CatalogError.lockNotHeld(path: path, lockPath: lockPath) }
        defer { close(fd) }
        if flock(fd, LOCK_EX | LOCK_NB) == 0 {
            flock(fd, LOCK_UN)
            throw CatalogError.lockNotHeld(path: path, lockPath: lockPath)
        }
    }

    // MARK: Retention

    /// Keeps a completed checkpoint from being pruned or deleted until `holder` releases it
    /// (a DR target holds the base of its next delta). Holding twice is harmless.
    public func hold(checkpointID: String, holder: String) throws {
        try write("hold checkpoint \(checkpointID) for \(holder)") { db in
            guard let row = try db.query("SELECT seq, outcome FROM checkpoints WHERE id = ?", [.text(checkpointID)]).first,
                  let seq = row[0].int else {
                throw CatalogError.unknownCheckpoint(path: path, id: checkpointID)
            }
            let outcome = row[1].text ?? "?"
            guard outcome == CheckpointRecord.Outcome.completed.rawValue else {
                throw CatalogError.notCompleted(path: path, id: checkpointID, outcome: outcome)
            }
            try db.query("INSERT OR IGNORE INTO retention_holds (checkpoint, holder, held_since) VALUES (?, ?, ?)",
                         [.integer(seq), .text(holder), .integer(unixMilliseconds(Date()))])
        }
    }

    /// Releases `holder`'s holds: all of them, or only the one on `checkpointID`
    /// (a target that acknowledged checkpoint N holds N, then releases N-1).
    /// Returns how many holds were released.
    @discardableResult
    public func release(holder: String, checkpointID: String? = nil) throws -> Int {
        try write("release the holds of \(holder)") { db in
            if let checkpointID {
                return try db.query("""
                    DELETE FROM retention_holds WHERE holder = ?
                    AND checkpoint = (SELECT seq FROM checkpoints WHERE id = ?) RETURNING holder
                    """, [.text(holder), .text(checkpointID)]).count
            }
            return try db.query("DELETE FROM retention_holds WHERE holder = ? RETURNING holder", [.text(holder)]).count
        }
    }

    /// Every retention hold, oldest checkpoint first.
    public func holds() throws -> [(checkpointID: String, holder: String)] {
        try read("read retention holds") { db in
            try db.query("""
                SELECT c.id, h.holder FROM retention_holds h JOIN checkpoints c ON c.seq = h.checkpoint
                ORDER BY c.started_at, c.id, h.holder
                """).map { (checkpointID: $0[0].text ?? "", holder: $0[1].text ?? "") }
        }
    }

    /// What `quiesce checkpoints prune --keep N` deletes, oldest first: completed checkpoints
    /// older than the newest `keep` completed ones, except held ones; and aborted ones older
    /// than the oldest kept one (with `keep` 0, every aborted one). Running ones never.
    /// The caller deletes each one's snapshot files, then `delete(checkpointID:)`.
    public func pruneCandidates(keep: Int) throws -> [CheckpointRecord] {
        let keep = max(0, keep)
        return try read("find checkpoints to prune") { db in
            let newest = "SELECT seq FROM checkpoints WHERE outcome = 'completed' ORDER BY started_at DESC, id DESC LIMIT \(keep)"
            let unheld = "NOT EXISTS (SELECT 1 FROM retention_holds h WHERE h.checkpoint = c.seq)"
            var chosen = "SELECT c.seq FROM checkpoints c WHERE c.outcome = 'completed' AND c.seq NOT IN (\(newest)) AND \(unheld)"
            var parameters: [SQLiteValue] = []
            if keep == 0 {
                chosen += " UNION ALL SELECT c.seq FROM checkpoints c WHERE c.outcome = 'aborted' AND \(unheld)"
            } else if let oldestKept = try db.query("""
                SELECT k.started_at, k.id FROM checkpoints k WHERE k.seq IN (\(newest)) ORDER BY k.started_at, k.id LIMIT 1
                """).first {
                chosen += """
                     UNION ALL SELECT c.seq FROM checkpoints c WHERE c.outcome = 'aborted'
                    AND (c.started_at, c.id) < (?, ?) AND \(unheld)
                    """
                parameters = oldestKept
            }
            // Pruning needs each one's id and snapshot files, not its writers' markers.
            return try loadRecords(chosen: chosen, parameters, db, writers: false)
        }
    }

    /// Removes a checkpoint's rows (its snapshot files are the caller's). Refuses a held
    /// checkpoint (`.checkpointHeld`, naming the holders) and a running one.
    public func delete(checkpointID: String) throws {
        try delete(checkpointIDs: [checkpointID])
    }

    /// Removes several checkpoints' rows in one transaction (a prune of thousands would
    /// otherwise hold the catalog for a commit per checkpoint); all or none.
    public func delete(checkpointIDs: [String]) throws {
        guard !checkpointIDs.isEmpty else { return }
        let what = checkpointIDs.count == 1 ? "checkpoint \(checkpointIDs[0])" : "\(checkpointIDs.count) checkpoints"
        try write("delete \(what)") { db in
            for checkpointID in checkpointIDs {
                guard let row = try db.query("SELECT seq, outcome FROM checkpoints WHERE id = ?", [.text(checkpointID)]).first,
                      let seq = row[0].int else {
                    throw CatalogError.unknownCheckpoint(path: path, id: checkpointID)
                }
                if row[1].text == CheckpointRecord.Outcome.running.rawValue {
                    throw CatalogError.checkpointRunning(path: path, id: checkpointID)
                }
                let holders = try db.query("SELECT holder FROM retention_holds WHERE checkpoint = ? ORDER BY holder",
                                           [.integer(seq)]).compactMap { $0[0].text }
                if !holders.isEmpty {
                    throw CatalogError.checkpointHeld(path: path, id: checkpointID, holders: holders)
                }
                for table in ["checkpoint_writers", "snapshot_files", "checkpoint_specs"] {
                    try db.query("DELETE FROM \(table) WHERE checkpoint = ?", [.integer(seq)])
                }
                try db.query("DELETE FROM checkpoints WHERE seq = ?", [.integer(seq)])
            }
            // Drop-in texts no checkpoint uses any more.
            try db.query("DELETE FROM writer_specs WHERE NOT EXISTS (SELECT 1 FROM checkpoint_specs c WHERE c.spec = writer_specs.id)")
        }
    }

    // MARK: Writer specs

    /// Records the drop-ins the checkpoint's writers were built from.
    public func recordSpecs(checkpointID: String, _ specs: [(name: String, text: String)]) throws {
        try write("record the writer specs of \(checkpointID)") { db in
            guard let seq = try db.query("SELECT seq FROM checkpoints WHERE id = ?", [.text(checkpointID)]).first?[0].int else {
                throw CatalogError.unknownCheckpoint(path: path, id: checkpointID)
            }
            for spec in specs {
                try db.query("INSERT OR IGNORE INTO writer_specs (text) VALUES (?)", [.text(spec.text)])
                guard let id = try db.query("SELECT id FROM writer_specs WHERE text = ?", [.text(spec.text)]).first?[0].int else {
                    throw CatalogError.storage(path: path, operation: "record the writer specs of \(checkpointID)", reason: "the spec row vanished")
                }
                try db.query("INSERT OR REPLACE INTO checkpoint_specs (checkpoint, name, spec) VALUES (?, ?, ?)",
                             [.integer(seq), .text(spec.name), .integer(id)])
            }
        }
    }

    /// The drop-ins a checkpoint's writers were built from, by name; nil when none were
    /// recorded (a checkpoint taken by a quiesce before catalog version 4, or with no writers).
    public func specs(checkpointID: String) throws -> [(name: String, text: String)]? {
        try read("read the writer specs of \(checkpointID)") { db in
            let rows = try db.query("""
                SELECT c.name, w.text FROM checkpoint_specs c JOIN writer_specs w ON w.id = c.spec
                WHERE c.checkpoint = (SELECT seq FROM checkpoints WHERE id = ?) ORDER BY c.name
                """, [.text(checkpointID)])
            return rows.isEmpty ? nil : rows.map { ($0[0].text ?? "", $0[1].text ?? "") }
        }
    }

    // MARK: Targets

    /// `target` has applied `checkpointID` of `volume`: record it, hold that checkpoint (the
    /// base of the target's next delta) and release the one it held before, in one transaction.
    /// `verified`: the receiver's verification of the copy (nil when it did not verify);
    /// `failures` its reasons when it failed.
    public func acknowledge(target: String, volume: String, checkpointID: String, verified: Bool? = nil,
                            failures: [String] = [], at time: Date = Date()) throws {
        let holder = Self.targetHolder(target: target, volume: volume)
        try write("record that \(target) acknowledged \(checkpointID) of \(volume)") { db in
            guard let row = try db.query("SELECT seq, started_at FROM checkpoints WHERE id = ? AND outcome = 'completed'",
                                         [.text(checkpointID)]).first,
                  let seq = row[0].int, let started = row[1].int else {
                throw CatalogError.unknownCheckpoint(path: path, id: checkpointID)
            }
            try db.query("DELETE FROM retention_holds WHERE holder = ?", [.text(holder)])
            try db.query("INSERT INTO retention_holds (checkpoint, holder, held_since) VALUES (?, ?, ?)",
                         [.integer(seq), .text(holder), .integer(unixMilliseconds(time))])
            try db.query("""
                INSERT INTO target_acks (target, volume, checkpoint_id, checkpoint_time, acknowledged_at, verified, verify_failures)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (target, volume) DO UPDATE SET checkpoint_id = excluded.checkpoint_id,
                    checkpoint_time = excluded.checkpoint_time, acknowledged_at = excluded.acknowledged_at,
                    verified = excluded.verified, verify_failures = excluded.verify_failures
                """, [.text(target), .text(volume), .text(checkpointID), .integer(started), .integer(unixMilliseconds(time)),
                      verified.map { .integer($0 ? 1 : 0) } ?? .null,
                      failures.isEmpty ? .null : .text(failures.joined(separator: "\n"))])
        }
    }

    /// What every target acknowledged last, per volume.
    public func targetAcknowledgements() throws -> [TargetAcknowledgement] {
        try read("read target acknowledgements") { db in
            try db.query("""
                SELECT target, volume, checkpoint_id, checkpoint_time, acknowledged_at, verified, verify_failures
                FROM target_acks ORDER BY target, volume
                """).map {
                    TargetAcknowledgement(target: $0[0].text ?? "", volume: $0[1].text ?? "", checkpointID: $0[2].text ?? "",
                                          checkpointTime: date(unixMilliseconds: $0[3].int ?? 0),
                                          acknowledgedAt: date(unixMilliseconds: $0[4].int ?? 0),
                                          verified: $0[5].int.map { $0 != 0 },
                                          verifyFailures: $0[6].text.map { $0.split(separator: "\n").map(String.init) } ?? [])
                }
        }
    }

    /// The retention holder name of a target's base for one volume.
    public static func targetHolder(target: String, volume: String) -> String { "target \(target) (\(volume))" }

    // MARK: Transactions

    /// `body` in a read transaction (one consistent snapshot of the catalog).
    private func read<T: Sendable>(_ operation: String, _ body: (SQLiteConnection) throws -> T) throws -> T {
        do {
            return try connection.withLock { db in
                try db.execute("BEGIN")
                do {
                    let result = try body(db)
                    try db.execute("COMMIT")
                    return result
                } catch {
                    try? db.execute("ROLLBACK")
                    throw error
                }
            }
        } catch {
            throw CatalogError.from(error, path: path, operation: operation)
        }
    }

    /// `body` in a write transaction (BEGIN IMMEDIATE … COMMIT).
    @discardableResult
    private func write<T: Sendable>(_ operation: String, _ body: (SQLiteConnection) throws -> T) throws -> T {
        do {
            return try connection.withLock { db in try db.transaction { try body(db) } }
        } catch {
            throw CatalogError.from(error, path: path, operation: operation)
        }
    }

    // MARK: Rows

    /// Upserts the checkpoint row and replaces its writer results and snapshot files
    /// (`new`: the id is known not to be recorded yet, there is nothing to replace).
    private func store(_ record: CheckpointRecord, new: Bool, _ db: SQLiteConnection) throws {
        // The upsert costs twice a plain insert to prepare: 100,000 new records notice.
        let upsert = new ? "" : """
            ON CONFLICT (id) DO UPDATE SET
                label = excluded.label, started_at = excluded.started_at, ended_at = excluded.ended_at,
                outcome = excluded.outcome, failed_phase = excluded.failed_phase,
                failed_writer = excluded.failed_writer, error = excluded.error,
                freeze_window_ms = excluded.freeze_window_ms, hold_window_ms = excluded.hold_window_ms
            """
        let rows = try db.query("""
            INSERT INTO checkpoints (id, label, started_at, ended_at, outcome, failed_phase, failed_writer, error,
                                     freeze_window_ms, hold_window_ms)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \(upsert) RETURNING seq
            """, [
                .text(record.id), optional(record.label), .integer(unixMilliseconds(record.startedAt)),
                record.endedAt.map { .integer(unixMilliseconds($0)) } ?? .null, .text(record.outcome.rawValue),
                optional(record.failedPhase?.rawValue), optional(record.failedWriter), optional(record.error),
                record.freezeWindowMs.map { .real($0) } ?? .null, record.holdWindowMs.map { .real($0) } ?? .null,
            ])
        guard let seq = rows.first?.first?.int else {
            throw CatalogError.storage(path: path, operation: "record checkpoint \(record.id)", reason: "no row id returned")
        }
        if !new {
            try db.query("DELETE FROM checkpoint_writers WHERE checkpoint = ?", [.integer(seq)])
            try db.query("DELETE FROM snapshot_files WHERE checkpoint = ?", [.integer(seq)])
        }
        for (position, writer) in record.writers.enumerated() {
            try db.query("""
                INSERT INTO checkpoint_writers (checkpoint, position, name, type, state, error_kind, error, marker, recovery)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                """, [
                    .integer(seq), .integer(Int64(position)), .text(writer.name), .text(writer.type), .text(writer.state),
                    .text(writer.errorKind.rawValue), optional(writer.error),
                    try writer.marker.map { .text(try json($0.fields)) } ?? .null,
                    try writer.recovery.map { .text(try json($0.files)) } ?? .null,
                ])
        }
        for (position, snapshot) in record.snapshots.enumerated() {
            try db.query("""
                INSERT INTO snapshot_files (checkpoint, position, volume, image, path, size_bytes) VALUES (?, ?, ?, ?, ?, ?)
                """, [
                    .integer(seq), .integer(Int64(position)), .text(snapshot.volume), .text(snapshot.image),
                    .text(snapshot.path), .integer(Int64(bitPattern: snapshot.sizeBytes)),
                ])
        }
    }

    /// A writer took part in a completed checkpoint: no error, and a new last success.
    private func markSucceeded(_ name: String, type: String, state: String, checkpointID: String, at: Int64,
                               _ db: SQLiteConnection) throws {
        try db.query("""
            INSERT INTO writer_status (name, type, state, last_error_kind, last_error, last_successful_checkpoint,
                                       last_checkpoint, updated_at)
            VALUES (?1, ?2, ?3, 'none', NULL, ?4, ?4, ?5)
            ON CONFLICT (name) DO UPDATE SET
                type = excluded.type, state = excluded.state, last_error_kind = 'none', last_error = NULL,
                last_successful_checkpoint = excluded.last_successful_checkpoint,
                last_checkpoint = excluded.last_checkpoint, updated_at = excluded.updated_at
            """, [.text(name), .text(type), .text(state), .text(checkpointID), .integer(at)])
    }

    /// A writer's new state; an error replaces its last error, no error keeps it.
    private func updateStatus(_ name: String, type: String, state: String, errorKind: WriterErrorKind, error: String?,
                              checkpointID: String, at: Int64, _ db: SQLiteConnection) throws {
        let reportsError = error != nil || errorKind != .none
        try db.query("""
            INSERT INTO writer_status (name, type, state, last_error_kind, last_error, last_successful_checkpoint,
                                       last_checkpoint, updated_at)
            VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, ?7)
            ON CONFLICT (name) DO UPDATE SET
                type = excluded.type, state = excluded.state,
                last_error_kind = CASE WHEN ?8 THEN excluded.last_error_kind ELSE last_error_kind END,
                last_error = CASE WHEN ?8 THEN excluded.last_error ELSE last_error END,
                last_checkpoint = excluded.last_checkpoint, updated_at = excluded.updated_at
            """, [.text(name), .text(type), .text(state), .text(errorKind.rawValue), optional(error),
                  .text(checkpointID), .integer(at), .integer(reportsError ? 1 : 0)])
    }

    /// The checkpoints whose `seq` the `chosen` query returns (all when nil), oldest first,
    /// with their writers and snapshot files: three queries, whatever the number of records.
    /// Records chosen by a query of `seq`s (all without one); `writers: false` leaves out the
    /// writers (and the decoding of their markers), `snapshots: false` the snapshot files.
    private func loadRecords(chosen: String?, _ parameters: [SQLiteValue], _ db: SQLiteConnection,
                             writers withWriters: Bool = true, snapshots withSnapshots: Bool = true) throws -> [CheckpointRecord] {
        let with = chosen.map { "WITH chosen(seq) AS (\($0)) " } ?? ""
        func only(_ column: String) -> String { chosen == nil ? "" : "WHERE \(column) IN (SELECT seq FROM chosen)" }

        var writers: [Int64: [WriterResult]] = [:]
        for row in try !withWriters ? [] : db.query("""
            \(with)SELECT checkpoint, name, type, state, error_kind, error, marker, recovery
            FROM checkpoint_writers \(only("checkpoint")) ORDER BY checkpoint, position
            """, parameters) {
            let marker = try row[6].text.map { ConsistencyMarker(try decodeJSON($0)) }
            let recovery = try row[7].text.map { RecoveryMetadata(files: try decodeJSON($0)) }
            writers[row[0].int ?? 0, default: []].append(WriterResult(
                name: row[1].text ?? "", type: row[2].text ?? "", state: row[3].text ?? "",
                errorKind: errorKind(row[4]), error: row[5].text, marker: marker, recovery: recovery))
        }
        var snapshots: [Int64: [SnapshotFile]] = [:]
        for row in try !withSnapshots ? [] : db.query("""
            \(with)SELECT checkpoint, volume, image, path, size_bytes
            FROM snapshot_files \(only("checkpoint")) ORDER BY checkpoint, position
            """, parameters) {
            snapshots[row[0].int ?? 0, default: []].append(SnapshotFile(
                volume: row[1].text ?? "", image: row[2].text ?? "", path: row[3].text ?? "",
                sizeBytes: UInt64(bitPattern: row[4].int ?? 0)))
        }
        return try db.query("""
            \(with)SELECT seq, id, label, started_at, ended_at, outcome, failed_phase, failed_writer, error,
                   freeze_window_ms, hold_window_ms
            FROM checkpoints \(only("seq")) ORDER BY started_at, id
            """, parameters).map { row in
            let seq = row[0].int ?? 0
            var record = CheckpointRecord(id: row[1].text ?? "", label: row[2].text,
                                          startedAt: date(unixMilliseconds: row[3].int ?? 0))
            record.endedAt = row[4].int.map { date(unixMilliseconds: $0) }
            record.outcome = row[5].text.flatMap(CheckpointRecord.Outcome.init(rawValue:)) ?? .aborted
            record.failedPhase = row[6].text.flatMap(Phase.init(rawValue:))
            record.failedWriter = row[7].text
            record.error = row[8].text
            record.freezeWindowMs = double(row[9])
            record.holdWindowMs = double(row[10])
            record.writers = writers[seq] ?? []
            record.snapshots = snapshots[seq] ?? []
            return record
        }
    }
}

// MARK: Encoding

/// Unix milliseconds, rounded to the nearest: a `Date` made from milliseconds reads back equal.
func unixMilliseconds(_ date: Date) -> Int64 {
    Int64((date.timeIntervalSince1970 * 1000).rounded())
}

func date(unixMilliseconds ms: Int64) -> Date {
    Date(timeIntervalSince1970: Double(ms) / 1000)
}

private func optional(_ text: String?) -> SQLiteValue {
    text.map { .text($0) } ?? .null
}

private func double(_ value: SQLiteValue) -> Double? {
    switch value {
    case .real(let v): v
    case .integer(let v): Double(v)
    default: nil
    }
}

private func errorKind(_ value: SQLiteValue) -> WriterErrorKind {
    value.text.flatMap(WriterErrorKind.init(rawValue:)) ?? .nonRetryable
}

private func json(_ fields: [String: String]) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return String(decoding: try encoder.encode(fields), as: UTF8.self)
}

private func decodeJSON(_ text: String) throws -> [String: String] {
    try JSONDecoder().decode([String: String].self, from: Data(text.utf8))
}

func parentDirectory(of path: String) -> String {
    let directory = (path as NSString).deletingLastPathComponent
    return directory.isEmpty ? "." : directory
}

/// `mkdir -p` giving each directory it creates mode 0700. Returns nil, or what failed.
func createDirectories(_ directory: String) -> String? {
    var info = stat()
    if stat(directory, &info) == 0 {
        return info.st_mode & S_IFMT == S_IFDIR ? nil : "\(directory) exists and is not a directory"
    }
    let parent = (directory as NSString).deletingLastPathComponent
    if !parent.isEmpty, parent != directory, let failure = createDirectories(parent) { return failure }
    if mkdir(directory, 0o700) != 0, errno != EEXIST {
        return "mkdir \(directory): \(String(cString: strerror(errno)))"
    }
    return nil
}
