import Foundation
import QuiesceCore
import QuiesceReplication
import QuiesceSystem

/// A DR test in a store, as persisted in `<store>/.drtest/state.json` (so that `status` and
/// `stop` work from another process).
public struct DRTestSession: Codable, Sendable, Equatable {
    public enum Phase: String, Codable, Sendable {
        /// The copy is being made or its applications started (by `pid`).
        case starting
        /// Every application is up: people can test.
        case running
    }

    public var store: String
    public var checkpoint: String
    public var volumes: [String]
    /// `verified`, `failed verification` or `not verified`: the checkpoint's `dr verify` record.
    public var verification: String
    public var startedAt: Date
    public var phase: Phase
    /// The process that started the test.
    public var pid: Int32
    /// The writable clones and where they are mounted (nil until made).
    public var copy: MountedCopy?
    public var applications: [RunningCopy]
    /// One line per writer of the checkpoint whose application was not started, and why.
    public var notStarted: [String]
    /// The checkpoint's writer drop-ins: `stop` needs them even after retention pruned the checkpoint.
    public var environment: CheckpointEnvironment?
}

/// What `dr test status` sees: the session, and whether its copy and applications are still up.
public struct DRTestStatus: Codable, Sendable, Equatable {
    public var running: Bool
    public var session: DRTestSession?
    /// What is as it should be, one line each.
    public var checks: [String]
    /// What is not (a server that died, a copy unmounted behind the test's back, an interrupted start).
    public var problems: [String]
}

/// What `dr test stop` did.
public struct DRTestStopReport: Codable, Sendable, Equatable {
    public var checkpoint: String?
    public var startedAt: Date?
    public var stoppedAt: Date
    /// One line per application stopped and per part of the copy discarded.
    public var stopped: [String]
    /// What could not be stopped or released; the test's state is kept so that `stop` can run again.
    public var problems: [String]
    public var ok: Bool { problems.isEmpty }

    public init(checkpoint: String?, startedAt: Date?, stoppedAt: Date, stopped: [String], problems: [String]) {
        self.checkpoint = checkpoint
        self.startedAt = startedAt
        self.stoppedAt = stoppedAt
        self.stopped = stopped
        self.problems = problems
    }
}

/// Errors of `dr test`: what failed and the fix.
public enum DRTestError: Error, Sendable, CustomStringConvertible {
    /// A DR test already runs in the store (or its start was interrupted).
    case alreadyRunning(store: String, session: DRTestSession?)
    /// An application did not start on the copy; nothing of the test was left behind.
    case applicationFailed(writer: String, type: String, reason: String)
    /// Another process is still starting the test.
    case stillStarting(store: String, pid: Int32)

    public var description: String {
        switch self {
        case .alreadyRunning(let store, let session?):
            return "a DR test is already running in \(store): checkpoint \(session.checkpoint) (\(session.volumes.joined(separator: ", "))), "
                + "started \(ISO8601DateFormatter().string(from: session.startedAt)) by pid \(session.pid)"
                + (session.phase == .starting ? ", still starting" : "")
                + " (one test at a time per store: end it with `quiesce dr test stop --store \(store)`)"
        case .alreadyRunning(let store, nil):
            return "a DR test is already starting in \(store), or its start was interrupted (\(store)/\(DRTest.directoryName) exists without state) "
                + "(run `quiesce dr test stop --store \(store)` to discard it)"
        case .applicationFailed(let writer, let type, let reason):
            return "writer \(writer) (\(type)) did not start on the DR copy: \(reason); the test was discarded"
        case .stillStarting(let store, let pid):
            return "the DR test in \(store) is still being started by pid \(pid) (wait for `dr test start` to finish, or kill it first)"
        }
    }
}

/// Non-disruptive DR tests: a writable reflink clone of a received checkpoint, mounted privately
/// in `<store>/.drtest/copy/`, with each writer's application started on it (`CopyStartable`)
/// for people to test against; `stop` stops them and discards the clone with every change made
/// during the test. One test per store at a time.
///
/// The clone shares extents with the checkpoint's image but is a file of its own: receiving new
/// checkpoints and pruning old ones (even the test's) go on meanwhile, and the store's images are
/// never written. `.drtest` is hidden from `DRStore.volumes()` (it holds no `<id>.img`).
public struct DRTest: Sendable {
    public var store: DRStore
    static let directoryName = ".drtest"

    public init(store: DRStore) {
        self.store = store
    }

    /// The store's root as an absolute, resolved path: servers on the copy get absolute paths.
    var root: String {
        realpath(store.root, nil).map { path in defer { free(path) }; return String(cString: path) } ?? store.root
    }
    var directory: String { "\(root)/\(Self.directoryName)" }
    var statePath: String { "\(directory)/state.json" }
    var copyDirectory: String { "\(directory)/copy" }
    func workDirectory(_ writer: String) -> String {
        "\(directory)/work/" + writer.map { $0 == "/" || $0 == " " ? "_" : $0 }
    }

    // MARK: start

