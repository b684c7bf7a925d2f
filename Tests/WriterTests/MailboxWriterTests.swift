import Foundation
import Logging
@testable import MailboxWriter
import QuiesceConfig
import QuiesceCore
import Synchronization
import Testing

/// A Dovecot store in a temporary directory with a private Dovecot config, and real deliveries
/// through `dovecot-lda` (run as `nobody`, which owns the store: as another user than root,
/// dovecot-lda delivers to `$USER` without asking an auth service).
struct MailStoreFixture {
    static let lda = "/usr/lib/dovecot/dovecot-lda"
    static var available: Bool { geteuid() == 0 && access(lda, X_OK) == 0 && access("/usr/bin/doveadm", X_OK) == 0 }

    let directory: String
    let root: String
    let config: String
    let format: MailFormat

    init(format: MailFormat, users: [String]) throws {
        var template = Array("/tmp/quiesce-mail-test-XXXXXX".utf8CString)
        directory = try template.withUnsafeMutableBufferPointer { buffer in
            guard let made = mkdtemp(buffer.baseAddress!) else { throw POSIXFailure("mkdtemp", errno) }
            return String(cString: made)
        }
        chmod(directory, 0o755)
        root = directory + "/mail"
        config = directory + "/dovecot.conf"
        self.format = format
        let location = format == .maildir ? "maildir:\(root)/%u" : "mbox:\(root)/%u:INBOX=\(root)/%u/inbox"
        try """
            mail_location = \(location)
            base_dir = \(directory)/run
            log_path = /dev/stderr
            ssl = no

            """.write(toFile: config, atomically: true, encoding: .utf8)
        for user in users {
            try FileManager.default.createDirectory(atPath: root + "/" + user, withIntermediateDirectories: true)
        }
        _ = try ChildProcess.runSync("/bin/chown", ["-R", "65534:65534", root], timeout: .seconds(30))
    }

    func remove() { try? FileManager.default.removeItem(atPath: directory) }

    /// The unique body of message `seq` to `user` (a few KiB, so a torn copy would show).
    static func body(_ user: String, _ seq: Int) -> String {
        let line = "quiesce test message \(seq) for \(user): " + String(repeating: "\(seq % 10)", count: 60) + "\n"
        return String(repeating: line, count: 20 + seq % 30)
    }

    static func message(_ user: String, _ seq: Int) -> String {
        "Message-ID: <\(user)-\(seq)@quiesce.test>\nSubject: message \(seq)\nTo: \(user)@quiesce.test\n\n" + body(user, seq)
    }

    /// Delivers one message with dovecot-lda (to `folder` if given). Blocking; returns its result.
    func deliver(_ user: String, _ seq: Int, folder: String? = nil) throws -> CommandResult {
        try ChildProcess.runSync("/usr/bin/setpriv",
                                 ["--reuid=65534", "--regid=65534", "--clear-groups", Self.lda, "-c", config]
                                    + (folder.map { ["-m", $0] } ?? []),
                                 environment: ["PATH": "/usr/bin:/bin", "USER": user, "HOME": root + "/" + user],
                                 input: Self.message(user, seq), timeout: .seconds(30))
    }

    /// Creates a folder for `user` through doveadm (so Dovecot lays it out).
    func createFolder(_ user: String, _ name: String) throws {
        let result = try ChildProcess.runSync("/usr/bin/setpriv",
                                              ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/doveadm", "-c", config,
                                               "mailbox", "create", name],
                                              environment: ["PATH": "/usr/bin:/bin", "USER": user, "HOME": root + "/" + user],
                                              timeout: .seconds(30))
        guard result.succeeded else { throw FixtureError(description: "doveadm mailbox create \(name): \(result.stderr)") }
    }

    /// Every lock file below the store.
    func lockFiles() -> [String] {
        let found = (FileManager.default.enumerator(atPath: root)?.allObjects as? [String]) ?? []
        return found.filter { $0.hasSuffix(".lock") }.sorted()
    }
}

/// Records what the writer hands the guard; every armed duty must be disarmed by thaw.
final class RecordingGuardian: FreezeGuardian {
    private let state = Mutex<(next: Int, armed: [Int: GuardDuty], disarmed: Int)>((1, [:], 0))
    func arm(_ duty: GuardDuty) async throws -> GuardDutyID {
        state.withLock { s in
            defer { s.next += 1 }
            s.armed[s.next] = duty
            return GuardDutyID(s.next)
        }
    }
    func disarm(_ id: GuardDutyID) async throws {
        state.withLock { s in
            if s.armed.removeValue(forKey: id.rawValue) != nil { s.disarmed += 1 }
        }
    }
    var armed: [GuardDuty] { state.withLock { Array($0.armed.values) } }
    var disarmed: Int { state.withLock { $0.disarmed } }
}

