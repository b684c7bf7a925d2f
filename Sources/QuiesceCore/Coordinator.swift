import Foundation
import Logging

/// The coordinator's side of the freeze guard (the watchdog process): duties with
/// absolute deadlines. See `docs/architecture.md`.
public protocol FreezeGuardSession: Sendable {
    /// Returns once the guard holds the duty.
    func arm(_ duty: GuardDuty, deadline: ContinuousClock.Instant) async throws -> GuardDutyID
    func disarm(_ id: GuardDutyID) async throws
    /// Many duties with one deadline, in one exchange.
    func arm(all duties: [GuardDuty], deadline: ContinuousClock.Instant) async throws -> [GuardDutyID]
    func disarm(all ids: [GuardDutyID]) async throws
    /// Every duty was done by its owner: the guard exits without running any.
    func close() async
}

/// How a run ended.
public struct CheckpointResult: Sendable {
    public var record: CheckpointRecord
    /// Why it aborted, if it did.
    public var error: CoordinatorError?
    /// Writers that failed to thaw after a snapshot that is nevertheless consistent.
    public var thawErrors: [CoordinatorError]

    public init(record: CheckpointRecord, error: CoordinatorError?, thawErrors: [CoordinatorError]) {
        self.record = record
        self.error = error
        self.thawErrors = thawErrors
    }
}

/// Runs identify → prepare → freeze → flush-and-hold → snapshot → release → thaw →
/// post-snapshot → complete across writers and providers, or aborts from any phase
/// with release and thaw of everything touched.
public struct Coordinator: Sendable {
    public var writers: [any Writer]
    /// The snapshot set.
    public var volumes: [Volume]
    public var providers: [String: any SnapshotProvider]
    public var holdTimeout: Duration
    public var journal: any CheckpointJournal
    public var startGuard: @Sendable () async throws -> any FreezeGuardSession
    public var logger: Logger

    public init(writers: [any Writer], volumes: [Volume], providers: [String: any SnapshotProvider],
                holdTimeout: Duration = .seconds(10), journal: any CheckpointJournal,
                startGuard: @escaping @Sendable () async throws -> any FreezeGuardSession, logger: Logger) {
        self.writers = writers
        self.volumes = volumes
        self.providers = providers
        self.holdTimeout = holdTimeout
        self.journal = journal
        self.startGuard = startGuard
        self.logger = logger
    }

    public func checkpoint(label: String?, id: String = CheckpointRecord.makeID()) async -> CheckpointResult {
        let run = CheckpointRun(coordinator: self, id: id, label: label)
        return await run.execute()
    }

    /// identify and prepare only, without freezing (`writers check`).
    public func check(writer: any Writer) async -> Result<[Volume], CoordinatorError> {
        let run = CheckpointRun(coordinator: self, id: CheckpointRecord.makeID(), label: "check")
        do {
            let volumes = try await run.identify(writer)
            let context = run.context(for: writer, phase: .prepare, volumes: volumes, limit: writer.timeout,
                                      guardian: NoGuardian())
            if case .failure(let error) = await CheckpointRun.call(writer.timeout, { try await writer.prepare(context) }) {
                return .failure(.writerFailed(writer: writer.name, phase: .prepare, error: error))
            }
            return .success(volumes)
        } catch let error as CoordinatorError {
            return .failure(error)
        } catch {
            return .failure(.writerFailed(writer: writer.name, phase: .identify,
                                          error: WriterError(.nonRetryable, "\(error)")))
        }
    }
}

/// Used where nothing is frozen (`writers check`): arming is refused.
struct NoGuardian: FreezeGuardian {
    func arm(_ duty: GuardDuty) async throws -> GuardDutyID {
        throw WriterError(.nonRetryable, "no freeze guard outside a checkpoint")
    }
    func disarm(_ id: GuardDutyID) async throws {}
    func arm(all duties: [GuardDuty]) async throws -> [GuardDutyID] {
        throw WriterError(.nonRetryable, "no freeze guard outside a checkpoint")
    }
}

/// The guard acts this long after the coordinator's own limit, so that a healthy coordinator
/// always undoes its own work first; still well inside "deadline plus one second".
let guardGrace: Duration = .milliseconds(500)

