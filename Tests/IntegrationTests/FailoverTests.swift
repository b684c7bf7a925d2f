import Foundation
import Quiesce
import QuiesceCore
import QuiesceDR
import QuiesceReplication
import QuiesceSQLite
import QuiesceSystem
import QuiesceTestSupport
import Testing

/// `quiesce failover prepare` and `quiesce failover promote`, run on the lab as an operator
/// runs them: the built binary, a lab of its own under /tmp, small sizes.
@Suite(.serialized, .enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI))
struct FailoverTests {
    static let sizes = ["--image-size", "128", "--datastore-size", "768"]

    /// The pre-failover hook on a healthy site: exit 0, the checkpoint id and a zero data-loss
    /// window; the DR store has the checkpoint, verified. With an unreachable second target it
    /// exits 8 naming that target.
    @Test
    func failoverPrepareIsReadyOnlyWhenEveryTargetAppliedAndVerified() async throws {
        try TestEnvironment.requireWorlds()
        try await withFailoverLab { lab in
            let config = lab.root + "/quiesce.toml"
            let prepared = try await run(["failover", "prepare", "--config", config])
            try #require(prepared.succeeded, "failover prepare: \(described(prepared))")
            let id = try #require(prepared.stdout.split(separator: "\n").first.flatMap { line -> String? in
                let words = line.split(separator: " ")
                return words.count >= 3 && words[0] == "checkpoint" && words[2] == "completed" ? String(words[1]) : nil
            }, "no checkpoint id in: \(prepared.stdout)")
            #expect(prepared.stdout.contains("data-loss window: 0"), "\(prepared.stdout)")
            #expect(prepared.stdout.contains("target dr (vm1): applied, verified"), "\(prepared.stdout)")
            let store = lab.root + "/dr/store/vm1"
            #expect(FileManager.default.fileExists(atPath: "\(store)/\(id).img"), "the DR store lacks \(id)")
            let verification = try String(contentsOfFile: "\(store)/\(id).verify.json", encoding: .utf8)
            #expect(verification.contains("\"ok\" : true"), "\(verification)")
            print("failover prepare: \(prepared.stdout)")

            // A target that does not verify: the copy is there but nobody knows it starts, exit 10.
            let verifying = try String(contentsOfFile: config, encoding: .utf8)
            try #require(verifying.contains("verify = true"), "\(verifying)")
            try verifying.replacingOccurrences(of: "verify = true", with: "verify = false").write(toFile: config, atomically: true, encoding: .utf8)
            let unverified = try await run(["failover", "prepare", "--config", config])
            #expect(unverified.status == 10, "failover prepare to a target that does not verify: \(described(unverified))")
            #expect(unverified.stderr.contains("target dr (vm1)") && unverified.stderr.contains("verify = true"), "\(unverified.stderr)")
            try verifying.write(toFile: config, atomically: true, encoding: .utf8)