func mailContext(_ phase: Phase, guardian: any FreezeGuardian, id: String = "20260101T000000000Z",
                 timeout: Duration = .seconds(10)) -> CheckpointContext {
    CheckpointContext(checkpointID: id, label: "test", phase: phase, deadline: .now + timeout, volumes: [],
                      logger: Logger(label: "mailbox-writer-test"), guardian: guardian)
}

func mailboxWriter(_ fixture: MailStoreFixture, lockTimeout: String = "2s", timeout: String = "10s") throws -> MailboxWriter {
    var table = TOMLTable()
    let entries: [(String, TOMLValue)] = [("name", .string("mail")), ("type", .string("mailbox")),
                                          ("format", .string(fixture.format.rawValue)), ("root", .string(fixture.root)),
                                          ("lock_timeout", .string(lockTimeout)), ("timeout", .string(timeout))]
    for (index, (key, value)) in entries.enumerated() { table.set(key, value, line: index + 1) }
    let reader = SpecReader(WriterSpec(file: "/etc/quiesce/writers.d/mail.toml", table: table))
    let common = CommonWriterSettings(name: try reader.string("name"), type: try reader.string("type"), order: 0,
                                      timeout: try reader.duration("timeout", default: .seconds(60)), specFile: reader.file)
    return try #require(try MailboxWriterFactory().make(reader, common: common) as? MailboxWriter)
}

@Suite struct MailboxWriterSpecTests {
    func make(_ entries: [(String, TOMLValue)]) throws -> any Writer {
        var table = TOMLTable()
        for (index, (key, value)) in entries.enumerated() { table.set(key, value, line: index + 1) }
        let reader = SpecReader(WriterSpec(file: "/etc/quiesce/writers.d/mail.toml", table: table))
        let common = CommonWriterSettings(name: "mail", type: "mailbox", order: 0,
                                          timeout: try reader.duration("timeout", default: .seconds(60)), specFile: reader.file)
        _ = try reader.optionalString("name")
        _ = try reader.optionalString("type")
        return try MailboxWriterFactory().make(reader, common: common)
    }

    @Test func lockTimeoutNotBelowTimeoutIsRefusedWithTheFix() throws {
        let error = #expect(throws: ConfigError.self) {
            try make([("name", .string("mail")), ("type", .string("mailbox")), ("format", .string("maildir")),
                      ("root", .string("/srv/mail")), ("lock_timeout", .string("30s")), ("timeout", .string("30s"))])
        }
        #expect(error?.description.contains("lock_timeout (30 s) must be below timeout (30 s)") == true)
    }

    @Test func unknownFormatAndRelativeRootAreRefused() throws {
        let format = #expect(throws: ConfigError.self) {
            try make([("format", .string("mdbox")), ("root", .string("/srv/mail"))])
        }
        #expect(format?.description.contains("expected \"maildir\" or \"mbox\", found \"mdbox\"") == true)
        let root = #expect(throws: ConfigError.self) {
            try make([("format", .string("maildir")), ("root", .string("srv/mail"))])
        }
        #expect(root?.description.contains("must be an absolute path") == true)
        let typo = #expect(throws: ConfigError.self) {
            try make([("format", .string("maildir")), ("root", .string("/srv/mail")), ("lock_timout", .string("1s"))])
        }
        #expect(typo?.description.contains("did you mean \"lock_timeout\"") == true)
    }
}

