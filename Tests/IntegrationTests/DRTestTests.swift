import Foundation
import QuiesceCore
import QuiesceDR
import QuiesceReplication
import QuiesceSQLite
import QuiesceSystem
import QuiesceTestSupport
import Testing

/// `quiesce dr test start|status|stop` on the lab, run as an operator runs them: the built binary,
/// a lab of its own under /tmp, small sizes.
@Suite("DR test", .serialized, .enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI))
struct DRTestTests {
    static let sizes = ["--image-size", "128", "--datastore-size", "768"]

    /// A DR test started on a verified checkpoint serves PostgreSQL on a private socket and the
    /// SQLite copy, takes writes, refuses a second test, and while it runs a new checkpoint
    /// arrives in the store; `stop` leaves the store's earlier images byte-identical, no loop
    /// device, mount or server of the test, and a new test on the same checkpoint sees none of
    /// the writes made in the first. Production never sees them either.
    @Test
    func drTestRunsBesideReplicationAndStopDiscardsEveryChange() async throws {
        try TestEnvironment.requireWorlds()
        try await withDRTestLab { lab in
            let clock = ContinuousClock()
            let up = try await quiesce(["lab", "up", "--dir", lab.root] + Self.sizes)
            try #require(up.succeeded, "lab up: \(shown(up))")
            let config = lab.root + "/quiesce.toml"
            let first = try await quiesce(["checkpoint", "--config", config, "--replicate"])
            try #require(first.succeeded, "checkpoint --replicate: \(shown(first))")
            let store = lab.store
            let before = try images(store)
            try #require(before.count == 1, "the store has \(before.keys.sorted())")
            let firstID = String(before.keys.first!.dropLast(4))

            // Start.
            var started = clock.now
            let start = try await quiesce(["dr", "test", "start", "--store", store, "--json"])
            try #require(start.succeeded, "dr test start: \(shown(start))")
            print("dr test start: \(started.duration(to: clock.now))")
            let session = try decode(DRTestSession.self, start.stdout)
            #expect(session.checkpoint == firstID)
            #expect(session.phase == .running)
            #expect(session.verification == "verified")
            #expect(Set(session.applications.map(\.writer)) == ["postgresql", "orders", "ledger", "mail"],
                    "started: \(session.applications.map(\.writer)), not started: \(session.notStarted)")
            #expect(session.notStarted.contains { $0.contains("app-hook (exec): not started") }, "\(session.notStarted)")
            let postgres = try #require(session.applications.first { $0.type == "postgresql" })
            let socket = try #require(postgres.state["socketDirectory"]), port = try #require(postgres.state["port"])
            #expect(socket.hasPrefix(store + "/.drtest/"), "the copy's socket is in the test's private directory: \(socket)")
            #expect(postgres.access.contains { $0.contains("psql -h \(socket) -p \(port)") }, "\(postgres.access)")

            // PostgreSQL answers on the private socket, on the copy, and takes writes.
            let select = try await psql(socket: socket, port: port, "SELECT current_setting('listen_addresses') || '|' || pg_is_in_recovery()::text")
            try #require(select.succeeded, "psql on the copy: \(shown(select))")
            #expect(select.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "|false", "no TCP, not in recovery: \(select.stdout)")
            let accounts = try await psql(socket: socket, port: port, "SELECT count(*) FROM pgbench_accounts")
            #expect(Int(accounts.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0 > 0, "the lab's data is in the copy: \(shown(accounts))")
            let write = try await psql(socket: socket, port: port,
                                       "CREATE TABLE drtest_marker (note text); INSERT INTO drtest_marker VALUES ('written during the DR test')")
            #expect(write.succeeded, "writing to the copy: \(shown(write))")
            let orders = try #require(session.applications.first { $0.writer == "orders" }?.state["database"])
            #expect(orders.hasPrefix(store + "/.drtest/copy/"), "\(orders)")
            try sqlite(orders, "CREATE TABLE drtest_marker (note TEXT); INSERT INTO drtest_marker VALUES ('written during the DR test')")
            let mail = try #require(session.applications.first { $0.writer == "mail" })
            if let doveadm = mail.state["doveadm"] {
                let list = try await ChildProcess.run(doveadm, ["mailbox", "list"], extraEnvironment: ["USER": "alice"], timeout: .seconds(60))
                #expect(list.succeeded && list.stdout.contains("INBOX"), "doveadm on the copy: \(shown(list))")
            }

            // One test at a time.
            let second = try await quiesce(["dr", "test", "start", "--store", store])
            #expect(second.status == 75, "a second start: \(shown(second))")
            #expect(second.stderr.contains("already running") && second.stderr.contains(firstID), "\(second.stderr)")

            let statusRun = try await quiesce(["dr", "test", "status", "--store", store, "--json"])
            #expect(statusRun.succeeded, "dr test status: \(shown(statusRun))")
            let status = try decode(DRTestStatus.self, statusRun.stdout)
            #expect(status.running && status.problems.isEmpty, "\(status)")
            #expect(status.checks.contains { $0.contains("postgresql") && $0.contains("running") }, "\(status.checks)")

            // Replication goes on: a new checkpoint arrives and verifies while the test runs.
            let during = try await quiesce(["checkpoint", "--config", config, "--replicate"])
            #expect(during.succeeded, "checkpoint --replicate during the DR test: \(shown(during))")
            #expect(during.stdout.contains("verified"), "\(during.stdout)")
            let arrived = try images(store)
            #expect(arrived.count == 2, "a new checkpoint arrived during the test: \(arrived.keys.sorted())")

            // Production saw none of the test's writes.
            let livePort = try String(contentsOfFile: lab.root + "/postgresql/port", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            let live = try await psql(socket: lab.root + "/postgresql/run", port: livePort, "SELECT to_regclass('drtest_marker') IS NULL")
            #expect(live.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "t", "production PostgreSQL: \(shown(live))")
            #expect(try sqliteTables(lab.root + "/guest/app/orders.db").contains("drtest_marker") == false)

            // Stop.
            started = clock.now
            let stop = try await quiesce(["dr", "test", "stop", "--store", store, "--json"])
            #expect(stop.succeeded, "dr test stop: \(shown(stop))")
            print("dr test stop: \(started.duration(to: clock.now))")
            let report = try decode(DRTestStopReport.self, stop.stdout)
            #expect(report.problems.isEmpty && report.checkpoint == firstID, "\(report)")

            let after = try images(store)
            for (name, digest) in before {
                #expect(after[name] == digest, "\(name) changed during the DR test")
            }
            #expect(after.count == 2, "\(after.keys.sorted())")
            expectNothingLeft(store)
            let idle = try await quiesce(["dr", "test", "status", "--store", store, "--json"])
            let idleStatus = try? decode(DRTestStatus.self, idle.stdout)
            #expect(idle.succeeded && idleStatus?.running == false, "\(shown(idle))")
            let again = try await quiesce(["dr", "test", "stop", "--store", store])
            #expect(again.succeeded && again.stdout.contains("nothing to stop"), "a second stop: \(shown(again))")

            // A new test on the same checkpoint: the first test's writes are gone.
            let restart = try await quiesce(["dr", "test", "start", "--store", store, "--checkpoint", firstID, "--json"])
            try #require(restart.succeeded, "dr test start again: \(shown(restart))")
            let fresh = try decode(DRTestSession.self, restart.stdout)
            let freshPG = try #require(fresh.applications.first { $0.type == "postgresql" })
            let gone = try await psql(socket: freshPG.state["socketDirectory"] ?? "", port: freshPG.state["port"] ?? "",
                                      "SELECT to_regclass('drtest_marker') IS NULL")
            #expect(gone.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "t", "the first test's table is back: \(shown(gone))")
            let freshOrders = try #require(fresh.applications.first { $0.writer == "orders" }?.state["database"])
            #expect(try sqliteTables(freshOrders).contains("drtest_marker") == false, "the first test's SQLite table is back")
            let stopAgain = try await quiesce(["dr", "test", "stop", "--store", store])
            #expect(stopAgain.succeeded, "dr test stop: \(shown(stopAgain))")
            expectNothingLeft(store)

            let down = try await quiesce(["lab", "down", "--dir", lab.root])
            #expect(down.succeeded, "lab down: \(shown(down))")
        }
    }

