import ArgumentParser
import Foundation
import Quiesce

struct WritersCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "writers",
        abstract: "The writer registry: list, check, add and remove writers.",
        subcommands: [List.self, Check.self, Add.self, Remove.self]
    )

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "One block per writer: name, type, state, last error, last successful checkpoint.")
        @OptionGroup var options: ConfigOptions
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            try await CLI.run {
                let writers = try options.installation().listWriters()
                if json {
                    try CLI.printJSON(writers)
                } else {
                    printBlocks(writers)
                }
                // A bad drop-in is listed, and the exit status says the registry needs fixing.
                if writers.contains(where: { $0.state == "invalid-spec" }) { throw ExitCode(ExitStatus.badConfiguration.rawValue) }
            }
        }

        func printBlocks(_ writers: [Installation.WriterListing]) {
            if writers.isEmpty { print("no writers registered") }
            for (index, w) in writers.enumerated() {
                if index > 0 { print("") }
                print("Writer: \(w.name)")
                print("   Type: \(w.type ?? "?")")
                print("   Spec: \(w.file ?? "?")")
                print("   State: \(w.state)")
                print("   Last error: \(w.lastError)" + (w.lastErrorMessage.map { " (\($0))" } ?? ""))
                print("   Last successful checkpoint: \(w.lastSuccessfulCheckpoint ?? "none")")
            }
        }
    }

    struct Check: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a writer's identify and prepare without freezing; say what is wrong.")
        @OptionGroup var options: ConfigOptions
        @Argument(help: "The writer's name.") var name: String

        func run() async throws {
            try await CLI.run {
                let volumes = try await options.installation().checkWriter(name: name)
                print("writer \(name): ok (identify and prepare passed; data on \(volumes.map(\.name).joined(separator: ", ")))")
            }
        }
    }

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate a writer spec, check it reaches its application, install it into writers.d/ (mode 0600).")
        @OptionGroup var options: ConfigOptions
        @Argument(help: "The spec file (TOML).") var file: String
        @Flag(help: "Install without running identify and prepare (the application is not up yet).")
        var skipCheck = false

        func run() async throws {
            try await CLI.run {
                let path = try await options.installation().addWriter(file: file, checkConnectivity: !skipCheck)
                print("installed \(path)")
            }
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a writer's spec from writers.d/.")
        @OptionGroup var options: ConfigOptions
        @Argument(help: "The writer's name.") var name: String

        func run() async throws {
            try await CLI.run {
                let path = try options.installation().removeWriter(name: name)
                print("removed \(path)")
            }
        }
    }
}
