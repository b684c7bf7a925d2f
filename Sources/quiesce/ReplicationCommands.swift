import ArgumentParser
import Foundation
import Quiesce
import QuiesceConfig
import QuiesceCore
import QuiesceDR
import QuiesceReplication
import ReplicationTLS

struct SendCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send",
        abstract: "Write one volume's delta stream to stdout (pipe it to `quiesce receive`).",
        discussion: "Example: quiesce send --volume vm1 --base 20261125T114012345Z | ssh dr quiesce receive --store /srv/dr. Without --base the stream is full (allocated data only; holes stay holes). The format is in docs/delta-format.md."
    )

    @OptionGroup var options: ConfigOptions

    @Option(help: "The volume to send.")
    var volume: String

    @Option(help: ArgumentHelp("The checkpoint to send (default: the newest completed one).", valueName: "id"))
    var checkpoint: String?

    @Option(help: ArgumentHelp("The checkpoint the receiver has: send only what changed since it.", valueName: "id"))
    var base: String?

    @Option(help: ArgumentHelp("Compress data frames: zstd or none.", valueName: "method"))
    var compress: String = "none"

    @Flag(name: .customLong("full-compare"), help: "Compare every block of the two snapshots by hash instead of trusting the extent maps (a scrub; slow: reads both images whole).")
    var fullCompare = false

    @Flag(help: "Print what was sent (bytes read, frames) as JSON on stderr when done.")
    var stats = false

    func run() async throws {
        try await CLI.run {
            let level: Int32? = switch compress {
            case "none": nil
            case "zstd": 1
            default: throw UsageError("--compress must be zstd or none, found \"\(compress)\"")
            }
            if isatty(STDOUT_FILENO) != 0 {
                throw UsageError("stdout is a terminal: pipe the stream into `quiesce receive` or a file")
            }
            let installation = try options.installation()
            let report = try installation.send(volume: volume, checkpointID: checkpoint, baseID: base,
                                               to: FileDescriptorStream(fd: STDOUT_FILENO, what: "stdout"), compressionLevel: level,
                                               fullCompare: fullCompare)
            if stats {
                let line = SendStats(volume: report.volume, base: report.base, checkpoint: report.checkpoint, frames: report.frames,
                                     dataBytes: report.dataBytes, zeroBytes: report.zeroBytes, bytesRead: report.bytesRead,
                                     bytesSent: report.destinations.first?.bytesSent ?? 0, seconds: report.seconds)
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.sortedKeys]
                FileHandle.standardError.write(try encoder.encode(line) + Data("\n".utf8))
            }
        }
    }

    struct SendStats: Codable {
        var volume: String, base: String?, checkpoint: String, frames: UInt64, dataBytes: UInt64, zeroBytes: UInt64
        var bytesRead: UInt64, bytesSent: UInt64, seconds: Double
    }
}

/// `--store` and `--keep`, shared by the receiving commands.
struct StoreOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The DR store directory (created if empty or missing).", valueName: "dir"))
    var store: String

    @Option(help: "Checkpoints to keep per volume in the store (older ones are removed once a newer one is complete).")
    var keep: Int = ReplicationTarget.defaultKeep

    @Flag(help: "After each applied checkpoint, verify it as `quiesce dr verify` does and report the result to the sender.")
    var verify = false

    /// The `--verify` hook, or nil.
    func verifier(_ store: DRStore, log: @escaping @Sendable (String) -> Void) -> ((ReceiveSummary) -> VerificationOutcome)? {
        guard verify else { return nil }
        return { DRVerifier(store: store).verifyBlocking($0, log: log) }
    }

    func open() throws -> DRStore {
        guard keep >= 1 else { throw UsageError("--keep must be at least 1, found \(keep)") }
        guard store.hasPrefix("/") else { throw UsageError("--store must be an absolute path, found \"\(store)\"") }
        return try DRStore(root: store, create: true)
    }
}