/// Hands writers' duties to the guard session with the checkpoint's freeze deadline.
struct WriterGuardian: FreezeGuardian {
    let session: any FreezeGuardSession
    let deadline: ContinuousClock.Instant
    func arm(_ duty: GuardDuty) async throws -> GuardDutyID { try await session.arm(duty, deadline: deadline + guardGrace) }
    func disarm(_ id: GuardDutyID) async throws { try await session.disarm(id) }
    func arm(all duties: [GuardDuty]) async throws -> [GuardDutyID] {
        try await session.arm(all: duties, deadline: deadline + guardGrace)
    }
    func disarm(all ids: [GuardDutyID]) async throws { try await session.disarm(all: ids) }
}

/// One checkpoint's mutable state. Confined to the task that runs it.
final class CheckpointRun {
    let c: Coordinator
    var record: CheckpointRecord
    var results: [String: WriterResult] = [:]
    var writerVolumes: [String: [Volume]] = [:]
    var logger: Logger

    init(coordinator: Coordinator, id: String, label: String?) {
        c = coordinator
        record = CheckpointRecord(id: id, label: label, startedAt: Date())
        logger = coordinator.logger
        logger[metadataKey: "checkpoint"] = "\(id)"
        for w in coordinator.writers {
            results[w.name] = WriterResult(name: w.name, type: w.type, state: WriterState.stable.description)
        }
    }

    // MARK: The run

