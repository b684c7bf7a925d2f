import Foundation
import Logging
import Quiesce
import QuiesceCore
import QuiesceLab
import QuiesceSQLite
import QuiesceTestSupport
import Testing

private let worlds = TestEnvironment.canBuildWorlds || TestEnvironment.isCI

/// The sqlite writer against the real system SQLite, a real guest filesystem on a loop device
/// and real checkpoints (`Installation.checkpoint`, as `quiesce checkpoint` runs it), with the
/// application's writes coming from processes of their own.
@Suite("SQLite checkpoints", .serialized)
struct SQLiteCheckpointTests {
    /// A WAL-mode and a rollback-journal database under inserts from several processes each:
    /// every snapshot, copied out as an operator would, opens cleanly with no hot journal and
    /// holds exactly the rows counted at its freeze.
    @Test(.enabled(if: worlds))
    func everySnapshotUnderInsertLoadHoldsExactlyTheRowsCountedAtFreeze() async throws {
        try TestEnvironment.requireWorlds()
        let quiesce = try Executables.requireQuiesce()
        try await TestWorld.with(.init(imageSize: 128 << 20)) { world in
            let databases = [
                LiveDatabase(writer: "orders", file: world.guest + "/app/orders.db", journalMode: "wal"),
                LiveDatabase(writer: "ledger", file: world.guest + "/app/ledger.db", journalMode: "delete"),
            ]
            let site = try TestSite(world)
            for database in databases {
                try database.create()
                try site.addSQLiteWriter(database, busyTimeout: "5s", timeout: "20s")
            }
            let installation = try site.quietInstallation()

            let insertersPerDatabase = 3
            var inserters: [Inserter] = []
            var checkpoints: [CheckpointRecord] = []
            do {
                for database in databases {
                    for n in 1...insertersPerDatabase {
                        inserters.append(try Inserter(quiesce, database: database, number: n))
                    }
                }
                // The workload is really running before the first checkpoint, and after each one.
                var seen = Dictionary(uniqueKeysWithValues: databases.map { ($0.writer, Int64(0)) })
                for n in 1...3 {
                    for database in databases {
                        try await database.waitForCount(above: seen[database.writer]!, within: .seconds(20))
                    }
                    let result = try await installation.checkpoint(label: "under-load-\(n)")
                    try #require(result.error == nil, "checkpoint \(n) failed: \(result.error.map { "\($0)" } ?? "")")
                    #expect(result.thawErrors.isEmpty, "thaw errors: \(result.thawErrors)")
                    #expect(result.record.outcome == .completed)
                    try #require(result.record.snapshots.count == 1)
                    checkpoints.append(result.record)
                    for database in databases {
                        seen[database.writer] = try #require(Int64(marker(database, in: result.record)?["marker_result"] ?? ""))
                    }
                }
            } catch {
                for inserter in inserters { _ = await inserter.stop() }
                throw error
            }
            var committed: [String: Int64] = [:]
            for inserter in inserters {
                let stopped = await inserter.stop()
                #expect(stopped.status == 0, "\(inserter.name) exited \(stopped.status): \(stopped.output)")
                let rows = try #require(stopped.rowsCommitted, "\(inserter.name) printed \"\(stopped.output)\"")
                print("sqlite under load: \(inserter.name): \(rows) rows committed")
                committed[inserter.database.writer, default: 0] += rows
            }

            for record in checkpoints {
                print("sqlite under load: checkpoint \(record.id) \(record.label ?? ""): "
                      + "freeze window \(milliseconds(record.freezeWindowMs)), hold window \(milliseconds(record.holdWindowMs)); "
                      + databases.map { "\($0.writer) marker \(marker($0, in: record)?["marker_result"] ?? "-")" }
                          .joined(separator: ", "))
                #expect(record.freezeWindowMs != nil && record.holdWindowMs != nil, "\(record.id) recorded no windows")
            }

            for database in databases {
                let markers = checkpoints.map { Int64(marker(database, in: $0)?["marker_result"] ?? "") ?? -1 }
                #expect(markers.allSatisfy { $0 > 0 }, "\(database.writer): markers \(markers)")
                #expect(zip(markers, markers.dropFirst()).allSatisfy { $0 < $1 },
                        "\(database.writer): the rows counted at freeze kept growing across checkpoints: \(markers)")
                for record in checkpoints {
                    #expect(marker(database, in: record)?["journal_mode"] == database.journalMode)
                }
                #expect(committed[database.writer, default: 0] > 0, "\(database.writer): the inserters committed nothing")
                let live = try database.count()
                #expect(live >= markers.last ?? .max, "\(database.writer): \(live) rows live, \(markers.last ?? -1) at the last freeze")
                #expect(live == committed[database.writer],
                        "\(database.writer): every row the inserters committed is in the live database")
            }

