import Foundation
import Logging
import QuiesceCatalog
import QuiesceConfig
import QuiesceCore
import QuiesceReplication
import ReplicationTLS

/// How one target fared for one volume in a replication run.
public struct TargetOutcome: Sendable, Codable {
    public enum Status: String, Sendable, Codable {
        /// The target applied the checkpoint and acknowledged it.
        case applied
        /// The target already had it.
        case upToDate = "up-to-date"
        case failed
    }
    public var target: String
    public var volume: String
    public var checkpoint: String?
    public var base: String?
    public var status: Status
    public var error: String?
    /// The frame the target resumed at (0 unless an earlier run was interrupted).
    public var resumedAtFrame: UInt64 = 0
    public var bytesSent: UInt64 = 0
    /// Changed bytes in the delta (data plus zeroed ranges).
    public var changedBytes: UInt64 = 0
    /// Bytes read from the snapshots for this delta (shared by the targets that took it).
    public var bytesRead: UInt64 = 0
    public var seconds: Double = 0
    /// The target fell behind the others and got the stream from this frame on from a second
    /// read of the snapshot (so that it did not pace them).
    public var rereadFromFrame: UInt64?
    /// The receiver's verification of the copy; nil when it does not verify.
    public var verified: Bool?
    public var verifyFailures: [String]?
}

public struct ReplicationReport: Sendable, Codable {
    public var outcomes: [TargetOutcome]
    public var failed: Bool { outcomes.contains { $0.status == .failed } }
}

/// A target's state as `quiesce targets status` shows it.
public struct TargetStatus: Sendable, Codable {
    public struct VolumeState: Sendable, Codable {
        public var volume: String
        public var checkpoint: String?
        public var checkpointTime: Date?
        public var acknowledgedAt: Date?
        /// Seconds of data the target would lose if the primary failed now (now − checkpoint time).
        public var lagSeconds: Double?
        /// A newer completed checkpoint is waiting to be replicated.
        public var pending: Bool
        /// Whether the target verified its copy of `checkpoint` (nil: it does not verify).
        public var verified: Bool?
        public var verifyFailures: [String]
    }
    public var name: String
    public var url: String
    public var volumes: [VolumeState]
    /// The worst lag over the target's volumes (its RPO right now), nil before its first acknowledgement.
    public var lagSeconds: Double? {
        volumes.contains { $0.lagSeconds == nil } ? nil : volumes.compactMap(\.lagSeconds).max()
    }
}

/// What a scrub found for one target and volume.
public struct ScrubOutcome: Sendable, Codable {
    public enum Status: String, Sendable, Codable {
        /// Every block of the DR copy matches the primary's snapshot.
        case identical
        /// Some blocks differ: the DR copy is damaged (`differingOffsets`).
        case differs
        /// The scrub could not run (target unreachable, nothing replicated, snapshot gone).
        case failed
    }
    public var target: String
    public var volume: String
    public var checkpoint: String?
    public var status: Status
    public var error: String?
    public var blockSize: Int
    public var bytesCompared: UInt64 = 0
    /// Offsets of the first differing blocks (at most 20) and how many differ in all.
    public var differingOffsets: [UInt64] = []
    public var differingBlocks: Int = 0
}

/// A replication run failed before reaching any target (bad target name, no checkpoint).
public struct ReplicationError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

extension Installation {
    /// Ships each volume's newest completed checkpoint (or `checkpointID`) to every target
    /// (or those named), each from the base that target says it has. A delta is read once
    /// for all targets that share its base. Targets that fail are reported; the others go on.
    /// `full` sends whole streams even where a base exists: a new, independent DR copy
    /// (after a scrub found a damaged one). `fullCompare` finds the delta by comparing every
    /// block of the two snapshots instead of their extent maps (after a defragmentation moved
    /// every block, the maps would call the whole image changed).
    ///
    /// One run at a time (the replication lock): another one throws `CheckpointLock.Held`
    /// (exit 75), unless `waitingUpTo` gives it time to finish.
    public func replicate(targets names: [String]? = nil, checkpointID: String? = nil, full: Bool = false,
                          fullCompare: Bool = false, waitingUpTo wait: Duration? = nil) throws -> ReplicationReport {
        signal(SIGPIPE, SIG_IGN)
        let targets = try selectTargets(names)
        let lock = try replicationLock("quiesce replicate", waitingUpTo: wait)
        defer { lock.release() }
        let catalog = try openCatalog()
        var outcomes: [TargetOutcome] = []
        for volume in configuration.volumes {
            guard let record = try checkpointToSend(catalog, volume: volume.name, checkpointID: checkpointID) else {
                throw ReplicationError("volume \(volume.name) has no completed checkpoint to replicate; run `quiesce checkpoint` first")
            }
            outcomes += try replicate(volume: volume, record: record, targets: targets, catalog: catalog, full: full,
                                      fullCompare: fullCompare)
        }
        return ReplicationReport(outcomes: outcomes)
    }