    func execute() async -> CheckpointResult {
        do {
            try await c.journal.begin(record)
        } catch {
            return await finish(error: .providerFailed(phase: .identify, error: ProviderError(
                volume: nil, "cannot record the checkpoint in the catalog: \(error)")), thawErrors: [])
        }
        logger.info("checkpoint started", metadata: ["writers": "\(c.writers.count)", "volumes": "\(c.volumes.count)"])

        // identify
        for writer in c.writers {
            do {
                writerVolumes[writer.name] = try await identify(writer)
            } catch let error as CoordinatorError {
                await setState(writer, .failed(at: .identify), error: error)
                return await abort(error, asked: [], captured: false)
            } catch {
                return await abort(.writerFailed(writer: writer.name, phase: .identify,
                                                 error: WriterError(.nonRetryable, "\(error)")), asked: [], captured: false)
            }
        }

        // prepare: the provider first (can it snapshot here at all?), then the mounts, then writers.
        for (provider, volumes) in providerGroups() {
            let id = record.id
            do {
                try await runBlocking { try provider.prepare(volumes, checkpointID: id) }
            } catch {
                return await abort(.providerFailed(phase: .prepare, error: asProviderError(error)), asked: [], captured: false)
            }
        }
        let mounts: [HeldMount]
        do {
            mounts = try openMounts()
        } catch let error as CoordinatorError {
            return await abort(error, asked: [], captured: false)
        } catch {
            return await abort(.filesystemFailed(phase: .prepare, mount: "?", message: "\(error)"), asked: [], captured: false)
        }
        defer { mounts.forEach { close($0.fd) } }

        let prepareFailures = await forEachConcurrently(c.writers, phase: .prepare) { writer, context in
            try await writer.prepare(context)
        }
        if let (writer, error) = prepareFailures.first {
            let failure = CoordinatorError.writerFailed(writer: writer.name, phase: .prepare, error: error)
            await setState(writer, .failed(at: .prepare), error: failure)
            return await abort(failure, asked: [], captured: false)
        }
        for writer in c.writers { await setState(writer, .waitingForFreeze) }

        // The guard holds the thaw duty from before the first freeze to after the last thaw.
        let session: any FreezeGuardSession
        do {
            session = try await c.startGuard()
        } catch {
            return await abort(.guardUnavailable("\(error)"), asked: [], captured: false)
        }
        let groups = Dictionary(grouping: c.writers, by: \.order).sorted { $0.key < $1.key }.map(\.value)
        let freezeBudget = groups.map { $0.map(\.timeout).max() ?? .zero }.reduce(.zero, +)
        let thawBudget = c.writers.map(\.timeout).max() ?? .zero
        let freezeDeadline = ContinuousClock.now + freezeBudget + c.holdTimeout + thawBudget
        let guardian = WriterGuardian(session: session, deadline: freezeDeadline)

        // freeze, group by group
        var asked: [any Writer] = []
        var failure: CoordinatorError?
        var firstFrozen: ContinuousClock.Instant?
        for group in groups {
            asked += group
            let outcomes = await withTaskGroup(of: (String, Result<ConsistencyMarker, WriterError>, ContinuousClock.Instant).self) { tasks in
                for writer in group {
                    let context = self.context(for: writer, phase: .freeze, volumes: writerVolumes[writer.name] ?? [],
                                               limit: writer.timeout, guardian: guardian)
                    tasks.addTask {
                        let result = await Self.call(writer.timeout) { try await writer.freeze(context) }
                        return (writer.name, result, .now)
                    }
                }
                var all: [(String, Result<ConsistencyMarker, WriterError>, ContinuousClock.Instant)] = []
                for await outcome in tasks { all.append(outcome) }
                return all
            }
            for (name, result, at) in outcomes {
                let writer = group.first { $0.name == name }!
                switch result {
                case .success(let marker):
                    firstFrozen = min(firstFrozen ?? at, at)
                    results[name]?.marker = marker
                    await setState(writer, .frozen)
                case .failure(let error):
                    let blame = CoordinatorError.writerFailed(writer: name, phase: .freeze, error: error)
                    await setState(writer, .failed(at: .freeze), error: blame)
                    if failure == nil { failure = blame }
                }
            }
            if failure != nil { break }
        }

        // flush-and-hold → snapshot → release
        var captured: [CapturedSnapshot] = []
        var captureStillRunning: DispatchSemaphore?
        if failure == nil {
            let hold = await flushHoldAndCapture(mounts, session: session)
            captured = hold.captured
            captureStillRunning = hold.captureStillRunning
            failure = hold.error
            if let start = hold.start, let end = hold.end {
                record.holdWindowMs = (end - start).milliseconds
            }
            for writer in c.writers where failure == nil { await setState(writer, .waitingForThaw) }
        }

        // thaw, every writer asked to freeze, in reverse order
        let outcome: CheckpointOutcome = failure == nil ? .completed : .aborted
        var thawErrors: [CoordinatorError] = []
        for group in groups.reversed() {
            let members = group.filter { w in asked.contains { $0.name == w.name } }
            if members.isEmpty { continue }
            let failures = await forEachConcurrently(members, phase: .thaw, guardian: guardian) { writer, context in
                try await writer.thaw(context, outcome: outcome)
            }
            for writer in members {
                if let (_, error) = failures.first(where: { $0.0.name == writer.name }) {
                    let blame = CoordinatorError.writerFailed(writer: writer.name, phase: .thaw, error: error)
                    thawErrors.append(blame)
                    await setState(writer, .failed(at: .thaw), error: blame)
                } else if results[writer.name]?.state != WriterState.failed(at: .freeze).description {
                    await setState(writer, .stable)
                }
            }
        }
        if let firstFrozen { record.freezeWindowMs = (ContinuousClock.now - firstFrozen).milliseconds }
        await session.close()

        if let failure {
            captureStillRunning?.wait()
            return await abort(failure, asked: asked, captured: true, thawErrors: thawErrors)
        }

        // post-snapshot: make the clones durable, collect recovery metadata
        do {
            let batches = Dictionary(grouping: captured) { $0.volume.provider }
            for (name, batch) in batches {
                guard let provider = c.providers[name] else { continue }
                record.snapshots += try await runBlocking { try provider.commit(batch) }
            }
        } catch {
            return await abort(.providerFailed(phase: .postSnapshot, error: asProviderError(error)),
                               asked: asked, captured: true, thawErrors: thawErrors)
        }
        for writer in c.writers {
            let context = context(for: writer, phase: .postSnapshot, volumes: writerVolumes[writer.name] ?? [],
                                  limit: writer.timeout, guardian: NoGuardian())
            switch await Self.call(writer.timeout, { try await writer.postSnapshot(context) }) {
            case .success(let metadata):
                if !metadata.files.isEmpty { results[writer.name]?.recovery = metadata }
            case .failure(let error):
                let blame = CoordinatorError.writerFailed(writer: writer.name, phase: .postSnapshot, error: error)
                await setState(writer, .failed(at: .postSnapshot), error: blame)
                return await abort(blame, asked: asked, captured: true, thawErrors: thawErrors)
            }
        }
        record.outcome = .completed
        return await finish(error: nil, thawErrors: thawErrors)
    }

