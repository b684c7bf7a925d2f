import Foundation
import QuiesceConfig
import QuiesceCore
import Synchronization

/// Builds `mailbox` writers: a Dovecot mail store (Maildir or mbox) held still with Dovecot's own locks.
///
/// ```toml
/// name = "mail"
/// type = "mailbox"
/// format = "maildir"                 # or "mbox"
/// root = "/srv/vm1/mail"             # one directory per user below it: mail_location = maildir:/srv/vm1/mail/%u
///                                    # (mbox: mbox:/srv/vm1/mail/%u:INBOX=/srv/vm1/mail/%u/inbox)
/// index_root = "/srv/vm1/index"      # optional: where INDEX= puts Dovecot's indexes, if not below root
/// doveadm_config = "/etc/dovecot/dovecot.conf"   # optional: base config for verification (mail_location is overridden)
/// lock_timeout = "5s"                # how long freeze waits for a lock Dovecot holds (below `timeout`)
/// order = 0
/// timeout = "30s"
/// ```
public struct MailboxWriterFactory: WriterFactory {
    public let type = "mailbox"
    /// `lock_timeout` when the spec does not say.
    public static let defaultLockTimeout: Duration = .seconds(5)

    public init() {}

    public func make(_ spec: SpecReader, common: CommonWriterSettings) throws -> any Writer {
        let formatText = try spec.string("format")
        guard let format = MailFormat(rawValue: formatText) else {
            throw spec.error("format", "expected \"maildir\" or \"mbox\", found \"\(formatText)\"")
        }
        var root = try spec.path("root")
        while root.count > 1 && root.hasSuffix("/") { root.removeLast() }
        var indexRoot: String?
        if spec.spec.table["index_root"] != nil { indexRoot = try spec.path("index_root") }
        var doveadmConfig: String?
        if spec.spec.table["doveadm_config"] != nil { doveadmConfig = try spec.path("doveadm_config") }
        let lockTimeout = try spec.duration("lock_timeout", default: Self.defaultLockTimeout)
        try spec.finish()

        if lockTimeout >= common.timeout {
            let what = spec.spec.table["lock_timeout"] == nil
                ? "the default lock_timeout (\(formatDuration(lockTimeout)))" : "lock_timeout (\(formatDuration(lockTimeout)))"
            throw spec.error("lock_timeout", "\(what) must be below timeout (\(formatDuration(common.timeout))): "
                + "freeze must give up waiting for a mailbox lock Dovecot holds, with a clear error, before the coordinator "
                + "gives up on the writer (set lock_timeout lower or timeout higher)")
        }
        return MailboxWriter(common: common, format: format, root: root, indexRoot: indexRoot,
                             doveadmConfig: doveadmConfig, lockTimeout: lockTimeout)
    }
}

/// A Dovecot mail store as a writer.
///
/// - identify: the mail root (and `index_root`), which must exist and be a directory.
/// - prepare: finds every folder (Maildir: each directory with `cur/` and `new/`; mbox: each
///   mbox file), outside the freeze.
/// - freeze, Maildir: creates `dovecot-uidlist.lock` in every folder by Dovecot's dotlock rules
///   (see `Dotlock`), so no Dovecot process can assign UIDs or rewrite the uidlist until thaw.
///   Deliveries go on: `dovecot-lda` still moves new mail into `new/` atomically, without a UID.
///   Then one `syncfs` of the store's filesystem makes every folder durable (an fsync per
///   directory would cost a device cache flush each: seconds for thousands of folders).
///   mbox: Dovecot's default `mbox_write_locks = dotlock fcntl`, in that order: `<mbox>.lock`,
///   then a write lock on the whole file; deliveries wait for thaw.
///   A lock Dovecot holds is retried with back-off for at most `lock_timeout`, holding nothing
///   else of that folder meanwhile (so a delivery in progress finishes); then freeze fails naming
///   the folder and the holder. Folders are locked by several workers at once.
///   Each lock file is armed in the freeze guard before it is created, so a dead coordinator's
///   locks are removed by the guard within the deadline plus one second.
/// - marker: per folder the message count, UIDVALIDITY, UIDNEXT (and the mbox size), as JSON in
///   `folders_state`; the names of the newest message files (at most `markerNameLimit`) in `names`.
/// - thaw: removes each lock it created, if it is still the file it created, and disarms its duty.
/// - verify: see `verify(copy:marker:)`.
public final class MailboxWriter: Writer {
    public let name: String
    public let type = "mailbox"
    public let order: Int
    public let timeout: Duration
    public let format: MailFormat
    /// The mail root: one directory per user.
    public let root: String
    public let indexRoot: String?
    public let doveadmConfig: String?
    /// The longest freeze waits for one folder's lock.
    public let lockTimeout: Duration
    let specFile: String

