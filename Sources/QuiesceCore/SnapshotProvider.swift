import Foundation

/// A volume of the snapshot set: a VM disk image, and where its guest filesystem is mounted.
public struct Volume: Sendable, Codable, Equatable, Hashable {
    public var name: String
    /// The raw disk image on the datastore.
    public var image: String
    /// Where the image's guest filesystem is mounted on this host, to flush and hold.
    /// Without it the snapshot is only crash-consistent for that volume.
    public var mount: String?
    /// Which provider snapshots it (`reflink`).
    public var provider: String
    /// Where the provider keeps this volume's snapshots.
    public var snapshotDirectory: String

    public init(name: String, image: String, mount: String?, provider: String = "reflink",
                snapshotDirectory: String? = nil) {
        self.name = name
        self.image = image
        self.mount = mount
        self.provider = provider
        let imageDirectory = (image as NSString).deletingLastPathComponent
        self.snapshotDirectory = snapshotDirectory ?? "\(imageDirectory)/.quiesce/\(name)"
    }
}

/// A snapshot taken during the hold but not yet made durable.
public struct CapturedSnapshot: Sendable, Equatable {
    public var volume: Volume
    /// The clone as written during the hold (not yet in its final place).
    public var pendingPath: String
    /// Where `commit` puts it.
    public var finalPath: String
    public init(volume: Volume, pendingPath: String, finalPath: String) {
        self.volume = volume
        self.pendingPath = pendingPath
        self.finalPath = finalPath
    }
}

/// Takes the block snapshot of volumes (image files).
///
/// The coordinator calls `prepare` before any writer freezes, `capture` while every
/// guest mount of the set is held (FIFREEZE), `commit` after release, and `discard`
/// when the checkpoint aborts. `capture` runs inside the hold window: it must be fast
/// (no full copy, ever), must not touch guest mounts and must not log.
public protocol SnapshotProvider: Sendable {
    var name: String { get }
    /// Cheap checks before the freeze: can this datastore take the snapshot at all?
    func prepare(_ volumes: [Volume], checkpointID: String) throws
    /// Take every volume's snapshot at this instant. Blocking; runs on its own thread.
    func capture(_ volumes: [Volume], checkpointID: String) throws -> [CapturedSnapshot]
    /// Make captured snapshots durable and immutable, in their final place.
    func commit(_ captured: [CapturedSnapshot]) throws -> [SnapshotFile]
    /// Remove whatever this checkpoint left for these volumes, pending or committed.
    func discard(_ volumes: [Volume], checkpointID: String) throws
    /// Delete one committed snapshot (pruning).
    func delete(_ snapshot: SnapshotFile) throws
    /// Reasons to expect the snapshot to take a large part of `holdTimeout` (checked before
    /// each checkpoint, outside the freeze; a warning, not a refusal). Each names the fix.
    func holdWindowRisks(_ volumes: [Volume], holdTimeout: Duration) -> [String]
}

extension SnapshotProvider {
    public func holdWindowRisks(_ volumes: [Volume], holdTimeout: Duration) -> [String] { [] }
}

/// Errors of the snapshot providers: what failed, where, and the fix.
public struct ProviderError: Error, Sendable, CustomStringConvertible {
    public var volume: String?
    public var message: String
    public var hint: String?
    public init(volume: String?, _ message: String, hint: String? = nil) {
        self.volume = volume
        self.message = message
        self.hint = hint
    }
    public var description: String {
        let subject = volume.map { "volume \"\($0)\": " } ?? ""
        return subject + message + (hint.map { "\n       (\($0))" } ?? "")
    }
}
