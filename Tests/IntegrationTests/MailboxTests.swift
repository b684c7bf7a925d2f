import Foundation
import Logging
import Quiesce
import QuiesceLab
import QuiesceCore
import QuiesceTestSupport
import Synchronization
import Testing

/// A Dovecot store inside a test world's guest (`guest/mail/<user>`), its private Dovecot config
/// outside the guest, and `dovecot-lda` delivering to it as `nobody` (which owns the store; as a
/// user other than root, dovecot-lda delivers to `$USER` without an auth service).
struct GuestMailStore: Sendable {
    static let lda = "/usr/lib/dovecot/dovecot-lda"
    static var installed: Bool { access(lda, X_OK) == 0 && access("/usr/bin/doveadm", X_OK) == 0 }

    let world: TestWorld
    let format: String
    let users: [String]
    var root: String { world.guest + "/mail" }
    var config: String { world.path("dovecot/dovecot.conf") }

    init(_ world: TestWorld, format: String, users: [String]) throws {
        guard Self.installed else {
            throw TestSupportError("dovecot-lda or doveadm is missing: apt-get install -y dovecot-core")
        }
        self.world = world
        self.format = format
        self.users = users
        _ = try world.makeDirectory("dovecot")
        let location = format == "maildir" ? "maildir:\(root)/%u" : "mbox:\(root)/%u:INBOX=\(root)/%u/inbox"
        try """
            mail_location = \(location)
            base_dir = \(world.path("dovecot/run"))
            log_path = /dev/stderr
            ssl = no

            """.write(toFile: config, atomically: true, encoding: .utf8)
        for user in users {
            try FileManager.default.createDirectory(atPath: root + "/" + user, withIntermediateDirectories: true)
        }
        _ = try ChildProcess.runSync("/bin/chown", ["-R", "65534:65534", root], timeout: .seconds(30))
    }

    /// Registers the `mailbox` writer for this store.
    func register(_ site: TestSite, order: Int = 0, lockTimeout: String = "3s", timeout: String = "10s") throws {
        let spec = "\(site.writersDirectory)/mail.toml"
        try """
            name = "mail"
            type = "mailbox"
            format = "\(format)"
            root = "\(root)"
            lock_timeout = "\(lockTimeout)"
            order = \(order)
            timeout = "\(timeout)"

            """.write(toFile: spec, atomically: true, encoding: .utf8)
        chmod(spec, 0o600)
    }

    static func body(_ user: String, _ seq: Int) -> String {
        let line = "quiesce message \(seq) for \(user) " + String(repeating: String(UnicodeScalar(UInt8(97 + seq % 26))), count: 70) + "\n"
        return String(repeating: line, count: 10 + seq % 50)
    }

    /// Delivers message `seq` to `user`; blocking (it waits out a freeze). True when dovecot-lda succeeded.
    func deliver(_ user: String, _ seq: Int, folder: String? = nil) throws -> Bool {
        let message = "Message-ID: <\(user).\(seq)@quiesce.test>\nSubject: \(seq)\n\n" + Self.body(user, seq)
        let result = try ChildProcess.runSync("/usr/bin/setpriv",
                                              ["--reuid=65534", "--regid=65534", "--clear-groups", Self.lda, "-c", config]
                                                + (folder.map { ["-m", $0] } ?? []),
                                              environment: ["PATH": "/usr/bin:/bin", "USER": user, "HOME": root + "/" + user],
                                              input: message, timeout: .seconds(60))
        return result.succeeded
    }