            // A second target that cannot be reached: not ready, exit 8, the target named.
            let unreachable = """

                [[target]]
                name = "nowhere"
                url = "ssh://127.0.0.1/nowhere"
                ssh_options = ["-p", "1", "-o", "ConnectTimeout=3"]

                """
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: config))
            handle.seekToEndOfFile()
            handle.write(Data(unreachable.utf8))
            try handle.close()
            let refused = try await run(["failover", "prepare", "--config", config, "--json"])
            #expect(refused.status == 8, "failover prepare with an unreachable target: \(described(refused))")
            #expect(refused.stderr.contains("target nowhere (vm1) did not get checkpoint"), "\(refused.stderr)")
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            let report = try decoder.decode(FailoverPreparation.self, from: Data(refused.stdout.utf8))
            #expect(report.dataLossWindowSeconds == nil)
            #expect(report.targets.first { $0.target == "dr" }?.ok == true, "the reachable target still got it: \(report.targets)")
            #expect(report.targets.first { $0.target == "nowhere" }?.ok == false)
        }
    }

    /// The DR copy becomes the live image: it mounts, holds the rows written before the last
    /// checkpoint (and not those after), and PostgreSQL starts on it with them. A second promote
    /// is refused (exit 64) without touching the image; with --force it replaces it.
    @Test
    func promotedImageMountsAndStartsWithTheLastCheckpointsData() async throws {
        try TestEnvironment.requireWorlds()
        try await withFailoverLab { lab in
            let config = lab.root + "/quiesce.toml"
            let store = lab.root + "/dr/store"
            let orders = lab.root + "/guest/app/orders.db"
            try sqlite(orders, "INSERT INTO orders (payload, created_at) VALUES ('before-failover', datetime('now'))")
            try await labPSQL(lab, "CREATE TABLE failover_check (note text); INSERT INTO failover_check VALUES ('before-failover')")

            // Nothing verified yet: refused, naming dr verify.
            let first = try await run(["checkpoint", "--config", config, "--replicate"])
            try #require(first.succeeded, "checkpoint --replicate: \(described(first))")
            let id = try #require(FileManager.default.contentsOfDirectory(atPath: store + "/vm1")
                .filter { $0.hasSuffix(".img") }.map { String($0.dropLast(4)) }.max())
            let verifyFile = "\(store)/vm1/\(id).verify.json"
            try FileManager.default.moveItem(atPath: verifyFile, toPath: lab.scratch + "/verify.json")
            let unverified = try await run(["failover", "promote", "--store", store, "--volume", "vm1", "--to", lab.root + "/promoted.img"])
            #expect(unverified.status == 9, "promote with no verified checkpoint: \(described(unverified))")
            #expect(unverified.stderr.contains("quiesce dr verify"), "\(unverified.stderr)")
            #expect(!FileManager.default.fileExists(atPath: lab.root + "/promoted.img"))
            try FileManager.default.moveItem(atPath: lab.scratch + "/verify.json", toPath: verifyFile)

            try sqlite(orders, "INSERT INTO orders (payload, created_at) VALUES ('after-checkpoint', datetime('now'))")

            let image = lab.root + "/promoted.img"
            let promoted = try await run(["failover", "promote", "--store", store, "--volume", "vm1", "--to", image, "--json"])
            try #require(promoted.succeeded, "failover promote: \(described(promoted))")
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            let report = try decoder.decode(PromotionReport.self, from: Data(promoted.stdout.utf8))
            #expect(report.checkpoint == id && report.chosen == "newest verified" && report.verification == "verified", "\(report)")
            #expect(report.copiedBy == "sparse copy", "the lab's root is not on the store's XFS: \(report.copiedBy)")
            #expect(report.writers.first { $0.writer == "postgresql" }?.actions.contains("removed the primary's postmaster.pid") == true,
                    "\(report.writers)")
            #expect(!FileManager.default.fileExists(atPath: image + ".partial"))

            try await withMountedImage(image, at: lab.scratch + "/promoted") { root in
                #expect(try sqliteCount(root + "/app/orders.db", "payload = 'before-failover'") == 1, "the promoted image lacks the row written before the checkpoint")
                #expect(try sqliteCount(root + "/app/orders.db", "payload = 'after-checkpoint'") == 0, "the promoted image has a row written after the checkpoint")
                #expect(!FileManager.default.fileExists(atPath: root + "/postgresql/data/postmaster.pid"))
                let rows = try await withServer(on: root + "/postgresql/data", scratch: lab.scratch) { query in
                    try await query("SELECT note FROM failover_check")
                }
                #expect(rows == "before-failover", "PostgreSQL on the promoted image: \(rows)")
                // In use (attached, mounted): refused even with --force.
                let inUse = try await run(["failover", "promote", "--store", store, "--volume", "vm1", "--to", image, "--force"])
                #expect(inUse.status == 64 && inUse.stderr.contains("is in use by /dev/loop"), "promote over a mounted image: \(described(inUse))")
            }

            // Again without --force: refused, the image untouched.
            let before = try fileIdentity(image)
            let again = try await run(["failover", "promote", "--store", store, "--volume", "vm1", "--to", image])
            #expect(again.status == 64, "promote over an existing image: \(described(again))")
            #expect(again.stderr.contains("already exists") && again.stderr.contains("--force"), "\(again.stderr)")
            #expect(try fileIdentity(image) == before, "the refused promote changed \(image)")

            let forced = try await run(["failover", "promote", "--store", store, "--volume", "vm1", "--to", image, "--force", "--json"])
            try #require(forced.succeeded, "promote --force: \(described(forced))")
            let replaced = try decoder.decode(PromotionReport.self, from: Data(forced.stdout.utf8))
            #expect(replaced.replaced)
            #expect(try fileIdentity(image).inode != before.inode, "--force did not put a new image in place")
            try await withMountedImage(image, at: lab.scratch + "/promoted") { root in
                let rows = try sqliteCount(root + "/app/orders.db", "payload = 'before-failover'")
                #expect(rows == 1, "the replacing image lacks the row")
            }
        }
    }

    /// PostgreSQL in `backup-label` mode: the promoted image's data directory gets the
    /// checkpoint's `backup_label` byte for byte (owner of the data directory, 0600) and, with
    /// --restore-command, `recovery.signal`; the server recovers from the archive (here: the
    /// primary's pg_wal) and has the row.
    @Test
    func backupLabelModeWritesTheLabelAndRecoversFromTheArchive() async throws {
        try TestEnvironment.requireWorlds()
        try await withFailoverLab { lab in
            let config = lab.root + "/quiesce.toml"
            let store = lab.root + "/dr/store"
            let spec = lab.root + "/writers.d/postgresql.toml"
            let text = try String(contentsOfFile: spec, encoding: .utf8)
            try #require(text.contains("mode = \"checkpoint\""), "\(text)")
            try text.replacingOccurrences(of: "mode = \"checkpoint\"", with: "mode = \"backup-label\"")
                .write(toFile: spec, atomically: true, encoding: .utf8)
            try await labPSQL(lab, "CREATE TABLE failover_check (note text); INSERT INTO failover_check VALUES ('backup-label')")

            let prepared = try await run(["failover", "prepare", "--config", config, "--json"])
            try #require(prepared.succeeded, "failover prepare: \(described(prepared))")
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            let preparation = try decoder.decode(FailoverPreparation.self, from: Data(prepared.stdout.utf8))
            let id = preparation.checkpoint
            let manifest = try decoder.decode(StoredCheckpoint.self,
                                              from: Data(contentsOf: URL(fileURLWithPath: "\(store)/vm1/\(id).manifest.json")))
            let label = try #require(manifest.record.writers.first { $0.name == "postgresql" }?.recovery?.files["backup_label"])
            #expect(label.contains("LABEL: quiesce \(id)"), "\(label)")

            let image = lab.root + "/promoted.img"
            let archive = lab.root + "/guest/postgresql/data/pg_wal"
            let promoted = try await run(["failover", "promote", "--store", store, "--volume", "vm1", "--to", image,
                                          "--restore-command", "cp \(archive)/%f %p"])
            try #require(promoted.succeeded, "failover promote: \(described(promoted))")
            #expect(promoted.stdout.contains("wrote backup_label"), "\(promoted.stdout)")

            try await withMountedImage(image, at: lab.scratch + "/promoted") { root in
                let data = root + "/postgresql/data"
                #expect(FileManager.default.contents(atPath: data + "/backup_label") == Data(label.utf8), "backup_label differs from the recorded one")
                var labelInfo = stat(), dataInfo = stat()
                #expect(stat(data + "/backup_label", &labelInfo) == 0 && stat(data, &dataInfo) == 0)
                #expect(labelInfo.st_uid == dataInfo.st_uid && labelInfo.st_gid == dataInfo.st_gid)
                #expect(labelInfo.st_mode & 0o777 == 0o600)
                #expect(FileManager.default.fileExists(atPath: data + "/recovery.signal"))
                let rows = try await withServer(on: data, scratch: lab.scratch) { query in
                    var inRecovery = "t"
                    let deadline = ContinuousClock.now + .seconds(30)
                    while inRecovery != "f", ContinuousClock.now < deadline {
                        inRecovery = try await query("SELECT pg_is_in_recovery()")
                        if inRecovery != "f" { try await Task.sleep(for: .milliseconds(200)) }
                    }
                    #expect(inRecovery == "f", "the server on the promoted image did not finish recovery")
                    return try await query("SELECT note FROM failover_check")
                }
                #expect(rows == "backup-label")
            }
        }
    }
}