struct ReceiveCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receive",
        abstract: "Apply a delta stream from stdin to a DR store, atomically.",
        discussion: "The checkpoint appears in the store only once the whole stream arrived and its digest matched; an interrupted stream leaves the previous checkpoint untouched and the next one resumes where this one's durable progress stopped. Exit 65 for a refused or damaged stream."
    )

    @OptionGroup var storeOptions: StoreOptions

    @Flag(help: ArgumentHelp("Speak the session protocol on stdin/stdout (what `quiesce replicate` starts locally or over ssh).",
                             visibility: .hidden))
    var session = false

    @Flag(help: "Print the result as JSON.")
    var json = false

    func run() async throws {
        try await CLI.run {
            CLI.bootstrapLogging(verbose: false)
            let store = try storeOptions.open()
            let storeOptions = self.storeOptions, session = self.session
            let log: @Sendable (String) -> Void = { message in
                FileHandle.standardError.write(Data("quiesce receive: \(message)\n".utf8))
            }
            // On a thread of its own: the apply blocks on disk I/O and --verify waits for the writers.
            let summary = try await runBlocking { () throws -> ReceiveSummary? in
                let input = FileDescriptorStream(fd: STDIN_FILENO, what: "stdin")
                if session {
                    let output = FileDescriptorStream(fd: STDOUT_FILENO, what: "stdout")
                    try Receiver.serve(source: input, sink: output, store: store, keep: storeOptions.keep,
                                       verify: storeOptions.verifier(store, log: log), log: log)
                    return nil
                }
                return try Receiver.receive(from: input, into: store, keep: storeOptions.keep,
                                            verify: storeOptions.verifier(store, log: log))
            }
            guard let summary else { return }
            if json {
                try CLI.printJSON(summary)
            } else {
                print(ReplicationReportText.received(summary))
            }
            if let verification = summary.verification, !verification.ok {
                for failure in verification.failures { CLI.printError(failure) }
                throw ExitCode(ExitStatus.verifyFailed.rawValue)
            }
        }
    }
}

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the receiver as a daemon: accept senders over TCP with mutual TLS.",
        discussion: "Only clients presenting a certificate signed by --client-ca are served; with --allow, each only for the volumes listed for its certificate's common name (a DR site serving several primaries keeps each to its own volumes). Each connection applies streams to the store like `quiesce receive`; one stream per volume at a time."
    )

    @OptionGroup var storeOptions: StoreOptions

    @Option(help: ArgumentHelp("Address to listen on, host:port (e.g. 0.0.0.0:7420).", valueName: "addr"))
    var listen: String

    @Option(help: ArgumentHelp("The server's certificate (PEM).", valueName: "path"))
    var cert: String

    @Option(help: ArgumentHelp("The server's private key (PEM).", valueName: "path"))
    var key: String

    @Option(name: .customLong("client-ca"), help: ArgumentHelp("The CA that signs the senders' certificates (PEM).", valueName: "path"))
    var clientCA: String

    @Option(name: .customLong("allow"), help: ArgumentHelp(
        "The client whose certificate's common name is NAME may send these volumes (* for all); repeatable. Without any, every client the CA signed may send every volume.",
        valueName: "NAME=VOLUME[,VOLUME…]"))
    var allow: [String] = []

    func run() async throws {
        try await CLI.run {
            CLI.bootstrapLogging(verbose: false)
            signal(SIGPIPE, SIG_IGN)
            guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]),
                  (0...65535).contains(port) else {
                throw UsageError("--listen must be host:port, found \"\(listen)\"")
            }
            let host = String(listen[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
            let authorization: ClientAuthorization
            do { authorization = try ClientAuthorization(parsing: allow) } catch { throw UsageError("\(error)") }
            let store = try storeOptions.open()
            let keep = storeOptions.keep
            let storeOptions = self.storeOptions
            let verifier = { @Sendable (store: DRStore, log: @escaping @Sendable (String) -> Void) in storeOptions.verifier(store, log: log) }
            let server = try TLSPipeServer.start(host: host, port: port,
                                                 identity: TLSIdentity(certificate: cert, privateKey: key, trustedCA: clientCA),
                                                 onRefused: { peer, reason in
                                                     FileHandle.standardError.write(Data("quiesce serve: refused \(peer): \(reason)\n".utf8))
                                                 }) { fd, peer in
                let stream = FileDescriptorStream(fd: fd, what: "\(peer)")
                defer { close(fd) }
                do {
                    let log: @Sendable (String) -> Void = { message in
                        FileHandle.standardError.write(Data("quiesce serve: \(peer): \(message)\n".utf8))
                    }
                    try Receiver.serve(source: stream, sink: stream, store: store, keep: keep,
                                       verify: verifier(store, log), allowed: authorization.scope(for: peer.commonName),
                                       client: peer.commonName.map { "the client CN=\($0)" } ?? "a client without a common name",
                                       log: log)
                } catch {
                    FileHandle.standardError.write(Data("quiesce serve: \(peer): \(error)\n".utf8))
                }
            }
            FileHandle.standardOutput.write(Data("quiesce serve: listening on \(host):\(server.port), store \(store.root)\n".utf8))
            server.wait()
        }
    }
}

struct ReplicateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replicate",
        abstract: "Ship each volume's newest checkpoint to every DR target (or --target).",
        discussion: "Each target says which checkpoint it has; it gets the delta from there (a full stream the first time). A delta is read once for every target that needs it (again only for a target that falls 64 MiB behind the others, so that it does not pace them). Each target has a `timeout`: one that takes no bytes and says nothing that long is given up on. Exit 8 if any target failed (the others still got the checkpoint)."
    )

    @OptionGroup var options: ConfigOptions

    @Option(help: ArgumentHelp("Only this target (repeatable).", valueName: "name"))
    var target: [String] = []

    @Option(help: ArgumentHelp("Replicate this checkpoint instead of the newest.", valueName: "id"))
    var checkpoint: String?

    @Flag(help: "Send whole streams, not deltas: a fresh DR copy (after `targets scrub` found a damaged one).")
    var full = false

    @Flag(name: .customLong("full-compare"), help: "Find the delta by comparing every block of the two snapshots, not their extent maps (once after a defragmentation moved every block).")
    var fullCompare = false

    @Flag(help: "Print the report as JSON.")
    var json = false

    func run() async throws {
        try await CLI.run {
            if full && fullCompare { throw UsageError("--full and --full-compare exclude each other (a full stream compares nothing)") }
            let report = try options.installation().replicate(targets: target, checkpointID: checkpoint, full: full,
                                                              fullCompare: fullCompare)
            try ReplicationReportText.print(report, json: json)
            if report.failed { throw ExitCode(ExitStatus.replicationFailed.rawValue) }
        }
    }
}

