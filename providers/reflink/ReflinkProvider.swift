import CQuiesceSys
import Foundation
import QuiesceCore

/// Snapshots image files by reflink (FICLONE) on an XFS (`reflink=1`) or btrfs datastore.
///
/// A snapshot of volume `v` for checkpoint `id` is the immutable file
/// `<v.snapshotDirectory>/<id>.img` (mode 0400): a clone that shares every extent
/// with the live image at the instant of `capture`, so it costs no copy and no
/// space until the live image diverges. Until `commit` it is `<id>.img.partial`.
///
/// A datastore that cannot reflink is refused in `prepare` with the fix; the
/// provider never falls back to copying an image.
public struct ReflinkProvider: SnapshotProvider {
    public let name = "reflink"

    public init() {}

    /// Where the snapshot of `volume` for `checkpointID` lives once committed.
    public static func snapshotPath(_ volume: Volume, checkpointID: String) -> String {
        "\(volume.snapshotDirectory)/\(checkpointID).img"
    }

    /// Where it lives between `capture` and `commit`.
    public static func pendingPath(_ volume: Volume, checkpointID: String) -> String {
        snapshotPath(volume, checkpointID: checkpointID) + ".partial"
    }

    // MARK: prepare

    /// Checks, for every volume, that the image is a regular file, that its snapshot
    /// directory exists (created 0700) on the same filesystem, that this filesystem
    /// can reflink (by cloning a tiny probe file, never the image), and that no
    /// snapshot of this checkpoint exists yet. Leaves nothing behind when it refuses.
    public func prepare(_ volumes: [Volume], checkpointID: String) throws {
        try Self.validate(checkpointID: checkpointID)
        var seen: [String: String] = [:]
        for volume in volumes {
            let final = Self.snapshotPath(volume, checkpointID: checkpointID)
            if let other = seen[final] {
                throw ProviderError(volume: volume.name,
                                    "shares its snapshot directory \(volume.snapshotDirectory) with volume \"\(other)\"",
                                    hint: "give each volume its own snapshot_directory")
            }
            seen[final] = volume.name
        }
        for volume in volumes {
            try prepare(volume, checkpointID: checkpointID)
        }
    }

    private func prepare(_ volume: Volume, checkpointID: String) throws {
        var image = stat()
        guard stat(volume.image, &image) == 0 else {
            let code = errno
            throw ProviderError(volume: volume.name, "cannot use image \(volume.image): \(Self.explain(code))",
                                hint: code == ENOENT ? "check the volume's image path in the config" : nil)
        }
        guard image.st_mode & S_IFMT == S_IFREG else {
            throw ProviderError(volume: volume.name, "image \(volume.image) is not a regular file",
                                hint: "the reflink provider snapshots image files; block devices need another provider")
        }

        let created = try Self.makeDirectory(volume.snapshotDirectory, volume: volume.name)
        do {
            var directory = stat()
            guard stat(volume.snapshotDirectory, &directory) == 0 else {
                throw ProviderError(volume: volume.name,
                                    "cannot use snapshot directory \(volume.snapshotDirectory): \(Self.explain(errno))")
            }
            guard directory.st_dev == image.st_dev else {
                throw ProviderError(
                    volume: volume.name,
                    "snapshot directory \(volume.snapshotDirectory) (\(Self.filesystemName(volume.snapshotDirectory))) "
                        + "is not on the same filesystem as the image \(volume.image) "
                        + "(\(Self.filesystemName(volume.image))): a reflink clone cannot cross filesystems",
                    hint: "set the volume's snapshot_directory to a directory on the image's filesystem "
                        + "(the default is <image directory>/.quiesce/<volume>)")
            }
            for path in [Self.snapshotPath(volume, checkpointID: checkpointID),
                         Self.pendingPath(volume, checkpointID: checkpointID)] where Self.exists(path) {
                throw ProviderError(volume: volume.name,
                                    "a snapshot for checkpoint \(checkpointID) already exists: \(path)",
                                    hint: "checkpoint ids are unique; discard that checkpoint first if it is a leftover")
            }
            try Self.probeReflink(volume)
        } catch {
            // Refused: remove the directories this call created (they are empty).
            for path in created.reversed() { rmdir(path) }
            throw error
        }
    }

    /// Creates `path` and missing parents with mode 0700; returns what it created, outermost first.
    private static func makeDirectory(_ path: String, volume: String) throws -> [String] {
        var missing: [String] = []
        var candidate = path
        while !candidate.isEmpty, candidate != "/", !exists(candidate) {
            missing.append(candidate)
            candidate = (candidate as NSString).deletingLastPathComponent
        }
        var created: [String] = []
        for directory in missing.reversed() {
            if mkdir(directory, 0o700) == 0 {
                created.append(directory)
            } else if errno != EEXIST {
                let code = errno
                for path in created.reversed() { rmdir(path) }
                throw ProviderError(volume: volume, "cannot create snapshot directory \(directory): \(explain(code))")
            }
        }
        var info = stat()
        guard stat(path, &info) == 0, info.st_mode & S_IFMT == S_IFDIR else {
            throw ProviderError(volume: volume, "snapshot directory \(path) is not a directory")
        }
        return created
    }