    /// How many message file names the marker lists (the newest first).
    public static let markerNameLimit = 256
    /// Folders handed to one blocking worker at a time.
    static let batchSize = 64
    /// Dovecot's stale timeouts: `dovecot-uidlist.lock` (MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT) and
    /// `mbox_dotlock_change_timeout`, both 2 minutes by default.
    static let staleSeconds = 120

    // Marker keys.
    static let formatKey = "format"
    static let rootKey = "root"
    static let foldersKey = "folders"
    static let messagesKey = "messages"
    static let stateKey = "folders_state"
    static let namesKey = "names"

    private struct State {
        var prepared: (checkpointID: String, folders: [MailFolder])?
        var session: LockSession?
        var thawedCheckpoint: String?
    }
    private let state = Mutex(State())

    public init(common: CommonWriterSettings, format: MailFormat, root: String, indexRoot: String? = nil,
                doveadmConfig: String? = nil, lockTimeout: Duration = MailboxWriterFactory.defaultLockTimeout) {
        self.name = common.name
        self.order = common.order
        self.timeout = common.timeout
        self.specFile = common.specFile
        self.format = format
        self.root = root
        self.indexRoot = indexRoot
        self.doveadmConfig = doveadmConfig
        self.lockTimeout = lockTimeout
    }

    var specPlace: String { specFile.isEmpty ? "the writer's spec" : specFile }

    // MARK: identify, prepare

    public func identify() async throws -> WriterFootprint {
        for (key, path) in [("root", root), ("index_root", indexRoot)] {
            guard let path else { continue }
            guard MailStore.isDirectory(path) else {
                throw WriterError(.nonRetryable, "the mail \(key) \(path) is not a directory",
                                  hint: "fix `\(key)` in \(specPlace): it is the directory holding one directory per user")
            }
        }
        if format == .maildir, MailStore.isDirectory(root + "/cur") {
            throw WriterError(.nonRetryable, "\(root) is itself a Maildir (it has cur/)",
                              hint: "`root` in \(specPlace) must be the directory above the users' Maildirs (mail_location = maildir:ROOT/%u)")
        }
        return WriterFootprint(paths: [root] + (indexRoot.map { [$0] } ?? []))
    }

    public func prepare(_ context: CheckpointContext) async throws {
        let folders = try await enumerate()
        context.logger.debug("mail folders found", metadata: ["root": "\(root)", "folders": "\(folders.count)"])
        state.withLock { $0.prepared = (context.checkpointID, folders) }
    }

    func enumerate() async throws -> [MailFolder] {
        let (root, format) = (self.root, self.format)
        do {
            return try await runBlocking { try MailStore.folders(root: root, format: format) }
        } catch {
            throw WriterError(.nonRetryable, "cannot list the mail folders below \(root): \(error)",
                              hint: "quiesce must be able to read the mail root; check `root` in \(specPlace)")
        }
    }

    // MARK: freeze