    // MARK: Phases

    func identify(_ writer: any Writer) async throws -> [Volume] {
        let footprint: WriterFootprint
        switch await Self.call(writer.timeout, { try await writer.identify() }) {
        case .success(let value): footprint = value
        case .failure(let error): throw CoordinatorError.writerFailed(writer: writer.name, phase: .identify, error: error)
        }
        let map = VolumeMap(c.volumes)
        var volumes: [Volume] = []
        for path in footprint.paths {
            guard let volume = map.volume(holding: path) else {
                throw CoordinatorError.outsideSnapshotSet(writer: writer.name, path: path, volumeMap: map.description)
            }
            if !volumes.contains(volume) { volumes.append(volume) }
        }
        for name in footprint.volumes {
            guard let volume = c.volumes.first(where: { $0.name == name }) else {
                throw CoordinatorError.outsideSnapshotSet(writer: writer.name, path: "volume \"\(name)\"", volumeMap: map.description)
            }
            if !volumes.contains(volume) { volumes.append(volume) }
        }
        return volumes
    }

    struct HeldMount {
        var volume: Volume
        var mount: String
        var fd: Int32
    }

    func openMounts() throws -> [HeldMount] {
        var held: [HeldMount] = []
        do {
            for volume in c.volumes {
                guard let mount = volume.mount else {
                    logger.warning("volume has no guest mount: its snapshot is only crash-consistent",
                                   metadata: ["volume": "\(volume.name)"])
                    continue
                }
                // Before any writer freezes: FIFREEZE would fail only after they all had.
                guard FilesystemHold.canFreeze else {
                    throw CoordinatorError.filesystemFailed(phase: .prepare, mount: mount,
                                                            message: "freezing a filesystem needs CAP_SYS_ADMIN: run `quiesce checkpoint` as root")
                }
                guard FilesystemHold.isMountPoint(mount) else {
                    throw CoordinatorError.filesystemFailed(phase: .prepare, mount: mount,
                                                            message: "not a mount point (is the guest filesystem of volume \"\(volume.name)\" mounted?)")
                }
                held.append(HeldMount(volume: volume, mount: mount, fd: try FilesystemHold.open(mount)))
            }
        } catch {
            held.forEach { close($0.fd) }
            if let error = error as? CoordinatorError { throw error }
            throw CoordinatorError.filesystemFailed(phase: .prepare, mount: "?", message: "\(error)")
        }
        return held
    }

    struct HoldResult {
        var start: ContinuousClock.Instant?
        var end: ContinuousClock.Instant?
        var captured: [CapturedSnapshot] = []
        var error: CoordinatorError?
        /// Signalled when a capture abandoned at the hold limit finally returns.
        var captureStillRunning: DispatchSemaphore?
    }

