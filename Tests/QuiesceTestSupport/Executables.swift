import Foundation

/// The `quiesce` binary built next to the tests (the guard and the CLI tests run it).
public enum Executables {
    /// `.build/debug/quiesce` (or `$QUIESCE_BIN`); the test command builds it before the tests.
    public static var quiesce: String {
        if let path = ProcessInfo.processInfo.environment["QUIESCE_BIN"] { return path }
        let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        for configuration in ["debug", "release"] {
            let path = packageRoot.appendingPathComponent(".build/\(configuration)/quiesce").path
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        return packageRoot.appendingPathComponent(".build/debug/quiesce").path
    }

    /// Fails clearly when the binary is missing (run `swift build` first; the README's test command does).
    public static func requireQuiesce() throws -> String {
        let path = quiesce
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw MissingPrerequisite("the quiesce binary is not built at \(path): run `swift build` before `swift test` (scripts/test does)")
        }
        return path
    }
}

public struct MissingPrerequisite: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