// MARK: helpers

private struct FailoverLab {
    let top: String
    var root: String { top + "/lab" }
    var scratch: String { top + "/scratch" }
}

/// Runs the built `quiesce`.
private func run(_ arguments: [String], timeout: Duration = .seconds(180)) async throws -> CommandResult {
    try await ChildProcess.run(try Executables.requireQuiesce(), arguments, timeout: timeout)
}

private func described(_ result: CommandResult) -> String {
    "exit \(result.status)\(result.timedOut ? " (timed out)" : "")\n--- stdout\n\(result.stdout)\n--- stderr\n\(result.stderr)"
}

/// A lab that is up in `/tmp/quiesce-failovertest-XXXXXX/lab`; afterwards, always: `lab down`,
/// then whatever is left below the directory (mounts, loop devices), then the directory.
private func withFailoverLab(_ body: (FailoverLab) async throws -> Void) async throws {
    var template = Array("/tmp/quiesce-failovertest-XXXXXX".utf8CString)
    guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!).map { String(cString: $0) } }) else {
        throw POSIXFailure("mkdtemp", errno)
    }
    chmod(made, 0o755)
    let lab = FailoverLab(top: made)
    try FileManager.default.createDirectory(atPath: lab.scratch, withIntermediateDirectories: true)
    var failure: (any Error)?
    do {
        let up = try await run(["lab", "up", "--dir", lab.root] + FailoverTests.sizes)
        try #require(up.succeeded, "lab up: \(described(up))")
        try await body(lab)
    } catch { failure = error }

    var leftovers: [String] = []
    if let down = try? await run(["lab", "down", "--dir", lab.root]), !down.succeeded {
        leftovers.append("lab down: \(described(down))")
    }
    for mount in Mounts.mountPoints(under: lab.top).sorted(by: { $0.count > $1.count }) {
        try? await Mounts.unmount(mount, lazily: true)
        leftovers.append("unmounted \(mount)")
    }
    for loop in LoopDevice.all() where loop.backing.hasPrefix(lab.top + "/") {
        try? await LoopDevice.detach(loop.device)
        leftovers.append("detached \(loop.device)")
    }
    if Mounts.mountPoints(under: lab.top).isEmpty { try? FileManager.default.removeItem(atPath: lab.top) }
    if let failure { throw failure }
    if !leftovers.isEmpty { Issue.record("cleaning up \(lab.top): \(leftovers.joined(separator: "; "))") }
}

