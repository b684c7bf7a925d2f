import ArgumentParser
import Foundation
import Quiesce
import QuiesceCatalog
import QuiesceCore

struct CheckpointCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "checkpoint",
        abstract: "Take one application-consistent checkpoint of every volume (cron-safe).",
        discussion: "Runs identify, prepare, freeze, flush-and-hold, snapshot, release, thaw and post-snapshot across the registered writers. One run at a time per catalog: a second exits 75 at once."
    )

    @OptionGroup var options: ConfigOptions

    @Option(help: "A label recorded with the checkpoint (e.g. nightly).")
    var label: String?

    @Flag(help: "Print the checkpoint record as JSON.")
    var json = false

    @Flag(help: "After the checkpoint, replicate it to every target (exit 8 if a target failed).")
    var replicate = false

    @Option(name: .customLong("metrics-file"), help: ArgumentHelp(
        "Write Prometheus textfile metrics here, atomically (node_exporter's textfile collector).", valueName: "path"))
    var metricsFile: String?

    func run() async throws {
        try await CLI.run {
            let installation = try options.installation()
            let result = try await installation.checkpoint(label: label)
            if let metricsFile {
                let catalog = try installation.openCatalog()
                let text = MetricsFile.render(result, lastSuccess: try catalog.latestCompleted(volume: nil),
                                              writers: try catalog.writerStatuses())
                try MetricsFile.write(text, to: metricsFile)
            }
            if json {
                try CLI.printJSON(result.record)
            } else {
                print(Report.checkpoint(result.record))
            }
            if let error = result.error { CLI.printError("\(error)") }
            for error in result.thawErrors { CLI.printError("\(error)") }
            let status = ExitStatus.of(result)
            if status != .completed { throw ExitCode(status.rawValue) }
            if replicate {
                let report: ReplicationReport
                do {
                    report = try installation.replicate(checkpointID: result.record.id)
                } catch let held as CheckpointLock.Held {
                    CLI.printError("checkpoint \(result.record.id) completed, but its replication was skipped: \(held) "
                                   + "(the next `quiesce replicate` sends it)")
                    throw ExitCode(ExitStatus.locked.rawValue)
                }
                if !json { try ReplicationReportText.print(report, json: false) }
                if report.failed { throw ExitCode(ExitStatus.replicationFailed.rawValue) }
            }
        }
    }
}

/// Human-readable renderings of catalog records.
enum Report {
    static func checkpoint(_ r: CheckpointRecord) -> String {
        var lines = ["checkpoint \(r.id) \(r.outcome.rawValue)" + (r.label.map { " (\($0))" } ?? "")]
        lines.append("  started \(ISO8601DateFormatter().string(from: r.startedAt))"
                     + (r.endedAt.map { String(format: ", took %.2f s", $0.timeIntervalSince(r.startedAt)) } ?? ""))
        lines.append("  freeze window \(CLI.milliseconds(r.freezeWindowMs)), hold window \(CLI.milliseconds(r.holdWindowMs))")
        if r.outcome == .aborted {
            lines.append("  failed at \(r.failedPhase?.rawValue ?? "?")" + (r.failedWriter.map { " (writer \($0))" } ?? ""))
        }
        for w in r.writers {
            var line = "  writer \(w.name) (\(w.type)): \(w.state)"
            if w.errorKind != .none { line += ", last error \(w.errorKind.rawValue)" }
            if let marker = w.marker, !marker.fields.isEmpty { line += "\n    marker: \(marker.summary)" }
            lines.append(line)
        }
        for s in r.snapshots {
            lines.append("  snapshot \(s.volume): \(s.path) (\(s.sizeBytes) bytes)")
        }
        return lines.joined(separator: "\n")
    }
}
