import ArgumentParser
import Foundation
import Logging
import Quiesce
import QuiesceCore
import QuiesceLab
import SQLiteWriter
import Synchronization

struct LabCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lab",
        abstract: "The embedded default: a whole quiesce world on this machine, from loop devices.",
        discussion: "`lab up` builds an XFS datastore, a VM image with an ext4 guest filesystem, a DR store and the applications in the guest; `lab demo` checkpoints them under a live workload and checks every snapshot; `lab down` removes everything it built.",
        subcommands: [Up.self, Demo.self, Status.self, Down.self]
    )

    struct LabOptions: ParsableArguments {
        @Option(help: ArgumentHelp("The lab's directory.", valueName: "dir"))
        var dir: String = "/var/lib/quiesce-lab"

        @Flag(name: .shortAndLong, help: "Log debug detail.")
        var verbose = false

        @Option(help: ArgumentHelp("Size of the VM image in MiB (sparse).", valueName: "MiB"))
        var imageSize: UInt64 = 1024

        @Option(help: ArgumentHelp("Size of the XFS datastore in MiB (sparse).", valueName: "MiB"))
        var datastoreSize: UInt64 = 3072

        func validate() throws {
            guard imageSize >= 64 else { throw ValidationError("--image-size must be at least 64 MiB") }
            guard datastoreSize >= imageSize + 512 else {
                throw ValidationError("--datastore-size must be at least --image-size + 512 MiB (XFS needs room for its log and the snapshots' metadata)")
            }
        }

        func lab() -> Lab {
            CLI.bootstrapLogging(verbose: verbose)
            return Lab(root: dir, sizes: LabSizes(datastoreBytes: datastoreSize << 20, imageBytes: imageSize << 20,
                                                  drBytes: datastoreSize << 20),
                       logger: Logger(label: "quiesce-lab"))
        }
    }

    struct Up: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Build the lab (idempotent).")
        @OptionGroup var options: LabOptions

        func run() async throws {
            try await CLI.run {
                let lab = options.lab()
                try await lab.up()
                print("lab is up in \(lab.layout.root)")
                print("  config:  \(lab.layout.config)")
                print("  guest:   \(lab.layout.guest) (ext4 in \(lab.layout.image))")
                print("  try:     quiesce checkpoint --config \(lab.layout.config)")
            }
        }
    }

    struct Demo: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Checkpoint the lab's applications under a live workload and check every snapshot.")
        @OptionGroup var options: LabOptions
        @Option(help: "How many checkpoints to take.") var checkpoints = 5
        @Option(help: "Seconds between checkpoints.") var interval = 1.0
        @Flag(help: "Print the report as JSON.") var json = false

        func validate() throws {
            guard checkpoints >= 1 else { throw ValidationError("--checkpoints must be at least 1") }
            guard interval >= 0 else { throw ValidationError("--interval must not be negative") }
        }

        func run() async throws {
            try await CLI.run {
                let demo = QuiesceLab.Demo(lab: options.lab(), executable: CLI.executablePath, checkpoints: checkpoints,
                                           interval: .milliseconds(Int64(interval * 1000)))
                let report = try await demo.run()
                if json { try CLI.printJSON(report) } else { print(DemoReport.render(report)) }
                if !report.ok { throw ExitCode(ExitStatus.failure.rawValue) }
            }
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show what of the lab is up.")
        @OptionGroup var options: LabOptions
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            try await CLI.run {
                let status = options.lab().status()
                if json { return try CLI.printJSON(status) }
                print("lab \(status.dir): \(status.up ? "up" : "down")")
                for (name, part) in [("datastore", status.datastore), ("guest", status.guest), ("dr", status.dr)] {
                    let loops = part.loopDevices.isEmpty ? "no loop device" : part.loopDevices.joined(separator: ", ")
                    print("  \(name): \(part.file) \(part.exists ? "exists" : "missing"), \(loops), \(part.mountPoint) \(part.mounted ? "mounted" : "not mounted")")
                }
                print("  writers: \(status.writers.isEmpty ? "none" : status.writers.joined(separator: ", "))")
            }
        }
    }

    struct Down: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stop, thaw, unmount and detach everything the lab built, and remove its directory.")
        @OptionGroup var options: LabOptions

        func run() async throws {
            try await CLI.run {
                let lab = options.lab()
                try await lab.down()
                print("lab in \(lab.layout.root) is down")
            }
        }
    }
}

enum DemoReport {
    static func render(_ report: QuiesceLab.Demo.Report) -> String {
        var out = ["quiesce lab demo: \(report.checkpoints.count) checkpoint(s) of a live workload in \(report.dir)", ""]
        for line in report.checkpoints {
            let r = line.record
            let verdict = line.check.map { $0.ok ? "DR copy started cleanly" : "DR COPY FAILED VERIFICATION" } ?? "not on the DR store"
            out.append("\(r.id)  \(r.outcome.rawValue)  freeze \(CLI.milliseconds(r.freezeWindowMs))  hold \(CLI.milliseconds(r.holdWindowMs))  \(verdict)")
            if let error = line.error { out.append("    error: \(error)") }
            for outcome in line.replication ?? [] {
                out.append("    replicated to \(outcome.target): \(outcome.status.rawValue)"
                           + (outcome.status == .applied ? (outcome.base.map { " (delta from \($0)" } ?? " (full") + ", \(ReplicationReportText.bytes(outcome.changedBytes)) changed)" : "")
                           + (outcome.error.map { ": \($0)" } ?? ""))
            }
            for w in r.writers {
                // The report shows the state recorded; the path and the SQL text are in `checkpoints show`.
                let marker = w.marker.map { m in
                    ConsistencyMarker(m.fields.filter { !["database", "marker_query", "data_directory", "names", "folders_state", "root"].contains($0.key) }).summary
                } ?? "-"
                out.append("    \(w.name) (\(w.type)) marker: \(marker)")
                if let verdict = line.check?.writers.first(where: { $0.writer == w.name }) {
                    out.append("      \(verdict.ok ? "ok" : "FAILED"): \(verdict.details.joined(separator: "; "))")
                }
            }
            for problem in line.check?.problems ?? [] { out.append("    problem: \(problem)") }
        }
        out.append("")
        out.append("workload:")
        for (name, summary) in report.workloads.sorted(by: { $0.key < $1.key }) { out.append("    \(name): \(summary)") }
        out.append("")
        out.append(report.ok ? "every checkpoint completed, reached the DR store, and its applications started cleanly there"
                             : "some checkpoints failed or did not verify: see above")
        return out.joined(separator: "\n")
    }
}

/// The lab's write workloads, each in its own process (like a real application's).
struct LabWorkloadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lab-workload",
        abstract: "A write workload for the lab (started by `quiesce lab demo`).",
        shouldDisplay: false,
        subcommands: [SQLiteInserts.self]
    )

    struct SQLiteInserts: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "sqlite",
                                                        abstract: "Insert rows one transaction at a time until SIGTERM.")
        @Option var database: String
        @Option var table: String
        @Option(help: "Busy timeout in milliseconds.") var busyTimeout: Int = 10_000

        func run() throws {
            signal(SIGTERM) { _ in workloadStop.store(true, ordering: .relaxed) }
            signal(SIGINT) { _ in workloadStop.store(true, ordering: .relaxed) }
            let rows = try SQLiteInsertWorkload.run(database: database, table: table,
                                                    busyTimeout: .milliseconds(busyTimeout),
                                                    until: { workloadStop.load(ordering: .relaxed) })
            print("\(rows) rows committed")
        }
    }
}

let workloadStop = Atomic<Bool>(false)
