import Foundation

/// The coordinator's phases, in order (DESIGN.md).
public enum Phase: String, Sendable, Codable, CaseIterable {
    case identify
    case prepare
    case freeze
    case flushAndHold = "flush-and-hold"
    case snapshot
    case release
    case thaw
    case postSnapshot = "post-snapshot"
    case replicate
    case complete
    case abort
}

/// What writers are told at thaw.
public enum CheckpointOutcome: String, Sendable, Codable {
    case completed
    case aborted
}

/// One snapshot file of a checkpoint: an immutable clone of a volume's image.
public struct SnapshotFile: Sendable, Codable, Equatable {
    public var volume: String
    public var image: String
    public var path: String
    public var sizeBytes: UInt64
    public init(volume: String, image: String, path: String, sizeBytes: UInt64) {
        self.volume = volume
        self.image = image
        self.path = path
        self.sizeBytes = sizeBytes
    }
}

/// A writer's part in one checkpoint.
public struct WriterResult: Sendable, Codable, Equatable {
    public var name: String
    public var type: String
    public var state: String
    public var errorKind: WriterErrorKind
    public var error: String?
    public var marker: ConsistencyMarker?
    public var recovery: RecoveryMetadata?
    public init(name: String, type: String, state: String, errorKind: WriterErrorKind = .none,
                error: String? = nil, marker: ConsistencyMarker? = nil, recovery: RecoveryMetadata? = nil) {
        self.name = name
        self.type = type
        self.state = state
        self.errorKind = errorKind
        self.error = error
        self.marker = marker
        self.recovery = recovery
    }
}

/// One checkpoint run, as the catalog records it.
public struct CheckpointRecord: Sendable, Codable, Equatable {
    public enum Outcome: String, Sendable, Codable {
        case running
        case completed
        case aborted
    }

    public var id: String
    public var label: String?
    public var startedAt: Date
    public var endedAt: Date?
    public var outcome: Outcome
    /// On failure: the phase and writer (or provider/volume) to blame, and why.
    public var failedPhase: Phase?
    public var failedWriter: String?
    public var error: String?
    /// First writer frozen → last writer thawed, in milliseconds.
    public var freezeWindowMs: Double?
    /// FIFREEZE → FITHAW, in milliseconds.
    public var holdWindowMs: Double?
    public var writers: [WriterResult]
    public var snapshots: [SnapshotFile]

    public init(id: String, label: String?, startedAt: Date) {
        self.id = id
        self.label = label
        self.startedAt = startedAt
        self.outcome = .running
        self.writers = []
        self.snapshots = []
    }

    /// A sortable, filename-safe id: UTC time to the millisecond, e.g. `20261125T114012345Z`.
    public static func makeID(at date: Date = Date()) -> String {
        let ms = Int64((date.timeIntervalSince1970 * 1000).rounded(.down))
        var t = time_t(ms / 1000)
        var parts = tm()
        gmtime_r(&t, &parts)
        return String(format: "%04d%02d%02dT%02d%02d%02d%03dZ",
                      Int(parts.tm_year) + 1900, Int(parts.tm_mon) + 1, Int(parts.tm_mday),
                      Int(parts.tm_hour), Int(parts.tm_min), Int(parts.tm_sec), Int(ms % 1000))
    }

    /// Whether `text` is a well-formed checkpoint id (no path separators, fixed shape).
    public static func isValidID(_ text: String) -> Bool {
        let chars = Array(text.utf8)
        guard chars.count == 19, chars[8] == UInt8(ascii: "T"), chars[18] == UInt8(ascii: "Z") else { return false }
        return chars.enumerated().allSatisfy { i, c in i == 8 || i == 18 || (c >= 48 && c <= 57) }
    }
}
