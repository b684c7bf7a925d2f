import Foundation
import QuiesceCore
import QuiesceSystem
import QuiesceLab
import QuiesceSQLite
import QuiesceTestSupport
import Synchronization
import Testing

private let worlds = TestEnvironment.canBuildWorlds || TestEnvironment.isCI

/// `quiesce lab up|status|demo|down`, run as an operator runs them: the built binary, a
/// directory of its own under /tmp, small sizes.
@Suite("Lab", .serialized)
struct LabTests {
    static let sizes = ["--image-size", "128", "--datastore-size", "768"]

    /// `lab up` twice is harmless, `lab status` says it is up, `lab demo` completes and verifies
    /// its checkpoints, and `lab down` leaves no loop device, no mount and no directory.
    @Test(.enabled(if: worlds))
    func labUpTwiceThenDemoVerifiesCheckpointsAndDownRemovesEverything() async throws {
        try TestEnvironment.requireWorlds()
        try await withLabDirectory { lab in
            let up = try await quiesce(["lab", "up", "--dir", lab.root] + Self.sizes)
            try #require(up.succeeded, "lab up: \(shown(up))")
            let built = lab.footprint()
            #expect(built.loops.count == 3, "datastore, guest image and DR store each on one loop device: \(built.loops)")
            #expect(Set(built.mounts) == [lab.root + "/datastore", lab.root + "/guest", lab.root + "/dr"],
                    "mounts: \(built.mounts)")
            let sentinel = lab.root + "/guest/app/sentinel"
            try Data("written after the first up\n".utf8).write(to: URL(fileURLWithPath: sentinel))
            let database = lab.root + "/guest/app/orders.db"
            let databaseInode = try inode(of: database)

            let again = try await quiesce(["lab", "up", "--dir", lab.root] + Self.sizes)
            #expect(again.succeeded, "second lab up: \(shown(again))")
            let rebuilt = lab.footprint()
            #expect(rebuilt.loops == built.loops, "the second up attached: \(rebuilt.loops), the first: \(built.loops)")
            #expect(rebuilt.mounts == built.mounts, "the second up mounted: \(rebuilt.mounts), the first: \(built.mounts)")
            #expect(FileManager.default.contents(atPath: sentinel) == Data("written after the first up\n".utf8),
                    "the guest's data survived the second up")
            #expect(try inode(of: database) == databaseInode, "the database was not recreated")

            let statusRun = try await quiesce(["lab", "status", "--dir", lab.root, "--json"])
            try #require(statusRun.succeeded, "lab status: \(shown(statusRun))")
            let status = try JSONDecoder().decode(Lab.Status.self, from: Data(statusRun.stdout.utf8))
            #expect(status.up)
            for part in [status.datastore, status.guest, status.dr] {
                #expect(part.exists && part.mounted && part.loopDevices.count == 1, "\(part)")
            }
            #expect(status.writers == labWriters)

