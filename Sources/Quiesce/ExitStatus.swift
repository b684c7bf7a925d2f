import QuiesceCatalog
import QuiesceConfig
import QuiesceCore
import QuiesceReplication

/// The exit codes of `quiesce`, documented in docs/operations.md. Cron and runbooks branch on them.
public enum ExitStatus: Int32, Sendable, CaseIterable {
    case completed = 0
    /// An unexpected error (a bug, or the system refused something we did not foresee).
    case failure = 1
    /// A writer vetoed or failed (identify, prepare, freeze, post-snapshot); nothing was kept.
    case writerFailed = 3
    /// A writer timed out; nothing was kept.
    case writerTimedOut = 4
    /// The provider or a guest filesystem failed (flush-and-hold, snapshot, release, hold limit); nothing was kept.
    case providerFailed = 5
    /// The checkpoint completed and is consistent, but a writer failed to thaw: look at the application.
    case thawFailed = 6
    /// The freeze guard could not be started; nothing was frozen.
    case guardUnavailable = 7
    /// Replication: at least one target did not get the checkpoint (the others did; see the report).
    case replicationFailed = 8
    /// The DR store could not be read or written (receive, serve).
    case storeFailed = 9
    /// A DR copy did not start cleanly: a writer's verify failed (dr verify, receive --verify,
    /// failover prepare when a target did not verify).
    case verifyFailed = 10
    /// A delta stream was refused: malformed, truncated, corrupted, or not applicable to this
    /// store (wrong base, replayed). The store's checkpoints are untouched (EX_DATAERR).
    case badStream = 65
    /// Bad command-line usage (unknown name, bad argument).
    case usage = 64
    /// The catalog could not be read or written.
    case catalogError = 74
    /// Another checkpoint holds the lock (EX_TEMPFAIL): try later.
    case locked = 75
    /// Bad configuration or writer spec (EX_CONFIG).
    case badConfiguration = 78

    public static func of(_ result: CheckpointResult) -> ExitStatus {
        guard let error = result.error else { return result.thawErrors.isEmpty ? .completed : .thawFailed }
        switch error {
        case .writerFailed(_, _, let writerError): return writerError.kind == .timedOut ? .writerTimedOut : .writerFailed
        case .outsideSnapshotSet: return .writerFailed
        case .providerFailed, .filesystemFailed, .holdTimedOut: return .providerFailed
        case .guardUnavailable: return .guardUnavailable
        }
    }

    public static func of(_ error: any Error) -> ExitStatus {
        switch error {
        case is ConfigError, is RegistryInvalid: return .badConfiguration
        case is CheckpointLock.Held: return .locked
        case is CatalogError: return .catalogError
        case is UsageError: return .usage
        case is ReplicationError: return .replicationFailed
        case let error as DeltaStreamError:
            switch error {
            case .malformed, .unsupportedVersion, .truncated, .corrupted, .rejected: return .badStream
            case .store: return .storeFailed
            case .transport, .stalled, .peer: return .replicationFailed
            }
        case let error as CoordinatorError:
            return of(CheckpointResult(record: CheckpointRecord(id: "", label: nil, startedAt: .now), error: error, thawErrors: []))
        default: return .failure
        }
    }
}