    /// Clones a one-block temporary file inside the snapshot directory.
    private static func probeReflink(_ volume: Volume) throws {
        let stem = "\(volume.snapshotDirectory)/.quiesce-probe-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let sourcePath = stem + ".src", clonePath = stem + ".clone"
        let source = open(sourcePath, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard source >= 0 else {
            throw ProviderError(volume: volume.name,
                                "cannot write in snapshot directory \(volume.snapshotDirectory): \(explain(errno))")
        }
        defer {
            close(source)
            unlink(sourcePath)
        }
        let block = [UInt8](repeating: 0x51, count: 4096)
        guard block.withUnsafeBytes({ write(source, $0.baseAddress, $0.count) }) == block.count else {
            throw ProviderError(volume: volume.name,
                                "cannot write in snapshot directory \(volume.snapshotDirectory): \(explain(errno))")
        }
        let clone = open(clonePath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard clone >= 0 else {
            throw ProviderError(volume: volume.name,
                                "cannot write in snapshot directory \(volume.snapshotDirectory): \(explain(errno))")
        }
        defer {
            close(clone)
            unlink(clonePath)
        }
        guard quiesce_ficlone(clone, source) == 0 else {
            let code = errno
            if isNoReflink(code) {
                var fs = filesystemName(volume.snapshotDirectory)
                if fs == "xfs" { fs = "xfs without reflink (made without `-m reflink=1`)" }
                throw ProviderError(
                    volume: volume.name,
                    "the datastore of \(volume.image) is \(fs), which cannot make reflink clones "
                        + "(FICLONE: \(explain(code))); quiesce never falls back to a full copy",
                    hint: reflinkFix)
            }
            throw ProviderError(volume: volume.name,
                                "cannot reflink in \(volume.snapshotDirectory) (FICLONE: \(explain(code)))",
                                hint: hint(for: code))
        }
    }

    // MARK: capture

    /// Clones every image into `<id>.img.partial`. Runs inside the hold window:
    /// two opens and one FICLONE per volume, no logging. On any failure removes the
    /// partial files it created and throws.
    public func capture(_ volumes: [Volume], checkpointID: String) throws -> [CapturedSnapshot] {
        try Self.validate(checkpointID: checkpointID)
        var captured: [CapturedSnapshot] = []
        captured.reserveCapacity(volumes.count)
        do {
            for volume in volumes {
                let final = Self.snapshotPath(volume, checkpointID: checkpointID)
                let pending = final + ".partial"
                if Self.exists(final) {
                    throw ProviderError(volume: volume.name,
                                        "a snapshot for checkpoint \(checkpointID) already exists: \(final)")
                }
                let source = open(volume.image, O_RDONLY | O_CLOEXEC)
                guard source >= 0 else {
                    throw ProviderError(volume: volume.name, "cannot open image \(volume.image): \(Self.explain(errno))")
                }
                defer { close(source) }
                let clone = open(pending, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
                guard clone >= 0 else {
                    let code = errno
                    throw ProviderError(volume: volume.name, "cannot create \(pending): \(Self.explain(code))",
                                        hint: code == EEXIST ? "a snapshot for this checkpoint is already pending" : nil)
                }
                defer { close(clone) }
                // Recorded before the clone so that a failed clone is removed too.
                captured.append(CapturedSnapshot(volume: volume, pendingPath: pending, finalPath: final))
                guard quiesce_ficlone(clone, source) == 0 else {
                    let code = errno
                    throw ProviderError(volume: volume.name,
                                        "FICLONE \(volume.image) → \(pending) failed: \(Self.explain(code))",
                                        hint: Self.hint(for: code))
                }
            }
        } catch {
            for snapshot in captured { unlink(snapshot.pendingPath) }
            throw error
        }
        return captured
    }

    // MARK: commit

    /// Makes each clone durable and immutable: fsync, mode 0400, moved to `<id>.img`
    /// (never replacing an existing file), then fsync of the directory.
    public func commit(_ captured: [CapturedSnapshot]) throws -> [SnapshotFile] {
        var files: [SnapshotFile] = []
        var directories: [(path: String, volume: String)] = []
        for snapshot in captured {
            let volume = snapshot.volume.name
            let fd = open(snapshot.pendingPath, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else {
                throw ProviderError(volume: volume, "cannot open captured snapshot \(snapshot.pendingPath): \(Self.explain(errno))")
            }
            var info = stat()
            let failure: (String, Int32)? = {
                if fchmod(fd, 0o400) != 0 { return ("chmod 0400", errno) }
                if fsync(fd) != 0 { return ("fsync", errno) }
                if fstat(fd, &info) != 0 { return ("stat", errno) }
                return nil
            }()
            close(fd)
            if let (operation, code) = failure {
                throw ProviderError(volume: volume, "\(operation) \(snapshot.pendingPath) failed: \(Self.explain(code))",
                                    hint: Self.hint(for: code))
            }
            // link + unlink: an atomic rename that refuses to replace an existing snapshot.
            guard link(snapshot.pendingPath, snapshot.finalPath) == 0 else {
                let code = errno
                throw ProviderError(volume: volume, "cannot move \(snapshot.pendingPath) to \(snapshot.finalPath): \(Self.explain(code))",
                                    hint: code == EEXIST ? "a snapshot of this checkpoint was already committed" : nil)
            }
            unlink(snapshot.pendingPath)
            let directory = (snapshot.finalPath as NSString).deletingLastPathComponent
            if !directories.contains(where: { $0.path == directory }) { directories.append((directory, volume)) }
            files.append(SnapshotFile(volume: volume, image: snapshot.volume.image, path: snapshot.finalPath,
                                      sizeBytes: UInt64(info.st_size)))
        }
        for directory in directories {
            try Self.syncDirectory(directory.path, volume: directory.volume)
        }
        return files
    }

    // MARK: discard / delete

    /// Removes `<id>.img.partial` and `<id>.img` of these volumes; missing files are fine.
    /// Tries every file before reporting the first failure.
    public func discard(_ volumes: [Volume], checkpointID: String) throws {
        try Self.validate(checkpointID: checkpointID)
        var firstError: ProviderError?
        for volume in volumes {
            var removed = false
            for path in [Self.pendingPath(volume, checkpointID: checkpointID),
                         Self.snapshotPath(volume, checkpointID: checkpointID)] {
                if unlink(path) == 0 {
                    removed = true
                } else if errno != ENOENT {
                    firstError = firstError ?? ProviderError(volume: volume.name, "cannot remove \(path): \(Self.explain(errno))")
                }
            }
            if removed {
                do { try Self.syncDirectory(volume.snapshotDirectory, volume: volume.name) } catch let error as ProviderError {
                    firstError = firstError ?? error
                }
            }
        }
        if let firstError { throw firstError }
    }

    /// Deletes one committed snapshot (pruning); already gone is fine. Refuses
    /// anything that is not a `.img` snapshot distinct from its live image.
    public func delete(_ snapshot: SnapshotFile) throws {
        guard snapshot.path.hasSuffix(".img"), snapshot.path != snapshot.image else {
            throw ProviderError(volume: snapshot.volume, "refusing to delete \(snapshot.path): not a reflink snapshot file")
        }
        var file = stat(), image = stat()
        if lstat(snapshot.path, &file) != 0 {
            if errno == ENOENT { return }
            throw ProviderError(volume: snapshot.volume, "cannot delete snapshot \(snapshot.path): \(Self.explain(errno))")
        }
        guard file.st_mode & S_IFMT == S_IFREG else {
            throw ProviderError(volume: snapshot.volume, "refusing to delete \(snapshot.path): not a regular file")
        }
        if stat(snapshot.image, &image) == 0, image.st_dev == file.st_dev, image.st_ino == file.st_ino {
            throw ProviderError(volume: snapshot.volume, "refusing to delete \(snapshot.path): it is the live image \(snapshot.image)")
        }
        guard unlink(snapshot.path) == 0 else {
            if errno == ENOENT { return }
            throw ProviderError(volume: snapshot.volume, "cannot delete snapshot \(snapshot.path): \(Self.explain(errno))")
        }
        try Self.syncDirectory((snapshot.path as NSString).deletingLastPathComponent, volume: snapshot.volume)
    }

    // MARK: helpers

    static let reflinkFix = "put images on an XFS filesystem made with `mkfs.xfs -m reflink=1`, or on btrfs"

    /// A checkpoint id becomes a file name: it must be one.
    private static func validate(checkpointID: String) throws {
        guard !checkpointID.isEmpty, !checkpointID.hasPrefix("."), !checkpointID.contains("/"),
              !checkpointID.utf8.contains(0) else {
            throw ProviderError(volume: nil, "invalid checkpoint id \"\(checkpointID)\": it must be a plain file name")
        }
    }

    private static func exists(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0
    }

    private static func syncDirectory(_ path: String, volume: String?) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else {
            throw ProviderError(volume: volume, "cannot open directory \(path) to fsync it: \(explain(errno))")
        }
        defer { close(fd) }
        guard fsync(fd) == 0 else {
            throw ProviderError(volume: volume, "fsync of directory \(path) failed: \(explain(errno))")
        }
    }

    /// errno values with which FICLONE says "this filesystem (or pair of files) cannot share extents".
    static func isNoReflink(_ code: Int32) -> Bool {
        [EOPNOTSUPP, ENOTSUP, EINVAL, ENOTTY, EXDEV, ENOSYS].contains(code)
    }

    private static func hint(for code: Int32) -> String? {
        switch code {
        case _ where isNoReflink(code): reflinkFix
        case ENOSPC, EDQUOT: "free space on the datastore (old snapshots pin the blocks the images have since overwritten)"
        case EROFS: "the datastore is mounted read-only"
        case EACCES, EPERM: "run quiesce as root"
        default: nil
        }
    }

    static func explain(_ code: Int32) -> String { String(cString: strerror(code)) }

    /// The name of the filesystem holding `path` (from statfs f_type), e.g. `ext4`, `tmpfs`, `xfs`.
    static func filesystemName(_ path: String) -> String {
        guard let magic = filesystemMagic(path) else { return "an unknown filesystem" }
        return filesystemNames[magic] ?? String(format: "a filesystem of type 0x%llx", magic)
    }

    /// statfs(2) f_type. Glibc's Swift module does not export statfs, so it is looked
    /// up by name; f_type is the first field (a C `long`) of `struct statfs` on 64-bit Linux.
    static func filesystemMagic(_ path: String) -> UInt64? {
        typealias StatFS = @convention(c) (UnsafePointer<CChar>, UnsafeMutableRawPointer) -> Int32
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "statfs") else { return nil }
        let call = unsafeBitCast(symbol, to: StatFS.self)
        // sizeof(struct statfs) is 120 on x86_64 and aarch64; leave room.
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 512, alignment: 16)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: 512)
        guard path.withCString({ call($0, buffer) }) == 0 else { return nil }
        return UInt64(UInt32(truncatingIfNeeded: buffer.load(as: Int.self)))
    }