            // Every snapshot, mounted read-only and copied out as an operator would.
            let writers = installation.registry().writers
            for (index, record) in checkpoints.enumerated() {
                let snapshot = record.snapshots[0]
                try await world.withMountedCopy(of: snapshot.path) { copy in
                    for database in databases {
                        let recorded = try #require(marker(database, in: record), "\(database.writer) recorded no marker in \(record.id)")
                        let relative = String(database.file.dropFirst(world.guest.count))
                        let scratch = try world.makeDirectory("operator/\(index)-\(database.writer)")
                        let found = try OperatorCopy.check(copyOf: copy + relative, into: scratch)
                        #expect(found.hotJournal == false,
                                "\(record.id) \(database.writer): a hot -journal in the snapshot (a write caught mid-commit)")
                        #expect(found.integrity == ["ok"], "\(record.id) \(database.writer): integrity_check \(found.integrity)")
                        #expect(found.journalMode == database.journalMode)
                        #expect("\(found.count)" == recorded["marker_result"],
                                "\(record.id) \(database.writer): \(found.count) rows in the snapshot, \(recorded["marker_result"] ?? "-") at freeze")
                        #expect("\(found.pageCount)" == recorded["page_count"],
                                "\(record.id) \(database.writer): page_count \(found.pageCount), \(recorded["page_count"] ?? "-") at freeze")

