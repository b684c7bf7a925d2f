import ArgumentParser
import Foundation
import Quiesce
import QuiesceCore
import QuiesceDR
import QuiesceReplication

/// `quiesce dr test start|status|stop`: a non-disruptive DR test on a clone of a received checkpoint.
struct DRTestCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "test",
        abstract: "Run a checkpoint's applications on a private clone for people to test against; stop discards every change.",
        discussion: "One test at a time per store. Replication goes on meanwhile: the clone is independent of the store's checkpoints, which the test never writes.",
        subcommands: [Start.self, Status.self, Stop.self]
    )

    struct Start: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Clone a received checkpoint, mount it privately and start its applications on it.",
            discussion: "Clones the checkpoint (reflink) into STORE/.drtest/copy, mounts it writable, and starts each writer's application on it, isolated from production: PostgreSQL as postgres on a Unix socket in a private directory (no TCP, no archiving, no logical replication workers); SQLite databases and the mail store are listed with a command line to open them (doveadm through a wrapper configured for the copy). Exec writers are not started. Prints how to reach each one. Exit 75 if a test already runs in the store, 10 if an application does not start (the test is then discarded)."
        )

        @Option(help: ArgumentHelp("The DR store directory.", valueName: "dir"))
        var store: String

        @Option(help: "Only this volume (default: every volume that has the checkpoint).")
        var volume: String?

        @Option(help: ArgumentHelp("A checkpoint id, or latest (default).", valueName: "id"))
        var checkpoint: String = "latest"

        @Flag(help: "Print the test's state as JSON.")
        var json = false

        func run() async throws {
            try await DRTestCommand.guarded {
                let session = try await DRTest(store: try DRStore(root: store, create: false))
                    .start(volume: volume, checkpoint: checkpoint)
                if json { try CLI.printJSON(session) } else { print(DRTestText.session(session, started: true)) }
            }
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show the store's DR test: its checkpoint, how to reach each application, whether they still run.",
            discussion: "Exit 0 whether or not a test runs (the JSON says `running`); 1 if the test's copy or an application is gone."
        )

        @Option(help: ArgumentHelp("The DR store directory.", valueName: "dir"))
        var store: String

        @Flag(help: "Print the status as JSON.")
        var json = false

        func run() async throws {
            try await DRTestCommand.guarded {
                let status = DRTest(store: try DRStore(root: store, create: false)).status()
                if json { try CLI.printJSON(status) } else { print(DRTestText.status(status, store: store)) }
                if !status.problems.isEmpty { throw ExitCode(ExitStatus.failure.rawValue) }
            }
        }
    }

    struct Stop: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stop the DR test's applications and discard its clone with every change made during the test.",
            discussion: "Stops every application (going on past one that fails), unmounts, detaches and deletes the clone, and removes the test's state. If something cannot be stopped or unmounted (a shell still inside the copy), it says what, keeps the state and exits 1: fix it and run stop again. Exit 0 with nothing to do when no test runs."
        )

        @Option(help: ArgumentHelp("The DR store directory.", valueName: "dir"))
        var store: String

        @Flag(help: "Print the report as JSON.")
        var json = false

        func run() async throws {
            try await DRTestCommand.guarded {
                let report = try await DRTest(store: try DRStore(root: store, create: false)).stop()
                if json {
                    try CLI.printJSON(report ?? DRTestStopReport(checkpoint: nil, startedAt: nil, stoppedAt: Date(), stopped: [], problems: []))
                } else {
                    print(report.map(DRTestText.stop) ?? "no DR test is running in \(store): nothing to stop")
                }
                if let report, !report.ok {
                    for problem in report.problems { CLI.printError(problem) }
                    throw ExitCode(ExitStatus.failure.rawValue)
                }
            }
        }
    }

    /// `CLI.run`, with `dr test`'s own errors mapped to their exit codes.
    static func guarded(_ body: () async throws -> Void) async throws {
        try await CLI.run {
            CLI.bootstrapLogging(verbose: false)
            do {
                try await body()
            } catch let error as DRTestError {
                CLI.printError("\(error)")
                switch error {
                case .alreadyRunning, .stillStarting: throw ExitCode(ExitStatus.locked.rawValue)
                case .applicationFailed: throw ExitCode(ExitStatus.verifyFailed.rawValue)
                }
            }
        }
    }
}

enum DRTestText {
    static func session(_ session: DRTestSession, started: Bool) -> String {
        let when = ISO8601DateFormatter().string(from: session.startedAt)
        var lines = [(started ? "DR test started" : "DR test running") + " on checkpoint \(session.checkpoint) "
                     + "(\(session.volumes.joined(separator: ", ")); \(session.verification)) since \(when)"]
        for volume in session.copy?.volumes ?? [] {
            lines.append("  volume \(volume.name): \(volume.mountPoint ?? "not mounted")"
                         + (volume.liveMount.map { " (\($0) on the primary)" } ?? ""))
        }
        for application in session.applications {
            lines.append("  writer \(application.writer) (\(application.type)):")
            lines += application.access.map { "    \($0)" }
        }
        lines += session.notStarted.map { "  \($0)" }
        lines.append("Every change made during the test is discarded by `quiesce dr test stop --store \(session.store)`.")
        return lines.joined(separator: "\n")
    }

    static func status(_ status: DRTestStatus, store: String) -> String {
        var lines: [String] = []
        if let session = status.session {
            lines.append(self.session(session, started: false))
        } else if status.problems.isEmpty {
            lines.append("no DR test is running in \(store)")
        }
        lines += status.checks.map { "  ok: \($0)" }
        lines += status.problems.map { "  PROBLEM: \($0)" }
        return lines.joined(separator: "\n")
    }

    static func stop(_ report: DRTestStopReport) -> String {
        var lines = ["DR test" + (report.checkpoint.map { " on checkpoint \($0)" } ?? "")
                     + (report.ok ? " stopped: every change made during it is discarded" : " NOT fully stopped")]
        lines += report.stopped.map { "  \($0)" }
        lines += report.problems.map { "  PROBLEM: \($0)" }
        return lines.joined(separator: "\n")
    }
}