    /// Creates a folder through doveadm, so Dovecot lays it out.
    func createFolder(_ user: String, _ name: String) throws {
        let result = try ChildProcess.runSync("/usr/bin/setpriv",
                                              ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/doveadm", "-c", config,
                                               "mailbox", "create", name],
                                              environment: ["PATH": "/usr/bin:/bin", "USER": user, "HOME": root + "/" + user],
                                              timeout: .seconds(30))
        guard result.succeeded else { throw TestSupportError("doveadm mailbox create \(name) for \(user): \(result.stderr)") }
    }

    /// Lock files below the store (quiesce's, or Dovecot's of the moment).
    func lockFiles(below directory: String? = nil) -> [String] {
        let base = directory ?? root
        let found = (FileManager.default.enumerator(atPath: base)?.allObjects as? [String]) ?? []
        return found.filter { $0.hasSuffix(".lock") }.sorted()
    }

    /// Every message in a store (live or a copy) as (user, seq) → whether its body is the one written, byte for byte.
    func messages(in store: String) throws -> [String: Bool] {
        var found: [String: Bool] = [:]
        func record(_ text: Substring) {
            guard let idStart = text.range(of: "Message-ID: <"), let idEnd = text[idStart.upperBound...].firstIndex(of: "@"),
                  let bodyStart = text.range(of: "\n\n") else { return }
            let id = String(text[idStart.upperBound..<idEnd])
            let parts = id.split(separator: ".")
            guard parts.count == 2, let seq = Int(parts[1]) else { return }
            var body = text[bodyStart.upperBound...]
            // mbox: the separator's blank line belongs to the mbox, not the message.
            if format == "mbox", body.hasSuffix("\n\n") { body = body.dropLast() }
            found[id] = String(body) == Self.body(String(parts[0]), seq)
        }
        let files = (FileManager.default.enumerator(atPath: store)?.allObjects as? [String]) ?? []
        for file in files {
            let path = store + "/" + file
            let components = file.split(separator: "/")
            if format == "maildir" {
                guard components.count >= 2, ["cur", "new"].contains(components[components.count - 2]) else { continue }
                record(Substring(try String(contentsOfFile: path, encoding: .utf8)))
            } else {
                guard components.count == 2, !components[1].hasPrefix("."), !components[1].hasSuffix(".lock") else { continue }
                let text = try String(contentsOfFile: path, encoding: .utf8)
                for message in text.components(separatedBy: "\nFrom ") { record(Substring(message)) }
            }
        }
        return found
    }
}

/// Runs deliveries to each user on threads of their own until stopped; remembers which succeeded.
final class DeliveryLoop: Sendable {
    private let state = Mutex<(stop: Bool, delivered: [String], failed: [String], running: Int)>((false, [], [], 0))

    init(_ store: GuestMailStore) {
        for user in store.users {
            state.withLock { $0.running += 1 }
            let thread = Thread { [self] in
                var seq = 0
                while !state.withLock({ $0.stop }) {
                    seq += 1
                    let ok = (try? store.deliver(user, seq)) ?? false
                    state.withLock { ok ? $0.delivered.append("\(user).\(seq)") : $0.failed.append("\(user).\(seq)") }
                    usleep(5_000)
                }
                state.withLock { $0.running -= 1 }
            }
            thread.start()
        }
    }

    var delivered: [String] { state.withLock { $0.delivered } }
    var failed: [String] { state.withLock { $0.failed } }

    func stop() async {
        state.withLock { $0.stop = true }
        while state.withLock({ $0.running }) > 0 { try? await Task.sleep(for: .milliseconds(20)) }
    }
}

@Suite(.enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI), .serialized)
struct MailboxTests {
    /// Several checkpoints while dovecot-lda delivers to three users; each snapshot verified.
    func checkpointsUnderDeliveries(format: String) async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            let store = try GuestMailStore(world, format: format, users: ["alice", "bob", "carol"])
            // The property is what the copies hold. A loaded CI machine (other suites share the
            // process and the disk) once kept one delivery holding carol's uidlist lock past a 3 s
            // lock_timeout; waiting out a slow holder is the writer's job, and giving up on one is
            // MailboxWriterTests' (staleDotlockOfADeadProcess…).
            try store.register(site, lockTimeout: "20s", timeout: "30s")
            // A folder besides INBOX (Maildir++ `.Archive`; an mbox file `Archive`).
            try store.createFolder("alice", "Archive")
            #expect(try store.deliver("alice", 0, folder: "Archive"))
            let loop = DeliveryLoop(store)
            defer { Task { await loop.stop() } }
            try await Task.sleep(for: .milliseconds(500))

            var records: [CheckpointRecord] = []
            for index in 0..<3 {
                let result = try await site.installation().checkpoint(label: "mail-\(index)")
                #expect(result.error == nil, "checkpoint \(index): \(String(describing: result.error))")
                records.append(result.record)
                // No lock of quiesce's stays behind a completed run.
                let ours = store.lockFiles().filter { isOurLock(store.root + "/" + $0) }
                #expect(ours.isEmpty, "quiesce's locks left after checkpoint \(index): \(ours)")
                try await Task.sleep(for: .milliseconds(300))
            }
            await loop.stop()
            #expect(loop.failed.isEmpty, "deliveries failed: \(loop.failed.prefix(5))")