    /// Clones `checkpoint` (an id, or nil / `latest` for the newest) of `volume` (or of every
    /// volume that has it), mounts it and starts every writer's application on it. Throws
    /// `DRTestError.alreadyRunning` while another test runs in the store; on any failure,
    /// stops what it started and discards the clone before rethrowing.
    public func start(volume: String? = nil, checkpoint: String? = nil) async throws -> DRTestSession {
        let (id, volumes) = try resolve(volume: volume, checkpoint: checkpoint)
        var manifests: [StoredCheckpoint] = []
        for volume in volumes { manifests.append(try store.manifest(volume: volume, checkpoint: id)) }
        let environment = manifests.compactMap(\.environment).first
        let record = manifests[0].record
        let verifier = DRVerifier(store: store)
        let verdicts = volumes.map { verifier.recorded(volume: $0, checkpoint: id)?.ok }
        let verification = verdicts.contains(false) ? "failed verification" : verdicts.allSatisfy { $0 == true } ? "verified" : "not verified"

        try claim()
        var session = DRTestSession(store: root, checkpoint: id, volumes: volumes, verification: verification, startedAt: Date(),
                                    phase: .starting, pid: getpid(), copy: nil, applications: [], notStarted: [],
                                    environment: environment)
        do {
            try save(session)
            let images = volumes.map { volume in
                (volume: volume, image: store.imagePath(volume: volume, checkpoint: id),
                 liveMount: environment?.volumes.first { $0.name == volume }?.mount)
            }
            let copy = try await MountedCopy.make(images, in: copyDirectory)
            session.copy = copy
            try save(session)

            let (writers, specProblems) = CopyVerification.writers(from: environment)
            if environment == nil {
                session.notStarted.append("the manifest carries no writer drop-ins (sent by an older quiesce): no application was started")
            }
            session.notStarted += specProblems
            for result in record.writers {
                guard let writer = writers.first(where: { $0.name == result.name }) else {
                    if environment != nil, !specProblems.contains(where: { $0.hasPrefix("writer \(result.name):") }) {
                        session.notStarted.append("writer \(result.name) (\(result.type)): not started (no drop-in in the manifest)")
                    }
                    continue
                }
                guard let startable = writer as? any CopyStartable else {
                    session.notStarted.append("writer \(writer.name) (\(writer.type)): not started (\(writer.type) writers do not run on a copy)")
                    continue
                }
                if let reason = startable.notStartableReason {
                    session.notStarted.append("writer \(writer.name) (\(writer.type)): not started (\(reason))")
                    continue
                }
                guard let marker = result.marker else {
                    session.notStarted.append("writer \(writer.name) (\(writer.type)): not started (no marker was recorded at freeze)")
                    continue
                }
                let work = workDirectory(writer.name)
                try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
                chmod((work as NSString).deletingLastPathComponent, 0o711)
                chmod(work, 0o711)
                do {
                    session.applications.append(try await startable.startOnCopy(copy.layout, marker: marker, workDirectory: work))
                } catch {
                    throw DRTestError.applicationFailed(writer: writer.name, type: writer.type, reason: "\(error)")
                }
                try save(session)
            }
            session.phase = .running
            try save(session)
            return session
        } catch {
            _ = await teardown(session)
            throw error
        }
    }

    /// The checkpoint id and the volumes that have it.
    func resolve(volume: String?, checkpoint: String?) throws -> (String, [String]) {
        let candidates = volume.map { [$0] } ?? store.volumes()
        guard !candidates.isEmpty else { throw DRError("the store \(store.root) has no checkpoints yet") }
        if let volume, store.checkpoints(volume: volume).isEmpty {
            throw DRError("the store has no checkpoint of volume \(volume) (volumes: \(store.volumes().joined(separator: ", ")))")
        }
        let id: String
        if let checkpoint, checkpoint != "latest" {
            guard candidates.contains(where: { store.checkpoints(volume: $0).contains(checkpoint) }) else {
                let newest = candidates.compactMap { store.latest(volume: $0) }.max() ?? "none"
                throw DRError("the store has no checkpoint \(checkpoint)\(volume.map { " of volume \($0)" } ?? "") (newest: \(newest))")
            }
            id = checkpoint
        } else {
            id = candidates.compactMap { store.latest(volume: $0) }.max()!
        }
        return (id, candidates.filter { store.checkpoints(volume: $0).contains(id) })
    }

    /// Creates `.drtest` (0711): the atomic claim of the store's one test.
    func claim() throws {
        if mkdir(directory, 0o711) != 0 {
            let code = errno
            guard code == EEXIST else { throw DRError("cannot create \(directory): \(String(cString: strerror(code)))") }
            throw DRTestError.alreadyRunning(store: root, session: load())
        }
        chmod(directory, 0o711)
    }

    // MARK: status