    /// syncfs (outside the hold), arm the guard, then on one thread: FIFREEZE every
    /// mount, capture, FITHAW in reverse, always.
    func flushHoldAndCapture(_ mounts: [HeldMount], session: any FreezeGuardSession) async -> HoldResult {
        for m in mounts {
            do {
                try await runBlocking { try FilesystemHold.sync(m.fd, mount: m.mount) }
            } catch {
                return HoldResult(error: .filesystemFailed(phase: .flushAndHold, mount: m.mount, message: "\(error)"))
            }
        }
        let limit = c.holdTimeout
        let holdDeadline = ContinuousClock.now + limit
        var duties: [GuardDutyID] = []
        for m in mounts {
            do {
                duties.append(try await session.arm(.thawFilesystem(mount: m.mount), deadline: holdDeadline + guardGrace))
            } catch {
                return HoldResult(error: .guardUnavailable("arming the thaw of \(m.mount): \(error)"))
            }
        }
        let groups = providerGroups()
        let id = record.id
        // Fault injection for the tests of the guard and the hold limit (docs/architecture.md):
        // a capture as slow as a struggling datastore's.
        let pause = ProcessInfo.processInfo.environment["QUIESCE_FAULT_HOLD_PAUSE_MS"].flatMap(UInt32.init)
        let capture: @Sendable () throws -> [CapturedSnapshot] = {
            if let pause { usleep(pause * 1000) }
            var all: [CapturedSnapshot] = []
            for (provider, volumes) in groups {
                all += try provider.capture(volumes, checkpointID: id)
            }
            return all
        }
        let targets = mounts.map { ($0.mount, $0.fd) }
        LogGate.shared.hold()
        let result = (try? await runBlocking { Self.holdSequence(targets, limit: limit, capture: capture) })
            ?? HoldResult(error: .filesystemFailed(phase: .flushAndHold, mount: "?", message: "hold thread failed"))
        LogGate.shared.release()
        for id in duties { try? await session.disarm(id) }
        if let start = result.start, let end = result.end {
            logger.info("hold window", metadata: ["ms": "\(String(format: "%.1f", (end - start).milliseconds))"])
        }
        return result
    }

    /// The hold itself, synchronous and short. Never logs.
    static func holdSequence(_ mounts: [(String, Int32)], limit: Duration,
                             capture: @escaping @Sendable () throws -> [CapturedSnapshot]) -> HoldResult {
        var frozen: [(String, Int32)] = []
        let start = ContinuousClock.now
        var result = freezeAndCapture(mounts, frozen: &frozen, limit: limit, capture: capture)
        // Release, always, in reverse.
        for (mount, fd) in frozen.reversed() {
            do {
                try FilesystemHold.thaw(fd, mount: mount)
            } catch {
                if result.error == nil {
                    result.error = .filesystemFailed(phase: .release, mount: mount, message: "\(error)")
                }
            }
        }
        result.start = start
        result.end = .now
        return result
    }

    private static func freezeAndCapture(_ mounts: [(String, Int32)], frozen: inout [(String, Int32)], limit: Duration,
                                         capture: @escaping @Sendable () throws -> [CapturedSnapshot]) -> HoldResult {
        var result = HoldResult()
        for (mount, fd) in mounts {
            do {
                try FilesystemHold.freeze(fd, mount: mount)
                frozen.append((mount, fd))
            } catch {
                result.error = .filesystemFailed(phase: .flushAndHold, mount: mount, message: "\(error)")
                return result
            }
        }
        // The capture runs on its own thread so that the hold limit can be enforced here.
        let done = DispatchSemaphore(value: 0)
        let box = CaptureBox()
        let thread = Thread {
            box.result = Result { try capture() }
            done.signal()
        }
        thread.start()
        let waitLimit = DispatchTime.now() + .milliseconds(Int(limit.milliseconds))
        if done.wait(timeout: waitLimit) == .timedOut {
            result.error = .holdTimedOut(limit: limit)
            result.captureStillRunning = done
            return result
        }
        switch box.result! {
        case .success(let captured): result.captured = captured
        case .failure(let error): result.error = .providerFailed(phase: .snapshot, error: asProviderError(error))
        }
        return result
    }

    final class CaptureBox: @unchecked Sendable {
        // Written by the capture thread before it signals; read after the wait.
        var result: Result<[CapturedSnapshot], any Error>?
    }

    // MARK: Endings

    func abort(_ error: CoordinatorError, asked: [any Writer], captured: Bool,
               thawErrors: [CoordinatorError] = []) async -> CheckpointResult {
        logger.error("checkpoint aborted: \(error)")
        for (provider, volumes) in providerGroups() {
            let id = record.id
            do {
                try await runBlocking { try provider.discard(volumes, checkpointID: id) }
            } catch {
                logger.error("could not remove partial snapshots: \(error)")
            }
        }
        record.snapshots = []
        record.outcome = .aborted
        record.failedPhase = error.phase
        record.failedWriter = error.writer
        record.error = error.description
        return await finish(error: error, thawErrors: thawErrors)
    }