            let demoRun = try await quiesce(["lab", "demo", "--dir", lab.root, "--checkpoints", "2", "--interval", "0.5", "--json"],
                                            timeout: .seconds(300))
            #expect(demoRun.succeeded, "lab demo: \(shown(demoRun))")
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            let report = try decoder.decode(Demo.Report.self, from: Data(demoRun.stdout.utf8))
            #expect(report.ok)
            #expect(report.checkpoints.count == 2)
            for line in report.checkpoints {
                let record = line.record
                print("lab demo: checkpoint \(record.id) \(record.outcome.rawValue): freeze window "
                      + "\(record.freezeWindowMs.map { String(format: "%.1f ms", $0) } ?? "-"), hold window "
                      + "\(record.holdWindowMs.map { String(format: "%.1f ms", $0) } ?? "-")")
                #expect(record.outcome == .completed, "\(record.id): \(line.error ?? "")")
                #expect(line.error == nil)
                #expect(record.snapshots.count == 1)
                let replicated = try #require(line.replication?.first, "\(record.id) was not replicated")
                #expect(replicated.status == .applied && replicated.verified == true,
                        "\(record.id) at the DR target: \(replicated.status) verified \(String(describing: replicated.verified)) \(replicated.verifyFailures ?? [])")
                let check = try #require(line.check, "\(record.id) was not checked")
                #expect(check.ok, "\(record.id): \(check.problems) \(check.writers.map { "\($0.writer): \($0.details)" })")
                #expect(Set(check.writers.map(\.writer)) == Set(labWriters))
                for name in ["orders", "ledger"] {
                    let marker = record.writers.first { $0.name == name }?.marker
                    #expect(Int(marker?["marker_result"] ?? "") != nil, "\(name) recorded no row count: \(String(describing: marker))")
                }
            }
            #expect(report.workloads.count == labWorkloads, "two inserters per database, pgbench and the mail deliveries: \(report.workloads)")
            var committed: [String: Int] = [:]
            for (name, summary) in report.workloads.sorted(by: { $0.key < $1.key }) {
                print("lab demo: \(name): \(summary)")
                #expect(summary.hasSuffix(" rows committed") || summary.hasSuffix(" deliveries, 0 failed"), "\(name): \(summary)")
                let database = String(name.prefix { $0 != " " })
                committed[database, default: 0] += summary.split(separator: " ").first.flatMap { Int($0) } ?? 0
            }
            #expect(committed["orders", default: 0] > 0 && committed["ledger", default: 0] > 0,
                    "the workload wrote to both databases: \(committed)")

            let down = try await quiesce(["lab", "down", "--dir", lab.root])
            #expect(down.succeeded, "lab down: \(shown(down))")
            lab.expectGone()
        }
    }

    /// A DR copy damaged after it arrived (a corrupted PostgreSQL page, a truncated SQLite
    /// database) fails `dr verify`, which names each writer and why; the undamaged
    /// checkpoint beside it still verifies.
    @Test(.enabled(if: worlds))
    func damagedDRCopyFailsVerificationNamingTheWriter() async throws {
        try TestEnvironment.requireWorlds()
        try await withLabDirectory { lab in
            let up = try await quiesce(["lab", "up", "--dir", lab.root] + Self.sizes)
            try #require(up.succeeded, "lab up: \(shown(up))")
            let config = lab.root + "/quiesce.toml"
            for _ in 0..<2 {
                let checkpoint = try await quiesce(["checkpoint", "--config", config, "--replicate"])
                try #require(checkpoint.succeeded, "checkpoint --replicate: \(shown(checkpoint))")
            }
            let store = lab.root + "/dr/store"
            let ids = try FileManager.default.contentsOfDirectory(atPath: store + "/vm1").filter { $0.hasSuffix(".img") }.sorted()
            try #require(ids.count == 2, "\(ids)")
            let damaged = String(ids[1].dropLast(4)), intact = String(ids[0].dropLast(4))

            // Damage the newest DR copy in place, as a failing disk would.
            let mountPoint = lab.scratch + "/damage"
            try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
            let device = try await LoopDevice.attach(file: "\(store)/vm1/\(ids[1])")
            try await Mounts.mount(device: device, at: mountPoint, type: "ext4", options: nil)
            let ledger = mountPoint + "/app/orders.db"
            let size = try FileManager.default.attributesOfItem(atPath: ledger)[.size] as! UInt64
            truncate(ledger, off_t(size / 2 + 100))
            unlink(ledger + "-wal")
            // Garbage over the line pointers of the pages of the biggest database's larger relations
            // (pgbench's tables and their indexes): pg_amcheck's btree check catches it.
            let base = mountPoint + "/postgresql/data/base"
            var files: [(path: String, size: UInt64)] = []
            for database in try FileManager.default.contentsOfDirectory(atPath: base) {
                for file in try FileManager.default.contentsOfDirectory(atPath: "\(base)/\(database)") where file.allSatisfy(\.isNumber) {
                    let path = "\(base)/\(database)/\(file)"
                    files.append((path, try FileManager.default.attributesOfItem(atPath: path)[.size] as! UInt64))
                }
            }
            let largest = try #require(files.max { $0.size < $1.size })
            let directory = (largest.path as NSString).deletingLastPathComponent
            let damagedFiles = files.filter { $0.path.hasPrefix(directory + "/") && $0.size >= 256 << 10 }
            try #require(damagedFiles.count >= 2, "no pgbench relations to damage: \(files.filter { $0.size >= 256 << 10 })")
            let garbage = [UInt8](repeating: 0xa5, count: 200)
            for file in damagedFiles {
                let fd = open(file.path, O_WRONLY)
                for page in 1..<min(Int(file.size / 8192), 400) {
                    _ = pwrite(fd, garbage, garbage.count, off_t(page * 8192 + 24))
                }
                fsync(fd)
                close(fd)
            }
            try await Mounts.unmount(mountPoint)
            try await LoopDevice.detach(device)

            let verify = try await quiesce(["dr", "verify", "--store", store, "--checkpoint", damaged])
            #expect(verify.status == 10, "dr verify of a damaged copy: \(shown(verify))")
            #expect(verify.stderr.contains("writer orders (sqlite)"), "\(verify.stderr)")
            #expect(verify.stderr.contains("writer postgresql (postgresql)"), "\(verify.stderr)")
            let recorded = try String(contentsOfFile: "\(store)/vm1/\(damaged).verify.json", encoding: .utf8)
            #expect(recorded.contains("\"ok\" : false"))

            let good = try await quiesce(["dr", "verify", "--store", store, "--checkpoint", intact, "--json"])
            #expect(good.succeeded, "dr verify of the intact copy: \(shown(good))")

            let down = try await quiesce(["lab", "down", "--dir", lab.root])
            #expect(down.succeeded, "lab down: \(shown(down))")
        }
    }

    /// `kill -9` of `lab demo` in the middle of its checkpoints: nothing stays frozen (the guest
    /// is thawed, the exec hook hears the end of every freeze it was told of, the application's
    /// writes go on), and `lab down` then removes everything, its workload processes included.
    @Test(.enabled(if: worlds))
    func labDownAfterKillDashNineDuringDemoLeavesNothingBehind() async throws {
        try TestEnvironment.requireWorlds()
        try await withLabDirectory { lab in
            let up = try await quiesce(["lab", "up", "--dir", lab.root] + Self.sizes)
            try #require(up.succeeded, "lab up: \(shown(up))")

            let demo = try ChildProcess("/bin/sh", [
                "-c", #"exec "$0" lab demo --dir "$1" --checkpoints 50 --interval 0.2 >"$2" 2>&1"#,
                try Executables.requireQuiesce(), lab.root, lab.scratch + "/demo.log",
            ], stdin: .null, stdout: .null, stderr: .null)
            var killed = false
            defer {
                if !killed {
                    demo.signal(SIGKILL)
                    demo.wait()
                }
            }
            // Kill it inside a freeze window: a random 0-250 ms after the exec hook (order 0, frozen
            // first) was told to freeze, so that the kill lands while the sqlite writers take their
            // locks, during the hold, or while thawing. (If no freeze shows within a few seconds,
            // once its catalog shows a checkpoint.)
            let catalog = lab.root + "/state/catalog.db"
            let hookLog = lab.root + "/logs/app-hook.log"
            let giveUp = ContinuousClock.now + .seconds(15)
            var insideFreeze = false
            while ContinuousClock.now < giveUp, demo.poll() == nil {
                if !HookCalls.unfinished(hookLog).isEmpty { insideFreeze = true; break }
                if ContinuousClock.now > giveUp - .seconds(5), checkpointRows(catalog) >= 1 { break }
                try await Task.sleep(for: .milliseconds(5))
            }
            let delay = Int.random(in: 0..<250)
            if insideFreeze { try await Task.sleep(for: .milliseconds(delay)) }
            #expect(demo.poll() == nil, "lab demo ended before it was killed: \(lab.demoLog)")
            demo.signal(SIGKILL, group: false)
            let status = demo.wait()
            killed = true
            #expect(status == 128 + SIGKILL)
            let killedAt = ContinuousClock.now
            let frozenAtKill = HookCalls.unfinished(hookLog)
            #expect(insideFreeze, "lab demo was not caught inside a freeze window: \(HookCalls.lines(hookLog)) \(lab.demoLog)")
            #expect(checkpointRows(catalog) >= 1, "no checkpoint had started when lab demo was killed: \(lab.demoLog)")

            // Nothing stays frozen. The guard runs its duties as soon as the coordinator is gone:
            // every freeze the exec hook was told of is followed by thaw or freeze-failed.
            while ContinuousClock.now - killedAt < .seconds(10), !HookCalls.unfinished(hookLog).isEmpty {
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(HookCalls.unfinished(hookLog).isEmpty,
                    "the exec hook was told to freeze and never to thaw for \(HookCalls.unfinished(hookLog)) (log: \(HookCalls.lines(hookLog)))")
            // FITHAW succeeds only on a frozen filesystem.
            let guest = lab.root + "/guest"
            #expect(FilesystemHold.isMountPoint(guest))
            #expect(try wasFrozen(guest) == false, "the guest filesystem was left frozen after kill -9")
            // The killed demo's inserters are orphans now and keep writing: no write lock is left held.
            let orders = lab.root + "/guest/app/orders.db"
            let before = try rowCount(orders, table: "orders")
            let growing = await eventually(within: .seconds(10), every: .milliseconds(100)) {
                ((try? rowCount(orders, table: "orders")) ?? 0) > before
            }
            #expect(growing, "orders.db took no write after kill -9 (a lock or a freeze left behind?)")
            print("lab demo killed -9 \(delay) ms after the hook's freeze, unfinished right after it: \(frozenAtKill) (\(checkpointRows(catalog)) checkpoint row(s)); "
                  + "hook calls after the kill: \(HookCalls.lines(hookLog).suffix(2).map { $0.split(separator: " ").dropFirst().prefix(2).joined(separator: " ") })")

            let down = try await quiesce(["lab", "down", "--dir", lab.root])
            #expect(down.succeeded, "lab down: \(shown(down))")
            lab.expectGone()
            let strays = processes { $0.contains("lab-workload") && $0.contains(lab.root + "/") }
            #expect(strays.isEmpty, "workload processes left running: \(strays)")
            // The pgbench and dovecot-lda loops are shells: found by the marker in their environment.
            let marked = workloadProcesses(of: lab.root)
            #expect(marked.isEmpty, "workload processes (pgbench, deliveries) left running: \(marked)")
        }
    }

    /// `lab status` reads the host's mount table: on a host with many mounts (a datastore server
    /// with many guests) it must still see the lab's own. Runs in a mount namespace of its own, with
    /// tmpfs standing in for the lab's filesystems, so no other test sees the extra mounts.
    @Test(.enabled(if: worlds))
    func labStatusSeesTheLabOnAHostWithManyMounts() async throws {
        try TestEnvironment.requireWorlds()
        guard let unshare = TestEnvironment.locate("unshare") else {
            throw MissingPrerequisite("unshare not found (apt-get install util-linux)")
        }
        try await withLabDirectory { lab in
            let script = #"""
                set -e
                top=$1
                i=0
                while [ $i -lt 150 ]; do
                    mkdir -p "$top/scratch/other-mounts/$i"
                    mount -t tmpfs -o size=64k other-guest "$top/scratch/other-mounts/$i"
                    i=$((i + 1))
                done
                for part in datastore guest dr; do
                    mkdir -p "$top/lab/$part"
                    mount -t tmpfs -o size=64k "lab-$part" "$top/lab/$part"
                done
                echo "mount table: $(wc -c < /proc/self/mountinfo) bytes" >&2
                exec "$0" lab status --dir "$top/lab" --json
                """#
            let run = try await ChildProcess.run(unshare, ["--mount", "--propagation", "private", "/bin/sh", "-c", script,
                                                           try Executables.requireQuiesce(), lab.top], timeout: .seconds(120))
            try #require(run.succeeded, "lab status in a namespace with many mounts: \(shown(run))")
            let status = try JSONDecoder().decode(Lab.Status.self, from: Data(run.stdout.utf8))
            let seen = "datastore \(status.datastore.mounted), guest \(status.guest.mounted), dr \(status.dr.mounted)"
            #expect(status.datastore.mounted && status.guest.mounted && status.dr.mounted,
                    "lab status missed mounts of the lab (\(run.stderr.trimmingCharacters(in: .whitespacesAndNewlines))): \(seen)")
            #expect(status.up)
        }
    }
}

// MARK: a lab directory per test

/// `/tmp/quiesce-labtest-XXXXXX/` holding the lab in `lab/` and the test's own files in `scratch/`.
private struct LabDirectory: Sendable {
    let top: String
    var root: String { top + "/lab" }
    var scratch: String { top + "/scratch" }

    func inside(_ path: String) -> Bool {
        let path = path.hasSuffix(" (deleted)") ? String(path.dropLast(" (deleted)".count)) : path
        return path == top || path.hasPrefix(top + "/")
    }

    /// Loop devices backed by files below the directory, and mounts below it.
    func footprint() -> (loops: [String], mounts: [String]) {
        (LoopDevice.all().filter { inside($0.backing) }.map { "\($0.device) \($0.backing)" }.sorted(),
         mountPoints(below: top))
    }

    /// What `lab down` must leave: nothing.
    func expectGone(sourceLocation: SourceLocation = #_sourceLocation) {
        let (loops, mounts) = footprint()
        #expect(loops.isEmpty, "loop devices left: \(loops)", sourceLocation: sourceLocation)
        #expect(mounts.isEmpty, "mounts left: \(mounts)", sourceLocation: sourceLocation)
        #expect(!FileManager.default.fileExists(atPath: root), "\(root) is still there", sourceLocation: sourceLocation)
    }

    var demoLog: String { (try? String(contentsOfFile: scratch + "/demo.log", encoding: .utf8)) ?? "(no log)" }
}

/// Runs `body` with a fresh lab directory; afterwards, always: `lab down`, then as a last resort
/// kills its workloads, thaws and unmounts what is mounted below it, detaches loop devices backed
/// by files below it, and removes it. A leftover after a passing body fails the test.
/// Once per process, first releases lab directories whose test process died (crash, `kill -9`).
private func withLabDirectory(_ body: (LabDirectory) async throws -> Void) async throws {
    await reclaimAbandonedLabDirectories()
    var template = Array("/tmp/quiesce-labtest-XXXXXX".utf8CString)
    guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!).map { String(cString: $0) } }) else {
        throw POSIXFailure("mkdtemp /tmp/quiesce-labtest-XXXXXX", errno)
    }
    let real = realpath(made, nil).map { path in defer { free(path) }; return String(cString: path) } ?? made
    chmod(real, 0o755)
    let lab = LabDirectory(top: real)
    if let start = processStartTime(getpid()) {
        try "\(getpid()) \(start)\n".write(toFile: lab.top + "/.owner", atomically: true, encoding: .utf8)
    }
    try FileManager.default.createDirectory(atPath: lab.scratch, withIntermediateDirectories: true)

    var failure: (any Error)?
    do { try await body(lab) } catch { failure = error }

    let problems = await release(lab)
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

/// `lab down`, then whatever it left: workload processes, mounts (a filesystem once nothing is
/// mounted below it and no loop device is backed by a file on it), loop devices, the directory.
/// Returns what it had to do beyond `lab down`, and what it could not.
private func release(_ lab: LabDirectory) async -> [String] {
    var problems: [String] = []
    if FileManager.default.fileExists(atPath: lab.root) {
        if let down = try? await quiesce(["lab", "down", "--dir", lab.root]), !down.succeeded {
            problems.append("cleanup `lab down` failed: \(shown(down))")
        }
    }
    for pid in processes({ $0.contains("lab-workload") && $0.contains(lab.top + "/") }) {
        kill(pid, SIGKILL)
        problems.append("killed stray workload pid \(pid)")
    }
    for mount in mountPoints(below: lab.top) { await thawIfFrozen(mount) }
    for _ in 0..<20 {
        let mounts = mountPoints(below: lab.top)
        let sources = Set(mountTable().map(\.source))
        for loop in LoopDevice.all() where lab.inside(loop.backing) && !sources.contains(loop.device) {
            try? await LoopDevice.detach(loop.device)
            problems.append("detached \(loop.device) (\(loop.backing))")
        }
        if mounts.isEmpty { break }
        let loops = LoopDevice.all().filter { lab.inside($0.backing) }
        for mount in mounts where !mounts.contains(where: { $0.hasPrefix(mount + "/") })
            && !loops.contains(where: { $0.backing.hasPrefix(mount + "/") }) {
            if (try? await Mounts.unmount(mount)) != nil { problems.append("unmounted \(mount)") }
        }
        try? await Task.sleep(for: .milliseconds(100))
    }
    for mount in mountPoints(below: lab.top).sorted(by: { $0.count > $1.count }) {
        try? await Mounts.unmount(mount, lazily: true)
        problems.append("\(mount) was busy: unmounted lazily")
    }
    if mountPoints(below: lab.top).isEmpty {
        try? FileManager.default.removeItem(atPath: lab.top)
    } else {
        problems.append("left \(lab.top) in place: still mounted")
    }
    return problems
}

private let reclaimed = Mutex(false)

/// `/tmp/quiesce-labtest-*` directories whose owning test process is gone: released once per process.
private func reclaimAbandonedLabDirectories() async {
    let first = reclaimed.withLock { done -> Bool in
        defer { done = true }
        return !done
    }
    guard first else { return }
    for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/tmp")) ?? [] where entry.hasPrefix("quiesce-labtest-") {
        let top = "/tmp/\(entry)"
        guard let owner = try? String(contentsOfFile: top + "/.owner", encoding: .utf8) else { continue }
        let parts = owner.split(whereSeparator: \.isWhitespace)
        guard parts.count == 2, let pid = pid_t(parts[0]), processStartTime(pid) != String(parts[1]) else { continue }
        let problems = await release(LabDirectory(top: top))
        FileHandle.standardError.write(Data("reclaimed abandoned lab test directory \(top): \(problems.joined(separator: "; "))\n".utf8))
    }
}

/// Field 22 of /proc/PID/stat (start time in clock ticks): a pid and its start time name one process.
private func processStartTime(_ pid: pid_t) -> String? {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return nil }
    let fields = stat[stat.index(after: close)...].split(separator: " ")
    return fields.count > 19 ? String(fields[19]) : nil
}

// MARK: helpers

/// Runs the built `quiesce` with `arguments`.
/// A command's exit status and output, for failure messages.
private func shown(_ result: CommandResult) -> String {
    "exit \(result.status)\(result.timedOut ? " (timed out)" : "")\n--- stdout\n\(result.stdout)\n--- stderr\n\(result.stderr)"
}

/// Rows of the catalog's checkpoints table (0 while it does not exist yet or is locked).
private func checkpointRows(_ catalog: String) -> Int {
    guard FileManager.default.fileExists(atPath: catalog),
          let connection = try? SQLiteConnection(path: catalog, mode: .readOnly, busyTimeout: .milliseconds(200)) else { return 0 }
    defer { connection.close() }
    return (try? connection.scalar("SELECT count(*) FROM checkpoints")?.int).flatMap { $0 }.map(Int.init) ?? 0
}

private func rowCount(_ database: String, table: String) throws -> Int64 {
    let connection = try SQLiteConnection(path: database, mode: .readWrite)
    defer { connection.close() }
    connection.limitWaits(busyUntil: .now + .seconds(5)) { false }
    return try connection.scalar("SELECT count(*) FROM \(table)")?.int ?? -1
}

/// The lab's exec hook log: `DATE ACTION checkpoint=ID volume=NAME` per call.
private enum HookCalls {
    static func lines(_ path: String) -> [String] {
        ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }

    /// Checkpoints the hook was told to freeze for and not yet to thaw or that the freeze failed.
    static func unfinished(_ path: String) -> [String] {
        var frozen = Set<String>(), ended = Set<String>()
        for line in lines(path) {
            let fields = line.split(separator: " ")
            guard fields.count >= 3, fields[2].hasPrefix("checkpoint=") else { continue }
            let id = String(fields[2].dropFirst("checkpoint=".count))
            switch fields[1] {
            case "freeze": frozen.insert(id)
            case "thaw", "freeze-failed": ended.insert(id)
            default: break
            }
        }
        return frozen.subtracting(ended).sorted()
    }
}

/// Process ids whose command line (arguments joined by spaces) matches.
/// Processes whose environment carries the lab's workload marker.
private func workloadProcesses(of root: String) -> [pid_t] {
    let marker = Array("\(Lab.workloadMarker)=\(root)".utf8)
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { entry -> pid_t? in
        guard let pid = pid_t(entry), pid != getpid(),
              let environment = FileManager.default.contents(atPath: "/proc/\(entry)/environ") else { return nil }
        return environment.split(separator: 0).contains { Array($0) == marker } ? pid : nil
    }
}

private func processes(_ predicate: (String) -> Bool) -> [pid_t] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { entry -> pid_t? in
        guard let pid = pid_t(entry), pid != getpid(),
              let data = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline"), !data.isEmpty else { return nil }
        let cmdline = String(decoding: data.map { $0 == 0 ? UInt8(ascii: " ") : $0 }, as: UTF8.self)
        return predicate(cmdline) ? pid : nil
    }
}

private func inode(of path: String) throws -> ino_t {
    var info = stat()
    guard stat(path, &info) == 0 else { throw POSIXFailure("stat \(path)", errno) }
    return info.st_ino
}

/// Mount points at or below `directory`.
private func mountPoints(below directory: String) -> [String] {
    mountTable().map(\.mountPoint).filter { $0 == directory || $0.hasPrefix(directory + "/") }
}

/// Every mount of this process's namespace and its source, from the whole of /proc/self/mountinfo
/// (read to its end with read(2): procfs hands it out a page at a time).
private func mountTable() -> [(mountPoint: String, source: String)] {
    let fd = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return [] }
    defer { close(fd) }
    var bytes = [UInt8]()
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(fd, &buffer, buffer.count)
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { break }
        bytes += buffer[0..<n]
    }
    // `36 35 98:0 /root /mnt rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
    return String(decoding: bytes, as: UTF8.self).split(separator: "\n").compactMap { line in
        let fields = line.split(separator: " ").map { $0.replacingOccurrences(of: "\\040", with: " ") }
        guard fields.count > 4, let dash = fields.firstIndex(of: "-"), dash + 2 < fields.count else { return nil }
        return (fields[4], fields[dash + 2])
    }
}

/// FITHAW on `mount`: true if it was frozen (and is now thawed), false if it was not.
private func wasFrozen(_ mount: String) throws -> Bool {
    let fd = try FilesystemHold.open(mount)
    defer { close(fd) }
    return try FilesystemHold.thaw(fd, mount: mount)
}

/// The lab's writers and workload processes, as `Lab.defaultApplications` registers them.
private let labWriters = ["app-hook", "ledger", "mail", "orders", "postgresql"]
private let labWorkloads = 8