    /// Retention prunes the test's own checkpoint while it runs: the test goes on. The copy's
    /// server crashes during the test (kill -9): `status` says so and exits 1. A shell
    /// left inside the copy keeps it busy: `stop` names the mount, keeps the test and exits 1;
    /// once the shell is gone, `stop` runs again and leaves nothing.
    @Test
    func drTestStopAfterACrashedServerAndABusyCopyCanBeRunAgain() async throws {
        try TestEnvironment.requireWorlds()
        try await withDRTestLab { lab in
            let up = try await quiesce(["lab", "up", "--dir", lab.root] + Self.sizes)
            try #require(up.succeeded, "lab up: \(shown(up))")
            let first = try await quiesce(["checkpoint", "--config", lab.root + "/quiesce.toml", "--replicate"])
            try #require(first.succeeded, "checkpoint --replicate: \(shown(first))")
            let store = lab.store
            let start = try await quiesce(["dr", "test", "start", "--store", store, "--json"])
            try #require(start.succeeded, "dr test start: \(shown(start))")
            let session = try decode(DRTestSession.self, start.stdout)
            let postgres = try #require(session.applications.first { $0.type == "postgresql" })
            let pid = try #require(postgres.state["pid"].flatMap { pid_t($0) })

            // Retention prunes the test's checkpoint meanwhile: the clone does not depend on it.
            let next = try await quiesce(["checkpoint", "--config", lab.root + "/quiesce.toml", "--replicate"])
            try #require(next.succeeded, "checkpoint --replicate during the test: \(shown(next))")
            let pruned = try DRStore(root: store, create: false).prune(volume: "vm1", keep: 1)
            #expect(pruned == [session.checkpoint], "\(pruned)")
            let afterPrune = try await quiesce(["dr", "test", "status", "--store", store, "--json"])
            #expect(afterPrune.succeeded, "status after the prune: \(shown(afterPrune))")
            let pruneStatus = try decode(DRTestStatus.self, afterPrune.stdout)
            #expect(pruneStatus.checks.contains { $0.contains("was pruned") }, "\(pruneStatus)")
            let answers = try await psql(socket: postgres.state["socketDirectory"] ?? "", port: postgres.state["port"] ?? "", "SELECT 1")
            #expect(answers.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "1", "the copy after the prune: \(shown(answers))")

            kill(pid, SIGKILL)
            let crashed = await eventually(within: .seconds(10)) { kill(pid, 0) != 0 }
            try #require(crashed, "the copy's postmaster \(pid) survived SIGKILL")
            let status = try await quiesce(["dr", "test", "status", "--store", store])
            #expect(status.status == 1 && status.stdout.contains("pid \(pid) is gone"), "status after the crash: \(shown(status))")

            let mountPoint = try #require(session.copy?.volumes.first?.mountPoint)
            let shell = try ChildProcess("/bin/sleep", ["600"], workingDirectory: mountPoint, stdout: .null, stderr: .null)
            defer {
                shell.signal(SIGKILL)
                shell.wait()
            }
            let busy = try await quiesce(["dr", "test", "stop", "--store", store])
            #expect(busy.status == 1, "stop with a shell inside the copy: \(shown(busy))")
            #expect(busy.stderr.contains("cannot unmount \(mountPoint)") && busy.stderr.contains("fuser"), "\(busy.stderr)")
            #expect(busy.stdout.contains("writer postgresql (postgresql): stopped"), "the crashed server counts as stopped: \(busy.stdout)")
            #expect(FileManager.default.fileExists(atPath: store + "/.drtest/state.json"), "the test's state was dropped while its copy is mounted")
            #expect(Mounts.isMounted(mountPoint))

            shell.signal(SIGKILL)
            shell.wait()
            let stop = try await quiesce(["dr", "test", "stop", "--store", store])
            #expect(stop.succeeded, "stop again: \(shown(stop))")
            expectNothingLeft(store)

            let down = try await quiesce(["lab", "down", "--dir", lab.root])
            #expect(down.succeeded, "lab down: \(shown(down))")
        }
    }