    /// statfs f_type magic numbers (linux/magic.h) of filesystems an image could sit on.
    private static let filesystemNames: [UInt64: String] = [
        0xEF53: "ext4",
        0x5846_5342: "xfs",
        0x9123_683E: "btrfs",
        0x0102_1994: "tmpfs",
        0x8584_58F6: "ramfs",
        0x6969: "nfs",
        0x794C_7630: "overlay",
        0x6573_5546: "a FUSE filesystem",
        0xFF53_4D42: "cifs",
        0xFE53_4D42: "smb2",
        0x517B: "smb",
        0x0102_1997: "9p",
        0x2FC1_2FC1: "zfs",
        0xF2F5_2010: "f2fs",
        0x5346_544E: "ntfs",
        0x7366_746E: "ntfs3",
        0x4D44: "vfat",
        0x2011_BAB0: "exfat",
        0x3153_464A: "jfs",
        0x5265_4973: "reiserfs",
        0x3434: "nilfs2",
        0x0116_1970: "gfs2",
        0x7461_636F: "ocfs2",
        0xCA45_1A4E: "bcachefs",
        0x00C3_6400: "ceph",
        0x7371_7368: "squashfs",
        0x9660: "iso9660",
    ]
}

extension ReflinkProvider {
    /// Measured on XFS (2 cores, loop device): FICLONE costs about 10–18 µs per extent of the
    /// source (26 ms at 2,000 extents, 2.7 s at 130,000, 6.6 s at 377,000 in bench/delta's
    /// checkpoints), and the clone runs inside the hold window. 20 µs is the conservative figure.
    public static let cloneCostPerExtent: Duration = .microseconds(20)

    /// Warns when an image is so fragmented that cloning it would take more than a quarter
    /// of the hold limit.
    public func holdWindowRisks(_ volumes: [Volume], holdTimeout: Duration) -> [String] {
        volumes.compactMap { volume in
            let fd = open(volume.image, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return nil }
            defer { close(fd) }
            let extents = quiesce_fiemap_count(fd)
            guard extents > 0 else { return nil }
            let estimate = Self.cloneCostPerExtent * Int(extents)
            guard estimate * 4 > holdTimeout else { return nil }
            return "volume \"\(volume.name)\": \(volume.image) has \(extents) extents; cloning it takes about "
                + "\(formatDuration(estimate)) inside the hold window (hold_timeout \(formatDuration(holdTimeout))). "
                + "Defragment it when no checkpoint runs (xfs_fsr \(volume.image); a sparse image must be written "
                + "whole first, holes and unwritten extents keep it fragmented), then replicate once with "
                + "`quiesce replicate --full-compare` (defragmenting moves every block); see docs/operations.md"
        }
    }
}