            // Every delivery that dovecot-lda acknowledged is in the live store, whole (delayed, never lost).
            let live = try store.messages(in: store.root)
            let lost = loop.delivered.filter { live[$0] == nil }
            #expect(lost.isEmpty, "acknowledged but missing: \(lost.prefix(5))")
            #expect(live.values.allSatisfy { $0 }, "a live message's body differs from what was delivered")
            #expect(store.lockFiles().isEmpty, "locks left: \(store.lockFiles())")
            print("\(format): \(loop.delivered.count) deliveries during \(records.count) checkpoints")

            let writer = try #require(try site.installation().registry().writers.first { $0.name == "mail" })
            for record in records where record.outcome == .completed {
                let snapshot = try #require(record.snapshots.first)
                let marker = try #require(record.writers.first { $0.name == "mail" }?.marker)
                let expected = Int(marker["messages"] ?? "") ?? -1
                try await world.withMountedCopy(of: snapshot.path) { copy in
                    let copyStore = copy + "/mail"
                    let held = try store.messages(in: copyStore)
                    #expect(held.values.allSatisfy { $0 }, "\(record.id): a message in the snapshot is not the one delivered")
                    #expect(held.count >= expected, "\(record.id): \(held.count) messages in the copy, \(expected) at freeze")
                    let report = try await writer.verify(copy: CopyLayout(mounts: [world.guest: copy]), marker: marker)
                    #expect(report.ok, "\(record.id) verify: \(report.details)")
                }
            }
        }
    }

    @Test(.enabled(if: GuestMailStore.installed || TestEnvironment.isCI))
    func maildirCheckpointsDuringContinuousDeliveriesVerifyOnEveryCopy() async throws {
        try await checkpointsUnderDeliveries(format: "maildir")
    }

    @Test(.enabled(if: GuestMailStore.installed || TestEnvironment.isCI))
    func mboxCheckpointsDuringContinuousDeliveriesVerifyOnEveryCopy() async throws {
        try await checkpointsUnderDeliveries(format: "mbox")
    }

    @Test(.enabled(if: GuestMailStore.installed || TestEnvironment.isCI))
    func mboxDeliveryArrivingDuringTheFreezeIsDelayedNotLost() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            let store = try GuestMailStore(world, format: "mbox", users: ["alice"])
            #expect(try store.deliver("alice", 1))
            try store.register(site, order: 0)
            // A second writer keeps the freeze going for a while after the mailbox is locked.
            let frozenMark = world.path("frozen")
            try site.addExecWriter("slow", order: 10, onFreeze: "touch \(frozenMark); sleep 2")
            let checkpoint = Task { try await site.installation().checkpoint(label: "delayed") }
            #expect(await eventually(within: .seconds(20)) { FileManager.default.fileExists(atPath: frozenMark) })
            let delivered = Mutex<(ok: Bool, at: ContinuousClock.Instant)?>(nil)
            let thread = Thread {
                let ok = (try? store.deliver("alice", 2)) ?? false
                delivered.withLock { $0 = (ok, .now) }
            }
            thread.start()
            try await Task.sleep(for: .milliseconds(800))
            #expect(delivered.withLock { $0 } == nil, "the delivery did not wait for the freeze")
            let result = try await checkpoint.value
            #expect(result.record.outcome == .completed, "\(String(describing: result.error))")
            #expect(await eventually(within: .seconds(20)) { delivered.withLock { $0 } != nil })
            #expect(delivered.withLock { $0?.ok } == true)
            // Delivered after thaw: in the live store, not in the snapshot.
            let live = try store.messages(in: store.root)
            #expect(live["alice.2"] == true && live["alice.1"] == true)
            let snapshot = try #require(result.record.snapshots.first)
            let held = try await world.withMountedCopy(of: snapshot.path) { copy in try store.messages(in: copy + "/mail") }
            #expect(held["alice.1"] == true && held["alice.2"] == nil, "snapshot holds \(held)")
            #expect(store.lockFiles().isEmpty)
        }
    }

    @Test(.enabled(if: GuestMailStore.installed || TestEnvironment.isCI))
    func abortedCheckpointLeavesNoMailLock() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            let store = try GuestMailStore(world, format: "maildir", users: ["alice", "bob"])
            #expect(try store.deliver("alice", 1) && store.deliver("bob", 1))
            try store.register(site, order: 0)
            // Frozen after the mailbox writer, and vetoes.
            try site.addExecWriter("veto", order: 10, onFreeze: "exit 3")
            let result = try await site.installation().checkpoint(label: "veto")
            #expect(result.record.outcome == .aborted)
            #expect(site.calls("veto") == ["freeze", "freeze-failed"])
            #expect(store.lockFiles().isEmpty, "locks left: \(store.lockFiles())")
            #expect(try store.deliver("alice", 2))
        }
    }

    @Test(.enabled(if: GuestMailStore.installed || TestEnvironment.isCI))
    func killedCoordinatorDuringTheFreezeLeavesNoMailLock() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            let store = try GuestMailStore(world, format: "mbox", users: ["alice", "bob"])
            #expect(try store.deliver("alice", 1) && store.deliver("bob", 1))
            try store.register(site, order: 0)
            let frozenMark = world.path("frozen")
            try site.addExecWriter("slow", order: 10, timeout: "15s", onFreeze: "touch \(frozenMark); sleep 12")
            let coordinator = try site.startCLI(["checkpoint"])
            defer { coordinator.terminate() }
            #expect(await eventually(within: .seconds(20)) { FileManager.default.fileExists(atPath: frozenMark) })
            #expect(store.lockFiles() == ["alice/inbox.lock", "bob/inbox.lock"])

            coordinator.signal(SIGKILL, group: false)
            let killed = ContinuousClock.now
            _ = try await runBlocking { coordinator.wait() }
            // The guard removes the dotlocks at once (the fcntl locks died with the coordinator).
            let released = await eventually(within: .seconds(5)) { store.lockFiles().isEmpty }
            #expect(released, "locks left after kill -9: \(store.lockFiles())")
            // At once, not at the freeze deadline; loose for loaded machines.
            #expect(ContinuousClock.now - killed < .seconds(5))
            // Deliveries go on.
            let started = ContinuousClock.now
            #expect(try store.deliver("alice", 2))
            #expect(ContinuousClock.now - started < .seconds(10))
        }
    }
}

