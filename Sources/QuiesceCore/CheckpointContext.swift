import Logging

/// What a writer is told in each phase.
public struct CheckpointContext: Sendable {
    public var checkpointID: String
    public var label: String?
    public var phase: Phase
    /// The call must return before this instant.
    public var deadline: ContinuousClock.Instant
    /// The volumes of the snapshot set that hold this writer's data.
    public var volumes: [Volume]
    public var logger: Logger
    /// Where to hand undo duties that must survive the coordinator (see `Writer.freeze`).
    public var guardian: any FreezeGuardian

    public init(checkpointID: String, label: String?, phase: Phase, deadline: ContinuousClock.Instant,
                volumes: [Volume], logger: Logger, guardian: any FreezeGuardian) {
        self.checkpointID = checkpointID
        self.label = label
        self.phase = phase
        self.deadline = deadline
        self.volumes = volumes
        self.logger = logger
        self.guardian = guardian
    }

    /// Time left before the deadline (zero if passed).
    public var remaining: Duration {
        let left = deadline - .now
        return left > .zero ? left : .zero
    }
}

/// Where the coordinator records progress: the catalog implements it.
/// Never called during the hold window.
public protocol CheckpointJournal: Sendable {
    /// The run has an id and is about to touch writers (a `running` row).
    func begin(_ record: CheckpointRecord) async throws
    /// A writer changed state (persisted so `writers list` shows it after the run).
    func writerState(_ name: String, type: String, state: WriterState, errorKind: WriterErrorKind,
                     error: String?, checkpointID: String) async
    /// The run ended, completed or aborted.
    func finish(_ record: CheckpointRecord) async throws
}