    func finish(error: CoordinatorError?, thawErrors: [CoordinatorError]) async -> CheckpointResult {
        record.endedAt = Date()
        record.writers = c.writers.compactMap { results[$0.name] }
        do {
            try await c.journal.finish(record)
        } catch {
            logger.error("could not record the checkpoint's end: \(error)")
        }
        if error == nil {
            logger.info("checkpoint completed", metadata: [
                "freeze_ms": "\(String(format: "%.1f", record.freezeWindowMs ?? 0))",
                "hold_ms": "\(String(format: "%.1f", record.holdWindowMs ?? 0))",
            ])
        }
        return CheckpointResult(record: record, error: error, thawErrors: thawErrors)
    }

    // MARK: Helpers

    func providerGroups() -> [(any SnapshotProvider, [Volume])] {
        var order: [String] = []
        var byName: [String: [Volume]] = [:]
        for v in c.volumes {
            if byName[v.provider] == nil { order.append(v.provider) }
            byName[v.provider, default: []].append(v)
        }
        return order.compactMap { name in c.providers[name].map { ($0, byName[name]!) } }
    }

    func context(for writer: any Writer, phase: Phase, volumes: [Volume], limit: Duration,
                 guardian: any FreezeGuardian) -> CheckpointContext {
        var log = logger
        log[metadataKey: "writer"] = "\(writer.name)"
        return CheckpointContext(checkpointID: record.id, label: record.label, phase: phase,
                                 deadline: .now + limit, volumes: volumes, logger: log, guardian: guardian)
    }

    /// Runs every writer's phase concurrently, each within its own timeout; returns the failures.
    func forEachConcurrently(_ writers: [any Writer], phase: Phase, guardian: any FreezeGuardian = NoGuardian(),
                             _ body: @escaping @Sendable (any Writer, CheckpointContext) async throws -> Void)
        async -> [(any Writer, WriterError)] {
        let contexts = writers.map { context(for: $0, phase: phase, volumes: writerVolumes[$0.name] ?? [],
                                             limit: $0.timeout, guardian: guardian) }
        return await withTaskGroup(of: (Int, WriterError?).self) { tasks in
            for (index, writer) in writers.enumerated() {
                let context = contexts[index]
                tasks.addTask {
                    if case .failure(let error) = await Self.call(writer.timeout, { try await body(writer, context) }) {
                        return (index, error)
                    }
                    return (index, nil)
                }
            }
            var failures: [(any Writer, WriterError)] = []
            for await (index, error) in tasks {
                if let error { failures.append((writers[index], error)) }
            }
            return failures.sorted { $0.0.name < $1.0.name }
        }
    }

    /// One writer call within its timeout, with errors turned into `WriterError`.
    static func call<T: Sendable>(_ limit: Duration, _ operation: @escaping @Sendable () async throws -> T)
        async -> Result<T, WriterError> {
        do {
            return .success(try await withDeadline(.now + limit, limit: limit, operation))
        } catch let error as DeadlineExceeded {
            return .failure(WriterError(.timedOut, "\(error)",
                                        hint: "raise `timeout` in the writer's spec, or find what held the application up"))
        } catch let error as WriterError {
            return .failure(error)
        } catch {
            return .failure(WriterError(.nonRetryable, "\(error)"))
        }
    }

    func setState(_ writer: any Writer, _ state: WriterState, error: CoordinatorError? = nil) async {
        results[writer.name]?.state = state.description
        var kind = WriterErrorKind.none
        if case .writerFailed(_, _, let writerError) = error { kind = writerError.kind } else if error != nil { kind = .nonRetryable }
        if error != nil {
            results[writer.name]?.errorKind = kind
            results[writer.name]?.error = error?.description
        }
        await c.journal.writerState(writer.name, type: writer.type, state: state, errorKind: kind,
                                    error: error?.description, checkpointID: record.id)
    }
}

func asProviderError(_ error: any Error) -> ProviderError {
    (error as? ProviderError) ?? ProviderError(volume: nil, "\(error)")
}