/// Attaches and mounts `image` at `mountPoint` for `body`, then unmounts and detaches it.
private func withMountedImage(_ image: String, at mountPoint: String, _ body: (String) async throws -> Void) async throws {
    try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
    let device = try await LoopDevice.attach(file: image)
    var failure: (any Error)?
    do {
        try await Mounts.mount(device: device, at: mountPoint, type: "ext4", options: nil)
        do { try await body(mountPoint) } catch { failure = error }
        try await Mounts.unmount(mountPoint)
    } catch { failure = failure ?? error }
    try await LoopDevice.detach(device)
    if let failure { throw failure }
}

/// Starts PostgreSQL 15 on `data` as postgres (Unix socket in a private directory, no TCP),
/// runs `body` with a query function, and stops the server, always.
private func withServer<T>(on data: String, scratch: String,
                           _ body: (@escaping (String) async throws -> String) async throws -> T) async throws -> T {
    let bin = "/usr/lib/postgresql/15/bin"
    let socket = scratch + "/pg-socket"
    try FileManager.default.createDirectory(atPath: socket, withIntermediateDirectories: true)
    let ids = try #require(getpwnam("postgres")).pointee
    chown(socket, ids.pw_uid, ids.pw_gid)
    let port = LoopbackPort.free(fallback: 55433)
    let log = socket + "/server.log"
    let start = try await ChildProcess.run("/usr/sbin/runuser", ["-u", "postgres", "--", bin + "/pg_ctl", "start", "-D", data, "-l", log,
        "-w", "-t", "90", "-o", "-c listen_addresses='' -c unix_socket_directories='\(socket)' -p \(port) -c archive_mode=off"],
        timeout: .seconds(120))
    let serverLog = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
    try #require(start.succeeded, "PostgreSQL did not start on the promoted image: \(described(start))\n--- server log\n\(serverLog)")
    print("PostgreSQL on the promoted image:\n" + serverLog.split(separator: "\n").suffix(12).joined(separator: "\n"))
    let query: (String) async throws -> String = { sql in
        let result = try await ChildProcess.run("/usr/sbin/runuser", ["-u", "postgres", "--", bin + "/psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
            "-h", socket, "-p", "\(port)", "-d", "postgres", "-c", sql], timeout: .seconds(30))
        guard result.succeeded else { throw POSIXFailure("psql \(sql): \(result.stderr)", 0) }
        return result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }
    var outcome: Result<T, any Error>
    do { outcome = .success(try await body(query)) } catch { outcome = .failure(error) }
    let stop = try await ChildProcess.run("/usr/sbin/runuser", ["-u", "postgres", "--", bin + "/pg_ctl", "stop", "-D", data,
                                                                "-m", "fast", "-w", "-t", "30"], timeout: .seconds(40))
    #expect(stop.succeeded, "pg_ctl stop: \(described(stop))")
    return try outcome.get()
}