    public func freeze(_ context: CheckpointContext) async throws -> ConsistencyMarker {
        let id = context.checkpointID
        let prepared = state.withLock { $0.prepared?.checkpointID == id ? $0.prepared?.folders : nil }
        let folders: [MailFolder]
        if let prepared { folders = prepared } else { folders = try await enumerate() }

        let session = LockSession(checkpointID: id)
        let (stale, thawed) = state.withLock { state -> (LockSession?, Bool) in
            if state.thawedCheckpoint == id { return (nil, true) }
            defer { state.session = session }
            return (state.session, false)
        }
        if thawed { throw abandoned() }
        if let stale { await release(stale, context) }

        let started = ContinuousClock.now
        // Leave the coordinator time to hear about a lock we could not get.
        let lockDeadline = min(started + lockTimeout, context.deadline - .milliseconds(200))
        let results = FolderResults(count: folders.count)
        let armTime = TimeTally()
        let next = BatchCursor()
        let workers = max(1, min(4, (folders.count + Self.batchSize - 1) / Self.batchSize))
        let format = self.format
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<workers {
                    group.addTask { [self] in
                        while true {
                            // Another worker failed: stop taking locks (the caller releases them).
                            try Task.checkCancellation()
                            let start = next.take(Self.batchSize)
                            if start >= folders.count { return }
                            var pending = Array(start..<min(start + Self.batchSize, folders.count))
                            var backoff = Duration.milliseconds(1)
                            let started = ContinuousClock.now
                            while !pending.isEmpty {
                                // Armed just before each create, and disarmed when the folder turned out busy:
                                // the guard only ever removes a lock file while it is ours to remove.
                                // One exchange for the whole batch; the guard removes a lock only while
                                // it still holds our content.
                                if session.isCancelled { throw abandoned() }
                                let arming = ContinuousClock.now
                                let duties = try await context.guardian.arm(all: pending.map {
                                    .removeFile(path: folders[$0].lockPath(format), expectedContent: Dotlock.ownContent)
                                })
                                armTime.add(ContinuousClock.now - arming)
                                let attempt = Array(zip(pending, duties))
                                let outcome = try await runBlocking {
                                    Self.lockOnce(attempt, folders: folders, format: format, session: session, results: results)
                                }
                                try? await context.guardian.disarm(all: duties.filter { !session.holds($0) })
                                if let problem = outcome.problem {
                                    throw LockFailure(folder: folders[problem.index], holder: nil, waited: .now - started,
                                                      problem: problem.text).error(writer: self)
                                }
                                if session.isCancelled { throw abandoned() }
                                pending = outcome.busy.map(\.index)
                                guard let first = outcome.busy.first else { break }
                                if ContinuousClock.now + backoff > lockDeadline {
                                    throw LockFailure(folder: folders[first.index], holder: first.holder, waited: .now - started,
                                                      problem: nil).error(writer: self)
                                }
                                try await Task.sleep(for: backoff)
                                backoff = min(backoff * 2, .milliseconds(100))
                            }
                        }
                    }
                }
                try await group.waitForAll()
            }
        } catch {
            await release(session, context)
            if error is WriterError { throw error }
            throw WriterError(.retryable, "locking the mail folders below \(root) failed: \(error)")
        }
        if session.isCancelled {
            await release(session, context)
            throw abandoned()
        }
        // No flush here: the coordinator's syncfs and FIFREEZE of the whole volume come next, before
        // the snapshot; a flush of our own would only lengthen everyone's freeze window.
        var marker = ConsistencyMarker()
        marker[Self.formatKey] = format.rawValue
        marker[Self.rootKey] = root
        marker[Self.foldersKey] = String(folders.count)
        var summary: [String: FolderState] = [:]
        var names: [(folder: String, name: String)] = []
        var total = 0
        for (index, folder) in folders.enumerated() {
            guard let found = results.get(index) else { continue }
            summary[folder.relative] = found.state
            total += found.state.m
            names += found.names.map { (folder.relative, $0) }
        }
        marker[Self.messagesKey] = String(total)
        marker[Self.stateKey] = Self.json(summary)
        // The newest files (Dovecot's names start with the delivery time): the ones most at risk.
        names.sort { $0.name > $1.name }
        let listed = Dictionary(grouping: names.prefix(Self.markerNameLimit), by: \.folder).mapValues { $0.map(\.name).sorted() }
        marker[Self.namesKey] = Self.json(listed)
        context.logger.info("mail folders locked", metadata: [
            "root": "\(root)", "folders": "\(folders.count)", "messages": "\(total)",
            "took_ms": "\(Int((ContinuousClock.now - started).milliseconds))",
            "guard_ms": "\(Int(armTime.total.milliseconds))",
        ])
        return marker
    }

    /// Why one folder could not be locked.
    struct LockFailure: Error {
        var folder: MailFolder
        var holder: String?
        var waited: Duration
        var problem: String?

        func error(writer: MailboxWriter) -> WriterError {
            if let problem {
                return WriterError(.nonRetryable, "cannot lock \(folder.path): \(problem)",
                                   hint: "quiesce must be able to create files in every mail folder (run it as root)")
            }
            return WriterError(.timedOut,
                "timed out after \(formatDuration(waited)) waiting for the lock of \(folder.path) (held by \(holder ?? "?")): "
                + "Dovecot was busy with that folder for longer than lock_timeout (\(formatDuration(writer.lockTimeout))); nothing was snapshotted",
                hint: "retry, or raise lock_timeout in \(writer.specPlace) (below timeout, \(formatDuration(writer.timeout)))")
        }
    }

    /// What one pass over some folders did.
    struct PassOutcome: Sendable {
        /// Folders someone else holds, with who.
        var busy: [(index: Int, holder: String)] = []
        /// A folder that cannot be locked at all (not a wait).
        var problem: (index: Int, text: String)?
    }

    /// One attempt at each folder's lock; a folder locked is adopted by the session and its state
    /// read at once. Stops at the first hard problem, or when the session is cancelled. Blocking.
    static func lockOnce(_ attempt: [(Int, GuardDutyID)], folders: [MailFolder], format: MailFormat,
                         session: LockSession, results: FolderResults) -> PassOutcome {
        var outcome = PassOutcome()
        for (index, duty) in attempt {
            if session.isCancelled { return outcome }
            let folder = folders[index]
            do {
                switch try lockFolder(folder, format: format) {
                case .busy(let holder):
                    outcome.busy.append((index, holder))
                case .held(let lock):
                    guard session.adopt(lock, duty: duty) else {
                        _ = lock.release()
                        return outcome
                    }
                    results.set(index, try readState(folder, format: format))
                }
            } catch {
                // A folder deleted since prepare (IMAP DELETE) is simply not in this checkpoint.
                if access(folder.path, F_OK) != 0 && errno == ENOENT { continue }
                outcome.problem = (index, "\(error)")
                return outcome
            }
        }
        return outcome
    }

    enum FolderLock {
        case held(HeldLock)
        case busy(String)
    }

    /// One attempt: the dotlock (removing a stale one, as Dovecot does, and trying again), then
    /// for mbox the file lock; a busy file lock releases the dotlock, so the holder can finish.
    static func lockFolder(_ folder: MailFolder, format: MailFormat) throws -> FolderLock {
        let owner = (folder.owner, folder.group, folder.lockMode)
        var dotlock: HeldDotlock?
        for _ in 0..<3 {
            switch try Dotlock.attempt(folder.lockPath(format), protecting: folder.protectedPath(format),
                                       staleAfter: staleSeconds, owner: owner) {
            case .acquired(let lock): dotlock = lock
            case .busy(let holder): return .busy(holder)
            case .removedStale: continue
            }
            break
        }
        guard let dotlock else { return .busy("a lock file that keeps reappearing") }
        guard format == .mbox else { return .held(HeldLock(dotlock: dotlock, fileLock: -1)) }
        do {
            switch try MboxFileLock.attempt(folder.path) {
            case .acquired(let fd): return .held(HeldLock(dotlock: dotlock, fileLock: fd))
            case .busy:
                _ = dotlock.release()
                return .busy("an fcntl lock on \(folder.path)")
            }
        } catch {
            _ = dotlock.release()
            throw error
        }
    }

    struct FolderResult: Sendable {
        var state: FolderState
        var names: [String]
    }

    /// The folder's state, read with its lock held; Maildir directories are fsynced.
    static func readState(_ folder: MailFolder, format: MailFormat) throws -> FolderResult {
        switch format {
        case .maildir:
            let names = MailStore.maildirMessages(folder.path)
            let uidlist = try MailStore.uidlist(folder.path + "/dovecot-uidlist")
            return FolderResult(state: FolderState(m: names.count, v: uidlist.validity, n: uidlist.next), names: names)
        case .mbox:
            return FolderResult(state: try MailStore.mbox(folder.path), names: [])
        }
    }

    private func abandoned() -> WriterError {
        WriterError(.timedOut, "freeze of the mail store \(root) was abandoned: thaw came before it finished; its locks were released")
    }

    // MARK: thaw

    public func thaw(_ context: CheckpointContext, outcome: CheckpointOutcome) async throws {
        let session = state.withLock { state -> LockSession? in
            state.thawedCheckpoint = context.checkpointID
            state.prepared = nil
            defer { state.session = nil }
            return state.session
        }
        guard let session else { return }
        let problems = await release(session, context)
        if !problems.isEmpty {
            throw WriterError(.retryable, "releasing the mail locks below \(root): " + problems.prefix(3).joined(separator: "; ")
                              + (problems.count > 3 ? " (and \(problems.count - 3) more)" : ""))
        }
    }

    /// Cancels the session (a freeze still running stops and releases what it takes), removes
    /// every lock it holds that is still ours, then disarms their guard duties. Returns problems.
    @discardableResult
    func release(_ session: LockSession, _ context: CheckpointContext) async -> [String] {
        let held = session.cancelAndTake()
        guard !held.isEmpty else { return [] }
        let problems = (try? await runBlocking { held.compactMap { $0.lock.release() } }) ?? ["release did not run"]
        try? await context.guardian.disarm(all: held.map { $0.1 })
        for problem in problems { context.logger.warning("\(problem)", metadata: ["writer": "\(name)"]) }
        return problems
    }

    static func json<T: Encodable>(_ value: T) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return (try? encoder.encode(value)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
    }
}

