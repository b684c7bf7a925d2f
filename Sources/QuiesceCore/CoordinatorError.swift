/// Why a checkpoint did not complete: the phase, and the writer, volume or part to blame.
public enum CoordinatorError: Error, Sendable, CustomStringConvertible {
    /// A writer vetoed, failed or timed out in `phase`.
    case writerFailed(writer: String, phase: Phase, error: WriterError)
    /// A writer's data is on no volume of the snapshot set.
    case outsideSnapshotSet(writer: String, path: String, volumeMap: String)
    /// The provider could not prepare, capture or commit.
    case providerFailed(phase: Phase, error: ProviderError)
    /// A guest filesystem could not be flushed, held or released.
    case filesystemFailed(phase: Phase, mount: String, message: String)
    /// The snapshot did not finish within the hold limit.
    case holdTimedOut(limit: Duration)
    /// The watchdog could not be started or armed: nothing was frozen.
    case guardUnavailable(String)

    public var phase: Phase {
        switch self {
        case .writerFailed(_, let phase, _): phase
        case .outsideSnapshotSet: .identify
        case .providerFailed(let phase, _): phase
        case .filesystemFailed(let phase, _, _): phase
        case .holdTimedOut: .snapshot
        case .guardUnavailable: .freeze
        }
    }

    /// The writer to blame, if a writer is.
    public var writer: String? {
        switch self {
        case .writerFailed(let writer, _, _), .outsideSnapshotSet(let writer, _, _): writer
        default: nil
        }
    }

    public var isTimeout: Bool {
        switch self {
        case .writerFailed(_, _, let error): error.kind == .timedOut
        case .holdTimedOut: true
        default: false
        }
    }

    public var description: String {
        switch self {
        case .writerFailed(let writer, let phase, let error):
            return "writer \"\(writer)\" failed at \(phase.rawValue): \(error.message)"
                + (error.hint.map { "\n       (\($0))" } ?? "")
        case .outsideSnapshotSet(let writer, let path, let map):
            return "writer \"\(writer)\" needs \(path), which is on no volume of the snapshot set\n"
                + "       volumes:\n" + map.split(separator: "\n").map { "         \($0)" }.joined(separator: "\n")
                + "\n       (add the volume that holds it to the config, or move the data onto one)"
        case .providerFailed(let phase, let error):
            return "snapshot provider failed at \(phase.rawValue): \(error)"
        case .filesystemFailed(let phase, let mount, let message):
            return "guest filesystem \(mount) failed at \(phase.rawValue): \(message)"
        case .holdTimedOut(let limit):
            return "the snapshot did not finish within the hold limit of \(formatDuration(limit)); filesystems were released"
                + "\n       (raise hold_timeout in [coordinator], or check the datastore's load and the images' extent counts)"
        case .guardUnavailable(let message):
            return "the freeze guard could not be started, so nothing was frozen: \(message)"
        }
    }
}
