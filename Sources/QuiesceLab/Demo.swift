import Foundation
import Logging
import Quiesce
import QuiesceCore

/// `quiesce lab demo`: a live write workload against every application in the guest,
/// several checkpoints while it runs, and a check of what each snapshot holds.
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
        public var check: SnapshotCheck.Result?
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
                lines.append(CheckpointLine(record: result.record, check: nil,
                                            error: result.error.map { "\($0)" } ?? result.thawErrors.first.map { "\($0)" }))
                if n < checkpoints { try await Task.sleep(for: interval) }
            }
        } catch {
            for workload in workloads { _ = await workload.stop() }
            throw error
        }
        for workload in workloads {
            summaries[workload.name] = await workload.stop().trimmingCharacters(in: .whitespacesAndNewlines)
        }

        // Check every completed snapshot against the markers recorded at its freeze.
        let check = SnapshotCheck(scratchDirectory: lab.layout.scratch, logger: logger)
        let writers = installation.registry().writers
        for index in lines.indices where lines[index].record.outcome == .completed {
            lines[index].check = await check.verify(lines[index].record, volumes: installation.configuration.volumes,
                                                    writers: writers)
        }
        let ok = !lines.isEmpty && lines.allSatisfy { $0.record.outcome == .completed && ($0.check?.ok ?? false) }
        return Report(dir: lab.layout.root, checkpoints: lines, workloads: summaries, ok: ok)
    }
}