    /// An owner's application, through its exec writer's script, runs on the DR test's copy
    /// (not on production) and is stopped by `dr test stop`; a script without `dr_test` is
    /// listed as not started, saying how to start it.
    @Test func execWriterWithDRTestStartsItsApplicationOnTheCopyAndStopEndsIt() async throws {
        try await TestWorld.with(.init(datastoreSize: 1 << 30, imageSize: 64 << 20)) { world in
            let (site, store) = try await siteWithOneFileTarget(world)
            let script = world.path("app-hook")
            // The "application": a process working in the copy, started in the background.
            try """
                #!/bin/sh
                case "$1" in
                dr-test-start)
                    echo "started on $3" > "$3/app-was-here"
                    (cd "$3" && exec sleep 300) >/dev/null 2>&1 &
                    echo "access cat $3/app-was-here"
                    echo "state pid=$!"
                    ;;
                dr-test-stop)
                    [ -n "$QUIESCE_STATE_PID" ] && kill "$QUIESCE_STATE_PID" 2>/dev/null
                    ;;
                esac
                exit 0

                """.write(toFile: script, atomically: true, encoding: .utf8)
            chmod(script, 0o755)
            for (name, drTest) in [("app", true), ("plain", false)] {
                try "name = \"\(name)\"\ntype = \"exec\"\ncommand = \"\(script)\"\nvolume = \"\(world.volume.name)\"\ndr_test = \(drTest)\n"
                    .write(toFile: "\(site.writersDirectory)/\(name).toml", atomically: true, encoding: .utf8)
                chmod("\(site.writersDirectory)/\(name).toml", 0o600)
            }
            _ = try churn(world, round: 1)
            #expect(try await site.runCLI(["checkpoint", "--replicate"]).status == 0)
            let before = try images(store)

            let start = try await quiesce(["dr", "test", "start", "--store", store, "--json"])
            try #require(start.succeeded, "dr test start: \(shown(start))")
            let session = try decode(DRTestSession.self, start.stdout)
            let app = try #require(session.applications.first { $0.writer == "app" }, "\(session)")
            let pid = try #require(app.state["pid"].flatMap { pid_t($0) })
            #expect(app.access.first?.hasPrefix("cat \(store)/.drtest/") == true, "\(app.access)")
            #expect(session.notStarted.contains { $0.contains("plain (exec): not started (set dr_test = true") }, "\(session.notStarted)")
            #expect(kill(pid, 0) == 0, "the application is not running")
            #expect(!FileManager.default.fileExists(atPath: world.guest + "/app-was-here"), "the application ran on production")
            let status = try decode(DRTestStatus.self, try await quiesce(["dr", "test", "status", "--store", store, "--json"]).stdout)
            #expect(status.running && status.problems.isEmpty, "\(status)")
            #expect(status.checks.contains("writer app (exec): running, pid \(pid)"), "\(status.checks)")

            let stop = try await quiesce(["dr", "test", "stop", "--store", store, "--json"])
            #expect(stop.succeeded, "dr test stop: \(shown(stop))")
            #expect(await eventually(within: .seconds(10)) { kill(pid, 0) != 0 }, "the application outlived the test")
            #expect(try images(store) == before)
            expectNothingLeft(store)
        }
    }
}