/// psql as postgres on the lab's own server.
private func labPSQL(_ lab: FailoverLab, _ sql: String) async throws {
    let port = try String(contentsOfFile: lab.root + "/postgresql/port", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
    let result = try await ChildProcess.run("/usr/sbin/runuser", ["-u", "postgres", "--", "/usr/lib/postgresql/15/bin/psql", "-X", "-At",
        "-v", "ON_ERROR_STOP=1", "-h", lab.root + "/postgresql/run", "-p", port, "-d", "postgres", "-c", sql], timeout: .seconds(30))
    try #require(result.succeeded, "psql on the lab: \(described(result))")
}

private func sqlite(_ database: String, _ sql: String) throws {
    let connection = try SQLiteConnection(path: database, mode: .readWrite, busyTimeout: .seconds(5))
    defer { connection.close() }
    try connection.execute(sql)
}

private func sqliteCount(_ database: String, _ condition: String) throws -> Int64 {
    let connection = try SQLiteConnection(path: database, mode: .readWrite, busyTimeout: .seconds(5))
    defer { connection.close() }
    return try connection.scalar("SELECT count(*) FROM orders WHERE \(condition)")?.int ?? -1
}

private func fileIdentity(_ path: String) throws -> FileIdentity {
    var info = stat()
    guard stat(path, &info) == 0 else { throw POSIXFailure("stat \(path)", errno) }
    return FileIdentity(inode: info.st_ino, size: info.st_size, modified: info.st_mtim.tv_sec, modifiedNanoseconds: info.st_mtim.tv_nsec)
}

private struct FileIdentity: Equatable {
    var inode: ino_t
    var size: off_t
    var modified: Int
    var modifiedNanoseconds: Int
}