/// One folder's lock: the dotlock, and for mbox the file lock's descriptor.
struct HeldLock: Sendable {
    var dotlock: HeldDotlock
    var fileLock: Int32

    /// File lock first (closing its descriptor drops it), then the dotlock if still ours.
    func release() -> String? {
        if fileLock >= 0 { close(fileLock) }
        return dotlock.release()
    }
}

/// The locks of one checkpoint. Thaw cancels it: a freeze still running then releases each lock it
/// takes at once instead of adopting it.
final class LockSession: Sendable {
    let checkpointID: String
    private struct Inner {
        var cancelled = false
        var held: [(lock: HeldLock, duty: GuardDutyID)] = []
        var duties: Set<GuardDutyID> = []
    }
    private let inner = Mutex(Inner())

    init(checkpointID: String) { self.checkpointID = checkpointID }

    var isCancelled: Bool { inner.withLock { $0.cancelled } }

    /// Keeps the lock; false (and keeps nothing) when the session was cancelled.
    func adopt(_ lock: HeldLock, duty: GuardDutyID) -> Bool {
        inner.withLock { inner in
            if inner.cancelled { return false }
            inner.held.append((lock, duty))
            inner.duties.insert(duty)
            return true
        }
    }

    func holds(_ duty: GuardDutyID) -> Bool { inner.withLock { $0.duties.contains(duty) } }

    func cancelAndTake() -> [(lock: HeldLock, duty: GuardDutyID)] {
        inner.withLock { inner in
            inner.cancelled = true
            defer { inner.held = [] }
            return inner.held
        }
    }
}

/// Hands out consecutive batches of folder indexes to the workers.
final class BatchCursor: Sendable {
    private let next = Atomic<Int>(0)
    func take(_ count: Int) -> Int { next.add(count, ordering: .relaxed).oldValue }
}

/// Time spent by all workers in one activity (handing lock files to the guard).
final class TimeTally: Sendable {
    private let spent = Mutex<Duration>(.zero)
    func add(_ duration: Duration) { spent.withLock { $0 += duration } }
    var total: Duration { spent.withLock { $0 } }
}

/// Per-folder results, filled by the workers.
final class FolderResults: Sendable {
    private let slots: Mutex<[MailboxWriter.FolderResult?]>
    init(count: Int) { slots = Mutex(Array(repeating: nil, count: count)) }
    func set(_ index: Int, _ result: MailboxWriter.FolderResult) { slots.withLock { $0[index] = result } }
    func get(_ index: Int) -> MailboxWriter.FolderResult? { slots.withLock { $0[index] } }
}
