/// Something that must happen if the coordinator dies or hangs while a freeze is in effect.
public enum GuardDuty: Sendable, Codable, Equatable {
    /// FITHAW this mount point.
    case thawFilesystem(mount: String)
    /// Run a command (an exec writer's `thaw`), killed after `timeoutSeconds`.
    case runCommand(executable: String, arguments: [String], environment: [String: String], timeoutSeconds: Double)
    /// Remove a lock file the writer created (a mailbox dotlock), if it is still ours.
    case removeFile(path: String)
}

/// The handle a writer uses to hand the guard its undo duty before it freezes something
/// that would outlive the coordinator (a lock file, a script's frozen state).
///
/// The guard runs an armed duty when the coordinator dies (at once) or when the
/// duty's deadline passes (the coordinator is hung: the guard also kills it, which
/// releases in-process locks and database sessions).
public protocol FreezeGuardian: Sendable {
    /// Arm a duty; returns once the guard has it. The deadline is the checkpoint's freeze deadline.
    func arm(_ duty: GuardDuty) async throws -> GuardDutyID
    /// The writer undid it itself: the guard forgets it.
    func disarm(_ id: GuardDutyID) async throws
}

public struct GuardDutyID: Sendable, Hashable, Codable {
    public var rawValue: Int
    public init(_ rawValue: Int) { self.rawValue = rawValue }
}
