import Foundation
import QuiesceCore

/// A PostgreSQL 15 cluster inside the lab's guest filesystem, run as the `postgres` user,
/// listening on a Unix socket outside the guest and on a loopback port, registered as a
/// `postgresql` writer with a least-privilege role (not a superuser), and loaded with pgbench.
///
/// ```
/// <guest>/postgresql/data        the data directory (initdb, owned by postgres, mode 0700)
/// <lab>/postgresql/run           the Unix socket directory
/// <lab>/postgresql/port          the loopback port chosen at the first `lab up`
/// <lab>/postgresql/quiesce.pgpass the writer role's password (mode 0600)
/// <lab>/logs/postgresql.log      the server's log (never in the guest: it is frozen)
/// ```
public struct PostgreSQLLabApplication: LabApplication {
    public let name = "postgresql"
    public let requiredTools = ["runuser", "psql", "pgbench"]
    /// Where the server binaries are.
    public var bin: String
    /// pgbench clients during the demo.
    public var clients: Int

    public init(bin: String = "/usr/lib/postgresql/15/bin", clients: Int = 2) {
        self.bin = bin
        self.clients = clients
    }

    static let user = "postgres"
    static let role = "quiesce"

    func dataDirectory(_ lab: LabLayout) -> String { "\(lab.guest)/postgresql/data" }
    func home(_ lab: LabLayout) -> String { "\(lab.root)/postgresql" }
    func socketDirectory(_ lab: LabLayout) -> String { "\(home(lab))/run" }
    func passfile(_ lab: LabLayout) -> String { "\(home(lab))/quiesce.pgpass" }
    func logFile(_ lab: LabLayout) -> String { "\(lab.logs)/postgresql.log" }