                        // The writer's own verify agrees (on the read-only copy it works on a private copy).
                        let writer = try #require(writers.first { $0.name == database.writer })
                        let report = try await writer.verify(copy: CopyLayout(mounts: [world.guest: copy]), marker: recorded)
                        #expect(report.ok, "\(record.id) \(database.writer) verify: \(report.details)")
                    }
                }
            }
        }
    }

    /// Another connection holds a write transaction (BEGIN IMMEDIATE) through the whole freeze:
    /// the sqlite writer gives up after its busy_timeout, the checkpoint aborts at freeze as
    /// "timed out" well before the writer's deadline, the writer that had frozen is thawed and told
    /// `freeze-failed`, no snapshot is left, and the application's transaction commits afterwards.
    @Test(.enabled(if: worlds), arguments: ["wal", "delete"])
    func longWriteTransactionMakesTheFreezeTimeOutCleanly(journalMode: String) async throws {
        try TestEnvironment.requireWorlds()
        _ = try Executables.requireQuiesce()
        guard let sqlite3 = TestEnvironment.locate("sqlite3") else {
            throw MissingPrerequisite("the sqlite3 command-line shell is not installed (apt-get install sqlite3)")
        }
        try await TestWorld.with(.init(imageSize: 128 << 20)) { world in
            let database = LiveDatabase(writer: "orders", file: world.guest + "/app/orders.db", journalMode: journalMode)
            try database.create(seedRows: 10)
            let site = try TestSite(world)
            try site.addSQLiteWriter(database, busyTimeout: "1s", timeout: "5s")
            let hookLog = try site.addExecWriter("app-hook", order: 0, timeout: "5s")
            let installation = try site.quietInstallation()

            // The application: a long write transaction in another process, held until we say COMMIT.
            let locked = world.path("blocker-has-the-lock")
            let blocker = try ChildProcess(sqlite3, [database.file], stdin: .pipe, stdout: .pipe, stderr: .pipe)
            var blockerDone = false
            defer {
                if !blockerDone {
                    blocker.signal(SIGKILL)
                    blocker.wait()
                }
            }
            try blocker.send("BEGIN IMMEDIATE;\nINSERT INTO t (payload, created_at) VALUES ('held', 'now');\n.shell touch \(locked)\n")
            try await waitUntil("the sqlite3 shell holds the write lock", within: .seconds(10)) {
                FileManager.default.fileExists(atPath: locked)
            }

            let started = ContinuousClock.now
            let result = try await installation.checkpoint(label: "blocked")
            let took = ContinuousClock.now - started
            print("sqlite long write transaction (\(journalMode)): checkpoint aborted after \(formatDuration(took)); "
                  + "freeze window \(milliseconds(result.record.freezeWindowMs)), hold window \(milliseconds(result.record.holdWindowMs))")

            let error = try #require(result.error, "the checkpoint completed while another connection held the write lock")
            #expect(error.phase == .freeze)
            #expect(error.writer == "orders")
            #expect(error.isTimeout, "\(error)")
            #expect("\(error)".contains("busy_timeout"), "\(error)")
            #expect(result.record.outcome == .aborted)
            #expect(result.record.failedPhase == .freeze)
            #expect(result.record.failedWriter == "orders")
            #expect(result.record.holdWindowMs == nil, "nothing was held: the freeze never finished")
            #expect(result.record.snapshots.isEmpty)
            let orders = result.record.writers.first { $0.name == "orders" }
            #expect(orders?.errorKind == .timedOut)
            #expect(orders?.state == "failed-at-freeze")
            // busy_timeout is 1 s and the writer's deadline 5 s: it gave up on busy_timeout, not at the deadline.
            // The freeze window runs from the exec writer's freeze to its freeze-failed, around the sqlite attempt.
            let window = try #require(result.record.freezeWindowMs, "no freeze window recorded, though the exec writer froze")
            #expect(window >= 900, "gave up before busy_timeout: freeze window \(milliseconds(window))")
            #expect(window < 4000, "freeze window \(milliseconds(window)): not well under the 5 s deadline")
            // It did not hang (the freeze window above is the precise check; this one includes the
            // test process's own scheduling, which a loaded CI machine stretches).
            #expect(took < .seconds(60), "the whole aborted checkpoint took \(formatDuration(took))")

            // The exec writer froze first (order 0), then heard freeze-failed, never thaw.
            let calls = try HookLog.read(hookLog)
            #expect(calls.map(\.action) == ["freeze", "freeze-failed"], "hook calls: \(calls)")
            #expect(calls.allSatisfy { $0.checkpoint == result.record.id })
            #expect(calls.last?.outcome == "aborted")

            // No snapshot file is left behind.
            let snapshots = (try? FileManager.default.contentsOfDirectory(atPath: world.volume.snapshotDirectory)) ?? []
            #expect(snapshots.isEmpty, "left in \(world.volume.snapshotDirectory): \(snapshots)")

            // The operator sees which writer failed, and why.
            let listed = try installation.listWriters().first { $0.name == "orders" }
            #expect(listed?.state == "failed-at-freeze")
            #expect(listed?.lastError == "timed out")

            // The application's transaction was never disturbed: it commits, and the database takes writes.
            try blocker.send("COMMIT;\n.quit\n")
            blocker.closeStdin()
            let status = try await runBlocking { blocker.wait() }
            blockerDone = true
            #expect(status == 0, "sqlite3 exited \(status)")
            try database.insertOne(payload: "after")
            #expect(try database.count() == 12, "10 seeded + the blocker's row + one more")

            // And the next checkpoint completes.
            let next = try await installation.checkpoint(label: "after")
            #expect(next.error == nil, "\(next.error.map { "\($0)" } ?? "")")
            #expect(next.record.writers.first { $0.name == "orders" }?.marker?["marker_result"] == "12")
            #expect(try HookLog.read(hookLog).suffix(2).map(\.action) == ["freeze", "thaw"])
        }
    }
}

// MARK: the quiesce installation

extension TestSite {
    /// An `sqlite` writer for `database`, counting rows of `t` as its marker.
    fileprivate func addSQLiteWriter(_ database: LiveDatabase, busyTimeout: String, timeout: String) throws {
        let file = "\(writersDirectory)/\(database.writer).toml"
        try """
            name = "\(database.writer)"
            type = "sqlite"
            database = "\(database.file)"
            busy_timeout = "\(busyTimeout)"
            marker_query = "\(LiveDatabase.markerQuery)"
            order = 10
            timeout = "\(timeout)"

            """.write(toFile: file, atomically: true, encoding: .utf8)
        chmod(file, 0o600)
    }