    private func replicate(volume: Volume, record: CheckpointRecord, targets: [ReplicationTarget],
                           catalog: Catalog, full: Bool, fullCompare: Bool) throws -> [TargetOutcome] {
        guard let snapshot = record.snapshots.first(where: { $0.volume == volume.name }) else {
            throw ReplicationError("checkpoint \(record.id) has no snapshot of volume \(volume.name)")
        }
        // Keep the snapshot being read from pruning while we read it (a run that died keeps
        // its hold until the next run sees its pid is gone).
        releaseHoldsOfDeadRuns(catalog)
        let readingHolder = "\(Self.readingHolderPrefix)\(getpid()))"
        try catalog.hold(checkpointID: record.id, holder: readingHolder)
        defer { _ = try? catalog.release(holder: readingHolder) }

        var outcomes: [TargetOutcome] = []
        var lanes: [(base: CheckpointRecord?, target: ReplicationTarget, session: ReceiverSession)] = []
        for target in targets {
            var outcome = TargetOutcome(target: target.name, volume: volume.name, checkpoint: record.id, status: .failed)
            do {
                let session = try openSession(target)
                let state: ReceiverState
                do { state = try session.hello(volume: volume.name) } catch {
                    session.close()
                    throw error
                }
                if let latest = state.latest, latest >= record.id {
                    outcome.status = .upToDate
                    outcome.checkpoint = latest
                    session.close()
                    if latest == record.id {
                        try catalog.acknowledge(target: target.name, volume: volume.name, checkpointID: latest)
                    }
                    outcomes.append(outcome)
                    continue
                }
                let base = full ? nil : try usableBase(catalog, volume: volume.name, receiverHas: state.checkpoints)
                lanes.append((base, target, session))
            } catch {
                outcome.error = "\(error)"
                logger.error("target \(target.name): \(error)")
                outcomes.append(outcome)
            }
        }
        // One read of each distinct delta, streamed to every target that takes it.
        let groups = Dictionary(grouping: lanes.indices) { lanes[$0].base?.id ?? "" }
        for key in groups.keys.sorted() {
            let members = groups[key]!.map { lanes[$0] }
            let base = members[0].base
            let baseImage = base?.snapshots.first { $0.volume == volume.name }?.path
            do {
                let ranges = fullCompare && baseImage != nil ? DeltaReader.fullCompareRanges(size: snapshot.sizeBytes)
                    : try changedRanges(volume, base: baseImage, target: snapshot.path)
                let plan = DeltaPlan(volume: volume.name, targetImage: snapshot.path, baseImage: baseImage, base: base?.id,
                                     manifest: record, environment: checkpointEnvironment(record), ranges: ranges)
                let report = try DeltaSender.send(plan, to: members.map(\.session))
                for (member, sent) in zip(members, report.destinations) {
                    var outcome = TargetOutcome(target: member.target.name, volume: volume.name, checkpoint: record.id,
                                                base: base?.id, status: sent.error == nil ? .applied : .failed, error: sent.error,
                                                resumedAtFrame: sent.resumedAtFrame, bytesSent: sent.bytesSent,
                                                changedBytes: report.dataBytes + report.zeroBytes, bytesRead: report.bytesRead,
                                                seconds: report.seconds)
                    outcome.verified = sent.applied?.verification?.ok
                    outcome.verifyFailures = sent.applied?.verification?.failures
                    outcome.rereadFromFrame = sent.rereadFromFrame
                    if sent.error == nil {
                        do {
                            try catalog.acknowledge(target: member.target.name, volume: volume.name, checkpointID: record.id,
                                                    verified: outcome.verified, failures: outcome.verifyFailures ?? [])
                        } catch {
                            outcome.status = .failed
                            outcome.error = "applied at the target, but recording it failed: \(error)"
                        }
                    } else {
                        logger.error("target \(member.target.name): \(sent.error ?? "")")
                    }
                    outcomes.append(outcome)
                }
            } catch {
                logger.error("volume \(volume.name): \(error)")
                outcomes += members.map {
                    TargetOutcome(target: $0.target.name, volume: volume.name, checkpoint: record.id, base: base?.id,
                                  status: .failed, error: "\(error)")
                }
            }
            members.forEach { $0.session.close() }
        }
        return outcomes
    }