/// A lock file naming this (the coordinator's) process.
func isOurLock(_ path: String) -> Bool {
    ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").hasPrefix("\(getpid()):")
}

/// The lab's mail store on its own: `dovecot-lda` delivering during the demo's checkpoints,
/// each snapshot verified by the mailbox writer (doveadm force-resync on the copy).
@Suite(.enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI))
struct MailboxLabTests {
    @Test(.enabled(if: GuestMailStore.installed || TestEnvironment.isCI))
    func labDemoDeliversMailDuringCheckpointsAndEverySnapshotVerifies() async throws {
        try TestEnvironment.requireWorlds()
        var template = Array("/tmp/quiesce-maillab-XXXXXX".utf8CString)
        let made = try template.withUnsafeMutableBufferPointer { buffer in
            guard let made = mkdtemp(buffer.baseAddress!) else { throw POSIXFailure("mkdtemp", errno) }
            return String(cString: made)
        }
        chmod(made, 0o755)
        let lab = Lab(root: made + "/lab", sizes: LabSizes(datastoreBytes: 1 << 30, imageBytes: 256 << 20, drBytes: 512 << 20),
                      applications: [MailboxLabApplication()], logger: Logger(label: "mailbox-lab-test"))
        let result: Result<Demo.Report, any Error>
        do {
            result = .success(try await Demo(lab: lab, executable: try Executables.requireQuiesce(), checkpoints: 2,
                                             interval: .milliseconds(500)).run())
        } catch {
            result = .failure(error)
        }
        try await lab.down()
        try FileManager.default.removeItem(atPath: made)
        let report = try result.get()
        #expect(report.ok)
        #expect(report.checkpoints.count == 2)
        for line in report.checkpoints {
            let check = try #require(line.check, "checkpoint \(line.record.id) was not checked: \(line.error ?? "")")
            let mail = try #require(check.writers.first { $0.writer == "mail" })
            #expect(mail.ok, "\(line.record.id): \(mail)")
        }
        #expect(report.workloads.count == 3)
        for (name, summary) in report.workloads {
            #expect(summary.hasSuffix(" deliveries, 0 failed") && !summary.hasPrefix("0 "), "\(name): \(summary)")
        }
    }
}