    /// The installation `quiesce checkpoint` would use, logging warnings and errors only.
    fileprivate func quietInstallation() throws -> Installation {
        var logger = Logger(label: "sqlite-checkpoint-test")
        logger.logLevel = .warning
        return try Installation(configPath: config, guardExecutable: try Executables.requireQuiesce(), logger: logger)
    }
}

/// A TestSite hook's log: `ACTION CHECKPOINT writer=… volume=… outcome=OUTCOME` per call.
private enum HookLog {
    struct Call: CustomStringConvertible {
        var action: String
        var checkpoint: String
        var outcome: String
        var description: String { "\(action) \(checkpoint) outcome=\(outcome)" }
    }

    static func read(_ path: String) throws -> [Call] {
        guard FileManager.default.fileExists(atPath: path) else { return [] }
        return try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            let outcome = fields.first { $0.hasPrefix("outcome=") }.map { String($0.dropFirst("outcome=".count)) }
            return Call(action: fields.first ?? "", checkpoint: fields.count > 1 ? fields[1] : "", outcome: outcome ?? "")
        }
    }
}

// MARK: the application's databases

/// A database of the application, in the guest, with the insert workload's table `t`.
private struct LiveDatabase: Sendable {
    static let markerQuery = "SELECT count(*) FROM t"

    var writer: String
    var file: String
    var journalMode: String

    /// Creates the database in `journalMode` with an empty (or seeded) `t`; every connection is closed afterwards.
    func create(seedRows: Int = 0) throws {
        try FileManager.default.createDirectory(atPath: (file as NSString).deletingLastPathComponent,
                                                withIntermediateDirectories: true)
        let connection = try SQLiteConnection(path: file, mode: .readWriteCreate)
        defer { connection.close() }
        let mode = try connection.scalar("PRAGMA journal_mode = \(journalMode)")?.text
        guard mode == journalMode else { throw TestSupportError("\(file): journal_mode is \(mode ?? "?"), wanted \(journalMode)") }
        try connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL, created_at TEXT NOT NULL)")
        try connection.transaction {
            for i in 0..<seedRows {
                try connection.query("INSERT INTO t (payload, created_at) VALUES (?, 'seed')", [.text("seed \(i)")])
            }
        }
    }

    /// The row count, as a reader of the application sees it. Polls for the lock every millisecond:
    /// back-to-back commits in rollback-journal mode starve a reader that backs off.
    func count() throws -> Int64 {
        let reader = try SQLiteConnection(path: file, mode: .readWrite)
        defer { reader.close() }
        reader.limitWaits(busyUntil: .now + .seconds(10)) { false }
        guard let count = try reader.scalar(Self.markerQuery)?.int else { throw TestSupportError("\(file): no count") }
        return count
    }

    func insertOne(payload: String) throws {
        let connection = try SQLiteConnection(path: file, mode: .readWrite, busyTimeout: .seconds(2))
        defer { connection.close() }
        try connection.query("INSERT INTO t (payload, created_at) VALUES (?, 'test')", [.text(payload)])
    }

    func waitForCount(above floor: Int64, within limit: Duration) async throws {
        let file = file
        try await waitUntil("\(file) has more than \(floor) rows", within: limit) {
            ((try? self.count()) ?? 0) > floor
        }
    }
}

private func marker(_ database: LiveDatabase, in record: CheckpointRecord) -> ConsistencyMarker? {
    record.writers.first { $0.name == database.writer }?.marker
}

/// What an operator finds in a database copied out of a mounted snapshot.
private enum OperatorCopy {
    struct Found {
        var hotJournal: Bool
        var integrity: [String]
        var journalMode: String
        var count: Int64
        var pageCount: Int64
    }

    /// Copies `database` and its `-wal`/`-journal` (never the `-shm`) into `directory`, looks at the
    /// journal's header before SQLite can roll it back, then opens the private copy.
    static func check(copyOf database: String, into directory: String) throws -> Found {
        let name = (database as NSString).lastPathComponent
        let target = directory + "/" + name
        guard FileManager.default.fileExists(atPath: database) else { throw TestSupportError("the snapshot has no \(database)") }
        for suffix in ["", "-wal", "-journal"] where FileManager.default.fileExists(atPath: database + suffix) {
            try FileManager.default.copyItem(atPath: database + suffix, toPath: target + suffix)
        }
        var hot = false
        if let journal = FileManager.default.contents(atPath: target + "-journal") {
            hot = journal.prefix(28).contains { $0 != 0 }
        }
        let connection = try SQLiteConnection(path: target, mode: .readWrite, busyTimeout: .seconds(1))
        defer { connection.close() }
        let integrity = try connection.query("PRAGMA integrity_check").compactMap { $0.first?.text }
        return Found(hotJournal: hot, integrity: integrity,
                     journalMode: try connection.scalar("PRAGMA journal_mode")?.text ?? "?",
                     count: try connection.scalar(LiveDatabase.markerQuery)?.int ?? -1,
                     pageCount: try connection.scalar("PRAGMA page_count")?.int ?? -1)
    }
}