    /// The running test, if any, and whether its copy is mounted and its applications' processes live.
    public func status() -> DRTestStatus {
        guard FileManager.default.fileExists(atPath: directory) else {
            return DRTestStatus(running: false, session: nil, checks: [], problems: [])
        }
        guard let session = load() else {
            return DRTestStatus(running: false, session: nil, checks: [], problems: [
                "\(directory) exists without a readable state.json: a start was interrupted (run `quiesce dr test stop --store \(root)` to discard it)",
            ])
        }
        var checks: [String] = [], problems: [String] = []
        if session.phase == .starting {
            if kill(session.pid, 0) == 0 {
                checks.append("being started by pid \(session.pid)")
            } else {
                problems.append("the start (pid \(session.pid)) did not finish: run `quiesce dr test stop --store \(root)` to discard it")
            }
        }
        for volume in session.copy?.volumes ?? [] {
            if let mountPoint = volume.mountPoint, Mounts.isMounted(mountPoint) {
                checks.append("volume \(volume.name): mounted at \(mountPoint)")
            } else {
                problems.append("volume \(volume.name): not mounted at \(volume.mountPoint ?? "?")")
            }
        }
        for application in session.applications {
            guard let text = application.state["pid"], let pid = pid_t(text) else { continue }
            if kill(pid, 0) == 0 {
                checks.append("writer \(application.writer) (\(application.type)): running, pid \(pid)")
            } else {
                problems.append("writer \(application.writer) (\(application.type)): pid \(pid) is gone"
                                + (application.state["log"].map { " (see \($0))" } ?? ""))
            }
        }
        for volume in session.volumes where !store.checkpoints(volume: volume).contains(session.checkpoint) {
            checks.append("checkpoint \(session.checkpoint) of \(volume) was pruned from the store since; the test's clone does not depend on it")
        }
        return DRTestStatus(running: true, session: session, checks: checks, problems: problems)
    }

    // MARK: stop

    /// Stops every application (going on past one that fails), unmounts, detaches and deletes the
    /// clone (every change made during the test is gone), and removes the test's state. When something
    /// cannot be stopped or released it is reported and the state is kept: run `stop` again.
    /// Nil when no test runs in the store.
    public func stop() async throws -> DRTestStopReport? {
        guard FileManager.default.fileExists(atPath: directory) else { return nil }
        let session = load()
        if let session, session.phase == .starting, session.pid != getpid(), kill(session.pid, 0) == 0 {
            throw DRTestError.stillStarting(store: root, pid: session.pid)
        }
        var report = await teardown(session)
        report.checkpoint = session?.checkpoint
        report.startedAt = session?.startedAt
        return report
    }

    /// Stops the session's applications, then releases everything below `.drtest` by what the
    /// kernel shows (mounts below it, loop devices backed by files below it), so that it also
    /// cleans up after an interrupted start; removes `.drtest` when nothing is left mounted.
    func teardown(_ session: DRTestSession?) async -> DRTestStopReport {
        var report = DRTestStopReport(checkpoint: nil, startedAt: nil, stoppedAt: Date(), stopped: [], problems: [])
        if let session, !session.applications.isEmpty {
            let (writers, _) = CopyVerification.writers(from: session.environment)
            var remaining: [RunningCopy] = []
            for application in session.applications.reversed() {
                guard let writer = writers.first(where: { $0.name == application.writer }) as? any CopyStartable else {
                    report.problems.append("writer \(application.writer) (\(application.type)): its drop-in does not load here, cannot stop it")
                    remaining.append(application)
                    continue
                }
                do {
                    try await writer.stopOnCopy(application)
                    report.stopped.append("writer \(application.writer) (\(application.type)): "
                                          + (application.state["pid"] == nil ? "nothing ran" : "stopped"))
                } catch {
                    report.problems.append("writer \(application.writer) (\(application.type)): \(error)")
                    remaining.append(application)
                }
            }
            // Keep what still runs in the state, for the next `stop`.
            var kept = session
            kept.applications = remaining.reversed()
            if kept != session { try? save(kept) }
        }
        report.problems += await releaseCopy(&report.stopped)
        if report.problems.isEmpty {
            do {
                try FileManager.default.removeItem(atPath: directory)
            } catch {
                report.problems.append("cannot remove \(directory): \(error.localizedDescription)")
            }
        }
        report.stoppedAt = Date()
        return report
    }

    /// Unmounts every mount below `.drtest`, then detaches every loop device backed by a file
    /// below it; applications were stopped by their writers first, so nothing is killed here.
    func releaseCopy(_ done: inout [String]) async -> [String] {
        let (released, problems) = await MountedCopy.releaseEverything(under: directory, killingUsers: false)
        done += released
        return problems.map { $0.hasSuffix("`)") ? $0 + "; then run `quiesce dr test stop` again" : $0 }
    }

    // MARK: state

    func load() -> DRTestSession? {
        guard let data = FileManager.default.contents(atPath: statePath) else { return nil }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try? decoder.decode(DRTestSession.self, from: data)
    }

    func save(_ session: DRTestSession) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        let temporary = statePath + ".tmp"
        guard FileManager.default.createFile(atPath: temporary, contents: try encoder.encode(session),
                                             attributes: [.posixPermissions: 0o600]) else {
            throw DRError("cannot write \(temporary): \(String(cString: strerror(errno)))")
        }
        guard rename(temporary, statePath) == 0 else {
            throw DRError("cannot write \(statePath): \(String(cString: strerror(errno)))")
        }
    }
}