    public func setUp(_ lab: LabLayout) async throws {
        guard access(bin + "/initdb", X_OK) == 0 else {
            throw LabError("no PostgreSQL 15 server in \(bin) (apt-get install postgresql-15; scripts/install-deps does it)")
        }
        guard getpwnam(Self.user) != nil else { throw LabError("no \(Self.user) user (apt-get install postgresql-15 creates it)") }
        let data = dataDirectory(lab)
        try FileManager.default.createDirectory(atPath: socketDirectory(lab), withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: lab.logs, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: (data as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        chmod(home(lab), 0o755)
        if !FileManager.default.fileExists(atPath: logFile(lab)) {
            _ = FileManager.default.createFile(atPath: logFile(lab), contents: nil)
        }
        try await run("chown", ["-R", "\(Self.user):\(Self.user)", socketDirectory(lab), logFile(lab),
                                (data as NSString).deletingLastPathComponent])

        let reach = try await ChildProcess.run("/usr/sbin/runuser", ["-u", Self.user, "--", "test", "-w", (data as NSString).deletingLastPathComponent],
                                               timeout: .seconds(10))
        guard reach.succeeded else {
            throw LabError("the \(Self.user) user cannot reach \((data as NSString).deletingLastPathComponent): every directory above the lab "
                           + "must be searchable by it (chmod o+x on each, or put the lab under a directory with mode 0755)")
        }
        if !FileManager.default.fileExists(atPath: data + "/PG_VERSION") {
            // Page checksums: DR verification then catches damage inside heap pages, not only broken structure.
            try await asPostgres(bin + "/initdb", ["-D", data, "-U", Self.user, "--data-checksums", "--auth-local=peer", "--auth-host=scram-sha-256",
                                                   "-E", "UTF8", "--no-instructions"])
            try """
                # Written by `quiesce lab up`: postgres by peer over the socket, everyone else by password.
                local all \(Self.user) peer
                local all all scram-sha-256
                host all all 127.0.0.1/32 scram-sha-256

                """.write(toFile: data + "/pg_hba.conf", atomically: false, encoding: .utf8)
            try await run("chown", ["\(Self.user):\(Self.user)", data + "/pg_hba.conf"])
        }
        let port = try self.port(lab)
        if try await !isRunning(lab) {
            let options = "-c listen_addresses='127.0.0.1' -c unix_socket_directories='\(socketDirectory(lab))' -p \(port) "
                + "-c max_wal_size=128MB -c min_wal_size=32MB -c shared_buffers=64MB -c logging_collector=off"
            try await asPostgres(bin + "/pg_ctl", ["start", "-D", data, "-l", logFile(lab), "-w", "-t", "60", "-o", options])
        }

        // The writer's least-privilege role, with a password of its own in a passfile.
        let password: String
        if let saved = try? String(contentsOfFile: passfile(lab), encoding: .utf8),
           let last = saved.split(separator: ":").last.map({ $0.trimmingCharacters(in: .whitespacesAndNewlines) }), !last.isEmpty {
            password = last
        } else {
            password = UUID().uuidString.replacingOccurrences(of: "-", with: "")
        }
        try await psql(lab, """
            DO $$ BEGIN
              IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '\(Self.role)') THEN CREATE ROLE \(Self.role) LOGIN; END IF;
            END $$;
            ALTER ROLE \(Self.role) PASSWORD '\(password)';
            GRANT pg_checkpoint, pg_read_all_settings TO \(Self.role);
            GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean) TO \(Self.role);
            """)
        try "\(socketDirectory(lab)):\(port):*:\(Self.role):\(password)\n127.0.0.1:\(port):*:\(Self.role):\(password)\n"
            .write(toFile: passfile(lab), atomically: true, encoding: .utf8)
        chmod(passfile(lab), 0o600)

        if try await psql(lab, "SELECT to_regclass('pgbench_accounts') IS NOT NULL") != "t" {
            try await asPostgres(bin + "/pgbench", ["-i", "-s", "1", "-q", "-h", socketDirectory(lab), "-p", "\(port)", "postgres"])
        }

        let spec = """
            # Registered by `quiesce lab up`: the lab's PostgreSQL 15 cluster, reached as a least-privilege
            # role (pg_checkpoint, pg_read_all_settings); its password is in the passfile.
            name = "postgresql"
            type = "postgresql"
            conninfo = "host=\(socketDirectory(lab)) port=\(port) dbname=postgres user=\(Self.role)"
            passfile = "\(passfile(lab))"
            mode = "checkpoint"
            statement_timeout = "15s"
            order = 20
            timeout = "20s"

            """
        try lab.registerWriter("postgresql", spec: spec)
    }

    /// pgbench (TPC-B-like) as postgres over the socket, in a shell that, when the lab stops it
    /// (SIGTERM to the group), prints how many transactions committed meanwhile (one
    /// `pgbench_history` row each) as `<n> rows committed`, like the lab's other workloads.
    public func startWorkload(_ lab: LabLayout, executable: String) throws -> [LabWorkload] {
        let port = try self.port(lab)
        let client = "-h '\(socketDirectory(lab))' -p \(port)"
        let script = """
            count() { /usr/sbin/runuser -u \(Self.user) -- '\(bin)/psql' -XAt \(client) -d postgres -c 'SELECT count(*) FROM pgbench_history'; }
            start=$(count)
            /usr/sbin/runuser -u \(Self.user) -- '\(bin)/pgbench' -n -c \(clients) -j 1 -T 86400 \(client) postgres >/dev/null 2>&1 &
            p=$!
            finish() { trap '' TERM INT; kill $p 2>/dev/null; wait $p 2>/dev/null; end=$(count); echo "$((end - start)) rows committed"; exit 0; }
            trap finish TERM INT
            wait $p
            finish
            """
        let process = try ChildProcess("/bin/sh", ["-c", script], extraEnvironment: [Lab.workloadMarker: lab.root],
                                       stdin: .null, stdout: .pipe, stderr: .null)
        return [LabWorkload(name: "pgbench (\(clients) clients)", process: process)]
    }

    /// Stops the cluster: fast, then immediate; works after a crash as long as the guest is mounted.
    public func tearDown(_ lab: LabLayout) async {
        let data = dataDirectory(lab)
        guard FileManager.default.fileExists(atPath: data + "/postmaster.pid") else { return }
        do {
            try await asPostgres(bin + "/pg_ctl", ["stop", "-D", data, "-m", "fast", "-w", "-t", "20"])
        } catch {
            try? await asPostgres(bin + "/pg_ctl", ["stop", "-D", data, "-m", "immediate", "-w", "-t", "20"])
        }
    }

    // MARK: helpers

    /// The loopback port, chosen once and kept in `<lab>/postgresql/port`.
    func port(_ lab: LabLayout) throws -> Int {
        let file = home(lab) + "/port"
        if let text = try? String(contentsOfFile: file, encoding: .utf8), let port = Int(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
            return port
        }
        let port = LoopbackPort.free(fallback: 54329)
        try "\(port)\n".write(toFile: file, atomically: true, encoding: .utf8)
        return port
    }

    func isRunning(_ lab: LabLayout) async throws -> Bool {
        let result = try await ChildProcess.run("/usr/sbin/runuser", ["-u", Self.user, "--", bin + "/pg_ctl", "status", "-D", dataDirectory(lab)],
                                                timeout: .seconds(20))
        return result.status == 0
    }

    @discardableResult
    func psql(_ lab: LabLayout, _ sql: String) async throws -> String {
        let result = try await ChildProcess.run("/usr/sbin/runuser", ["-u", Self.user, "--", bin + "/psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
                                                                       "-h", socketDirectory(lab), "-p", "\(try port(lab))", "-d", "postgres", "-c", sql],
                                                timeout: .seconds(60))
        guard result.succeeded else { throw LabError("psql on the lab's PostgreSQL failed: \(result.stderr)") }
        return result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func asPostgres(_ program: String, _ arguments: [String]) async throws {
        try await run("/usr/sbin/runuser", ["-u", Self.user, "--", program] + arguments, timeout: .seconds(120))
    }

    func run(_ program: String, _ arguments: [String], timeout: Duration = .seconds(60)) async throws {
        let result = try await ChildProcess.run(program, arguments, timeout: timeout)
        guard result.succeeded else {
            throw LabError("\((program as NSString).lastPathComponent) \(arguments.joined(separator: " ")) failed: \(result.stderr)\(result.stdout)")
        }
    }
}
