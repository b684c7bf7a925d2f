import ArgumentParser
import Foundation
import Quiesce
import QuiesceDR
import QuiesceReplication

struct DRCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dr",
        abstract: "On the DR site: check that received checkpoints start cleanly.",
        subcommands: [Verify.self, DRTestCommand.self]
    )

    struct Verify: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Start every writer's application on a clone of a received checkpoint and check it against its marker.",
            discussion: "Clones the checkpoint (reflink), attaches and mounts it privately, runs each writer's verify from the checkpoint's manifest (PostgreSQL starts with no TCP, is not in recovery, pg_amcheck clean, LSN ≥ marker; SQLite integrity_check and marker query; Dovecot force-resync and counts ≥ markers; exec writers' verify), then stops everything and discards the clone. The result is recorded beside the checkpoint (<id>.verify.json). Exit 10 if any writer failed."
        )

        @Option(help: ArgumentHelp("The DR store directory.", valueName: "dir"))
        var store: String

        @Option(help: "Only this volume (default: every volume in the store).")
        var volume: String?

        @Option(help: ArgumentHelp("A checkpoint id, or latest (default).", valueName: "id"))
        var checkpoint: String = "latest"

        @Flag(help: "Print the results as JSON.")
        var json = false

        func run() async throws {
            try await CLI.run {
                CLI.bootstrapLogging(verbose: false)
                let results = try await DRVerifier(store: try DRStore(root: store, create: false))
                    .verify(volume: volume, checkpoint: checkpoint)
                if json {
                    try CLI.printJSON(results)
                } else {
                    for result in results { print(DRReportText.verification(result)) }
                }
                let failed = results.filter { !$0.ok }
                for result in failed {
                    for failure in result.failures { CLI.printError("checkpoint \(result.checkpoint): \(failure)") }
                }
                if !failed.isEmpty { throw ExitCode(ExitStatus.verifyFailed.rawValue) }
            }
        }
    }
}

enum DRReportText {
    static func verification(_ result: DRVerification) -> String {
        var lines = ["checkpoint \(result.checkpoint) (\(result.volumes.joined(separator: ", "))): " + (result.ok ? "verified" : "FAILED")]
        for writer in result.writers {
            lines.append("  writer \(writer.writer) (\(writer.type)): \(writer.ok ? "ok" : "FAILED")")
            lines += writer.details.map { "    \($0)" }
        }
        lines += result.problems.map { "  problem: \($0)" }
        lines += (result.cleanup ?? []).map { "  cleanup: \($0)" }
        return lines.joined(separator: "\n")
    }
}
