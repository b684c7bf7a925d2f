import Foundation

/// Where everything of a lab lives. Everything is under `root`: the lab only ever touches
/// loop devices whose backing file and mounts whose mount point are under it.
public struct LabLayout: Sendable, Codable {
    public var root: String

    public init(root: String) {
        // Loop backing files are recorded as absolute paths: compare like with like.
        var path = root.hasPrefix("/") ? root : FileManager.default.currentDirectoryPath + "/" + root
        while path.count > 1 && path.hasSuffix("/") { path.removeLast() }
        self.root = path
    }

    /// The XFS (reflink=1) datastore: its backing file and mount point.
    public var datastoreFile: String { "\(root)/datastore.xfs" }
    public var datastore: String { "\(root)/datastore" }
    /// The VM disk image (ext4 inside) and where its guest filesystem is mounted.
    public var image: String { "\(datastore)/vm1.img" }
    public var guest: String { "\(root)/guest" }
    /// The DR side's XFS store.
    public var drFile: String { "\(root)/dr.xfs" }
    public var dr: String { "\(root)/dr" }
    /// The DR store the lab's target replicates to (on the DR filesystem).
    public var drStore: String { "\(dr)/store" }
    public static let targetName = "dr"
    /// quiesce's own files: never on a volume of the snapshot set.
    public var config: String { "\(root)/quiesce.toml" }
    public var writersDirectory: String { "\(root)/writers.d" }
    public var state: String { "\(root)/state" }
    public var catalog: String { "\(state)/catalog.db" }
    public var hooks: String { "\(root)/hooks" }
    public var logs: String { "\(root)/logs" }
    /// Scratch mounts for checking snapshots.
    public var scratch: String { "\(root)/scratch" }

    public static let volumeName = "vm1"
}

/// Sizes of a lab's files (sparse: they take only what is written).
public struct LabSizes: Sendable {
    public var datastoreBytes: UInt64
    public var imageBytes: UInt64
    public var drBytes: UInt64

    public init(datastoreBytes: UInt64 = 3 << 30, imageBytes: UInt64 = 1 << 30, drBytes: UInt64 = 2 << 30) {
        self.datastoreBytes = datastoreBytes
        self.imageBytes = imageBytes
        self.drBytes = drBytes
    }
}