// MARK: the application's processes

/// `quiesce lab-workload sqlite`: one inserter process with its own connection, until SIGTERM.
private final class Inserter: @unchecked Sendable {
    let name: String
    let database: LiveDatabase
    let process: ChildProcess

    init(_ quiesce: String, database: LiveDatabase, number: Int) throws {
        name = "\(database.writer) inserter \(number)"
        self.database = database
        process = try ChildProcess(quiesce, ["lab-workload", "sqlite", "--database", database.file, "--table", "t",
                                             "--busy-timeout", "2000"],
                                   stdin: .null, stdout: .pipe, stderr: .pipe)
    }

    struct Stopped {
        var status: Int32
        var output: String
        /// From its last line, `N rows committed`.
        var rowsCommitted: Int64? {
            let words = output.split(whereSeparator: \.isNewline).last?.split(separator: " ") ?? []
            guard words.count == 3, words[1] == "rows", words[2] == "committed" else { return nil }
            return Int64(words[0])
        }
    }

    /// SIGTERM, then its output and exit status (SIGKILL if it has not exited within 20 s).
    func stop() async -> Stopped {
        process.signal(SIGTERM)
        let process = self.process
        return (try? await runBlocking { () -> Stopped in
            let (out, err) = drainOutput(process, killAfter: .seconds(20))
            let status = process.wait()
            return Stopped(status: status, output: out.trimmingCharacters(in: .whitespacesAndNewlines)
                           + (err.isEmpty ? "" : " (stderr: \(err.trimmingCharacters(in: .whitespacesAndNewlines)))"))
        }) ?? Stopped(status: -1, output: "")
    }
}

/// Reads a child's stdout and stderr pipes to EOF, killing its group if that takes longer than `killAfter`.
private func drainOutput(_ process: ChildProcess, killAfter limit: Duration) -> (String, String) {
    let start = ContinuousClock.now
    var out = [UInt8](), err = [UInt8]()
    var open = Set([process.stdoutFD, process.stderrFD].filter { $0 >= 0 })
    var buffer = [UInt8](repeating: 0, count: 4096)
    var killed = false
    while !open.isEmpty {
        var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        _ = poll(&fds, nfds_t(fds.count), 100)
        for p in fds where p.revents != 0 {
            let n = read(p.fd, &buffer, buffer.count)
            if n > 0 {
                if p.fd == process.stdoutFD { out += buffer[0..<n] } else { err += buffer[0..<n] }
            } else if n == 0 || errno != EINTR {
                open.remove(p.fd)
            }
        }
        if !killed, ContinuousClock.now - start > limit {
            killed = true
            process.signal(SIGKILL)
        }
    }
    return (String(decoding: out, as: UTF8.self), String(decoding: err, as: UTF8.self))
}

extension ChildProcess {
    /// Writes `text` to the child's stdin.
    fileprivate func send(_ text: String) throws {
        var bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeMutableBytes { write(stdinFD, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw POSIXFailure("write to pid \(pid)'s stdin", errno) }
            offset += n
        }
    }
}

/// Polls `condition` every 50 ms until it holds, or throws after `limit`.
private func waitUntil(_ what: String, within limit: Duration, _ condition: @Sendable () -> Bool) async throws {
    let giveUp = ContinuousClock.now + limit
    while !condition() {
        guard ContinuousClock.now < giveUp else { throw TestSupportError("timed out after \(formatDuration(limit)) waiting until \(what)") }
        try await Task.sleep(for: .milliseconds(50))
    }
}

private func milliseconds(_ value: Double?) -> String {
    value.map { String(format: "%.1f ms", $0) } ?? "-"
}
