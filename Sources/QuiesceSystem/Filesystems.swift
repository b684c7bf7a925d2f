import Foundation
import QuiesceCore

/// Making filesystems on a device or an image file (`mkfs.*`). Each overwrites
/// whatever `target` held; the tools refuse a target that is mounted.
public enum Filesystems {
    static let timeout: Duration = .seconds(120)

    /// XFS, with reflink (the datastore: FICLONE snapshots) or without (to test refusal).
    /// XFS needs at least 300 MiB.
    public static func makeXFS(_ target: String, reflink: Bool = true, label: String? = nil) async throws {
        var arguments = ["-f", "-q", "-m", "reflink=\(reflink ? 1 : 0)"]
        if let label { arguments += ["-L", label] }
        try await SystemCommand.run("mkfs.xfs", arguments + [target], timeout: timeout,
                                    hint: "apt-get install xfsprogs; XFS needs a target of at least 300 MiB")
    }

    /// ext4 (a guest filesystem, or a datastore that cannot reflink). Inode tables and
    /// journal are initialized now rather than by a background thread after mount, so
    /// that a quiet guest does not keep writing to its image.
    public static func makeExt4(_ target: String, label: String? = nil) async throws {
        var arguments = ["-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
        if let label { arguments += ["-L", label] }
        try await SystemCommand.run("mkfs.ext4", arguments + [target], timeout: timeout,
                                    hint: "apt-get install e2fsprogs")
    }

    /// btrfs (a datastore that reflinks). btrfs needs at least about 110 MiB.
    public static func makeBtrfs(_ target: String, label: String? = nil) async throws {
        var arguments = ["-f", "-q"]
        if let label { arguments += ["-L", label] }
        try await SystemCommand.run("mkfs.btrfs", arguments + [target], timeout: timeout,
                                    hint: "apt-get install btrfs-progs; btrfs needs a target of at least 110 MiB")
    }
}
