import Foundation
import QuiesceCore

extension PostgreSQLWriter {
    /// How long the server on a copy may take to recover and accept connections.
    static let verifyStartLimit: Duration = .seconds(120)
    /// The operating-system user the server runs as on a copy.
    static let serverUser = "postgres"

    /// Starts PostgreSQL on a copy of the snapshot set and checks it against the marker:
    /// the server recovers and accepts connections within the deadline, is not in recovery,
    /// its WAL position is at least the marker's, and `pg_amcheck --all` is clean.
    ///
    /// The copy is a throwaway clone and must be writable: its data directory is given to the
    /// `postgres` user, the live server's `postmaster.pid` is removed from it, and `pg_wal` or
    /// tablespace symlinks that point at live paths are re-pointed into the copy. The server
    /// listens on a Unix socket in a private directory only (no TCP), with WAL archiving off
    /// (a copy must never push WAL into the live archive) and trust authentication for local
    /// connections. The amcheck extension is installed in the copy's databases if missing.
    /// The server is stopped afterwards, also when a check fails.
    public func verify(copy: CopyLayout, marker: ConsistencyMarker) async throws -> VerifyReport {
        try await runBlocking { [self] in try verifyCopy(copy, marker: marker) }
    }

    func verifyCopy(_ copy: CopyLayout, marker: ConsistencyMarker) throws -> VerifyReport {
        var checks = VerifyChecks()
        guard let server = try prepareServer(on: copy, marker: marker, checks: &checks) else { return checks.report }
        let privateDirectory: String
        do { privateDirectory = try Self.makePrivateDirectory(owner: server.owner) } catch {
            checks.fail("cannot create a private socket directory: \(error)")
            return checks.report
        }
        defer { try? FileManager.default.removeItem(atPath: privateDirectory) }
        let log = privateDirectory + "/server.log"
        let port = LoopbackPort.free(fallback: 54321)
        let version = server.version, bin = server.bin
        let started = ContinuousClock.now
        guard let start = try startServer(server, socketDirectory: privateDirectory, port: port, log: log, checks: &checks) else {
            return checks.report
        }
        defer {
            // Always: a server left running would hold the copy's mount.
            Self.stopServer(server.directory, bin: server.bin)
        }
        let recovery = Self.recoveryLines(log)
        guard start.succeeded else {
            checks.fail("PostgreSQL did not start on the copy within \(formatDuration(Self.verifyStartLimit)): "
                        + PGConnection.trim(start.stdout + start.stderr))
            for line in Self.tail(log, lines: 15) { checks.pass("server log: " + line) }
            return checks.report
        }
        checks.pass("PostgreSQL \(version) started on the copy in \(formatDuration(ContinuousClock.now - started)) (as \(Self.serverUser), Unix socket only)")
        for line in recovery { checks.pass("recovery: " + line) }

        do {
            let connection = try PGConnection(conninfo: "host='\(privateDirectory)' port=\(port) dbname=postgres user=\(Self.serverUser)",
                                              connectTimeout: .seconds(10), passfile: nil, statementTimeout: nil,
                                              applicationName: "quiesce verify")
            defer { connection.close() }
            let inRecovery = try connection.scalar("SELECT pg_is_in_recovery()::text")
            if inRecovery == "false" {
                checks.pass("pg_is_in_recovery(): false")
            } else {
                checks.fail("pg_is_in_recovery(): \(inRecovery ?? "null"): the copy is a standby, or recovery did not finish")
            }
            let current = try connection.scalar(inRecovery == "false" ? "SELECT pg_current_wal_lsn()::text" : "SELECT pg_last_wal_replay_lsn()::text")
            if let recorded = marker[Self.lsnKey], let expected = LSN(recorded) {
                if let found = current.flatMap(LSN.init), found >= expected {
                    checks.pass("WAL position \(found) ≥ \(expected), the LSN recorded at freeze")
                } else {
                    checks.fail("WAL position \(current ?? "null") in the copy is before \(recorded), the LSN recorded at freeze: "
                                + "the snapshot does not hold what was committed before the freeze")
                }
            } else {
                checks.fail("the marker records no valid lsn (\(marker[Self.lsnKey] ?? "none"))")
            }
            // pg_amcheck checks the structure of pages; only page checksums catch bytes changed
            // inside a heap page whose structure is intact.
            if try connection.scalar("SHOW data_checksums") == "on" {
                checks.pass("data checksums: on (pg_amcheck's reads check every page it visits)")
            } else {
                checks.pass("note: data checksums are off: damage inside a heap page that leaves its structure intact "
                            + "goes unnoticed (initdb --data-checksums, or pg_checksums --enable on the stopped primary)")
            }
        } catch {
            checks.fail("cannot query the server on the copy: \(error)")
            return checks.report
        }

        let amcheck = try ChildProcess.runSync(bin + "/pg_amcheck", ["--all", "--install-missing", "-h", privateDirectory,
            "-p", "\(port)", "-U", Self.serverUser, "--no-password"], timeout: Self.verifyStartLimit)
        if amcheck.succeeded {
            checks.pass("pg_amcheck --all: clean")
        } else {
            let output = (amcheck.stdout + amcheck.stderr).split(separator: "\n").prefix(20).joined(separator: "; ")
            checks.fail("pg_amcheck --all \(amcheck.timedOut ? "timed out" : "exited \(amcheck.status)"): \(output)")
        }
        return checks.report
    }

