import Logging

/// An application that can be told to prepare, freeze, thaw, and later verify a copy of itself.
///
/// The coordinator calls each phase at most once per checkpoint, in the order
/// `identify → prepare → freeze → thaw → postSnapshot`. `thaw` is called for every
/// writer that was asked to freeze, even if its own `freeze` failed or timed out.
///
/// Every call must return within `context.deadline`; the coordinator abandons a call
/// that does not and reports the writer as `timed out`. A writer must never write to
/// a filesystem of the snapshot set between `freeze` and `thaw` beyond what its
/// application already does, and must not log to one.
public protocol Writer: Sendable {
    /// The name from the writer's spec, unique in the registry.
    var name: String { get }
    /// The spec's `type` (`exec`, `sqlite`, …).
    var type: String { get }
    /// Freeze group: lower groups freeze first and thaw last.
    var order: Int { get }
    /// How long `freeze` (and, separately, `thaw`) may take.
    var timeout: Duration { get }

    /// Which data the writer needs in the snapshot. Called before anything else;
    /// must not change the application's state.
    func identify() async throws -> WriterFootprint
    /// Slow work outside the freeze window (flush, checkpoint). May veto by throwing.
    func prepare(_ context: CheckpointContext) async throws
    /// Make the application's on-disk state consistent and keep it so until `thaw`.
    /// Anything the freeze leaves behind that outlives this process (a lock file, a
    /// script's state) must be handed to `context.guardian` *before* it is created.
    func freeze(_ context: CheckpointContext) async throws -> ConsistencyMarker
    /// Undo the freeze. Told whether the checkpoint completed.
    func thaw(_ context: CheckpointContext, outcome: CheckpointOutcome) async throws
    /// After the snapshot is taken: recovery metadata to keep in the manifest.
    /// Must never edit the live system.
    func postSnapshot(_ context: CheckpointContext) async throws -> RecoveryMetadata
    /// Check a copy of the application (a mounted snapshot) against the marker recorded at freeze.
    func verify(copy: CopyLayout, marker: ConsistencyMarker) async throws -> VerifyReport
}

extension Writer {
    public func postSnapshot(_ context: CheckpointContext) async throws -> RecoveryMetadata { RecoveryMetadata() }
}

/// What a writer needs in the snapshot set: file paths (mapped to volumes through
/// their mounts) and volumes it names directly.
public struct WriterFootprint: Sendable, Equatable {
    public var paths: [String]
    public var volumes: [String]
    public init(paths: [String] = [], volumes: [String] = []) {
        self.paths = paths
        self.volumes = volumes
    }
}

/// What a writer records at freeze to say which state the snapshot holds
/// (a WAL LSN, a row count, UID counters). Ordered key/value pairs.
public struct ConsistencyMarker: Sendable, Codable, Equatable {
    public var fields: [String: String]
    public init(_ fields: [String: String] = [:]) { self.fields = fields }
    public subscript(key: String) -> String? {
        get { fields[key] }
        set { fields[key] = newValue }
    }
    /// `key=value` pairs, sorted by key, for logs and reports.
    public var summary: String {
        fields.keys.sorted().map { "\($0)=\(fields[$0]!)" }.joined(separator: " ")
    }
}

/// Files a writer wants kept beside the snapshot for recovery (e.g. a backup label),
/// byte for byte.
public struct RecoveryMetadata: Sendable, Codable, Equatable {
    public var files: [String: String]
    public init(files: [String: String] = [:]) { self.files = files }
}

/// Where a copy of the snapshot set is mounted: maps a live path to the same path in the copy.
public struct CopyLayout: Sendable {
    /// Live guest mount point → where the copy of that volume is mounted.
    public var mounts: [String: String]
    public init(mounts: [String: String]) { self.mounts = mounts }

    /// The copy's path for a live path, or nil if it is on no copied volume.
    public func translate(_ livePath: String) -> String? {
        let best = mounts.keys
            .filter { livePath == $0 || livePath.hasPrefix($0.hasSuffix("/") ? $0 : $0 + "/") }
            .max { $0.count < $1.count }
        guard let mount = best, let copy = mounts[mount] else { return nil }
        return copy + livePath.dropFirst(mount.count)
    }
}

/// The outcome of a writer's `verify`.
public struct VerifyReport: Sendable, Codable, Equatable {
    public var ok: Bool
    public var details: [String]
    public init(ok: Bool, details: [String]) {
        self.ok = ok
        self.details = details
    }
}

/// What a writer's verify checked, line by line; failed if any check failed.
public struct VerifyChecks: Sendable {
    public private(set) var details: [String] = []
    public private(set) var failed = false

    public init() {}

    public mutating func pass(_ line: String) { details.append(line) }
    public mutating func fail(_ line: String) {
        failed = true
        details.append("FAILED: " + line)
    }

    public var report: VerifyReport { VerifyReport(ok: !failed, details: details) }
}

/// A writer's state, as `quiesce writers list` shows it (the VSS names).
public enum WriterState: Sendable, Codable, Equatable, CustomStringConvertible {
    case stable
    case waitingForFreeze
    case frozen
    case waitingForThaw
    case failed(at: Phase)

    public var description: String {
        switch self {
        case .stable: "stable"
        case .waitingForFreeze: "waiting-for-freeze"
        case .frozen: "frozen"
        case .waitingForThaw: "waiting-for-thaw"
        case .failed(let phase): "failed-at-\(phase.rawValue)"
        }
    }

    public init?(_ text: String) {
        switch text {
        case "stable": self = .stable
        case "waiting-for-freeze": self = .waitingForFreeze
        case "frozen": self = .frozen
        case "waiting-for-thaw": self = .waitingForThaw
        default:
            guard text.hasPrefix("failed-at-"), let phase = Phase(rawValue: String(text.dropFirst(10))) else { return nil }
            self = .failed(at: phase)
        }
    }
}

/// The kind of a writer's last error (the VSS names).
public enum WriterErrorKind: String, Sendable, Codable, Equatable {
    case none
    case timedOut = "timed out"
    case retryable
    case nonRetryable = "non-retryable"
    case inconsistent
}

/// An error a writer throws: what went wrong, of which kind, and what to do about it.
public struct WriterError: Error, Sendable, Equatable, CustomStringConvertible {
    public var kind: WriterErrorKind
    public var message: String
    public var hint: String?

    public init(_ kind: WriterErrorKind, _ message: String, hint: String? = nil) {
        self.kind = kind
        self.message = message
        self.hint = hint
    }

    public var description: String {
        hint.map { "\(message) (\($0))" } ?? message
    }
}
