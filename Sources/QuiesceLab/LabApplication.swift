import Foundation
import QuiesceCore

/// One application living in the lab's guest filesystem: its data, its writer spec(s),
/// its write workload. The lab and the demo run every application the same way, so adding
/// one (PostgreSQL, the mail store) is one more conformance, not a change to the demo.
public protocol LabApplication: Sendable {
    var name: String { get }
    /// Debian packages it needs (checked by `lab up`, installed by the README's demo command).
    var requiredTools: [String] { get }
    /// Create its data inside the guest and write its writer spec(s) into `writers.d/`. Idempotent.
    func setUp(_ lab: LabLayout) async throws
    /// Start its write workload; the processes run until stopped.
    func startWorkload(_ lab: LabLayout, executable: String) throws -> [LabWorkload]
    /// Stop whatever servers it started (workloads are stopped by the lab). Must work after a crash.
    func tearDown(_ lab: LabLayout) async
}

/// A running workload process: a name and its process.
public final class LabWorkload: @unchecked Sendable {
    public let name: String
    let process: ChildProcess

    public init(name: String, process: ChildProcess) {
        self.name = name
        self.process = process
    }

    /// Asks it to stop (SIGTERM) and returns what it printed on stdout (its summary).
    public func stop() async -> String {
        process.signal(SIGTERM)
        let process = self.process
        return (try? await runBlocking { () -> String in
            var output = [UInt8]()
            var buffer = [UInt8](repeating: 0, count: 4096)
            while process.stdoutFD >= 0 {
                let n = read(process.stdoutFD, &buffer, buffer.count)
                if n <= 0 { break }
                output += buffer[0..<n]
            }
            process.wait()
            return String(decoding: output, as: UTF8.self)
        }) ?? ""
    }
}

/// Two SQLite databases in the guest: `orders.db` in WAL mode and `ledger.db` in
/// rollback-journal mode, each with inserters in their own processes.
public struct SQLiteLabApplication: LabApplication {
    public let name = "sqlite"
    public let requiredTools = ["sqlite3"]
    public var insertersPerDatabase: Int

    public init(insertersPerDatabase: Int = 2) { self.insertersPerDatabase = insertersPerDatabase }

    struct Database {
        var writer: String
        var file: String
        var table: String
        var journalMode: String
    }

    func databases(_ lab: LabLayout) -> [Database] {
        [
            Database(writer: "orders", file: "\(lab.guest)/app/orders.db", table: "orders", journalMode: "wal"),
            Database(writer: "ledger", file: "\(lab.guest)/app/ledger.db", table: "entries", journalMode: "delete"),
        ]
    }

    public func setUp(_ lab: LabLayout) async throws {
        try FileManager.default.createDirectory(atPath: "\(lab.guest)/app", withIntermediateDirectories: true)
        for db in databases(lab) {
            try createDatabase(db)
            let spec = """
                # Registered by `quiesce lab up`: the lab's \(db.journalMode == "wal" ? "WAL-mode" : "rollback-journal") SQLite database.
                name = "\(db.writer)"
                type = "sqlite"
                database = "\(db.file)"
                busy_timeout = "5s"
                marker_query = "SELECT count(*) FROM \(db.table)"
                order = 10
                timeout = "20s"

                """
            try lab.registerWriter(db.writer, spec: spec)
        }
    }

    func createDatabase(_ db: Database) throws {
        let result = try ChildProcess.runSync("sqlite3", [db.file], input: """
            PRAGMA journal_mode=\(db.journalMode);
            CREATE TABLE IF NOT EXISTS \(db.table) (id INTEGER PRIMARY KEY, payload TEXT NOT NULL, created_at TEXT NOT NULL);
            """, timeout: .seconds(30))
        guard result.succeeded else {
            throw LabError("could not create \(db.file) with sqlite3: \(result.stderr)")
        }
    }

    public func startWorkload(_ lab: LabLayout, executable: String) throws -> [LabWorkload] {
        var workloads: [LabWorkload] = []
        for db in databases(lab) {
            for n in 1...max(1, insertersPerDatabase) {
                let process = try ChildProcess(executable, ["lab-workload", "sqlite", "--database", db.file, "--table", db.table],
                                               extraEnvironment: [Lab.workloadMarker: lab.root],
                                               stdin: .null, stdout: .pipe, stderr: .inherit)
                workloads.append(LabWorkload(name: "\(db.writer) inserter \(n)", process: process))
            }
        }
        return workloads
    }

    public func tearDown(_ lab: LabLayout) async {}
}

/// An application owner's exec hook: a shell script outside the guest that logs each call.
public struct ExecHookLabApplication: LabApplication {
    public let name = "exec-hook"
    public let requiredTools: [String] = []

    public init() {}

    public func setUp(_ lab: LabLayout) async throws {
        let script = "\(lab.hooks)/app-hook"
        let text = """
            #!/bin/sh
            # The lab's example exec writer: called as `app-hook freeze|thaw|freeze-failed`.
            # A real hook would tell its application to flush and pause here.
            echo "$(date -u +%FT%T.%NZ) $1 checkpoint=$QUIESCE_CHECKPOINT_ID volume=$QUIESCE_VOLUME" >> \(lab.logs)/app-hook.log
            [ "$1" = freeze ] && echo "marker calls=$(wc -l < \(lab.logs)/app-hook.log)"
            exit 0

            """
        try FileManager.default.createDirectory(atPath: lab.hooks, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: lab.logs, withIntermediateDirectories: true)
        try text.write(toFile: script, atomically: true, encoding: .utf8)
        chmod(script, 0o755)
        let spec = """
            # Registered by `quiesce lab up`: an application owner's own freeze/thaw script.
            name = "app-hook"
            type = "exec"
            command = "\(script)"
            volume = "\(LabLayout.volumeName)"
            order = 0
            timeout = "10s"

            """
        try lab.registerWriter("app-hook", spec: spec)
    }

    public func startWorkload(_ lab: LabLayout, executable: String) throws -> [LabWorkload] { [] }
    public func tearDown(_ lab: LabLayout) async {}
}

extension LabLayout {
    /// Writes a writer's drop-in as `quiesce writers add` would install it (mode 0600).
    func registerWriter(_ name: String, spec: String) throws {
        let path = "\(writersDirectory)/\(name).toml"
        try spec.write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o600)
    }
}

public struct LabError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
