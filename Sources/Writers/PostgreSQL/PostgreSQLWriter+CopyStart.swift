import Foundation
import QuiesceCore

extension PostgreSQLWriter: CopyStartable {
    /// Starts PostgreSQL on the copy for a DR test and leaves it running: the same preparation
    /// and server settings as `verify` (as postgres, Unix socket only in a private directory, no
    /// TCP, archiving off, trust for local connections), plus no logical replication workers (a
    /// subscription in the copy must not pull from production's publishers) and
    /// `cluster_name = quiesce-dr-test` (process titles say what the server is).
    public func startOnCopy(_ copy: CopyLayout, marker: ConsistencyMarker, workDirectory: String) async throws -> RunningCopy {
        try await runBlocking { [self] in try startCopy(copy, marker: marker, workDirectory: workDirectory) }
    }

    /// `pg_ctl stop -m fast` (then immediate) on the copy's data directory; removes the socket directory.
    public func stopOnCopy(_ running: RunningCopy) async throws {
        try await runBlocking { try Self.stopCopy(running) }
    }

    func startCopy(_ copy: CopyLayout, marker: ConsistencyMarker, workDirectory: String) throws -> RunningCopy {
        var checks = VerifyChecks()
        func failure(_ what: String) -> WriterError {
            WriterError(.nonRetryable, what + ": " + checks.details.filter { $0.hasPrefix("FAILED: ") }
                .map { String($0.dropFirst(8)) }.joined(separator: "; "))
        }
        guard let server = try prepareServer(on: copy, marker: marker, checks: &checks) else {
            throw failure("cannot prepare the copy's data directory")
        }
        let port = LoopbackPort.free(fallback: 54321)
        // The socket's path must fit sockaddr_un (107 bytes): a store deep in the tree gets one in /tmp.
        var socketDirectory = workDirectory + "/run"
        if (socketDirectory + "/.s.PGSQL.\(port).lock").utf8.count > 100 {
            socketDirectory = try Self.makePrivateDirectory(owner: server.owner)
        } else {
            try FileManager.default.createDirectory(atPath: socketDirectory, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
            guard chown(socketDirectory, server.owner.uid, server.owner.gid) == 0 else {
                throw POSIXFailure("chown \(socketDirectory)", errno)
            }
        }
        let log = workDirectory + "/server.log"
        let extra = ["-c max_logical_replication_workers=0", "-c cluster_name='quiesce-dr-test'"]
        let start = try startServer(server, socketDirectory: socketDirectory, port: port, log: log, extraOptions: extra, checks: &checks)
        guard let start, start.succeeded else {
            Self.stopServer(server.directory, bin: server.bin)
            try? FileManager.default.removeItem(atPath: socketDirectory)
            if start == nil { throw failure("cannot configure the server on the copy") }
            let tail = Self.tail(log, lines: 8).joined(separator: " | ")
            throw WriterError(.nonRetryable, "PostgreSQL \(server.version) did not start on the copy \(server.directory) within "
                              + "\(formatDuration(Self.verifyStartLimit)): " + PGConnection.trim(start!.stdout + start!.stderr)
                              + (tail.isEmpty ? "" : "; server log: " + tail),
                              hint: "the whole log is \(log) until `quiesce dr test stop`")
        }
        let pid = ((try? String(contentsOfFile: server.directory + "/postmaster.pid", encoding: .utf8)) ?? "")
            .split(separator: "\n").first.map(String.init) ?? ""
        return RunningCopy(
            writer: name, type: type,
            access: [
                "psql -h \(socketDirectory) -p \(port) -U \(Self.serverUser) -d postgres   (as root or \(Self.serverUser); Unix socket only, no TCP)",
                "PostgreSQL \(server.version), data directory \(server.directory), log \(log)",
            ],
            state: ["dataDirectory": server.directory, "bin": server.bin, "socketDirectory": socketDirectory,
                    "port": "\(port)", "pid": pid, "log": log, "version": server.version])
    }

    static func stopCopy(_ running: RunningCopy) throws {
        guard let directory = running.state["dataDirectory"], let bin = running.state["bin"] else {
            throw WriterError(.nonRetryable, "the DR test's state of \(running.writer) names no data directory: cannot stop its server",
                              hint: "stop it with pg_ctl stop -D <data directory> as \(serverUser)")
        }
        guard stopServer(directory, bin: bin) else {
            throw WriterError(.retryable, "PostgreSQL on the copy \(directory) did not stop (pid \(running.state["pid"] ?? "?"))",
                              hint: "look at \(running.state["log"] ?? "its log"), then run `quiesce dr test stop` again")
        }
        waitForBackends(directory)
        if let socketDirectory = running.state["socketDirectory"] {
            try? FileManager.default.removeItem(atPath: socketDirectory)
        }
    }

    /// Backends of a postmaster that died (kill -9) exit on their own once they notice: waits up
    /// to 10 s for the processes working in the data directory (their cwd) to go, so that the copy
    /// can be unmounted.
    static func waitForBackends(_ directory: String) {
        for _ in 0..<100 {
            guard let result = try? ChildProcess.runSync("fuser", ["-s", directory], timeout: .seconds(10)),
                  result.succeeded else { return }
            usleep(100_000)
        }
    }
}
