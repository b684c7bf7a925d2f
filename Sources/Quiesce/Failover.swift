import Foundation
import QuiesceCatalog
import QuiesceCore

/// What `quiesce failover prepare` did: the final checkpoint and how every target took it.
public struct FailoverPreparation: Sendable, Codable {
    /// One target's part, per volume: whether it has the final checkpoint and verified it.
    public struct TargetResult: Sendable, Codable {
        public var target: String
        public var volume: String
        public var status: TargetOutcome.Status
        /// The target's verification of its copy; nil when it does not verify.
        public var verified: Bool?
        /// Ready for failover: applied (or already had) the checkpoint and verified it.
        public var ok: Bool
        /// Why not, naming the target and the fix.
        public var problem: String?
    }

    /// The final checkpoint's id (also when it failed: the aborted run's id).
    public var checkpoint: String
    public var record: CheckpointRecord
    /// Why the checkpoint failed, if it did; then nothing was replicated.
    public var checkpointError: String?
    /// Writers that failed to thaw: the checkpoint is consistent, but look at those applications (exit 6).
    public var thawErrors: [String] = []
    /// Estimated moment the applications were frozen: the checkpoint's end minus its freeze
    /// window (the snapshot holds every write acknowledged before it, none after).
    public var frozenAt: Date?
    public var targets: [TargetResult]
    /// Seconds of writes the DR copy lacks if the primary is switched off now: 0 when every
    /// target verified the final checkpoint and the applications stay stopped; nil when not ready.
    public var dataLossWindowSeconds: Double?
    /// The documented exit code (0 ready, the checkpoint's own on its failure, 8 a target did
    /// not apply, 10 a target did not verify).
    public var exitCode: Int32

    public var ok: Bool { exitCode == ExitStatus.completed.rawValue }
    public var problems: [String] {
        (checkpointError.map { ["the final checkpoint failed: \($0)"] } ?? []) + thawErrors + targets.compactMap(\.problem)
    }
}

extension Installation {
    /// The pre-failover hook: one final checkpoint (label `failover`), replicated to every
    /// target. Ready only when each target applied (or already had) it and verified it: a copy
    /// nobody has started is not one to fail over to. A target that does not verify is a failure.
    ///
    /// The data-loss window is 0 only for a planned failover: stop (or keep frozen) the
    /// applications before calling this, since writes after the freeze are not in the DR copy.
    /// How long `failover prepare` waits for a replication already running (exit 75 after).
    public static let replicationWait: Duration = .seconds(1800)

    public func failoverPrepare(label: String = "failover") async throws -> FailoverPreparation {
        let result = try await checkpoint(label: label)
        let record = result.record
        var preparation = FailoverPreparation(checkpoint: record.id, record: record, checkpointError: nil,
                                              frozenAt: Self.frozenAt(record), targets: [], dataLossWindowSeconds: nil,
                                              exitCode: ExitStatus.completed.rawValue)
        let status = ExitStatus.of(result)
        preparation.thawErrors = result.thawErrors.map { "\($0)" }
        // A thaw failure leaves a consistent checkpoint: go on, but report it and its exit code.
        guard result.error == nil, record.outcome == .completed else {
            preparation.checkpointError = result.error.map { "\($0)" } ?? record.error ?? "checkpoint \(record.id) \(record.outcome.rawValue)"
            preparation.exitCode = status == .completed ? ExitStatus.failure.rawValue : status.rawValue
            return preparation
        }

        // A cron replication still sending an older checkpoint finishes first.
        let report = try replicate(checkpointID: record.id, waitingUpTo: Self.replicationWait)
        let acknowledged = (try? openCatalog().targetAcknowledgements()) ?? []
        var notApplied = false
        for outcome in report.outcomes {
            var verified = outcome.verified
            if outcome.status == .upToDate, outcome.checkpoint == record.id, verified == nil {
                // Already there from an earlier run: its recorded verification counts.
                verified = acknowledged.first { $0.target == outcome.target && $0.volume == outcome.volume
                    && $0.checkpointID == record.id }?.verified
            }
            var target = FailoverPreparation.TargetResult(target: outcome.target, volume: outcome.volume, status: outcome.status,
                                                          verified: verified, ok: false, problem: nil)
            let subject = "target \(outcome.target) (\(outcome.volume))"
            switch outcome.status {
            case .failed:
                notApplied = true
                target.problem = "\(subject) did not get checkpoint \(record.id): \(outcome.error?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "no reason given")"
                    + " (fix the target, then run `quiesce failover prepare` again)"
            case .upToDate where outcome.checkpoint != record.id:
                notApplied = true
                target.problem = "\(subject) already has checkpoint \(outcome.checkpoint ?? "?"), newer than the final \(record.id): "
                    + "is another primary replicating to it? (check the host's clock and the target's store)"
            default:
                switch verified {
                case true?:
                    target.ok = true
                case false?:
                    target.problem = "\(subject) has checkpoint \(record.id) but its copy FAILED verification: "
                        + ((outcome.verifyFailures ?? []).joined(separator: "; ").nonEmpty ?? "no details")
                        + " (see `quiesce dr verify` on the DR host)"
                case nil:
                    target.problem = "\(subject) has checkpoint \(record.id) but does not verify its copies, so nobody knows it starts: "
                        + "set verify = true in its [[target]] table (file://, ssh://) or run its server as `quiesce serve --verify` (quiesce://)"
                }
            }
            preparation.targets.append(target)
        }

        if notApplied {
            preparation.exitCode = ExitStatus.replicationFailed.rawValue
        } else if preparation.targets.contains(where: { !$0.ok }) {
            preparation.exitCode = ExitStatus.verifyFailed.rawValue
        } else {
            preparation.dataLossWindowSeconds = 0
            preparation.exitCode = status.rawValue
        }
        return preparation
    }

    /// The checkpoint's end minus its freeze window, never before its start.
    static func frozenAt(_ record: CheckpointRecord) -> Date? {
        guard let end = record.endedAt else { return nil }
        let estimate = end.addingTimeInterval(-(record.freezeWindowMs ?? 0) / 1000)
        return max(estimate, record.startedAt)
    }
}

private extension String {
    var nonEmpty: String? { isEmpty ? nil : self }
}