    /// A PostgreSQL data directory in a copy, made startable: where it is, its major version,
    /// the server binaries for it, and the user that owns it now.
    struct CopyServer {
        var directory: String
        var version: String
        var bin: String
        var owner: (uid: uid_t, gid: gid_t)
    }

    /// Finds the data directory of the marker (or the spec) in the copy and makes it startable:
    /// the live server's `postmaster.pid` removed, `pg_wal` and tablespace links re-pointed into
    /// the copy, everything given to the server's user. Nil (after `checks.fail`) when it cannot.
    func prepareServer(on copy: CopyLayout, marker: ConsistencyMarker, checks: inout VerifyChecks) throws -> CopyServer? {
        guard let live = marker[Self.dataDirectoryKey] ?? dataDirectory else {
            checks.fail("the marker records no data_directory, and the spec sets none: cannot find the data directory in the copy")
            return nil
        }
        guard let directory = copy.translate(live) else {
            checks.fail("the data directory \(live) is on no volume of the copy (copied mounts: \(copy.mounts.keys.sorted().joined(separator: ", ")))")
            return nil
        }
        guard FileManager.default.fileExists(atPath: directory + "/PG_VERSION") else {
            checks.fail("the copy has no PostgreSQL data directory at \(directory) (no PG_VERSION)")
            return nil
        }
        guard access(directory, W_OK) == 0 else {
            checks.fail("the copy at \(directory) is not writable: PostgreSQL must replay its WAL on it (mount a writable clone of the snapshot)")
            return nil
        }
        let version = ((try? String(contentsOfFile: directory + "/PG_VERSION", encoding: .utf8)) ?? "")
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let bin: String
        do { bin = try Self.binaryDirectory(major: version) } catch {
            checks.fail("\(error)")
            return nil
        }
        guard let ids = Self.userIDs(Self.serverUser) else {
            checks.fail("there is no \(Self.serverUser) user on this machine to run the server on the copy (install PostgreSQL \(version))")
            return nil
        }

        // Make the clone startable: ours to change, never the live system.
        do {
            try prepareCopy(directory, copy: copy, owner: ids, checks: &checks)
        } catch {
            checks.fail("\(error)")
            return nil
        }
        let runsAs = try ChildProcess.runSync("/usr/sbin/runuser", ["-u", Self.serverUser, "--", "test", "-x", directory],
                                              timeout: .seconds(10))
        guard runsAs.succeeded else {
            checks.fail("the \(Self.serverUser) user cannot reach \(directory): every directory above the copy must be searchable by it (chmod o+x)")
            return nil
        }
        return CopyServer(directory: directory, version: version, bin: bin, owner: ids)
    }