// MARK: helpers

/// `<store>/vm1/*.img` → SHA-256.
private func images(_ store: String) throws -> [String: String] {
    var digests: [String: String] = [:]
    for name in try FileManager.default.contentsOfDirectory(atPath: store + "/vm1") where name.hasSuffix(".img") {
        digests[name] = try fileDigest(store + "/vm1/" + name)
    }
    return digests
}

/// No mount, loop device or process of a DR test, and no `.drtest`.
private func expectNothingLeft(_ store: String, sourceLocation: SourceLocation = #_sourceLocation) {
    let directory = store + "/.drtest"
    let loops = LoopDevice.all().filter { $0.backing.hasPrefix(directory + "/") }
    #expect(loops.isEmpty, "loop devices left: \(loops)", sourceLocation: sourceLocation)
    let mountinfo = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
    let mounts = mountinfo.split(separator: "\n").filter { $0.contains(directory) }
    #expect(mounts.isEmpty, "mounts left: \(mounts)", sourceLocation: sourceLocation)
    let strays = processes(commandContaining: directory + "/")
    #expect(strays.isEmpty, "processes left: \(strays)", sourceLocation: sourceLocation)
    #expect(!FileManager.default.fileExists(atPath: directory), "\(directory) is still there", sourceLocation: sourceLocation)
}

private func psql(socket: String, port: String, _ sql: String) async throws -> CommandResult {
    try await ChildProcess.run("/usr/sbin/runuser", ["-u", "postgres", "--", "psql", "-X", "-h", socket, "-p", port, "-d", "postgres",
                                                     "-v", "ON_ERROR_STOP=1", "-Atc", sql], timeout: .seconds(60))
}

