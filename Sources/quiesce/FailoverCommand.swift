import ArgumentParser
import Foundation
import Quiesce
import QuiesceCore
import QuiesceDR

/// `quiesce failover prepare` (on the primary) and `quiesce failover promote` (on the DR site).
struct FailoverCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "failover",
        abstract: "Fail over to the DR site: a final verified checkpoint on the primary, then the live image on the DR site.",
        subcommands: [Prepare.self, Promote.self]
    )

    struct Prepare: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The pre-failover hook, on the primary: a final checkpoint, replicated to every target and verified there.",
            discussion: "Takes a checkpoint labelled `failover`, replicates it to every target and exits 0 only when each target applied it and verified it (started its applications on a clone): a target that does not verify (verify = true for file:// and ssh:// targets, `quiesce serve --verify`) counts as a failure. Prints the checkpoint id and the data-loss window: 0 for a planned failover, where the applications are stopped before this runs, since writes after the freeze are not in the DR copy. Exit codes: the checkpoint's own (3, 4, 5, 7, 75 …) if it failed; 8 if a target did not get it; 10 if a target did not verify it."
        )

        @OptionGroup var options: ConfigOptions

        @Flag(help: "Print the result as JSON.")
        var json = false

        func run() async throws {
            try await CLI.run {
                let preparation = try await options.installation().failoverPrepare()
                if json { try CLI.printJSON(preparation) } else { print(FailoverText.preparation(preparation)) }
                for problem in preparation.problems { CLI.printError(problem) }
                if !preparation.ok { throw ExitCode(preparation.exitCode) }
            }
        }
    }

    struct Promote: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "On the DR site: make a received checkpoint the DR VM's live image, with its recovery files.",
            discussion: "Copies the newest verified checkpoint of the volume (or --checkpoint ID, verified or not) to PATH: a reflink clone when PATH is on the store's filesystem, else a sparse copy. Before the image appears at PATH (it is built at PATH.partial, fsynced and renamed) it is mounted privately and each PostgreSQL writer's data directory gets its recovery files: the primary's postmaster.pid removed; in backup-label mode, backup_label (and tablespace_map) byte for byte, owned by the data directory's owner, 0600, and with --restore-command, restore_command in postgresql.auto.conf and recovery.signal. The store's checkpoint is never written. An existing PATH is refused without --force (exit 64), and always while a loop device uses it. Exit 9 if the store has no such checkpoint or none verified."
        )

        @Option(help: ArgumentHelp("The DR store directory.", valueName: "dir"))
        var store: String

        @Option(help: "The volume to promote.")
        var volume: String

        @Option(name: .customLong("to"), help: ArgumentHelp("Where the live image goes (a file).", valueName: "path"))
        var path: String

        @Option(help: ArgumentHelp("A checkpoint id (default: the newest verified one).", valueName: "id"))
        var checkpoint: String?

        @Flag(help: "Replace an existing image at PATH.")
        var force = false

        @Option(name: .customLong("restore-command"), help: ArgumentHelp(
            "For PostgreSQL in backup-label mode: the WAL archive's restore_command (e.g. 'cp /archive/%f %p').", valueName: "cmd"))
        var restoreCommand: String?

        @Flag(help: "Print the report as JSON.")
        var json = false

        func run() async throws {
            CLI.bootstrapLogging(verbose: false)
            do {
                let report = try await FailoverPromotion.promote(store: store, volume: volume, to: path, checkpoint: checkpoint,
                                                                 force: force, restoreCommand: restoreCommand)
                if json { try CLI.printJSON(report) } else { print(FailoverText.promotion(report)) }
                for warning in report.warnings { FileHandle.standardError.write(Data("warning: \(warning)\n".utf8)) }
            } catch let error as PromotionError {
                CLI.printError("\(error)")
                switch error {
                case .usage: throw ExitCode(ExitStatus.usage.rawValue)
                case .store: throw ExitCode(ExitStatus.storeFailed.rawValue)
                case .failed: throw ExitCode(ExitStatus.failure.rawValue)
                }
            } catch let exit as ExitCode {
                throw exit
            } catch {
                CLI.printError("\(error)")
                throw ExitCode(ExitStatus.of(error).rawValue)
            }
        }
    }
}

enum FailoverText {
    static func preparation(_ p: FailoverPreparation) -> String {
        let time = { (date: Date) in timestamp(date) }
        var lines = ["checkpoint \(p.checkpoint) \(p.record.outcome.rawValue)" + (p.record.label.map { " (\($0))" } ?? "")]
        if let frozenAt = p.frozenAt {
            lines.append("  frozen at \(time(frozenAt)) (freeze window \(CLI.milliseconds(p.record.freezeWindowMs)))")
        }
        for target in p.targets {
            let verified = target.status == .failed ? "" : ", " + (target.verified.map { $0 ? "verified" : "VERIFICATION FAILED" } ?? "not verified")
            lines.append("  target \(target.target) (\(target.volume)): \(target.status.rawValue)\(verified)\(target.ok ? "" : ": NOT READY")")
        }
        if let window = p.dataLossWindowSeconds {
            lines.append("ready for failover: every target has checkpoint \(p.checkpoint) and verified it")
            lines.append("data-loss window: \(window == 0 ? "0" : String(format: "%.1f s", window))"
                         + (p.frozenAt.map { " (writes after \(time($0)) are not in the DR copy; stop the applications before running this for a zero window)" } ?? ""))
        } else {
            lines.append("NOT ready for failover")
        }
        return lines.joined(separator: "\n")
    }

    static func promotion(_ r: PromotionReport) -> String {
        var lines = ["promoted checkpoint \(r.checkpoint) of \(r.volume) (\(r.chosen), \(r.verification)) to \(r.path)"
                     + (r.replaced ? ", replacing the image there" : "")]
        lines.append("  data as of \(timestamp(r.checkpointTime)) on the primary; "
                     + "\(r.copiedBy), \(r.imageSize) bytes, \(String(format: "%.1f s", r.seconds))")
        for writer in r.writers {
            lines.append("  writer \(writer.writer) (\(writer.type))" + (writer.dataDirectory.map { ": \($0)" } ?? ""))
            lines += writer.actions.map { "    \($0)" }
        }
        return lines.joined(separator: "\n")
    }

    static func timestamp(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.string(from: date)
    }
}