    /// Starts the server on a prepared copy with `pg_ctl start -w`: Unix socket in `socketDirectory`
    /// (owned by the server's user) only, no TCP, WAL archiving off, trust for local connections
    /// (`pg_hba.conf` in `socketDirectory`), PostgreSQL's defaults when the copy has no
    /// `postgresql.conf`, plus `extraOptions` (`-c name=value`). Nil (after `checks.fail`) when the
    /// configuration cannot be written; otherwise pg_ctl's result (the server may not have started).
    func startServer(_ server: CopyServer, socketDirectory: String, port: Int, log: String, extraOptions: [String] = [],
                     checks: inout VerifyChecks) throws -> CommandResult? {
        let ids = server.owner, directory = server.directory
        do {
            try "local all all trust\n".write(toFile: socketDirectory + "/pg_hba.conf", atomically: false, encoding: .utf8)
            _ = chown(socketDirectory + "/pg_hba.conf", ids.uid, ids.gid)
        } catch {
            checks.fail("cannot write the copy's pg_hba.conf: \(error)")
            return nil
        }
        var options = [
            "-c listen_addresses=''", "-c unix_socket_directories='\(socketDirectory)'", "-p \(port)",
            "-c hba_file='\(socketDirectory)/pg_hba.conf'", "-c archive_mode=off", "-c logging_collector=off",
            "-c data_directory='\(directory)'",
        ]
        if !FileManager.default.fileExists(atPath: directory + "/postgresql.conf") {
            // Debian keeps postgresql.conf in /etc/postgresql: start the copy with the defaults.
            _ = FileManager.default.createFile(atPath: socketDirectory + "/postgresql.conf", contents: Data())
            _ = chown(socketDirectory + "/postgresql.conf", ids.uid, ids.gid)
            options.append("-c config_file='\(socketDirectory)/postgresql.conf'")
            checks.pass("the copy has no postgresql.conf: started with PostgreSQL's defaults")
        }
        options += extraOptions
        _ = FileManager.default.createFile(atPath: log, contents: Data())
        _ = chown(log, ids.uid, ids.gid)

        return try ChildProcess.runSync("/usr/sbin/runuser", ["-u", Self.serverUser, "--", server.bin + "/pg_ctl", "start",
            "-D", directory, "-l", log, "-w", "-t", "\(Int(Self.verifyStartLimit.seconds))", "-o", options.joined(separator: " ")],
            timeout: Self.verifyStartLimit + .seconds(10))
    }

    /// `pg_ctl stop -m fast`, then `-m immediate` if the server is still there. True when no server
    /// runs on the data directory afterwards (no `postmaster.pid`, or its process is gone: a crashed
    /// server leaves a stale one that pg_ctl cannot stop).
    @discardableResult
    static func stopServer(_ directory: String, bin: String) -> Bool {
        let stop = try? ChildProcess.runSync("/usr/sbin/runuser", ["-u", Self.serverUser, "--", bin + "/pg_ctl", "stop",
            "-D", directory, "-m", "fast", "-w", "-t", "30"], timeout: .seconds(40))
        if stop?.succeeded != true, FileManager.default.fileExists(atPath: directory + "/postmaster.pid") {
            _ = try? ChildProcess.runSync("/usr/sbin/runuser", ["-u", Self.serverUser, "--", bin + "/pg_ctl", "stop",
                "-D", directory, "-m", "immediate", "-w", "-t", "30"], timeout: .seconds(40))
        }
        return serverPID(directory) == nil
    }

    /// The live postmaster's pid from the data directory's `postmaster.pid`, nil if none runs.
    static func serverPID(_ directory: String) -> pid_t? {
        guard let text = try? String(contentsOfFile: directory + "/postmaster.pid", encoding: .utf8),
              let pid = text.split(separator: "\n").first.flatMap({ pid_t($0.trimmingCharacters(in: .whitespaces)) }),
              pid > 0, kill(pid, 0) == 0 || errno == EPERM else { return nil }
        return pid
    }