private func sqlite(_ path: String, _ sql: String) throws {
    let connection = try SQLiteConnection(path: path, mode: .readWrite, busyTimeout: .seconds(5))
    defer { connection.close() }
    try connection.execute(sql)
}

private func sqliteTables(_ path: String) throws -> [String] {
    let connection = try SQLiteConnection(path: path, mode: .readWrite, busyTimeout: .seconds(5))
    defer { connection.close() }
    return try connection.query("SELECT name FROM sqlite_master WHERE type = 'table'", limit: 1000).compactMap { $0.first?.text }
}

private func decode<T: Decodable>(_ type: T.Type, _ json: String) throws -> T {
    let decoder = JSONDecoder()
    decoder.dateDecodingStrategy = .iso8601
    return try decoder.decode(type, from: Data(json.utf8))
}

private func shown(_ result: CommandResult) -> String {
    "exit \(result.status)\(result.timedOut ? " (timed out)" : "")\n--- stdout\n\(result.stdout)\n--- stderr\n\(result.stderr)"
}

private struct DRTestLab: Sendable {
    let top: String
    var root: String { top + "/lab" }
    var store: String { root + "/dr/store" }
}

/// Runs `body` with a fresh lab directory under /tmp; afterwards, always: `dr test stop`, `lab down`,
/// then as a last resort stops the copy's servers, unmounts what is mounted below the directory
/// (deepest first), detaches loop devices backed by files below it, and removes it.
private func withDRTestLab(_ body: (DRTestLab) async throws -> Void) async throws {
    var template = Array("/tmp/quiesce-drtest-XXXXXX".utf8CString)
    guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!).map { String(cString: $0) } }) else {
        throw POSIXFailure("mkdtemp /tmp/quiesce-drtest-XXXXXX", errno)
    }
    let real = realpath(made, nil).map { path in defer { free(path) }; return String(cString: path) } ?? made
    chmod(real, 0o755)
    let lab = DRTestLab(top: real)

    var failure: (any Error)?
    do { try await body(lab) } catch { failure = error }

    var problems: [String] = []
    if FileManager.default.fileExists(atPath: lab.store + "/.drtest"),
       let stop = try? await quiesce(["dr", "test", "stop", "--store", lab.store]) {
        problems.append("cleanup `dr test stop`: exit \(stop.status)")
    }
    if FileManager.default.fileExists(atPath: lab.root),
       let down = try? await quiesce(["lab", "down", "--dir", lab.root]), !down.succeeded {
        problems.append("cleanup `lab down` failed: \(shown(down))")
    }
    for line in processes(commandContaining: lab.top + "/") {
        if let pid = pid_t(line.prefix { $0 != " " }) { kill(pid, SIGKILL) }
        problems.append("killed \(line)")
    }
    for _ in 0..<20 {
        let mounts = Mounts.mountPoints(under: lab.top)
        if mounts.isEmpty { break }
        for mount in mounts.reversed() where (try? await Mounts.unmount(mount)) != nil { problems.append("unmounted \(mount)") }
        for loop in LoopDevice.all() where loop.backing.hasPrefix(lab.top + "/") && Mounts.mountPoints(of: loop.device).isEmpty {
            try? await LoopDevice.detach(loop.device)
        }
        try? await Task.sleep(for: .milliseconds(100))
    }
    for loop in LoopDevice.all() where loop.backing.hasPrefix(lab.top + "/") {
        try? await LoopDevice.detach(loop.device)
        problems.append("detached \(loop.device) (\(loop.backing))")
    }
    if Mounts.mountPoints(under: lab.top).isEmpty {
        try? FileManager.default.removeItem(atPath: lab.top)
    } else {
        problems.append("left \(lab.top) in place: still mounted")
    }
    if let failure {
        if !problems.isEmpty {
            FileHandle.standardError.write(Data("cleaning up \(lab.top) after a failure:\n\(problems.map { "  - \($0)" }.joined(separator: "\n"))\n".utf8))
        }
        throw failure
    }
    if !problems.isEmpty {
        Issue.record("cleaning up \(lab.top) found leftovers: \(problems.joined(separator: "; "))")
    }
}