@Suite(.enabled(if: MailStoreFixture.available), .serialized)
struct MailboxWriterTests {
    @Test func maildirFreezeHoldsEveryUidlistLockRecordsTheMarkerAndThawRemovesOnlyItsLocks() async throws {
        let fixture = try MailStoreFixture(format: .maildir, users: ["alice", "bob"])
        defer { fixture.remove() }
        try fixture.createFolder("alice", "Archive")
        for seq in 1...5 {
            #expect(try fixture.deliver("alice", seq).succeeded)
            #expect(try fixture.deliver("bob", seq).succeeded)
        }
        #expect(try fixture.deliver("alice", 6, folder: "Archive").succeeded)

        let writer = try mailboxWriter(fixture)
        let guardian = RecordingGuardian()
        _ = try await writer.identify()
        try await writer.prepare(mailContext(.prepare, guardian: guardian))
        let marker = try await writer.freeze(mailContext(.freeze, guardian: guardian))
        #expect(marker["folders"] == "3")
        #expect(marker["messages"] == "11")
        let locks = fixture.lockFiles()
        #expect(locks == ["alice/.Archive/dovecot-uidlist.lock", "alice/dovecot-uidlist.lock", "bob/dovecot-uidlist.lock"])
        let content = try String(contentsOfFile: fixture.root + "/alice/dovecot-uidlist.lock", encoding: .utf8)
        #expect(content.hasPrefix("\(getpid()):"))
        #expect(guardian.armed.count == 3)
        // The guard is told the lock's content, so it never removes someone else's lock of that name.
        #expect(guardian.armed.contains(.removeFile(path: fixture.root + "/bob/dovecot-uidlist.lock", expectedContent: content)))
        let summary = try JSONDecoder().decode([String: [String: Int]].self, from: Data(try #require(marker["folders_state"]).utf8))
        #expect(summary["alice"]?["m"] == 5)
        #expect(summary["alice"]?["n"] == 6)
        #expect(summary["alice/.Archive"]?["m"] == 1)

        // A delivery during the freeze is not blocked: it lands in new/ without a UID.
        let started = ContinuousClock.now
        #expect(try fixture.deliver("bob", 99).succeeded)
        // Blocked, it would wait for the thaw below, or be killed at its 30 s limit and fail;
        // loose for loaded machines.
        #expect(ContinuousClock.now - started < .seconds(20))
        let uidlist = try String(contentsOfFile: fixture.root + "/bob/dovecot-uidlist", encoding: .utf8)
        #expect(!uidlist.contains("bob-99"))

        try await writer.thaw(mailContext(.thaw, guardian: guardian), outcome: .completed)
        #expect(fixture.lockFiles().isEmpty)
        #expect(guardian.armed.isEmpty && guardian.disarmed == 3)

        // The copy verifies: Dovecot's force-resync, counts and UIDs ≥ the marker, files whole.
        let copy = fixture.directory + "/copy"
        #expect(try ChildProcess.runSync("/bin/cp", ["-a", fixture.root, copy], timeout: .seconds(30)).succeeded)
        let report = try await writer.verify(copy: CopyLayout(mounts: [fixture.root: copy]), marker: marker)
        #expect(report.ok, "\(report.details)")
    }

    @Test func folderDeletedBetweenPrepareAndFreezeIsLeftOutNotAFailure() async throws {
        let fixture = try MailStoreFixture(format: .maildir, users: ["frank"])
        defer { fixture.remove() }
        try fixture.createFolder("frank", "Old")
        #expect(try fixture.deliver("frank", 1).succeeded)
        let writer = try mailboxWriter(fixture)
        let guardian = RecordingGuardian()
        try await writer.prepare(mailContext(.prepare, guardian: guardian))
        try FileManager.default.removeItem(atPath: fixture.root + "/frank/.Old")
        let marker = try await writer.freeze(mailContext(.freeze, guardian: guardian))
        let summary = try JSONDecoder().decode([String: [String: Int]].self, from: Data(try #require(marker["folders_state"]).utf8))
        #expect(Set(summary.keys) == ["frank"])
        try await writer.thaw(mailContext(.thaw, guardian: guardian), outcome: .completed)
        #expect(fixture.lockFiles().isEmpty && guardian.armed.isEmpty)
    }

    @Test func staleDotlockOfADeadProcessIsReplacedAndALiveHoldersLockTimesOutNamingTheFolder() async throws {
        let fixture = try MailStoreFixture(format: .maildir, users: ["carol"])
        defer { fixture.remove() }
        #expect(try fixture.deliver("carol", 1).succeeded)
        let lock = fixture.root + "/carol/dovecot-uidlist.lock"
        let writer = try mailboxWriter(fixture, lockTimeout: "1s")
        let guardian = RecordingGuardian()

        // A dead process's lock (as Dovecot leaves it when killed): removed, as Dovecot would.
        let dead = try ChildProcess("/bin/true", [], stdout: .null, stderr: .null)
        dead.wait()
        try "\(dead.pid):\(Dotlock.hostname)".write(toFile: lock, atomically: false, encoding: .utf8)
        _ = try await writer.freeze(mailContext(.freeze, guardian: guardian, id: "a"))
        #expect(try String(contentsOfFile: lock, encoding: .utf8).hasPrefix("\(getpid()):"))
        try await writer.thaw(mailContext(.thaw, guardian: guardian, id: "a"), outcome: .completed)
        #expect(fixture.lockFiles().isEmpty)

        // A live holder (another process of this host): freeze waits lock_timeout, then fails naming the folder.
        let holder = try ChildProcess("/bin/sleep", ["30"], stdout: .null, stderr: .null)
        defer { holder.signal(SIGKILL); holder.wait() }
        try "\(holder.pid):\(Dotlock.hostname)".write(toFile: lock, atomically: false, encoding: .utf8)
        let started = ContinuousClock.now
        let error = await #expect(throws: WriterError.self) {
            try await writer.freeze(mailContext(.freeze, guardian: guardian, id: "b"))
        }
        let waited = ContinuousClock.now - started
        // It waited lock_timeout (1 s), not the 10 s deadline; loose upper bound for loaded machines.
        #expect(waited >= .milliseconds(900) && waited < .seconds(8))
        #expect(error?.kind == .timedOut)
        #expect(error?.description.contains("\(fixture.root)/carol") == true)
        // The holder and how long it has held the lock (one stuck holder, or a stream of short ones).
        #expect(error?.description.contains("process \(holder.pid), lock ") == true)
        #expect(error?.description.contains(" s old") == true)
        try await writer.thaw(mailContext(.thaw, guardian: guardian, id: "b"), outcome: .aborted)
        // Not ours: left alone. And every duty armed was disarmed.
        #expect(try String(contentsOfFile: lock, encoding: .utf8) == "\(holder.pid):\(Dotlock.hostname)")
        #expect(guardian.armed.isEmpty)

        // A lock naming no local process: fresh, it is waited for; unchanged for the stale timeout
        // (Dovecot's 2 minutes for the uidlist, 1 s here), it is replaced.
        try FileManager.default.removeItem(atPath: lock)
        try "12345:another-host".write(toFile: lock, atomically: false, encoding: .utf8)
        let owner: (uid: uid_t, gid: gid_t, mode: mode_t) = (65534, 65534, 0o600)
        guard case .busy(let holder) = try Dotlock.attempt(lock, protecting: fixture.root + "/carol/dovecot-uidlist",
                                                           staleAfter: 120, owner: owner) else {
            Issue.record("a fresh lock of another host was not respected")
            return
        }
        #expect(holder.contains("12345:another-host"))
        try await Task.sleep(for: .milliseconds(2100))
        guard case .removedStale = try Dotlock.attempt(lock, protecting: fixture.root + "/carol/dovecot-uidlist",
                                                        staleAfter: 1, owner: owner) else {
            Issue.record("a lock unchanged for longer than the stale timeout was not replaced")
            return
        }
        #expect(!FileManager.default.fileExists(atPath: lock))
    }

    @Test func mboxFreezeTakesDotlockThenFcntlAndADeliveryWaitsForThaw() async throws {
        let fixture = try MailStoreFixture(format: .mbox, users: ["dave", "erin"])
        defer { fixture.remove() }
        for seq in 1...3 {
            #expect(try fixture.deliver("dave", seq).succeeded)
            #expect(try fixture.deliver("erin", seq).succeeded)
        }
        let writer = try mailboxWriter(fixture)
        let guardian = RecordingGuardian()
        try await writer.prepare(mailContext(.prepare, guardian: guardian))
        let marker = try await writer.freeze(mailContext(.freeze, guardian: guardian))
        #expect(marker["folders"] == "2")
        #expect(marker["messages"] == "6")
        #expect(fixture.lockFiles() == ["dave/inbox.lock", "erin/inbox.lock"])
        let summary = try JSONDecoder().decode([String: [String: Int]].self, from: Data(try #require(marker["folders_state"]).utf8))
        #expect(summary["dave/inbox"]?["n"] == 4)

        // A delivery now waits for the locks; it completes after thaw.
        let delivered = Mutex<CommandResult?>(nil)
        let thread = Thread {
            let result = try? fixture.deliver("dave", 4)
            delivered.withLock { $0 = result }
        }
        thread.start()
        try await Task.sleep(for: .milliseconds(1500))
        #expect(delivered.withLock { $0 } == nil, "the delivery did not wait for the freeze")
        try await writer.thaw(mailContext(.thaw, guardian: guardian), outcome: .completed)
        let deadline = ContinuousClock.now + .seconds(20)
        while delivered.withLock({ $0 }) == nil && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
        #expect(delivered.withLock { $0?.succeeded } == true)
        let mbox = try String(contentsOfFile: fixture.root + "/dave/inbox", encoding: .utf8)
        #expect(mbox.contains(MailStoreFixture.body("dave", 4)))
        #expect(fixture.lockFiles().isEmpty)
        #expect(guardian.armed.isEmpty)

        let copy = fixture.directory + "/copy"
        #expect(try ChildProcess.runSync("/bin/cp", ["-a", fixture.root, copy], timeout: .seconds(30)).succeeded)
        let report = try await writer.verify(copy: CopyLayout(mounts: [fixture.root: copy]), marker: marker)
        #expect(report.ok, "\(report.details)")
    }
}