    /// Writes one volume's delta as a stream (`quiesce send`): `checkpointID` (default: the
    /// newest) against `baseID` (default: none, a full stream).
    /// `fullCompare` ignores the provider's change tracking and compares every block of the
    /// two snapshots by hash (a scrub, and the baseline the benchmarks measure against).
    public func send(volume name: String, checkpointID: String?, baseID: String?, to sink: ByteSink,
                     compressionLevel: Int32?, fullCompare: Bool = false) throws -> SendReport {
        signal(SIGPIPE, SIG_IGN)
        guard let volume = configuration.volumes.first(where: { $0.name == name }) else {
            throw UsageError("no volume \"\(name)\" in \(configuration.file) (volumes: \(configuration.volumes.map(\.name).joined(separator: ", ")))")
        }
        let catalog = try openCatalog()
        guard let record = try checkpointToSend(catalog, volume: name, checkpointID: checkpointID),
              let snapshot = record.snapshots.first(where: { $0.volume == name }) else {
            throw UsageError("volume \(name) has no completed checkpoint\(checkpointID.map { " \($0)" } ?? "") to send")
        }
        var baseImage: String?
        if let baseID {
            guard let base = try catalog.checkpoint(id: baseID), base.outcome == .completed,
                  let file = base.snapshots.first(where: { $0.volume == name }), FileManager.default.fileExists(atPath: file.path)
            else { throw UsageError("base \(baseID) is not a completed checkpoint of volume \(name) with its snapshot still on disk") }
            guard baseID < record.id else { throw UsageError("base \(baseID) is not older than \(record.id)") }
            baseImage = file.path
        }
        if fullCompare, baseImage == nil { throw UsageError("--full-compare needs --base (there is nothing to compare against)") }
        let ranges = fullCompare ? DeltaReader.fullCompareRanges(size: snapshot.sizeBytes)
            : try changedRanges(volume, base: baseImage, target: snapshot.path)
        let plan = DeltaPlan(volume: name, targetImage: snapshot.path, baseImage: baseImage, base: baseID, manifest: record,
                             environment: checkpointEnvironment(record), ranges: ranges)
        let report = try DeltaSender.send(plan, to: [PipeDestination(name: "stdout", sink: sink, compressionLevel: compressionLevel)])
        if let error = report.destinations.first?.error { throw ReplicationError(error) }
        return report
    }

