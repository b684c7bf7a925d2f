/// A writer whose application can run on a copy of the snapshot set for people to test
/// against (`quiesce dr test start`), isolated from production.
///
/// `quiesce dr test` calls `startOnCopy` once per test, after the copy is mounted writable, and
/// `stopOnCopy` once when the test ends (`dr test stop`), possibly from another process: everything
/// `stopOnCopy` needs must be in the returned `RunningCopy`, which is persisted as JSON.
///
/// The application must be reachable only privately: a Unix socket in a directory of its own
/// under `workDirectory`, or a loopback port of its own, never production's socket, port,
/// archive or peers. It must write only below the copy's mount points and `workDirectory`,
/// never to a live path. `startOnCopy` returns once the application accepts connections, or
/// throws (leaving nothing running) naming what failed. `stopOnCopy` must be safe to call again
/// after a failed or partial stop, and must succeed when the application is already gone.
public protocol CopyStartable: Writer {
    /// Starts the application on the copy. `marker` is the one recorded at freeze (where the
    /// data was on the primary); `workDirectory` is private to this writer and this test
    /// (created by the caller, mode 0711, removed after the test).
    func startOnCopy(_ copy: CopyLayout, marker: ConsistencyMarker, workDirectory: String) async throws -> RunningCopy
    /// Stops what `startOnCopy` started.
    func stopOnCopy(_ running: RunningCopy) async throws
    /// Why this writer, as configured, starts nothing on a copy (and how to change that); nil
    /// when it does.
    var notStartableReason: String? { get }
}

extension CopyStartable {
    public var notStartableReason: String? { nil }
}

/// An application running on a copy for a DR test: how to reach it, and what stopping it needs.
public struct RunningCopy: Codable, Sendable, Equatable {
    /// The writer's name and type.
    public var writer: String
    public var type: String
    /// One line each, for people: where the data is and how to connect (a command line).
    public var access: [String]
    /// What `stopOnCopy` needs (data directory, socket directory, pid …), and `pid` if a
    /// process runs: `dr test status` reports whether it is alive.
    public var state: [String: String]

    public init(writer: String, type: String, access: [String], state: [String: String] = [:]) {
        self.writer = writer
        self.type = type
        self.access = access
        self.state = state
    }
}
