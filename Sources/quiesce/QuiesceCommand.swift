import ArgumentParser
import Foundation
import Logging
import Quiesce
import QuiesceCore

@main
struct QuiesceCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quiesce",
        abstract: "Application-consistent snapshots of VM disk images, replicated to DR.",
        discussion: "Exit codes: see `docs/operations.md` (0 completed, 3 writer failed, 4 writer timed out, 5 provider failed, 6 thaw failed, 7 guard unavailable, 8 replication failed, 9 DR store failed, 10 DR copy failed verification, 64 usage, 65 bad delta stream, 74 catalog, 75 another run holds the lock, 78 bad configuration).",
        version: "0.1.0",
        subcommands: [
            CheckpointCommand.self, WritersCommand.self, CheckpointsCommand.self,
            ReplicateCommand.self, TargetsCommand.self, SendCommand.self, ReceiveCommand.self, ServeCommand.self,
            DRCommand.self, FailoverCommand.self,
            LabCommand.self,
            GuardCommand.self, LabWorkloadCommand.self,
        ]
    )
}

/// `--config`, shared by every command that reads the configuration.
struct ConfigOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The configuration file.", valueName: "path"))
    var config: String = ProcessInfo.processInfo.environment["QUIESCE_CONFIG"] ?? "/etc/quiesce/quiesce.toml"

    @Flag(name: .shortAndLong, help: "Log debug detail.")
    var verbose = false

    func installation() throws -> Installation {
        CLI.bootstrapLogging(verbose: verbose)
        return try Installation(configPath: config, guardExecutable: CLI.executablePath,
                                logger: Logger(label: "quiesce"))
    }
}

enum CLI {
    /// The running `quiesce` binary: the guard is started from it.
    static var executablePath: String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    nonisolated(unsafe) private static var bootstrapped = false

    static func bootstrapLogging(verbose: Bool) {
        guard !bootstrapped else { return }
        bootstrapped = true
        signal(SIGPIPE, SIG_IGN)
        LoggingSystem.bootstrap { label in GatedLogHandler(label: label, level: verbose ? .debug : .info) }
    }

    /// Runs a command body; any error is printed as `error: …` and mapped to its documented exit code.
    static func run(_ body: () async throws -> Void) async throws {
        do {
            try await body()
        } catch let exit as ExitCode {
            throw exit
        } catch {
            printError("\(error)")
            throw ExitCode(ExitStatus.of(error).rawValue)
        }
    }

    static func printError(_ message: String) {
        FileHandle.standardError.write(Data("error: \(message)\n".utf8))
    }

    static func printJSON<T: Encodable>(_ value: T) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        print(String(decoding: try encoder.encode(value), as: UTF8.self))
    }

    static func milliseconds(_ value: Double?) -> String {
        value.map { String(format: "%.1f ms", $0) } ?? "-"
    }
}