    /// Compares every block of each target's newest copy of each volume with the primary's
    /// snapshot of the same checkpoint: both sides hash their own image at once and only
    /// the hashes travel. Reads both images whole (a scrub, not a routine step).
    public func scrub(targets names: [String]? = nil, blockSize: Int = BlockHashes.defaultBlockSize) throws -> [ScrubOutcome] {
        // Not beside a replication: it could retire the checkpoint being hashed at the receiver.
        let lock = try replicationLock("quiesce targets scrub", waitingUpTo: nil)
        defer { lock.release() }
        signal(SIGPIPE, SIG_IGN)
        let targets = try selectTargets(names)
        let catalog = try openCatalog()
        var outcomes: [ScrubOutcome] = []
        for target in targets {
            for volume in configuration.volumes {
                var outcome = ScrubOutcome(target: target.name, volume: volume.name, status: .failed, blockSize: blockSize)
                do {
                    let session = try openSession(target)
                    defer { session.close() }
                    guard let latest = try session.hello(volume: volume.name).latest else {
                        throw ReplicationError("target \(target.name) has no checkpoint of volume \(volume.name) yet")
                    }
                    outcome.checkpoint = latest
                    guard let record = try catalog.checkpoint(id: latest),
                          let snapshot = record.snapshots.first(where: { $0.volume == volume.name }),
                          FileManager.default.fileExists(atPath: snapshot.path) else {
                        throw ReplicationError("checkpoint \(latest) (the target's newest of \(volume.name)) is no longer on the primary; replicate a newer one first")
                    }
                    try session.requestScrub(volume: volume.name, checkpoint: latest, blockSize: blockSize)
                    let ours = try BlockHashes.compute(snapshot.path, blockSize: blockSize)
                    let theirs = try session.scrubResult()
                    let differing = (0..<max(ours.count, theirs.count)).filter { index in
                        index >= ours.count || index >= theirs.count || ours[index] != theirs[index]
                    }
                    outcome.bytesCompared = snapshot.sizeBytes
                    outcome.differingBlocks = differing.count
                    outcome.differingOffsets = differing.prefix(20).map { UInt64($0) * UInt64(blockSize) }
                    outcome.status = differing.isEmpty ? .identical : .differs
                    if !differing.isEmpty {
                        outcome.error = "\(differing.count) block(s) of \(blockSize) bytes differ from the primary's snapshot of \(latest), the first at offset \(outcome.differingOffsets[0]); take a checkpoint and run `quiesce replicate --full --target \(target.name)` for a clean copy"
                    }
                } catch {
                    outcome.error = "\(error)"
                }
                outcomes.append(outcome)
            }
        }
        return outcomes
    }

    /// Every configured target with what it acknowledged last, per volume, and its lag.
    public func targetStatuses(now: Date = Date()) throws -> [TargetStatus] {
        let catalog = try openCatalog()
        let acks = try catalog.targetAcknowledgements()
        var latest: [String: String] = [:]
        for volume in configuration.volumes { latest[volume.name] = try catalog.latestCompleted(volume: volume.name)?.id }
        return configuration.targets.map { target in
            TargetStatus(name: target.name, url: target.url, volumes: configuration.volumes.map { volume in
                let ack = acks.first { $0.target == target.name && $0.volume == volume.name }
                return .init(volume: volume.name, checkpoint: ack?.checkpointID, checkpointTime: ack?.checkpointTime,
                             acknowledgedAt: ack?.acknowledgedAt, lagSeconds: ack.map { now.timeIntervalSince($0.checkpointTime) },
                             pending: latest[volume.name].map { $0 != ack?.checkpointID } ?? false,
                             verified: ack?.verified, verifyFailures: ack?.verifyFailures ?? [])
            })
        }
    }

    // MARK: Pieces

    static let readingHolderPrefix = "replication in progress (pid "

    /// The replication lock; nil `wait`: one attempt.
    func replicationLock(_ holder: String, waitingUpTo wait: Duration?) throws -> CheckpointLock {
        try CheckpointLock.acquire(catalogPath: configuration.catalog, holder: holder, purpose: .replication,
                                   waitingUpTo: wait ?? .zero)
    }

    private func releaseHoldsOfDeadRuns(_ catalog: Catalog) {
        for hold in (try? catalog.holds()) ?? [] where hold.holder.hasPrefix(Self.readingHolderPrefix) {
            guard let pid = Int32(hold.holder.dropFirst(Self.readingHolderPrefix.count).dropLast()) else { continue }
            if kill(pid, 0) != 0, errno == ESRCH { _ = try? catalog.release(holder: hold.holder) }
        }
    }

    /// The volumes and the writers' drop-ins of a checkpoint, for the DR side: the drop-ins
    /// recorded when it was taken; for a checkpoint without them (taken before catalog
    /// version 4), the ones registered now.
    func checkpointEnvironment(_ record: CheckpointRecord) -> CheckpointEnvironment {
        // A checkpoint without writers has nothing to verify, whatever is registered now.
        guard !record.writers.isEmpty else { return CheckpointEnvironment(volumes: configuration.volumes, writers: []) }
        if let recorded = try? openCatalog().specs(checkpointID: record.id) {
            return CheckpointEnvironment(volumes: configuration.volumes, writers: recorded.map { .init(name: $0.name, text: $0.text) })
        }
        logger.notice("checkpoint \(record.id) has no recorded writer drop-ins (taken by an older quiesce): sending the ones registered now")
        let writers = registry().specs.map { CheckpointEnvironment.WriterSpecText(name: $0.name, text: $0.text) }
        return CheckpointEnvironment(volumes: configuration.volumes, writers: writers)
    }

