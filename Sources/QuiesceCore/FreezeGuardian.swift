/// Something that must happen if the coordinator dies or hangs while a freeze is in effect.
public enum GuardDuty: Sendable, Codable, Equatable {
    /// FITHAW this mount point.
    case thawFilesystem(mount: String)
    /// Run a command (an exec writer's `thaw`), killed after `timeoutSeconds`.
    case runCommand(executable: String, arguments: [String], environment: [String: String], timeoutSeconds: Double)
    /// Remove a lock file the writer created (a mailbox dotlock) — only if it still holds
    /// `expectedContent` (when given): someone else's lock of the same name is never removed.
    case removeFile(path: String, expectedContent: String? = nil)
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
    /// Arm many duties in one exchange (thousands of mailbox locks); ids in the same order.
    func arm(all duties: [GuardDuty]) async throws -> [GuardDutyID]
    /// Disarm many duties in one exchange.
    func disarm(all ids: [GuardDutyID]) async throws
}

extension FreezeGuardian {
    public func arm(all duties: [GuardDuty]) async throws -> [GuardDutyID] {
        var ids: [GuardDutyID] = []
        for duty in duties { ids.append(try await arm(duty)) }
        return ids
    }

    public func disarm(all ids: [GuardDutyID]) async throws {
        for id in ids { try await disarm(id) }
    }
}

public struct GuardDutyID: Sendable, Hashable, Codable {
    public var rawValue: Int
    public init(_ rawValue: Int) { self.rawValue = rawValue }
}