struct TargetsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "targets",
        abstract: "Show DR targets.",
        subcommands: [Status.self, Scrub.self]
    )

    struct Scrub: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Compare each target's newest DR copy with the primary's snapshot, block by block.",
            discussion: "Both sides hash their own image (XXH3-128 per block) at the same time; only the hashes travel. Reads both images whole. Exit 8 if a copy differs or a target could not be scrubbed.")

        @OptionGroup var options: ConfigOptions

        @Option(help: ArgumentHelp("Only this target (repeatable).", valueName: "name"))
        var target: [String] = []

        @Flag(help: "Print as JSON.")
        var json = false

        func run() async throws {
            try await CLI.run {
                let outcomes = try options.installation().scrub(targets: target)
                if json {
                    try CLI.printJSON(outcomes)
                } else {
                    for outcome in outcomes {
                        print("target \(outcome.target) volume \(outcome.volume): \(outcome.status.rawValue)"
                              + (outcome.checkpoint.map { " \($0)" } ?? "")
                              + (outcome.status == .identical ? " (\(ReplicationReportText.bytes(outcome.bytesCompared)) compared)" : ""))
                        if let error = outcome.error { CLI.printError("target \(outcome.target): \(error)") }
                    }
                }
                if outcomes.contains(where: { $0.status != .identical }) { throw ExitCode(ExitStatus.replicationFailed.rawValue) }
            }
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Each target's last acknowledged checkpoint per volume and its lag (the RPO now).")

        @OptionGroup var options: ConfigOptions

        @Flag(help: "Print as JSON.")
        var json = false

        func run() async throws {
            try await CLI.run {
                let statuses = try options.installation().targetStatuses()
                if json { return try CLI.printJSON(statuses) }
                if statuses.isEmpty { print("no targets configured") }
                for status in statuses {
                    print("target \(status.name) \(status.url)")
                    for volume in status.volumes {
                        let lag = volume.lagSeconds.map { String(format: "lag %.0f s", $0) } ?? "never replicated"
                        let verified = switch volume.verified {
                        case true?: ", verified"
                        case false?: ", VERIFICATION FAILED: " + volume.verifyFailures.joined(separator: "; ")
                        case nil: volume.checkpoint == nil ? "" : ", not verified"
                        }
                        print("  \(volume.volume): \(volume.checkpoint ?? "-")  \(lag)\(volume.pending ? ", newer checkpoint pending" : "")\(verified)")
                    }
                }
            }
        }
    }
}

enum ReplicationReportText {
    static func print(_ report: ReplicationReport, json: Bool) throws {
        if json { return try CLI.printJSON(report) }
        for outcome in report.outcomes {
            var line = "target \(outcome.target) volume \(outcome.volume): \(outcome.status.rawValue)"
            if let checkpoint = outcome.checkpoint { line += " \(checkpoint)" }
            if outcome.status == .applied {
                line += outcome.base.map { " (delta from \($0)" } ?? " (full"
                line += String(format: ", %@ changed, %@ sent, %.2f s", bytes(outcome.changedBytes), bytes(outcome.bytesSent), outcome.seconds)
                if outcome.resumedAtFrame > 0 { line += ", resumed at frame \(outcome.resumedAtFrame)" }
                line += ")"
                if let verified = outcome.verified { line += verified ? ", verified" : ", VERIFICATION FAILED" }
            }
            Swift.print(line)
            if let error = outcome.error { CLI.printError("target \(outcome.target): \(error)") }
        }
    }

    static func received(_ s: ReceiveSummary) -> String {
        var line = "received \(s.checkpoint) of \(s.volume)" + (s.base.map { " (delta from \($0))" } ?? " (full)")
        line += String(format: ": %llu frames, %@ data, %@ zeroed, %.2f s", s.frames, bytes(s.dataBytes), bytes(s.zeroBytes), s.seconds)
        if s.resumedAtFrame > 0 { line += ", resumed at frame \(s.resumedAtFrame)" }
        if let verification = s.verification { line += verification.ok ? "; verified" : "; VERIFICATION FAILED" }
        if !s.pruned.isEmpty { line += "; pruned \(s.pruned.joined(separator: ", "))" }
        return line
    }

    static func bytes(_ count: UInt64) -> String {
        let value = Double(count)
        if value >= 1_073_741_824 { return String(format: "%.2f GiB", value / 1_073_741_824) }
        if value >= 1_048_576 { return String(format: "%.1f MiB", value / 1_048_576) }
        if value >= 1024 { return String(format: "%.1f KiB", value / 1024) }
        return "\(count) B"
    }
}