    private func selectTargets(_ names: [String]?) throws -> [ReplicationTarget] {
        guard !configuration.targets.isEmpty else {
            throw ReplicationError("no [[target]] in \(configuration.file): add one with a name and a url (see docs/replication.md)")
        }
        guard let names, !names.isEmpty else { return configuration.targets }
        return try names.map { name in
            guard let target = configuration.targets.first(where: { $0.name == name }) else {
                throw UsageError("no target \"\(name)\" in \(configuration.file) (targets: \(configuration.targets.map(\.name).joined(separator: ", ")))")
            }
            return target
        }
    }

    private func checkpointToSend(_ catalog: Catalog, volume: String, checkpointID: String?) throws -> CheckpointRecord? {
        guard let checkpointID else { return try catalog.latestCompleted(volume: volume) }
        guard let record = try catalog.checkpoint(id: checkpointID) else {
            throw UsageError("no checkpoint \(checkpointID) in the catalog (see `quiesce checkpoints list`)")
        }
        guard record.outcome == .completed else {
            throw UsageError("checkpoint \(checkpointID) is \(record.outcome.rawValue), only completed checkpoints are replicated")
        }
        return record
    }

    /// The newest checkpoint the receiver has that we still have a snapshot of: the base of
    /// its delta. None (a full stream) when there is no such checkpoint.
    private func usableBase(_ catalog: Catalog, volume: String, receiverHas: [String]) throws -> CheckpointRecord? {
        for id in receiverHas.reversed() {
            if let record = try catalog.checkpoint(id: id), record.outcome == .completed,
               let file = record.snapshots.first(where: { $0.volume == volume }),
               FileManager.default.fileExists(atPath: file.path) {
                return record
            }
        }
        if let latest = receiverHas.last {
            logger.warning("the receiver's newest checkpoint of \(volume), \(latest), is no longer here: sending a full stream")
        }
        return nil
    }

    private func changedRanges(_ volume: Volume, base: String?, target: String) throws -> [ChangedRange] {
        guard let tracker = Providers.all[volume.provider] as? any ChangeTracking else {
            throw ReplicationError("provider \(volume.provider) of volume \(volume.name) cannot report changed ranges")
        }
        return try tracker.changedRanges(from: base, to: target)
    }

    /// A session with the target's receiver, over its transport.
    func openSession(_ target: ReplicationTarget) throws -> ReceiverSession {
        let name = "target \(target.name)"
        let keep = ["--keep", String(target.keep)] + (target.verify ? ["--verify"] : [])
        switch target.transport {
        case .file(let path):
            return try ReceiverConnection.spawn(name: name, executable: guardExecutable,
                                                arguments: ["receive", "--session", "--store", path] + keep,
                                                compressionLevel: target.compressionLevel, bytesPerSecond: target.bytesPerSecond,
                                                idleTimeout: target.timeout)
        case .ssh(let user, let host, let port, let path):
            var arguments = ["-T", "-o", "BatchMode=yes"] + target.sshOptions
            if let port { arguments += ["-p", String(port)] }
            arguments.append(user.map { "\($0)@\(host)" } ?? host)
            arguments += [target.remoteCommand, "receive", "--session", "--store", shellQuoted(path)] + keep
            return try ReceiverConnection.spawn(name: name, executable: "ssh", arguments: arguments,
                                                compressionLevel: target.compressionLevel, bytesPerSecond: target.bytesPerSecond,
                                                idleTimeout: target.timeout)
        case .tls(let host, let port):
            guard let files = target.tls else { throw ReplicationError("target \(target.name) has no cert/key/ca") }
            let fd = try TLSPipeClient.connect(host: host, port: port,
                                               identity: TLSIdentity(certificate: files.certificate, privateKey: files.privateKey,
                                                                     trustedCA: files.trustedCA),
                                               serverName: files.serverName)
            return ReceiverConnection.socket(name: name, fd: fd, compressionLevel: target.compressionLevel,
                                             bytesPerSecond: target.bytesPerSecond, idleTimeout: target.timeout)
        }
    }
}

/// ssh passes the remote command through a shell.
func shellQuoted(_ text: String) -> String {
    text.allSatisfy({ $0.isLetter || $0.isNumber || "/._-".contains($0) }) ? text : "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'"
}
