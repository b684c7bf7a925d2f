import Foundation
import Logging
import Quiesce
import QuiesceCore
import QuiesceDR
import QuiesceReplication

/// `quiesce lab demo`: a live write workload against every application in the guest,
/// several checkpoints while it runs, each replicated to the lab's DR store, and a check
/// that every checkpoint that reached the DR store starts cleanly there.
public struct Demo: Sendable {
    public var lab: Lab
    /// The `quiesce` executable: the guard and the workload processes are started from it.
    public var executable: String
    public var checkpoints: Int
    public var interval: Duration

    public init(lab: Lab, executable: String, checkpoints: Int = 5, interval: Duration = .seconds(1)) {
        self.lab = lab
        self.executable = executable
        self.checkpoints = checkpoints
        self.interval = interval
    }

    public struct CheckpointLine: Sendable, Codable {
        public var record: CheckpointRecord
        /// How the DR copy of this checkpoint verified: each writer's application started on a
        /// clone of what the DR store received, checked against the marker recorded at freeze.
        /// How the checkpoint's DR copy verified (the store's recorded verification).
        public var check: DRVerification?
        /// What replication did for each target.
        public var replication: [TargetOutcome]?
        public var error: String?
    }

    public struct Report: Sendable, Codable {
        public var dir: String
        public var checkpoints: [CheckpointLine]
        public var workloads: [String: String]
        public var ok: Bool
    }

    public func run() async throws -> Report {
        let logger = lab.logger
        if !lab.status().up { try await lab.up() }
        let installation = try Installation(configPath: lab.layout.config, guardExecutable: executable, logger: logger)

        var workloads: [LabWorkload] = []
        for application in lab.applications {
            workloads += try application.startWorkload(lab.layout, executable: executable)
        }
        logger.info("workload started", metadata: ["processes": "\(workloads.count)"])
        var lines: [CheckpointLine] = []
        var summaries: [String: String] = [:]
        do {
            try await Task.sleep(for: interval)
            for n in 1...checkpoints {
                let result = try await installation.checkpoint(label: "lab-demo-\(n)")
                var line = CheckpointLine(record: result.record, check: nil,
                                          error: result.error.map { "\($0)" } ?? result.thawErrors.first.map { "\($0)" })
                if result.record.outcome == .completed {
                    let id = result.record.id
                    do {
                        line.replication = try await runBlocking { try installation.replicate(checkpointID: id).outcomes }
                    } catch {
                        line.error = "replication: \(error)"
                    }
                }
                lines.append(line)
                if n < checkpoints { try await Task.sleep(for: interval) }
            }
        } catch {
            for workload in workloads { _ = await workload.stop() }
            throw error
        }
        for workload in workloads {
            summaries[workload.name] = await workload.stop().trimmingCharacters(in: .whitespacesAndNewlines)
        }

        // Every checkpoint that reached the DR store: its applications started on a clone of the
        // DR copy (verified as it landed; verified now if it was not).
        let store = try DRStore(root: lab.layout.drStore, create: false)
        let verifier = DRVerifier(store: store)
        for index in lines.indices {
            let id = lines[index].record.id
            let volumes = store.volumes().filter { store.checkpoints(volume: $0).contains(id) }
            guard let first = volumes.first else { continue }
            var verification = verifier.recorded(volume: first, checkpoint: id)
            if verification == nil {
                do { verification = try await verifier.verify(checkpoint: id, volumes: volumes) } catch {
                    lines[index].error = "DR verify: \(error)"
                }
            }
            lines[index].check = verification
        }
        let ok = !lines.isEmpty && lines.allSatisfy {
            $0.record.outcome == .completed && $0.error == nil && ($0.check?.ok ?? false)
        }
        return Report(dir: lab.layout.root, checkpoints: lines, workloads: summaries, ok: ok)
    }
}
