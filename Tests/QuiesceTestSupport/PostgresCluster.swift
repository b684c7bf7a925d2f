import Foundation
import QuiesceCore

/// A real PostgreSQL 15 cluster for one test, run as the `postgres` user with its own data
/// directory, Unix socket directory and port, and no TCP listener. Always stopped by `with`.
///
/// ```swift
/// try await PostgresCluster.with(dataDirectory: world.guest + "/pg/data", scratch: world.path("pg")) { cluster in
///     try await cluster.psql("CREATE TABLE t (id int)")
/// }
/// ```
///
/// Authentication: the `postgres` role connects over the socket without a password (the
/// fixture's own access); every other role needs its password (scram-sha-256).
public final class PostgresCluster: Sendable {
    /// Where the PostgreSQL 15 binaries are.
    public static let bin = "/usr/lib/postgresql/15/bin"
    public static let user = "postgres"

    public let dataDirectory: String
    /// The Unix socket's directory (libpq's `host`).
    public let socketDirectory: String
    public let port: Int
    public let logFile: String

    /// A cluster over an existing data directory (e.g. a copy of a snapshot); not started.
    public init(dataDirectory: String, scratch: String) throws {
        self.dataDirectory = dataDirectory
        self.socketDirectory = scratch + "/socket"
        self.logFile = scratch + "/server.log"
        self.port = LoopbackPort.free(fallback: 40000 + Int(getpid() % 20000))
        try FileManager.default.createDirectory(atPath: socketDirectory, withIntermediateDirectories: true)
        try Self.chownToPostgres(scratch)
        chmod(scratch, 0o755)
    }

    /// What is missing to run clusters, each with its fix.
    public static var missing: [String] {
        var missing: [String] = []
        if access(bin + "/postgres", X_OK) != 0 { missing.append("no PostgreSQL 15 server in \(bin) (apt-get install postgresql-15)") }
        if getpwnam(user) == nil { missing.append("no \(user) user (apt-get install postgresql-15 creates it)") }
        if access("/usr/sbin/runuser", X_OK) != 0 { missing.append("no /usr/sbin/runuser (apt-get install util-linux)") }
        return missing
    }

    public static func requireServer() throws {
        guard missing.isEmpty else { throw MissingPrerequisite("PostgreSQL tests cannot run here: " + missing.joined(separator: "; ")) }
    }

    /// initdb into `dataDirectory` (its parent is created and given to postgres), start,
    /// run `body`, and stop the server, also when `body` throws.
    /// `initdbArguments` are added to initdb's (e.g. `--waldir=…`; that directory's parent is given to postgres too).
    public static func with<T: Sendable>(dataDirectory: String, scratch: String, initdbArguments: [String] = [],
                                         _ body: @Sendable (PostgresCluster) async throws -> T) async throws -> T {
        try requireServer()
        let parent = (dataDirectory as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
        try chownToPostgres(parent)
        let cluster = try PostgresCluster(dataDirectory: dataDirectory, scratch: scratch)
        try await cluster.initdb(initdbArguments)
        return try await cluster.running(body)
    }

    /// Starts the server, runs `body`, stops it (fast, then immediate), also when `body` throws.
    public func running<T: Sendable>(_ body: @Sendable (PostgresCluster) async throws -> T) async throws -> T {
        try await start()
        let result: Result<T, any Error>
        do { result = .success(try await body(self)) } catch { result = .failure(error) }
        await stop()
        return try result.get()
    }

    func initdb(_ extra: [String] = []) async throws {
        try await asPostgres(Self.bin + "/initdb", ["-D", dataDirectory, "-U", Self.user, "--auth-local=trust",
                                                     "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions"] + extra)
        try """
            local all \(Self.user) trust
            local all all scram-sha-256
            host all all 127.0.0.1/32 scram-sha-256

            """.write(toFile: dataDirectory + "/pg_hba.conf", atomically: false, encoding: .utf8)
    }

    /// `pg_ctl start -w`: listening on the Unix socket only, small WAL, logging to `logFile`.
    public func start() async throws {
        let options = "-c listen_addresses='' -c unix_socket_directories='\(socketDirectory)' -p \(port) "
            + "-c max_wal_size=96MB -c min_wal_size=32MB -c shared_buffers=32MB -c logging_collector=off"
        try await asPostgres(Self.bin + "/pg_ctl", ["start", "-D", dataDirectory, "-l", logFile, "-w", "-t", "60", "-o", options])
    }

    /// Stops the server if it runs: fast, then immediate.
    public func stop() async {
        guard FileManager.default.fileExists(atPath: dataDirectory + "/postmaster.pid") else { return }
        do {
            try await asPostgres(Self.bin + "/pg_ctl", ["stop", "-D", dataDirectory, "-m", "fast", "-w", "-t", "30"])
        } catch {
            try? await asPostgres(Self.bin + "/pg_ctl", ["stop", "-D", dataDirectory, "-m", "immediate", "-w", "-t", "30"])
        }
    }

    /// A libpq connection string for `user` over the socket.
    public func conninfo(user: String = PostgresCluster.user, database: String = "postgres") -> String {
        "host=\(socketDirectory) port=\(port) dbname=\(database) user=\(user)"
    }

    /// Runs SQL through psql as the `postgres` role; returns its unaligned, tuples-only output.
    @discardableResult
    public func psql(_ sql: String, database: String = "postgres") async throws -> String {
        let result = try await ChildProcess.run(Self.bin + "/psql", ["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", socketDirectory,
                                                                      "-p", "\(port)", "-U", Self.user, "-d", database, "-c", sql],
                                                timeout: .seconds(60))
        guard result.succeeded else {
            throw TestSupportError("psql \"\(sql)\" failed (\(result.status)): \(result.stderr)")
        }
        return result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The arguments that point a client program (psql, pgbench) at this server as `postgres`.
    public var clientArguments: [String] { ["-h", socketDirectory, "-p", "\(port)", "-U", Self.user] }

    func asPostgres(_ program: String, _ arguments: [String]) async throws {
        let result = try await ChildProcess.run("/usr/sbin/runuser", ["-u", Self.user, "--", program] + arguments,
                                                timeout: .seconds(90))
        guard result.succeeded else {
            throw TestSupportError("\(program) \(arguments.joined(separator: " ")) failed (\(result.status)): \(result.stdout)\(result.stderr)"
                                   + "\n" + ((try? String(contentsOfFile: logFile, encoding: .utf8)) ?? "").suffix(2000))
        }
    }

    /// `chown -R postgres:postgres path`.
    public static func chownToPostgres(_ path: String) throws {
        let result = try ChildProcess.runSync("chown", ["-R", "\(user):\(user)", path], timeout: .seconds(60))
        guard result.succeeded else { throw TestSupportError("chown -R \(user) \(path): \(result.stderr)") }
    }

}