    /// Removes the live server's lock file and re-points symlinks to live paths, then gives the
    /// data directory (and WAL directory and tablespaces inside the copy) to the server's user.
    private func prepareCopy(_ directory: String, copy: CopyLayout, owner: (uid: uid_t, gid: gid_t),
                             checks: inout VerifyChecks) throws {
        if unlink(directory + "/postmaster.pid") == 0 {
            checks.pass("removed the live server's postmaster.pid from the copy")
        }
        var owned = [directory]
        var links = [directory + "/pg_wal"]
        let tablespaces = (try? FileManager.default.contentsOfDirectory(atPath: directory + "/pg_tblspc")) ?? []
        links += tablespaces.map { directory + "/pg_tblspc/" + $0 }
        for link in links {
            guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: link) else { continue }
            // Already inside the copy (verified before): leave it.
            if copy.mounts.values.contains(where: { target == $0 || target.hasPrefix($0.hasSuffix("/") ? $0 : $0 + "/") }) {
                owned.append(target)
                continue
            }
            guard let translated = copy.translate(target) else {
                throw WriterError(.nonRetryable, "\(link) in the copy points at \(target), which is on no volume of the copy")
            }
            unlink(link)
            guard symlink(translated, link) == 0 else { throw POSIXFailure("symlink \(link)", errno) }
            owned.append(translated)
            checks.pass("re-pointed \(link) from \(target) to the copy's \(translated)")
        }
        for path in owned {
            let result = try ChildProcess.runSync("chown", ["-R", "\(owner.uid):\(owner.gid)", path], timeout: .seconds(120))
            guard result.succeeded else {
                throw WriterError(.nonRetryable, "cannot give \(path) to \(Self.serverUser): \(result.stderr)")
            }
        }
    }

    /// The log lines that tell how the server on the copy recovered.
    static func recoveryLines(_ log: String) -> [String] {
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        let wanted = ["not properly shut down", "automatic recovery", "redo starts at", "redo done at", "interrupted",
                      "invalid record length", "backup", "checkpoint record", "consistent recovery state",
                      "ready to accept connections", "was shut down at"]
        return text.split(separator: "\n").map(String.init).filter { line in wanted.contains { line.contains($0) } }
            .map { line in
                // Drop the timestamp and pid prefix: "2026-… UTC [123] LOG:  redo done at …" → "LOG:  redo done at …".
                if let range = line.range(of: "] ") { return String(line[range.upperBound...]) }
                return line
            }
    }

    static func tail(_ log: String, lines: Int) -> [String] {
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").suffix(lines).map(String.init)
    }

    /// `/usr/lib/postgresql/<major>/bin`, else `pg_config --bindir`, else the directory of `postgres` in PATH.
    static func binaryDirectory(major: String) throws -> String {
        let debian = "/usr/lib/postgresql/\(major)/bin"
        if access(debian + "/postgres", X_OK) == 0 { return debian }
        if let result = try? ChildProcess.runSync("pg_config", ["--bindir"], timeout: .seconds(10)), result.succeeded {
            let directory = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            if access(directory + "/postgres", X_OK) == 0 { return directory }
        }
        throw WriterError(.nonRetryable, "no PostgreSQL \(major) server binaries to start the copy with (looked in \(debian) and pg_config --bindir)",
                          hint: "install the server of the same major version: apt-get install postgresql-\(major)")
    }

    static func userIDs(_ name: String) -> (uid: uid_t, gid: gid_t)? {
        guard let entry = getpwnam(name) else { return nil }
        return (entry.pointee.pw_uid, entry.pointee.pw_gid)
    }

    static func makePrivateDirectory(owner: (uid: uid_t, gid: gid_t)) throws -> String {
        var template = Array("/tmp/quiesce-pg-verify-XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!).map { String(cString: $0) } }) else {
            throw POSIXFailure("mkdtemp in /tmp", errno)
        }
        guard chown(made, owner.uid, owner.gid) == 0 else {
            let code = errno
            try? FileManager.default.removeItem(atPath: made)
            throw POSIXFailure("chown \(made)", code)
        }
        return made
    }

}

