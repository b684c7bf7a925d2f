import ArgumentParser
import Foundation
import Quiesce

struct CheckpointsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "checkpoints",
        abstract: "The catalog: list, show and prune checkpoints.",
        subcommands: [List.self, Show.self, Prune.self]
    )

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List checkpoints, oldest first.")
        @OptionGroup var options: ConfigOptions
        @Option(help: "Only the newest N.") var last: Int?
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            try await CLI.run {
                let records = try options.installation().listCheckpoints(limit: last, details: json)
                if json { return try CLI.printJSON(records) }
                print("ID                   OUTCOME    FREEZE      HOLD        LABEL")
                for r in records {
                    let outcome = r.outcome.rawValue.padding(toLength: 10, withPad: " ", startingAt: 0)
                    let freeze = CLI.milliseconds(r.freezeWindowMs).padding(toLength: 11, withPad: " ", startingAt: 0)
                    let hold = CLI.milliseconds(r.holdWindowMs).padding(toLength: 11, withPad: " ", startingAt: 0)
                    print("\(r.id) \(outcome) \(freeze) \(hold) \(r.label ?? "")")
                }
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one checkpoint: writers, markers, snapshots.")
        @OptionGroup var options: ConfigOptions
        @Argument(help: "The checkpoint id.") var id: String
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            try await CLI.run {
                let record = try options.installation().showCheckpoint(id: id)
                if json { return try CLI.printJSON(record) }
                print(Report.checkpoint(record))
                if let error = record.error { print("  error: \(error)") }
            }
        }
    }

    struct Prune: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete all but the newest N completed checkpoints (never a DR target's base).")
        @OptionGroup var options: ConfigOptions
        @Option(help: "How many completed checkpoints to keep.") var keep: Int
        @Flag(help: "Print JSON.") var json = false

        func validate() throws {
            guard keep >= 1 else { throw ValidationError("--keep must be at least 1 (the newest checkpoint is the base of the next delta)") }
        }

        func run() async throws {
            try await CLI.run {
                let report = try options.installation().prune(keep: keep)
                if json { return try CLI.printJSON(report) }
                print("deleted \(report.deleted.count) checkpoint(s)" + (report.deleted.isEmpty ? "" : ": " + report.deleted.joined(separator: ", ")))
            }
        }
    }
}
